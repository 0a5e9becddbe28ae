"""Which validated records to keep: size, side ratio, caption length, metadata thresholds,
duplicates. One implementation for both ingest executors (local and Beam).

`reject_reason` looks at one record alone; duplicates need the others, so `dedup_keys`
names what a record may share with an earlier one and the executor removes every record
whose key an earlier record (in input order) already had. "Earlier" counts every record
that passed the other filters, duplicates included, so the rule is the same whether the
records are seen one by one (local) or grouped by key (Beam).
"""
import dataclasses
import hashlib
import json

DEDUP_KINDS = ("image", "url")


@dataclasses.dataclass(frozen=True)
class Filters:
  min_image_side: int = 0  # pixels, the shorter side of every image
  max_side_ratio: float = 0.0  # longer / shorter side; 0 = any
  min_caption_words: int = 0  # pairs: the caption
  max_caption_words: int = 0  # 0 = any
  min_meta: tuple = ()  # ((field, threshold), ...): pairs' metadata, e.g. img2dataset similarity
  dedup: tuple = ()  # subset of DEDUP_KINDS

  def __post_init__(self):
    unknown = [d for d in self.dedup if d not in DEDUP_KINDS]
    if unknown:
      raise ValueError(f"dedup {unknown}: expected some of {DEDUP_KINDS} (--dedup)")
    if self.max_side_ratio and self.max_side_ratio < 1:
      raise ValueError(f"max_side_ratio {self.max_side_ratio} < 1 (--max-side-ratio)")

  @classmethod
  def from_strings(cls, *, min_meta=(), dedup="", **kwargs):
    """`min_meta`: ["similarity=0.3", ...]; `dedup`: "image,url" (the CLI's forms)."""
    thresholds = []
    for item in min_meta:
      field, sep, value = item.partition("=")
      try:
        thresholds.append((field, float(value)))
        if not (sep and field):
          raise ValueError
      except ValueError:
        raise ValueError(f"--min-meta {item!r}: expected FIELD=NUMBER") from None
    return cls(min_meta=tuple(thresholds),
               dedup=tuple(d for d in dedup.split(",") if d), **kwargs)


def image_reason(size, filters: Filters):
  """Why an image of `size` (width, height) is filtered out, or None."""
  short, long = min(size), max(size)
  if filters.min_image_side and short < filters.min_image_side:
    return f"image side below {filters.min_image_side}"
  if filters.max_side_ratio and long > filters.max_side_ratio * short:
    return f"side ratio above {filters.max_side_ratio:g}"
  return None


def _meta(record):
  try:
    meta = json.loads(record.get("meta") or "{}")
  except ValueError:
    return {}
  return meta if isinstance(meta, dict) else {}


def reject_reason(record, filters: Filters):
  """Why a validated pairs record is filtered out, or None. (Interleaved documents lose
  their small images in `ingest`; text documents have no filters here.)"""
  if record["kind"] != "pairs":
    return None
  words = len(record["text"].split())
  if words < filters.min_caption_words:
    return f"caption shorter than {filters.min_caption_words} words"
  if filters.max_caption_words and words > filters.max_caption_words:
    return f"caption longer than {filters.max_caption_words} words"
  if filters.min_meta:
    meta = _meta(record)
    for field, threshold in filters.min_meta:
      try:
        value = float(meta[field])
      except (KeyError, TypeError, ValueError):
        return f"meta {field} missing"
      if value < threshold:
        return f"meta {field} below {threshold:g}"
  return None


def image_hash(record) -> str:
  images = [record["image"]] if record["kind"] == "pairs" else [
      i for i in record.get("images", ()) if i is not None]
  digest = hashlib.sha256()
  for image in images:
    digest.update(hashlib.sha256(image).digest())
  return digest.hexdigest()


def dedup_keys(record, filters: Filters) -> list:
  """[(kind, key)] this record must not share with an earlier one, in the order the
  removal reason is chosen (image before url)."""
  keys = []
  if "image" in filters.dedup and record["kind"] != "text":
    keys.append(("image", image_hash(record)))
  if "url" in filters.dedup:
    url = _meta(record).get("url")
    if isinstance(url, str) and url:
      keys.append(("url", url))
  return keys


def duplicate_reason(kind: str) -> str:
  return f"duplicate {kind}"
