"""vlm-train --config configs/<family>.py:<size> --workdir DIR [--config.a.b=value ...]

Trains, resuming from the newest checkpoint in DIR, then shows what the model generates for a
few held-out examples beside the truth.
"""
import argparse
import contextlib
import io
import os
import sys

from vlm_jax.cli import common

EXIT_NONFINITE = 3


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
  from vlm_jax import distributed
  distributed.initialize()  # a multi-process launch: before anything touches a device
  from vlm_jax.train import loop

  os.makedirs(args.workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(args.workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  try:
    trainer = loop.Trainer(config, args.workdir)
    state = trainer.run()
  except loop.NonFiniteError as e:
    print(f"vlm-train: error: {e}", file=sys.stderr)
    sys.exit(EXIT_NONFINITE)
  if args.num_samples and hasattr(trainer.model, "encode"):
    from vlm_jax import samples
    # Every process decodes (the state is sharded across all of them); process 0 prints.
    with contextlib.redirect_stdout(sys.stdout if jax.process_index() == 0 else io.StringIO()):
      samples.show_generations(trainer, state, args.num_samples)


if __name__ == "__main__":
  main()
