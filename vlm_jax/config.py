"""Trainer defaults shared by every family's config, and config loading with clear errors.

A family config (`configs/<family>.py`) parses its argument with `parse_arg` (a size name and
options, the options every family has included), starts from `base_config(name, options)`
and fills `model` (sub-configs per part: `lm`, `vision`, ...) and `data`.
"""
import ast
import difflib
import importlib.util
import os

import ml_collections


# Size-argument options every family has: `configs/x.py:tiny,scan=False,remat=full`.
COMMON_OPTIONS = {"scan": bool, "remat": str, "dtype": str}
_MODEL_FIELDS = {"scan": "scan_layers", "remat": "remat_policy", "dtype": "dtype"}


def base_config(name: str = "", options=None) -> ml_collections.ConfigDict:
  """Trainer defaults for family `name`; `options` from `parse_arg` set the common model
  options (scan, remat, dtype)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 32  # global, across all processes
  c.num_train_steps = 1000
  c.grad_accum_steps = 1
  c.log_every_steps = 50
  # Another run's --workdir (or its checkpoints/ dir): when this workdir has no checkpoint of
  # its own, start from that run's newest parameters (not its step, optimizer or data state).
  c.init_from = ""

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.schedule = "cosine"  # cosine | rsqrt | constant
  c.optimizer.end_lr_fraction = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.01
  # Params whose '/'-joined path matches one of these get no weight decay.
  c.optimizer.no_decay = (r".*bias$", r".*scale$", r".*embedding$", r".*pos_embedding$")
  c.optimizer.grad_clip_norm = 1.0

  # Regexes over '/'-joined parameter paths; matched sub-trees get no gradient at all.
  c.frozen = ()

  # Pretrained weights (HF safetensors checkpoint directories; "" = none), imported after the
  # model is initialised and before training into the sub-trees the family declares
  # (`PRETRAINED_PARTS` in its model file); new parts keep their initialisation.
  c.init = ml_collections.ConfigDict()
  c.init.lm = ""
  c.init.vision = ""

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor) within a slice; -1 fills
  c.mesh.dcn_shape = (1, 1, 1)  # across slices (multi-slice pods)
  c.logical_axis_rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("vocab", "tensor"),
      ("kv", None),
      ("length", None),
      ("layers", None),
      ("conv_in", None),
      ("conv_out", "tensor"),
  )

  # JAX's persistent compilation cache (train/compilation_cache.py): "" = <workdir>/jax_cache
  # (or $JAX_COMPILATION_CACHE_DIR when set), "none" = off, or a local or gs:// directory.
  c.compilation_cache_dir = ""

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  # NaN/inf loss or gradient norm (train/nonfinite.py): "stop", or "skip" the update and
  # rewind to the last checkpoint after `rewind_after` consecutive bad steps.
  c.nonfinite = ml_collections.ConfigDict()
  c.nonfinite.policy = "stop"
  c.nonfinite.rewind_after = 5
  c.nonfinite.max_rewinds = 3
  # Evaluations during training (vlm_jax.evaluation): every `every_steps` (0: never), the
  # named tasks (empty: every evaluation task of the config's family); results go to the
  # metric writers as eval/<task>/<metric>.
  c.evals = ml_collections.ConfigDict()
  c.evals.every_steps = 0
  c.evals.tasks = ()
  c.evals.num_examples = 0  # 0: each task's default
  c.evals.batch_size = 8

  # Operating a long run (docs/reliability.md, docs/performance.md).
  # Profiles (train/profiling.py): jax.profiler traces of these steps (each run of consecutive
  # steps is one trace), or of `num_steps` steps from every multiple of `every_steps`, into
  # <workdir>/tensorboard/plugins/profile (TensorBoard's Profile tab, xprof).
  c.profile = ml_collections.ConfigDict()
  c.profile.steps = ()
  c.profile.every_steps = 0
  c.profile.num_steps = 2
  # Hang detection (train/watchdog.py): a loop phase (waiting for data or for the device, a
  # checkpoint, an eval) longer than `factor` x its recent median and than `min_s`, or than
  # `timeout_s` in any case, dumps every thread's stack and exits with status 76 so the
  # launcher restarts the run. 0 turns a bound off (both 0: no watchdog).
  c.watchdog = ml_collections.ConfigDict()
  c.watchdog.factor = 20.0
  c.watchdog.min_s = 600.0
  c.watchdog.timeout_s = 7200.0
  # Weights & Biases (train/wandb_writer.py, pip install 'vlm_jax[wandb]'), beside
  # metrics.jsonl and TensorBoard: "disabled", "offline" (files under <workdir>/wandb; upload
  # with `wandb sync`) or "online". A restarted run continues the same W&B run.
  c.wandb = ml_collections.ConfigDict()
  c.wandb.mode = "disabled"
  c.wandb.project = "vlm_jax"
  c.wandb.entity = ""
  c.wandb.name = ""  # "": the workdir's name

  c.model = ml_collections.ConfigDict()
  c.model.name = name
  c.model.dtype = "float32"  # compute dtype: bfloat16 on TPU/GPU
  c.model.param_dtype = "float32"
  c.model.scan_layers = True
  c.model.remat_policy = "none"  # none | full | dots
  # Attention computation: xla | splash (Pallas, TPU) | cudnn (GPU, bf16); nn/fused_attention.py
  c.model.attention_impl = "xla"
  for key, value in (options or {}).items():
    if key in _MODEL_FIELDS:
      c.model[_MODEL_FIELDS[key]] = value

  c.data = default_data_config()
  return c


def default_data_config() -> ml_collections.ConfigDict:
  """`config.data` fields every family has; a family's config adds its own (sequence
  lengths, image tokens, ...) that its data module's Processor reads."""
  d = ml_collections.ConfigDict()
  # Root of generated/ingested data; "" = $VLM_JAX_DATA_DIR or ~/.cache/vlm_jax/sample_data.
  d.data_dir = ""
  # A SentencePiece .model or an HF tokenizer dir / tokenizer.json (data/vocab.py); "" =
  # $VLM_JAX_VOCAB, else the tokenizer the run recorded (vlm-convert import --tokenizer), else
  # the sample model shipped in the package.
  d.vocab_path = ""
  # What training reads (vlm_jax/data/mixture.py, data/README.md): a mixture or task of the
  # family's data module, a directory `vlm-data ingest` wrote, a seqio task or mixture, a
  # TFDS dataset `tfds:name/config:version`; or a list of sources with rates, loss weights
  # and templates. Typed `object` so a config file may assign a list.
  d.mixture = ml_collections.FieldReference("", field_type=object)
  d.tasks_module = ""  # a module (or .py path) registering seqio Tasks/Mixtures; "" = none
  d.tfds_data_dir = ""  # TFDS data dir of `tfds:` sources; "" = $TFDS_DATA_DIR or TFDS's
  d.image_size = 64
  d.resize_mode = "pad"  # pad (letterbox) | crop (centre) | stretch
  d.seed = 0  # shuffle/prefix seed; combined with the trainer's seed argument
  d.num_workers = 0  # grain worker processes; keep fixed across a resume
  d.worker_buffer_size = 2  # batches each worker prepares ahead
  d.read_threads = 4  # decode threads per process (main or worker)
  d.max_pixels = 64_000_000  # decompression-bomb guard: larger images are skipped
  # Skipped records: a rate-limited warning names shard and key; if more than
  # max_bad_fraction of the last bad_window records of one source were bad, raise.
  d.bad_window = 1000
  d.max_bad_fraction = 0.1
  d.warn_every_s = 10.0
  # Sequence packing (data/packing.py; families whose data module declares PACKING): several
  # examples per row with segment ids; packed_images image slots per row; packing_bins rows
  # the best-fit packer fills at once (more: less padding, more examples in flight).
  d.packing = False
  d.packed_images = 4
  d.packing_bins = 16
  return d


def parse_arg(arg: str, sizes, options: dict, family: str) -> tuple[str, dict]:
  """`size,key=value,...` (a config's argument) -> (size, {key: value}); `options` maps the
  family's own option keys to their types, besides COMMON_OPTIONS."""
  size, _, rest = arg.partition(",")
  if size not in sizes:
    raise ValueError(f"{family} size {size!r}: expected one of {sorted(sizes)}.")
  return size, parse_options(rest, {**COMMON_OPTIONS, **options})


def parse_options(text: str, options: dict) -> dict:
  """`key=value,...` after a config's size name (`simvlm.py:tiny,scan=False`) -> {key: value};
  `options` maps each valid key to its type (bool accepts 1/true/yes, anything else is False).
  """
  parsed = {}
  for item in filter(None, text.split(",")):
    key, eq, value = item.partition("=")
    if not eq or key not in options:
      raise ValueError(f"config option {item!r}: expected key=value with key in "
                       f"{sorted(options)}.")
    kind = options[key]
    parsed[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return parsed


# ----------------------------------------------------------------------------------------
# Loading `path/to/config.py:arg` and `--config.a.b=value` overrides.
# ----------------------------------------------------------------------------------------
class ConfigError(ValueError):
  """A config file or override the user must fix; the message names the field."""


def _flat_keys(cfg, prefix=""):
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    yield path
    if isinstance(value, ml_collections.ConfigDict):
      yield from _flat_keys(value, path + ".")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist (from --config={spec}).")
  module_spec = importlib.util.spec_from_file_location(
      f"vlm_jax_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config(arg).")
  return module.get_config(arg) if arg else module.get_config()


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string such as --config.model.dtype=bfloat16


def apply_override(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  """Sets `cfg.<dotted> = text` (parsed), failing with the nearest valid keys."""
  parts = dotted.split(".")
  node = cfg
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      valid = sorted(_flat_keys(cfg))
      near = difflib.get_close_matches(dotted, valid, n=3, cutoff=0.5)
      hint = f" Did you mean: {', '.join(near)}?" if near else ""
      raise ConfigError(f"unknown config key {dotted!r}.{hint}")
    if i < len(parts) - 1:
      node = node[part]
  key, old = parts[-1], node[parts[-1]]
  value = _parse_value(text)
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if old is not None and node.get_type(key) is not object and not isinstance(value, type(old)):
    raise ConfigError(
        f"config key {dotted!r} expects {type(old).__name__} (now {old!r}); "
        f"got {text!r} ({type(value).__name__}).")
  try:
    node[key] = value
  except TypeError as e:
    raise ConfigError(f"config key {dotted!r}: {e}") from None


def load_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """`spec` is `path.py:arg`; `overrides` are ('a.b', 'value') pairs, applied in order."""
  cfg = load_config_file(spec)
  for dotted, text in overrides:
    apply_override(cfg, dotted, text)
  return cfg


def parse_config_args(argv):
  """Splits `--config X` and `--config.a.b=v` out of argv; returns (spec, overrides, rest)."""
  spec, overrides, rest = None, [], []
  args = list(argv)
  while args:
    arg = args.pop(0)
    if arg == "--config" or arg.startswith("--config="):
      spec = arg.split("=", 1)[1] if "=" in arg else args.pop(0)
    elif arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        if not args:
          raise ConfigError(f"{arg} needs a value.")
        value = args.pop(0)
      overrides.append((key, value))
    else:
      rest.append(arg)
  return spec, overrides, rest
