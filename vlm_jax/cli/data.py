"""`vlm-data`: generate sample data, train the sample tokenizer, ingest, inspect.

  vlm-data generate --output ~/.cache/vlm_jax/sample_data      # writes <output>/synthetic
  vlm-data train-tokenizer --output data/tokenizer/sample      # writes sample.model
  vlm-data inspect pretrain_simvlm --num 4                      # examples + realised rates
  vlm-data inspect /path/to/shards                              # any directory we can read
  vlm-data ingest --format mmc4 --input 'docs/*.jsonl' --output out/mmc4
  vlm-data experts --input 'shards/*.tar' --output out/labelled --experts edge,depth \
      --labels /data/expert_labels                              # Prismer expert labels
"""
import argparse
import dataclasses
import json
import sys
import time


def _generate(args):
  from vlm_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(synthetic.SyntheticSizes)}
  sizes = synthetic.SyntheticSizes(**{k: v for k, v in vars(args).items()
                                      if k in fields and v is not None})
  start = time.time()
  path = synthetic.ensure_sample_data(args.output, sizes)
  print(f"sample data in {path} ({time.time() - start:.1f} s)")


def _train_tokenizer(args):
  from vlm_jax.data import tokenizer_train  # pylint: disable=g-import-not-at-top
  print(tokenizer_train.train(args.output, args.vocab_size))


def _inspect(args):
  from vlm_jax.data import inspect as inspect_lib  # pylint: disable=g-import-not-at-top
  inspect_lib.run(args.name, data_dir=args.data_dir, split=args.split, num=args.num,
                  mixture_examples=args.mixture_examples)


def _ingest(args):
  from vlm_jax.data import ingest  # pylint: disable=g-import-not-at-top
  stats = ingest.run(args.format, args.input, args.output, shard_size=args.shard_size,
                     min_similarity=args.min_similarity, max_images=args.max_images,
                     image_tars=args.images)
  print(json.dumps(stats, indent=2))


def _experts(args):
  from vlm_jax.data import prismer  # pylint: disable=g-import-not-at-top
  stats = prismer.label_dataset(args.input, args.output, args.experts.split(","),
                                label_dir=args.labels, shard_size=args.shard_size)
  print(json.dumps(stats, indent=2))


def build_parser():
  parser = argparse.ArgumentParser(prog="vlm-data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  gen = sub.add_parser("generate", help="write the synthetic sample data set")
  gen.add_argument("--output", default="", help="data dir (default $VLM_JAX_DATA_DIR or "
                   "~/.cache/vlm_jax/sample_data); data goes to <output>/synthetic")
  for name in ("train_pairs", "validation_pairs", "train_docs", "validation_docs",
               "shard_size", "image_size", "seed"):
    gen.add_argument("--" + name.replace("_", "-"), type=int, dest=name)
  gen.set_defaults(run=_generate)

  tok = sub.add_parser("train-tokenizer", help="retrain the sample SentencePiece model")
  tok.add_argument("--output", default="data/tokenizer/sample", help="model path prefix")
  tok.add_argument("--vocab-size", type=int, default=1024)
  tok.set_defaults(run=_train_tokenizer)

  ins = sub.add_parser("inspect", help="print examples of a task, mixture or directory")
  ins.add_argument("name", help="catalog task/mixture name, or a directory of shards")
  ins.add_argument("--data-dir", default="")
  ins.add_argument("--split", default="train")
  ins.add_argument("--num", type=int, default=3)
  ins.add_argument("--mixture-examples", type=int, default=2000,
                   help="examples drawn to report a mixture's realised proportions")
  ins.set_defaults(run=_inspect)

  ing = sub.add_parser("ingest", help="convert source files to ArrayRecord shards")
  ing.add_argument("--format", required=True, choices=(
      "img2dataset", "img2dataset-tfrecord", "mmc4", "obelics", "text"))
  ing.add_argument("--input", required=True, help="glob of input files")
  ing.add_argument("--output", required=True, help="output directory")
  ing.add_argument("--shard-size", type=int, default=10_000)
  ing.add_argument("--min-similarity", type=float, default=0.24,
                   help="MMC4: drop images whose matched_sim is below this")
  ing.add_argument("--max-images", type=int, default=6, help="MMC4/OBELICS: per document")
  ing.add_argument("--images", default="", help="MMC4/OBELICS: glob of img2dataset tars "
                   "holding the documents' images (by file name / url)")
  ing.set_defaults(run=_ingest)

  exp = sub.add_parser("experts", help="label images with expert outputs (Prismer)")
  exp.add_argument("--input", required=True,
                   help="an ingested directory or a glob of img2dataset tars")
  exp.add_argument("--output", required=True, help="output directory (a task by its path)")
  exp.add_argument("--experts", required=True, help="comma-separated: depth, normal, edge, "
                   "seg, obj_detection, ocr_detection")
  exp.add_argument("--labels", default="", help="labels computed elsewhere: "
                   "<dir>/<expert>/<key>.png (+ <key>.json naming label-map ids)")
  exp.add_argument("--shard-size", type=int, default=10_000)
  exp.set_defaults(run=_experts)
  return parser


def main(argv=None):
  args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
  args.run(args)


if __name__ == "__main__":
  main()
