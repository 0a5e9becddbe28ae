"""vlm-convert: HF safetensors checkpoints <-> our parameter trees (docs/weights.md).

  vlm-convert inspect CKPT
      architecture, tensor count, parameters, dtypes and files of an HF checkpoint (headers
      only) or of a torch state-dict file (read with weights_only=True).
  vlm-convert import CKPT [--config configs/<family>.py:<size> --part lm|vision] [--out DIR]
      checks CKPT against the family's part (or, without --config, against our module built
      from CKPT's config.json), imports it into the config's mesh shardings and reports what
      was converted and what keeps its initialisation; --out saves the imported params
      (orbax); --workdir RUN (with --config) writes them as step 0 of a run that vlm-eval and
      vlm-train read; --tokenizer PATH (a SentencePiece .model, or a Hugging Face tokenizer
      directory / tokenizer.json) records the release's tokenizer in RUN, which they then
      tokenize with (docs/weights.md). Training uses the same import through
      --config.init.lm / .vision.
  vlm-convert import CKPT --layout openflamingo|minigpt_v2|prismer|cogagent [--lm DIR]
      [--vision PATH] [--set FIELD=VALUE ...] [--config ...] [--out DIR] [--workdir RUN]
      a seed system's released checkpoint (CKPT: its published file or directory; --lm /
      --vision: the other files the release consists of, see docs/weights.md) into our whole
      model: built from the files (--set: config.model fields the files do not determine,
      dotted, e.g. vision.num_heads=16) or the --config's model, in its mesh shardings.
  vlm-convert export --config configs/<family>.py:<size> --workdir RUN --part lm --out DIR
      [--step N] [--dtype bfloat16] [--arch llama|gpt_neox|mpt|clip|roberta] [--layout NAME]
      the run's newest (or step N) parameters of that part, LoRA merged, as an HF checkpoint
      (safetensors shards + config.json) that transformers' from_pretrained loads. Params
      the family declares new in that part (Flamingo's gated cross-attention, Prismer's
      cross-attention and adaptors) have no place in the HF model and are left out.
      --layout NAME writes the whole model in that release's layout instead (one
      sub-directory per file of the release).
"""
import argparse
import json
import math
import sys

from vlm_jax import config as config_lib


def _inspect(args):
  from vlm_jax import convert
  checkpoint = convert.sources.open_checkpoint(args.checkpoint)
  try:
    arch = convert.arch_for(checkpoint).NAME
  except convert.ConversionError as e:
    arch = f"unknown ({e})"
  dtypes = {}
  for name in checkpoint.tensors:
    dtypes[checkpoint.dtype(name)] = dtypes.get(checkpoint.dtype(name), 0) + 1
  count = sum(math.prod(checkpoint.shape(n)) for n in checkpoint.tensors)
  print(json.dumps({"source": checkpoint.source, "arch": arch,
                    "tensors": len(checkpoint.tensors), "parameters": count,
                    "dtypes": dtypes,
                    "files": sorted({checkpoint.file(n) for n in checkpoint.tensors})}, indent=2))


def _family_target(config, part: str):
  """(model, part root, '/'-path -> ShapeDtypeStruct with sharding, new regexes, mesh)."""
  from vlm_jax import convert, params, sharding
  from vlm_jax.models import registry
  from vlm_jax.train import init_weights

  model = registry.build(config.model)
  parts = init_weights.pretrained_parts(model)
  if part not in parts:
    raise convert.ConversionError(f"--part {part}: {type(model).__name__} declares "
                                  f"{sorted(parts) or 'no'} parts (PRETRAINED_PARTS).")
  mesh = sharding.make_mesh(config.mesh)
  full = params.abstract_with_shardings(config, mesh, model)
  root, target, new = init_weights.part_target(parts[part], full)
  return model, root, target, new, mesh


def _model_fields(assignments) -> dict:
  """--set FIELD=VALUE (VALUE a Python literal, else a string) -> {field: value}."""
  import ast

  from vlm_jax import convert
  fields = {}
  for item in assignments:
    key, sep, value = item.partition("=")
    if not sep:
      raise convert.ConversionError(f"--set {item!r}: expected FIELD=VALUE.")
    try:
      fields[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      fields[key] = value
  return fields


def _import_released(args, config):
  """A released checkpoint into our whole model (built from the files, or the config's)."""
  import jax

  from vlm_jax import convert, params, sharding
  from vlm_jax.models import registry
  release = convert.RELEASES[args.layout]
  paths = {"checkpoint": args.checkpoint, "lm": args.lm, "vision": args.vision}
  paths = {k: v for k, v in paths.items() if k in release.SOURCES or v}
  if config is None:
    return convert.released.import_released(release, paths, _model_fields(args.set))[1]
  if args.set:
    raise convert.ConversionError("--set sets fields of a model built from the files; with "
                                  "--config, override --config.model.FIELD instead.")
  model = registry.build(config.model)
  mesh = sharding.make_mesh(config.mesh)
  target = params.abstract_with_shardings(config, mesh, model)
  batch = registry.dummy_batch(config, 1)
  checkpoint = convert.released.open_sources(release, paths)
  with jax.set_mesh(mesh):
    loaded = convert.released.load(release, checkpoint, model, target)
    missing = sorted(set(target) - set(loaded))
    loaded.update(convert.released.initialise(model, batch, missing))
  return convert.unflatten(loaded)


def _import(args, config):
  from vlm_jax import convert
  if args.workdir and config is None:
    raise convert.ConversionError("--workdir writes a run of a config: pass --config too.")
  if args.tokenizer:
    if not args.workdir:
      raise convert.ConversionError("--tokenizer is recorded in the run: pass --workdir too.")
    from vlm_jax.data import vocab as vocab_lib
    from vlm_jax.train import run_vocab
    try:  # before the (long) import: the tokenizer loads and fits the config's model
      run_vocab.check(config, vocab_lib.Vocab(args.tokenizer))
    except (OSError, ValueError) as e:
      raise convert.ConversionError(f"--tokenizer: {e}") from None
  root = ""
  if args.layout:
    params = _import_released(args, config)
  elif config is None:
    _, params = convert.import_hf(args.checkpoint, arch=args.arch)
  else:
    _, root, target, new, _ = _family_target(config, args.part)
    params = convert.unflatten(convert.load_part(args.checkpoint, target, arch=args.arch,
                                                 new=new))
  if args.out:
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as saver:
      saver.save(args.out, params)
    print(f"Saved the imported parameters to {args.out} (orbax).")
  if args.workdir:
    from vlm_jax.train import imported_run
    try:
      imported_run.save(config, args.workdir,
                        {root + p: a for p, a in convert.flatten(params).items()})
    except imported_run.ImportedRunError as e:
      raise convert.ConversionError(str(e)) from None
    if args.tokenizer:
      print(f"Recorded the tokenizer in {args.workdir}: "
            f"{run_vocab.describe(run_vocab.record(args.workdir, args.tokenizer))}.")


def _read_run(workdir: str, step, wanted: dict) -> tuple[dict, int]:
  """('/'-path -> array for every path of `wanted`, step) from a run's checkpoint."""
  from vlm_jax import convert, params
  try:
    flat, step = params.read_checkpoint(workdir, wanted, step)
  except params.CheckpointParamsError as e:
    raise convert.ConversionError(f"--workdir {e}") from None
  missing = sorted(set(wanted) - set(flat))
  if missing:
    raise convert.ConversionError(f"--workdir {workdir} step {step} lacks {missing[:3]} "
                                  "(another config?).")
  return flat, step


def _export_released(args, config):
  """The run's whole model in a release's layout."""
  import jax

  from vlm_jax import convert, params, sharding
  from vlm_jax.models import registry
  model = registry.build(config.model)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    flat, step = _read_run(args.workdir, args.step,
                           params.abstract_with_shardings(config, mesh, model))
  written = convert.released.export_released(convert.RELEASES[args.layout],
                                             convert.unflatten(flat), model, args.out,
                                             dtype=args.dtype)
  print(f"Exported the model (step {step}) as {args.layout}: "
        + ", ".join(f"{len(names)} tensors in {args.out}/{source}"
                    for source, names in written.items()) + ".")


def _export(args, config):
  import jax

  from vlm_jax import convert
  from vlm_jax.train import init_weights
  if args.layout:
    return _export_released(args, config)
  model, root, target, new, mesh = _family_target(config, args.part)
  with jax.set_mesh(mesh):
    flat, step = _read_run(args.workdir, args.step, {root + p: s for p, s in target.items()})
  module = model.bind({})
  for name in filter(None, root.split("/")):
    module = getattr(module, name)
  params = convert.unflatten({p[len(root):]: a for p, a in flat.items()})
  arch = args.arch or init_weights.pretrained_parts(model)[args.part].get("arch")
  names = convert.export_hf(params, module, args.out, arch=arch, dtype=args.dtype, drop=new)
  print(f"Exported {len(names)} tensors of {root.rstrip('/') or 'the model'} (step {step}) to "
        f"{args.out}.")


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog="vlm-convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  inspect = commands.add_parser("inspect", help="describe an HF checkpoint")
  inspect.add_argument("checkpoint")
  imp = commands.add_parser("import", help="import an HF checkpoint (check, place, save)")
  imp.add_argument("checkpoint")
  imp.add_argument("--part", default="lm", help="the family's part (with --config)")
  imp.add_argument("--arch", default=None, help="override config.json's model_type")
  imp.add_argument("--out", default="", help="save the imported params here (orbax)")
  imp.add_argument("--workdir", default="", help="with --config: write the imported model as "
                   "step 0 of a run there (vlm-eval / vlm-train --workdir read it)")
  layouts = ["openflamingo", "minigpt_v2", "prismer", "cogagent"]  # convert.RELEASES (a
  # literal: --help does not import jax)
  imp.add_argument("--layout", default=None, choices=layouts,
                   help="CKPT is this seed system's released checkpoint (docs/weights.md)")
  imp.add_argument("--lm", default=None, help="--layout: the release's language model (HF dir)")
  imp.add_argument("--vision", default=None, help="--layout: the release's vision tower file")
  imp.add_argument("--tokenizer", default="", help="with --workdir: the release's tokenizer "
                   "(.model, or an HF dir / tokenizer.json), recorded for vlm-eval/vlm-train")
  imp.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="--layout without --config: a model field the files do not determine")
  exp = commands.add_parser("export", help="a run's part as an HF checkpoint")
  exp.add_argument("--workdir", required=True)
  exp.add_argument("--part", default="lm")
  exp.add_argument("--out", required=True)
  exp.add_argument("--step", type=int, default=None)
  exp.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: as trained)")
  exp.add_argument("--arch", default=None, help="default: the part's declared 'arch', else "
                   "from the module (llama for an RMSNorm DecoderLM, mpt for an ALiBi one, "
                   "gpt_neox for a LayerNorm one, clip for a ViT)")
  exp.add_argument("--layout", default=None, choices=layouts,
                   help="write the whole model in this release's layout (not --part)")
  try:
    spec, overrides, rest = config_lib.parse_config_args(argv)
    args = parser.parse_args(rest)
    config = config_lib.load_config(spec, overrides) if spec else None
  except config_lib.ConfigError as e:
    parser.error(str(e))
  if args.command == "export" and config is None:
    parser.error("export needs --config path/to/config.py:arg (the run's config)")
  from vlm_jax import convert
  try:
    {"inspect": lambda: _inspect(args), "import": lambda: _import(args, config),
     "export": lambda: _export(args, config)}[args.command]()
  except convert.ConversionError as e:
    print(f"vlm-convert: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
