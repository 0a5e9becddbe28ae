"""`config.data.mixture`: what training reads, as a name or as a list of sources.

  a name        a task or mixture of the family's data module (`families/<family>.py`), a
                directory written by `vlm-data ingest`, a seqio Task or Mixture registered
                by `config.data.tasks_module`, or a TFDS dataset `tfds:name[/config][:version]`
  a list        of sources, each a dict; in a config file `c.data.mixture = (dict(...), ...)`,
                on the command line `--config.data.mixture="[{'source': ..., 'rate': 1}]"`
                (a Python literal, read with ast.literal_eval: no code runs)
  compact text  sources separated by ';', each `SOURCE key=value ...`:
                --config.data.mixture="/data/laion rate=1 weight=0.2; /data/mmc4 rate=1"

A source's keys (compact text: `weight` for loss_weight, `field.<record field>=<feature>`):

  source       (required) any name above; a mixture shares the entry's rate among its tasks
               in proportion to its own rates
  rate         sampling rate, > 0, relative to the other entries (default 1)
  loss_weight  scales each of its examples' token losses, > 0 (default: the task's own;
               1 for directories, TFDS datasets and seqio tasks)
  template     the family template its records feed (`TEMPLATES`; default: the first that
               takes the records' kind): caption pair, document, text-only, chat/grounding
  name         its name in metrics (data/rate/<name>) and for `vlm-eval --task` (default:
               the task's name, the directory's base name, the TFDS dataset's name)
  split        the split training reads (default 'train'); eval_split: evaluation's
               (default 'validation')
  kind, fields TFDS / seqio only: the records' kind (pairs | text | interleaved | grounding;
               default from the features) and {record field: feature name}
               (`sources/features.py`)
  data_dir     TFDS only: its data dir (default config.data.tfds_data_dir)

`check` validates all of it before training compiles anything (unknown or empty source,
non-positive rate, template that does not fit the family, ...): a `MixtureError` whose
message is one line naming the field, e.g. `config.data.mixture[1].rate=0: must be > 0`.
"""
import ast
import dataclasses
import difflib
import math
import os
import shlex

from vlm_jax.data import catalog, families, records
from vlm_jax.data import processor as processor_lib
from vlm_jax.data.sources import features, seqio_stream, tfds_source

FIELD = "config.data.mixture"
KEYS = ("source", "rate", "loss_weight", "template", "name", "split", "eval_split", "kind",
        "fields", "data_dir")
ALIASES = {"weight": "loss_weight"}
NAMED_ONLY = ("kind", "fields", "data_dir")  # keys for TFDS datasets and seqio tasks only


class MixtureError(ValueError):
  """config.data.mixture cannot be trained on; the message is one line naming the field."""


@dataclasses.dataclass(frozen=True)
class Entry:
  field: str  # where the entry was written: config.data.mixture or config.data.mixture[i]
  source: str
  rate: float = 1.0
  loss_weight: float | None = None
  template: str = ""
  name: str = ""
  split: str = "train"
  eval_split: str = "validation"
  kind: str = ""
  fields: tuple = ()
  data_dir: str = ""

  def at(self, key: str) -> str:
    """The field path of `key` (a plain name is the whole field)."""
    return self.field if self.field == FIELD else f"{self.field}.{key}"


# ----------------------------------------------------------------------------------------
# Parsing: name | literal list | compact text -> [Entry]
# ----------------------------------------------------------------------------------------
def _number(text: str):
  try:
    return float(text)
  except ValueError:
    return text  # reported by _entry as not a number


def _compact(text: str) -> list[dict]:
  items = []
  for i, chunk in enumerate(c for c in text.split(";") if c.strip()):
    try:
      words = shlex.split(chunk)
    except ValueError as e:
      raise MixtureError(f"{FIELD}[{i}]={chunk.strip()!r}: {e}") from None
    item = {"source": words[0]}
    for word in words[1:]:
      key, eq, value = word.partition("=")
      if not eq:
        raise MixtureError(f"{FIELD}[{i}]: {word!r} is not key=value (keys: {', '.join(KEYS)})")
      if key.startswith("field."):
        item.setdefault("fields", {})[key[len("field."):]] = value
        continue
      key = ALIASES.get(key, key)
      item[key] = _number(value) if key in ("rate", "loss_weight") else value
    items.append(item)
  return items


def _positive(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0)


def _entry(field: str, item) -> Entry:
  if isinstance(item, str):
    item = {"source": item}
  if not hasattr(item, "items"):
    raise MixtureError(f"{field}={item!r}: expected a dict with a 'source' (keys: "
                       f"{', '.join(KEYS)})")
  item = {ALIASES.get(k, k): v for k, v in item.items()}
  unknown = sorted(set(item) - set(KEYS))
  if unknown:
    raise MixtureError(f"{field}: unknown key(s) {unknown}; the keys are {', '.join(KEYS)}")
  source = item.get("source")
  if not isinstance(source, str) or not source.strip():
    raise MixtureError(f"{field}.source={source!r}: empty source; name a task, mixture, "
                       "ingested directory, seqio task or tfds:dataset")
  for key in ("rate", "loss_weight"):
    if key in item and not _positive(item[key]):
      raise MixtureError(f"{field}.{key}={item[key]!r}: must be a number > 0")
  for key in ("template", "name", "split", "eval_split", "kind", "data_dir"):
    if not isinstance(item.get(key, ""), str):
      raise MixtureError(f"{field}.{key}={item[key]!r}: must be a string")
  if item.get("kind", "") and item["kind"] not in catalog.KINDS:
    raise MixtureError(f"{field}.kind={item['kind']!r}: expected one of {catalog.KINDS}")
  fields = item.get("fields", {})
  if not hasattr(fields, "items") or any(
      k not in features.DEFAULT_FIELDS or not isinstance(v, str) for k, v in fields.items()):
    raise MixtureError(f"{field}.fields={fields!r}: expected {{record field: feature name}} "
                       f"with record fields in {sorted(features.DEFAULT_FIELDS)}")
  values = {k: v for k, v in item.items() if k not in ("rate", "loss_weight", "fields")}
  return Entry(field, **{**values, "source": source.strip()},
               rate=float(item.get("rate", 1.0)),
               loss_weight=None if "loss_weight" not in item else float(item["loss_weight"]),
               fields=tuple(sorted(fields.items())))


def entries(value) -> list[Entry]:
  """`config.data.mixture` as entries (a plain name is one entry with field FIELD)."""
  if isinstance(value, str):
    text = value.strip()
    if not text:
      raise MixtureError(f"{FIELD} is empty; name a task, mixture, ingested directory, seqio "
                         "task or tfds:dataset, or list sources")
    if text[0] in "[(":
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError) as e:
        raise MixtureError(f"{FIELD}={text!r}: not a Python literal list of sources "
                           f"({type(e).__name__})") from None
    elif "=" in text or ";" in text:
      value = _compact(text)
    else:
      return [Entry(FIELD, text)]
  if hasattr(value, "items"):
    value = [value]
  if not isinstance(value, (list, tuple)) or not value:
    raise MixtureError(f"{FIELD}={value!r}: expected a name or a non-empty list of sources")
  return [_entry(f"{FIELD}[{i}]", item) for i, item in enumerate(value)]


# ----------------------------------------------------------------------------------------
# Resolution: Entry -> [(TaskSpec, rate)]
# ----------------------------------------------------------------------------------------
def _unknown(entry: Entry, module, data_config) -> MixtureError:
  names = sorted(catalog.tasks(module)) + sorted(catalog.mixtures(module))
  near = difflib.get_close_matches(entry.source, names, n=3)
  hint = f" (did you mean {', '.join(near)}?)" if near else ""
  seqio_part = (f"a seqio task or mixture of {data_config.tasks_module}"
                if data_config.get("tasks_module") else
                "a seqio task (config.data.tasks_module is empty)")
  return MixtureError(
      f"{entry.at('source')}={entry.source!r}: unknown source{hint}: not a task or mixture "
      f"of this family, a directory written by `vlm-data ingest`, {seqio_part}, or "
      "tfds:name[/config][:version]")


def _tfds_specs(entry: Entry, data_config) -> list:
  data_dir = entry.data_dir or data_config.get("tfds_data_dir", "")
  try:
    name = tfds_source.dataset_name(entry.source)
    names, _ = tfds_source.describe(name, data_dir, entry.split)
  except tfds_source.SourceError as e:
    raise MixtureError(f"{entry.at('source')}={entry.source!r}: {e}") from None
  spec = catalog.TaskSpec(name.split(":")[0], _kind(entry, names), "tfds", name,
                          args=(("data_dir", data_dir), ("fields", entry.fields)))
  return [(spec, 1.0)]


def _seqio_specs(entry: Entry, data_config) -> list | None:
  module = data_config.get("tasks_module", "")
  try:
    provider = seqio_stream.lookup(entry.source, module)
  except Exception as e:  # pylint: disable=broad-except  # the user's module raises anything
    first = (str(e).splitlines() or [""])[0]
    raise MixtureError(f"config.data.tasks_module={module!r}: importing it failed: "
                       f"{type(e).__name__}: {first}") from None
  if provider is None:
    return None
  specs = []
  for task, rate in seqio_stream.tasks_and_rates(provider):
    try:
      names = seqio_stream.describe(task, module, entry.split)
    except seqio_stream.SourceError as e:
      raise MixtureError(f"{entry.at('source')}={entry.source!r}: {e}") from None
    specs.append((catalog.TaskSpec(task, _kind(entry, names), "seqio", task, args=(
        ("tasks_module", module), ("fields", entry.fields))), rate))
  return specs


def _kind(entry: Entry, names) -> str:
  kind = entry.kind or features.infer_kind(names, dict(entry.fields))
  if kind is None:
    raise MixtureError(f"{entry.at('kind')}: cannot tell what {entry.source!r} holds from its "
                       f"features {sorted(names)}; set kind and fields")
  return kind


def _catalog_specs(entry: Entry, module) -> list | None:
  """A task or mixture of the family, or an ingested directory; None if it is none."""
  source = entry.source
  known, declared = catalog.tasks(module), catalog.mixtures(module)
  if source in known:
    return [(known[source], 1.0)]
  if source in declared:
    return [(known[task], rate) for task, rate in declared[source]]
  if catalog.is_ingested(source):
    spec = catalog.task_from_directory(source)
    return [(dataclasses.replace(spec, name=os.path.basename(os.path.normpath(source))), 1.0)]
  if os.path.isdir(source):
    raise MixtureError(f"{entry.at('source')}={source!r}: a directory without "
                       f"{records.MANIFEST}; write it with `vlm-data ingest`")
  return None


def _entry_specs(entry: Entry, module, data_config) -> list:
  """[(TaskSpec, rate within the entry)] of one entry, before its overrides."""
  if entry.source.startswith(tfds_source.PREFIX):
    return _tfds_specs(entry, data_config)
  forced_seqio = entry.source.startswith(seqio_stream.PREFIX)
  specs = None if forced_seqio else _catalog_specs(entry, module)
  if specs is not None:
    key = next((key for key in NAMED_ONLY if getattr(entry, key)), None)
    if key:
      raise MixtureError(f"{entry.at(key)}: only TFDS datasets and seqio tasks take {key!r}")
    return specs
  if forced_seqio or data_config.get("tasks_module", ""):
    specs = _seqio_specs(entry, data_config)
    if specs:
      return specs
  raise _unknown(entry, module, data_config)


def _with_overrides(entry: Entry, specs: list) -> list:
  total = sum(rate for _, rate in specs)
  if entry.name and len(specs) > 1:
    raise MixtureError(f"{entry.at('name')}={entry.name!r}: {entry.source!r} holds "
                       f"{len(specs)} tasks, each named by its task; drop the name")
  changes = {"name": entry.name} if entry.name else {}
  if entry.template:
    changes["template"] = entry.template
  if entry.loss_weight is not None:
    changes["loss_weight"] = entry.loss_weight
  if (entry.split, entry.eval_split) != ("train", "validation"):
    changes["splits"] = (("train", entry.split), ("validation", entry.eval_split))
  return [(dataclasses.replace(spec, **changes), entry.rate * rate / total)
          for spec, rate in specs]


def sources(data_config, family: str) -> list:
  """[(Entry, TaskSpec with its template resolved, rate)] of config.data.mixture."""
  module = families.load(family)
  items = entries(data_config.mixture)
  plain = items[0].field == FIELD
  resolved = []
  if plain and (items[0].source in catalog.tasks(module) or items[0].source in
                catalog.mixtures(module) or catalog.is_ingested(items[0].source)):
    # A name the catalog knows: its tasks, names and rates exactly as declared.
    resolved = [(items[0], spec, rate)
                for spec, rate in catalog.resolve(items[0].source, module).tasks]
  else:
    for entry in items:
      resolved += [(entry, spec, rate) for spec, rate in
                   _with_overrides(entry, _entry_specs(entry, module, data_config))]
  out, seen = [], {}
  for entry, spec, rate in resolved:
    try:
      spec = processor_lib.with_template(spec, module.TEMPLATES, family)
    except ValueError as e:
      raise MixtureError(f"{entry.at('template')}={entry.template or spec.template!r}: "
                         f"{e}") from None
    if spec.name in seen:
      raise MixtureError(f"{entry.at('name')}: two sources are named {spec.name!r} (also "
                         f"{seen[spec.name]}); give one another name")
    seen[spec.name] = entry.field
    out.append((entry, spec, rate))
  return out


def resolve(data_config, family: str) -> catalog.Mixture:
  """config.data.mixture for `family` as a Mixture of task specs (templates resolved)."""
  name = data_config.mixture if isinstance(data_config.mixture, str) else FIELD
  return catalog.Mixture(name, tuple((spec, rate) for _, spec, rate in
                                     sources(data_config, family)))


def has_split(spec, split: str) -> bool:
  """Whether a TFDS or seqio source has the pipeline split `split` (its mapped name)."""
  args, name = dict(spec.args), catalog.source_split(spec, split)
  if spec.format == "tfds":
    return tfds_source.has_split(spec.pattern, args["data_dir"], name)
  return seqio_stream.has_split(spec.pattern, args["tasks_module"], name)


# ----------------------------------------------------------------------------------------
# Validation before training
# ----------------------------------------------------------------------------------------
def _empty(spec, data_config) -> str:
  """Why `spec`'s training split has no records, or ''."""
  if spec.format == "tfds":
    args = dict(spec.args)
    split = catalog.source_split(spec, "train")
    count = tfds_source.describe(spec.pattern, args["data_dir"], split)[1]
    return "" if count else f"split {split!r} has no examples"
  if spec.format == "seqio":
    try:
      seqio_stream.describe(spec.pattern, dict(spec.args)["tasks_module"],
                            catalog.source_split(spec, "train"), require_examples=True)
    except seqio_stream.SourceError as e:
      return str(e)
    return ""
  directory = os.path.dirname(spec.pattern)
  if catalog.is_ingested(directory) and records.read_manifest(directory).get("records") == 0:
    return f"{directory} holds no records"
  try:
    catalog.files(spec, data_config.data_dir, "train")
  except FileNotFoundError as e:
    return str(e)
  return ""


def check(data_config, family: str) -> catalog.Mixture:
  """Resolves config.data.mixture and checks that every source has training records;
  MixtureError (one line naming the field) otherwise."""
  resolved = sources(data_config, family)
  for entry, spec, _ in resolved:
    problem = _empty(spec, data_config)
    if problem:
      raise MixtureError(f"{entry.at('source')}={entry.source!r}: empty source: "
                         f"{problem.splitlines()[0]}")
  return catalog.Mixture(FIELD, tuple((spec, rate) for _, spec, rate in resolved))
