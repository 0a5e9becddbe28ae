"""vlm-convert: HF safetensors checkpoints <-> our parameter trees (docs/weights.md).

  vlm-convert inspect CKPT
      architecture, tensor count, parameters, dtypes and files of an HF checkpoint (headers
      only).
  vlm-convert import CKPT [--config configs/<family>.py:<size> --part lm|vision] [--out DIR]
      checks CKPT against the family's part (or, without --config, against our module built
      from CKPT's config.json), imports it into the config's mesh shardings and reports what
      was converted and what keeps its initialisation; --out saves the imported params
      (orbax). Training uses the same import through --config.init.lm / --config.init.vision.
  vlm-convert export --config configs/<family>.py:<size> --workdir RUN --part lm --out DIR
      [--step N] [--dtype bfloat16] [--arch llama|gpt_neox|clip|roberta]
      the run's newest (or step N) parameters of that part, LoRA merged, as an HF checkpoint
      (safetensors shards + config.json) that transformers' from_pretrained loads. Params
      the family declares new in that part (Flamingo's gated cross-attention, Prismer's
      cross-attention and adaptors) have no place in the HF model and are left out.
"""
import argparse
import json
import math
import sys

from vlm_jax import config as config_lib


def _inspect(args):
  from vlm_jax import convert
  checkpoint = convert.Checkpoint(args.checkpoint)
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


def _import(args, config):
  from vlm_jax import convert
  if config is None:
    _, params = convert.import_hf(args.checkpoint, arch=args.arch)
  else:
    _, _, target, new, _ = _family_target(config, args.part)
    params = convert.unflatten(convert.load_part(args.checkpoint, target, arch=args.arch,
                                                 new=new))
  if args.out:
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as saver:
      saver.save(args.out, params)
    print(f"Saved the imported parameters to {args.out} (orbax).")


def _export(args, config):
  import jax

  from vlm_jax import convert, params
  from vlm_jax.train import init_weights
  model, root, target, new, mesh = _family_target(config, args.part)
  with jax.set_mesh(mesh):
    wanted = {root + p: s for p, s in target.items()}
    try:
      flat, step = params.read_checkpoint(args.workdir, wanted, args.step)
    except params.CheckpointParamsError as e:
      raise convert.ConversionError(f"--workdir {e}") from None
  missing = sorted(set(wanted) - set(flat))
  if missing:
    raise convert.ConversionError(f"--workdir {args.workdir} step {step} lacks "
                                  f"{missing[:3]} (another config?).")
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
  exp = commands.add_parser("export", help="a run's part as an HF checkpoint")
  exp.add_argument("--workdir", required=True)
  exp.add_argument("--part", default="lm")
  exp.add_argument("--out", required=True)
  exp.add_argument("--step", type=int, default=None)
  exp.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: as trained)")
  exp.add_argument("--arch", default=None, help="default: the part's declared 'arch', else "
                   "from the module (llama for an RMSNorm DecoderLM, gpt_neox for a LayerNorm "
                   "one, clip for a ViT)")
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
