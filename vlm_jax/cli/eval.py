"""vlm-eval --config configs/<family>.py:<size> --workdir DIR [--task NAME ...] [--step N]

Evaluates the newest (or --step) checkpoint in DIR on held-out tasks (default: every task of
the config's family; `--task list` prints them), prints the metrics and a few
generations beside the truth, and appends eval/<task>/<metric> at the checkpoint's step to
DIR's metrics.jsonl / TensorBoard. --random-init evaluates freshly initialised weights
instead (a smoke test of the evaluation path: the figures mean nothing).

--coco-captions FILE --image-dir DIR captions a COCO-format benchmark (captions_*.json and
its images) instead, scored against every reference (eval/coco_captions/...).

--vqa-questions Q --vqa-annotations A --vqa-images DIR answers a VQAv2 / OK-VQA-format
benchmark (v2_OpenEnded_*_questions.json, v2_mscoco_*_annotations.json, images named
<--vqa-image-prefix><12-digit image id>.jpg) in the family's own prompt format
(MiniGPT-v2 `[vqa] ...`, Flamingo `Question:... Short answer:`, CogAgent `Question: ...
Answer:`), scored with the official VQA accuracy (eval/vqa/...). --vqa-shots N asks each
question after N in-context examples chosen by RICES (the model's vision features) as
OpenFlamingo does (Flamingo only), from the benchmark itself (never the question itself) or
from --vqa-shots-from QUESTIONS ANNOTATIONS IMAGE_DIR (e.g. the train split, images named
<--vqa-shots-image-prefix><id>.jpg); --vqa-text-only-shots shows them without their images
(OpenFlamingo's "0-shot" rows are --vqa-shots 2 --vqa-text-only-shots).

Tokenizer: config.data.vocab_path, else the one `vlm-convert import --tokenizer` recorded
in DIR (a released model's own), else the shipped sample model; its ids are printed.

--refcoco FILE --refcoco-images DIR asks for the box of each referring expression of a
RefCOCO/+/g-style file in the family's prompt and box format (MiniGPT-v2 `[refer] give me
the location of ...`, CogAgent `Where is ...? answer in [[x0,y0,x1,y1]] format.`), scored
by IoU >= 0.5 (eval/refcoco/...).
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
  parser.add_argument("--expert-labels", default="",
                      help="Prismer with experts: the experts' labels of those images, "
                      "DIR/<expert>/<image file stem>.png (+ .json naming label-map ids), as "
                      "Prismer's expert scripts write them (edge is computed here)")
  parser.add_argument("--vqa-questions", default="",
                      help="VQAv2/OK-VQA questions json (v2_OpenEnded_*_questions.json)")
  parser.add_argument("--vqa-annotations", default="",
                      help="VQAv2/OK-VQA annotations json (v2_mscoco_*_annotations.json)")
  parser.add_argument("--vqa-images", default="", help="the images of --vqa-questions")
  parser.add_argument("--vqa-image-prefix", default="COCO_val2014_",
                      help="image file name before the 12-digit image id")
  parser.add_argument("--vqa-shots", type=int, default=0,
                      help="in-context examples per VQA question, chosen by RICES")
  parser.add_argument("--vqa-shots-from", nargs=3, default=None,
                      metavar=("QUESTIONS", "ANNOTATIONS", "IMAGE_DIR"),
                      help="the pool of --vqa-shots (default: the benchmark itself)")
  parser.add_argument("--vqa-text-only-shots", action="store_true",
                      help="show the --vqa-shots without their images (OpenFlamingo's "
                           "0-shot rows: --vqa-shots 2 --vqa-text-only-shots)")
  parser.add_argument("--vqa-shots-image-prefix", default="COCO_train2014_",
                      help="image file name before the id in --vqa-shots-from's directory")
  parser.add_argument("--refcoco", default="",
                      help="RefCOCO/+/g-style referring expressions (json or json lines)")
  parser.add_argument("--refcoco-images", default="", help="the images of --refcoco")
  config, args = common.parse_with_config(parser, argv)

  import absl.flags  # grain's worker processes read absl flags (DESIGN.md gotchas)
  absl.flags.FLAGS.mark_as_parsed()
  import jax
  from vlm_jax import distributed
  distributed.initialize()  # a multi-process launch: before anything touches a device
  from vlm_jax.evaluation import coco, family_benchmarks, runner, tasks as tasks_lib
  from vlm_jax.train import loop, metrics, run_vocab

  try:  # the run's recorded tokenizer (vlm-convert import --tokenizer) unless the config's
    config, vocab = run_vocab.resolve(config, args.workdir)
  except (OSError, ValueError) as e:
    parser.error(str(e))
  if args.task == ["list"]:
    print("\n".join(tasks_lib.tasks_for(config)))
    return
  if jax.process_index() == 0:
    print(run_vocab.describe(vocab))
  if bool(args.vqa_questions) != bool(args.vqa_annotations):
    parser.error("--vqa-questions and --vqa-annotations go together")
  if (args.vqa_shots or args.vqa_shots_from) and not args.vqa_questions:
    parser.error("--vqa-shots and --vqa-shots-from need --vqa-questions")
  if args.vqa_shots < 0 or ((args.vqa_shots_from or args.vqa_text_only_shots) and
                            not args.vqa_shots):
    parser.error("--vqa-shots must be a positive number of examples with --vqa-shots-from "
                 "or --vqa-text-only-shots")
  chosen = [flag for flag, value in (("--task", args.task), ("--coco-captions",
                                                              args.coco_captions),
                                      ("--vqa-questions", args.vqa_questions),
                                      ("--refcoco", args.refcoco)) if value]
  if len(chosen) > 1:
    parser.error(f"pass one of --task, --coco-captions, --vqa-questions, --refcoco (got "
                 f"{', '.join(chosen)})")
  try:
    if args.coco_captions:
      coco.caption_task(config)
      names = [coco.TASK_NAME]
    elif args.vqa_questions:
      family_benchmarks.family_module(config, family_benchmarks.VQA, args.vqa_shots)
      names = [family_benchmarks.VQA]
    elif args.refcoco:
      family_benchmarks.family_module(config, family_benchmarks.REFER)
      names = [family_benchmarks.REFCOCO]
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
  sizes = {"num_examples": args.num_examples, "batch_size": args.batch_size}
  if args.coco_captions or args.vqa_questions or args.refcoco:
    try:
      if args.coco_captions:
        scalars, samples = runner.evaluate_benchmark(
            trainer, state, coco.TASK_NAME, coco.evaluate, args.coco_captions, args.image_dir,
            expert_labels=args.expert_labels, **sizes)
      elif args.vqa_questions:
        scalars, samples = runner.evaluate_benchmark(
            trainer, state, family_benchmarks.VQA, family_benchmarks.evaluate_vqa,
            args.vqa_questions, args.vqa_annotations, args.vqa_images,
            image_prefix=args.vqa_image_prefix, shots=args.vqa_shots,
            shots_from=args.vqa_shots_from and (*args.vqa_shots_from,
                                                args.vqa_shots_image_prefix),
            text_only_shots=args.vqa_text_only_shots, **sizes)
      else:
        scalars, samples = runner.evaluate_benchmark(
            trainer, state, family_benchmarks.REFCOCO, family_benchmarks.evaluate_refcoco,
            args.refcoco, args.refcoco_images, **sizes)
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
