"""`vlm-data`: generate sample data, train the sample tokenizer, ingest, inspect.

  vlm-data generate --output ~/.cache/vlm_jax/sample_data      # writes <output>/synthetic
  vlm-data train-tokenizer --output vlm_jax/data/tokenizer/sample  # writes sample.model
  vlm-data inspect pretrain_simvlm --num 4                      # examples + realised rates
  vlm-data inspect /path/to/shards                              # any directory we can read
  vlm-data inspect /path/to/ingested --config configs/minigpt_v2.py:tiny  # + as trained
  vlm-data inspect --config configs/examples/flamingo_blend.py \
      --config.data.tasks_module=my_tasks        # the config's mixture + realised rates
  vlm-data inspect "tfds:coco_captions:1.1.0 rate=1; /data/laion rate=2" \
      --config configs/simvlm.py:tiny            # a mixture written as on the command line
  vlm-data ingest --format mmc4 --input 'docs/*.jsonl' --output out/mmc4
  vlm-data ingest --format img2dataset --input 'pairs/*.tar' --output out/pairs \
      --min-image-side 64 --min-meta similarity=0.28 --dedup image,url \
      --runner beam --beam_option direct_num_workers=8 \
      --beam_option direct_running_mode=multi_processing
  vlm-data experts --input 'shards/*.tar' --output out/labelled --experts edge,depth \
      --labels /data/expert_labels --runner beam                # Prismer expert labels
  vlm-data ingest --format img2dataset --input 'gs://b/laion/*.tar' --output gs://b/pairs \
      --runner beam --beam_option runner=DataflowRunner --beam_option project=P \
      --beam_option region=us-central1 --beam_option temp_location=gs://b/tmp \
      --beam_option setup_file=./setup.py [--dry-run]         # Dataflow (data/README.md)
"""
import argparse
import dataclasses
import json
import sys
import time

from vlm_jax import storage


def _generate(args):
  from vlm_jax.data.synthetic import sample_data  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(sample_data.SyntheticSizes)}
  sizes = sample_data.SyntheticSizes(**{k: v for k, v in vars(args).items()
                                      if k in fields and v is not None})
  start = time.time()
  path = sample_data.ensure_sample_data(args.output, sizes)
  print(f"sample data in {path} ({time.time() - start:.1f} s)")


def _train_tokenizer(args):
  from vlm_jax.data.synthetic import tokenizer  # pylint: disable=g-import-not-at-top
  print(tokenizer.train(args.output, args.vocab_size))


def _inspect(args):
  """A directory's records; a task, mixture or (with --config) ingested directory, TFDS
  dataset, seqio task or mixture expression, or the config's own mixture, as the family's
  training examples, with realised mixture proportions."""
  from vlm_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from vlm_jax.data import catalog  # pylint: disable=g-import-not-at-top
  from vlm_jax.inspection import common, data  # pylint: disable=g-import-not-at-top
  if args.name and storage.isdir(args.name):
    what, records = data.directory_records(args.name, args.num)
    print(f"{args.name}: {what}")
    print("\n".join(data.record_lines(r) for r in records))
    if not (args.config and catalog.is_ingested(args.name)):
      return
  try:
    if args.config:
      config = config_lib.load_config(args.config, args.overrides)
    elif args.name:
      config = common.family_config(data.family_of(args.name), "tiny")
    else:
      raise ValueError("name a task, mixture or directory, or pass --config")
    if args.name:
      config.data.mixture = args.name
    if args.data_dir:
      config.data.data_dir = args.data_dir
    print("\n".join(data.stream_lines(config, args.num, args.mixture_examples)))
  except (KeyError, ValueError) as e:  # config.ConfigError, mixture.MixtureError, ...
    message = str(e).strip("'")  # a KeyError's text comes quoted
    sys.exit(f"vlm-data: error: {message}")


def _filters(args):
  from vlm_jax.data.ingest import filters  # pylint: disable=g-import-not-at-top
  return filters.Filters.from_strings(
      min_image_side=args.min_image_side, max_side_ratio=args.max_side_ratio,
      min_caption_words=args.min_caption_words, max_caption_words=args.max_caption_words,
      min_meta=args.min_meta, dedup=args.dedup)


def _ingest(args):
  from vlm_jax.data import ingest  # pylint: disable=g-import-not-at-top
  manifest = ingest.run(args.format, args.input, args.output, runner=args.runner,
                        beam_options=args.beam_option, shard_size=args.shard_size,
                        min_similarity=args.min_similarity, max_images=args.max_images,
                        image_tars=args.images, max_bad_fraction=args.max_bad_fraction,
                        max_pixels=args.max_pixels, dry_run=args.dry_run,
                        filters=_filters(args), experts=args.experts)
  print(json.dumps(manifest, indent=2))


def _add_runner_args(parser):
  parser.add_argument("--runner", choices=("local", "beam"), default="local",
                      help="local: one process; beam: an Apache Beam pipeline (the [beam] "
                      "extra), DirectRunner unless --beam_option runner=... says otherwise")
  parser.add_argument("--beam_option", "--beam-option", action="append", default=[],
                      metavar="KEY=VALUE", help="Beam pipeline option, repeatable, e.g. "
                      "direct_num_workers=8, direct_running_mode=multi_processing, "
                      "runner=FlinkRunner (see data/README.md)")
  parser.add_argument("--shard-size", type=int, default=10_000, help="records per shard")
  parser.add_argument("--dry-run", action="store_true", help="--runner beam: build the "
                      "pipeline (on Dataflow: the job request, not submitted), print it and "
                      "write nothing")


def _experts(args):
  """The ingest with a labeller, over an ingested directory or img2dataset tars."""
  from vlm_jax.data import ingest, records  # pylint: disable=g-import-not-at-top
  from vlm_jax.data.ingest import experts, labellers  # pylint: disable=g-import-not-at-top
  names = args.experts.split(",")
  if all(n in experts.ALL_EXPERTS for n in names):  # Prismer's experts
    spec = labellers.experts_spec(names, args.labels)
  elif args.labels:
    raise ValueError(f"--labels is for Prismer's experts {experts.ALL_EXPERTS}, not "
                     f"--experts {args.experts!r}")
  else:  # any labeller spec (labellers.py)
    spec = args.experts
  if storage.exists(storage.join(args.input, records.MANIFEST)):
    fmt, pattern = "arrayrecord", storage.join(args.input, "*.array_record")
  else:
    fmt, pattern = "img2dataset", args.input
  manifest = ingest.run(fmt, pattern, args.output, runner=args.runner,
                        beam_options=args.beam_option, shard_size=args.shard_size,
                        dry_run=args.dry_run, experts=spec)
  print(json.dumps(manifest, indent=2))


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
  tok.add_argument("--output", default="vlm_jax/data/tokenizer/sample",
                   help="model path prefix")
  tok.add_argument("--vocab-size", type=int, default=1024)
  tok.set_defaults(run=_train_tokenizer)

  ins = sub.add_parser("inspect", help="print examples of a task, mixture or directory")
  ins.add_argument("name", nargs="?", default="", help="a family's task or mixture name, a "
                   "directory of shards, or (with --config) a seqio task, tfds:dataset or "
                   "mixture expression (vlm_jax/data/mixture.py); default: --config's mixture")
  ins.add_argument("--config", default="", help="configs/<family>.py:<size>: read the "
                   "name with this family (default: the family that declares it, tiny); "
                   "--config.a.b=value overrides it")
  ins.add_argument("--data-dir", default="")
  ins.add_argument("--num", type=int, default=3)
  ins.add_argument("--mixture-examples", type=int, default=2000,
                   help="examples drawn to report a mixture's realised proportions")
  ins.set_defaults(run=_inspect)

  ing = sub.add_parser("ingest", help="convert source files to ArrayRecord shards")
  ing.add_argument("--format", required=True, choices=(
      "img2dataset", "img2dataset-tfrecord", "mmc4", "obelics", "text"))
  ing.add_argument("--input", required=True, help="glob of input files")
  ing.add_argument("--output", required=True, help="output directory")
  _add_runner_args(ing)
  ing.add_argument("--min-similarity", type=float, default=0.24,
                   help="MMC4: drop images whose matched_sim is below this")
  ing.add_argument("--max-images", type=int, default=6, help="MMC4/OBELICS: per document")
  ing.add_argument("--images", default="", help="MMC4/OBELICS: glob of img2dataset tars "
                   "holding the documents' images (by file name / url)")
  ing.add_argument("--max-bad-fraction", type=float, default=0.1,
                   help="fail when more of an input file's records than this are bad")
  ing.add_argument("--max-pixels", type=int, default=64_000_000,
                   help="images with more pixels are bad records (decompression bombs)")
  flt = ing.add_argument_group("filters (the same in both runners)")
  flt.add_argument("--min-image-side", type=int, default=0, help="pixels, shorter side")
  flt.add_argument("--max-side-ratio", type=float, default=0.0, help="longer/shorter side")
  flt.add_argument("--min-caption-words", type=int, default=0)
  flt.add_argument("--max-caption-words", type=int, default=0, help="0 = no limit")
  flt.add_argument("--min-meta", action="append", default=[], metavar="FIELD=NUMBER",
                   help="pairs: keep records whose metadata FIELD is at least NUMBER, "
                   "e.g. img2dataset's similarity=0.28 (repeatable)")
  flt.add_argument("--dedup", default="", help="remove later duplicates by 'image' "
                   "(SHA-256 of the bytes), 'url' (metadata url) or 'image,url'")
  ing.add_argument("--experts", default="", help="per-record labeller: a name from "
                   "vlm_jax.data.labellers or package.module:factory, optionally =ARG")
  ing.set_defaults(run=_ingest)

  exp = sub.add_parser("experts", help="label images with expert outputs (Prismer): the "
                       "ingest with a labeller")
  exp.add_argument("--input", required=True,
                   help="an ingested directory or a glob of img2dataset tars")
  exp.add_argument("--output", required=True, help="output directory (a task by its path)")
  exp.add_argument("--experts", required=True, help="Prismer's experts, comma-separated: "
                   "depth, normal, edge, seg, obj_detection, ocr_detection; or any labeller "
                   "spec (a name from vlm_jax.data.labellers or package.module:factory[=ARG])")
  exp.add_argument("--labels", default="", help="labels computed elsewhere: "
                   "<dir>/<expert>/<key>.png (+ <key>.json naming label-map ids); an image "
                   "whose label is missing is a bad record (counted, skipped)")
  _add_runner_args(exp)
  exp.set_defaults(run=_experts)
  return parser


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  # --config.a.b=value overrides (inspect), as vlm-train takes them
  overrides = [a[len("--config."):].partition("=")[::2] for a in argv
               if a.startswith("--config.")]
  args = build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
  args.overrides = overrides
  args.run(args)


if __name__ == "__main__":
  main()
