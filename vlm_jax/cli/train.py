"""vlm-train --config configs/<family>.py:<size> --workdir DIR [--config.a.b=value ...]

Trains, resuming from the newest complete checkpoint in DIR, then shows what the model
generates for a few held-out examples beside the truth.

Exit status (docs/reliability.md): 0 done; 1 crash (traceback); 2 bad config, before anything
is compiled; 3 non-finite loss/gradient (config.nonfinite.policy=stop); 74 workdir not
writable or full, or a checkpoint save failed (the previous checkpoint is intact); 75
preempted after saving a checkpoint: rerun the same command to resume; 76 hung (the
watchdog found the loop stuck, printed every thread's stack and ended the process): rerun
the same command to resume from the newest checkpoint.
"""
import argparse
import contextlib
import io
import sys

from vlm_jax.cli import common

EXIT_CONFIG = 2
EXIT_NONFINITE = 3  # do not restart: the same data and state would fail again
EXIT_WORKDIR = 74  # sysexits EX_IOERR: restart only after fixing the disk
EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: restart the same command, it resumes
EXIT_HUNG = 76  # train/watchdog.py exits the process with it: restart, it resumes


def _fail(message: str, code: int):
  print(f"vlm-train: error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="vlm-train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics and logs go here")
  parser.add_argument("--num-samples", type=int, default=8,
                      help="held-out examples to generate for after training (0: none)")
  config, args = common.parse_with_config(parser, argv)

  import absl.flags  # grain's worker processes read absl flags (DESIGN.md gotchas)
  absl.flags.FLAGS.mark_as_parsed()
  import jax
  from vlm_jax import distributed, storage
  distributed.initialize()  # a multi-process launch: before anything touches a device
  from vlm_jax.config import ConfigError
  from vlm_jax.train import checkpoint, init_from, loop, preemption, run_vocab, validate

  try:
    validate.check_workdir_writable(args.workdir)
    config, _ = run_vocab.resolve(config, args.workdir)  # an imported run's tokenizer
    if jax.process_index() == 0:
      storage.write_atomic(storage.join(args.workdir, "config.json"),
                           config.to_json_best_effort(indent=2))
    trainer = loop.Trainer(config, args.workdir)
    state = trainer.run()
  except (ConfigError, init_from.InitFromError) as e:
    _fail(str(e), EXIT_CONFIG)
  except loop.NonFiniteError as e:
    _fail(str(e), EXIT_NONFINITE)
  except (validate.WorkdirError, checkpoint.CheckpointSaveError) as e:
    _fail(str(e), EXIT_WORKDIR)
  except checkpoint.CheckpointRestoreError as e:
    _fail(str(e), 1)
  except preemption.Preempted as e:
    _fail(str(e), EXIT_PREEMPTED)
  from vlm_jax import samples  # pylint: disable=g-import-not-at-top
  if args.num_samples and samples.generation_task(config):
    # Every process decodes (the state is sharded across all of them); process 0 prints.
    with contextlib.redirect_stdout(sys.stdout if jax.process_index() == 0 else io.StringIO()):
      samples.show_generations(trainer, state, args.num_samples)


if __name__ == "__main__":
  main()
