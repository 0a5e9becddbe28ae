"""vlm-eval --config configs/<family>.py:<size> --workdir DIR [--task NAME ...] [--step N]

Evaluates the newest (or --step) checkpoint in DIR on held-out tasks (default: every task of
the config's family; `--task list` prints them), prints the metrics and a few
generations beside the truth, and appends eval/<task>/<metric> at the checkpoint's step to
DIR's metrics.jsonl / TensorBoard. --random-init evaluates freshly initialised weights
instead (a smoke test of the evaluation path: the figures mean nothing).

--coco-captions FILE --image-dir DIR captions a COCO-format benchmark (captions_*.json and
its images) instead, scored against every reference (eval/coco_captions/...).
"""
import argparse
import sys

from vlm_jax.cli import common


def main(argv=None):
  parser = argparse.ArgumentParser(prog="vlm-eval", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the training run's directory")
  parser.add_argument("--task", action="append", default=[],
                      help="evaluation task name (repeatable; 'list' lists them)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  parser.add_argument("--num-examples", type=int, default=0,
                      help="held-out examples per task (0: the task's default)")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--num-samples", type=int, default=4,
                      help="generations to print per task beside the truth")
  parser.add_argument("--random-init", action="store_true",
                      help="evaluate freshly initialised weights (no checkpoint needed)")
  parser.add_argument("--coco-captions", default="",
                      help="a COCO captions json (e.g. captions_val2014.json) to caption")
  parser.add_argument("--image-dir", default="", help="the images of --coco-captions")
  config, args = common.parse_with_config(parser, argv)

  import absl.flags  # grain's worker processes read absl flags (DESIGN.md gotchas)
  absl.flags.FLAGS.mark_as_parsed()
  import jax
  from vlm_jax import distributed
  distributed.initialize()  # a multi-process launch: before anything touches a device
  from vlm_jax.evaluation import coco, runner, tasks as tasks_lib
  from vlm_jax.train import loop, metrics

  if args.task == ["list"]:
    print("\n".join(tasks_lib.tasks_for(config)))
    return
  try:
    if args.coco_captions:
      if args.task:
        parser.error("--coco-captions replaces --task; pass one or the other")
      coco.caption_task(config)
      names = [coco.TASK_NAME]
    else:
      names = runner.task_names(config, args.task)
  except ValueError as e:
    parser.error(str(e))
  trainer = loop.Trainer(config, args.workdir)
  with trainer.mesh_context():
    if args.random_init:
      step, state = 0, trainer.factory.create(jax.random.key(config.seed))
    else:
      step = trainer.checkpointer.latest_step() if args.step is None else args.step
      if step is None:
        print(f"vlm-eval: error: no checkpoint in {trainer.checkpointer.directory} "
              "(train first, or pass --random-init)", file=sys.stderr)
        sys.exit(1)
      if step not in trainer.checkpointer.manager.all_steps():
        print(f"vlm-eval: error: no checkpoint for step {step} in "
              f"{trainer.checkpointer.directory} (have {trainer.checkpointer.manager.all_steps()})",
              file=sys.stderr)
        sys.exit(1)
      # The weights only: the data state was saved per process, by however many there were.
      state = trainer.checkpointer.restore(step, trainer.factory.abstract_with_shardings())
  if args.coco_captions:
    try:
      scalars, samples = runner.evaluate_coco(trainer, state, args.coco_captions,
                                              args.image_dir, num_examples=args.num_examples,
                                              batch_size=args.batch_size)
    except (OSError, ValueError) as e:
      print(f"vlm-eval: error: {e}", file=sys.stderr)
      sys.exit(1)
  else:
    scalars, samples = runner.evaluate(trainer, state, names, num_examples=args.num_examples,
                                       batch_size=args.batch_size)
  if jax.process_index() == 0:
    for name in names:
      values = {k.split("/")[-1]: v for k, v in scalars.items() if k.startswith(f"eval/{name}/")}
      print(f"{name} (step {step}): " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
      for truth, generated in samples[name][:args.num_samples]:
        print(f"  {'=' if truth == generated else ' '} truth: {truth!r}\n    model: {generated!r}")
  writer = metrics.MetricWriter(args.workdir)
  writer.write(step, scalars)
  writer.close()


if __name__ == "__main__":
  main()
