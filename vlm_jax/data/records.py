"""The record format of ingested ArrayRecord shards: one normalised example per record.

Kinds: `pairs` (image + caption + metadata), `text` (a document), `interleaved` (aligned
`texts`/`images` lists, exactly one non-null per position, as OBELICS; MMC4 is converted to
it), `grounding` (an image + `objects`: [{"phrase": str, "box": [x0, y0, x1, y1]}] with
coordinates in [0, 1] of the image's width/height, optionally a caption `text`; read from
TFDS / seqio sources, `sources/features.py`). Records from TFDS or seqio may hold decoded
uint8 pixels instead of image bytes. Encoding: b"VLM1", a little-endian uint32 header length, a JSON header, then the image
blobs back to back; the header names each blob's size. JSON + raw bytes rather than pickle,
so reading a shard never executes code from it.
"""
import json
import struct

from vlm_jax import storage

MAGIC = b"VLM1"
MANIFEST = "dataset.json"  # beside the shards: kind, format, inputs, counts (ingest/local.py)


def encode(record: dict) -> bytes:
  header = {k: v for k, v in record.items() if k not in ("image", "images")}
  blobs = []
  if record.get("image") is not None:
    blobs.append(record["image"])
    header["image"] = 0
  if "images" in record:
    header["images"] = []
    for image in record["images"]:
      header["images"].append(None if image is None else len(blobs))
      if image is not None:
        blobs.append(image)
  header["blob_sizes"] = [len(b) for b in blobs]
  head = json.dumps(header, ensure_ascii=False).encode("utf-8")
  return MAGIC + struct.pack("<I", len(head)) + head + b"".join(blobs)


def decode(data: bytes) -> dict:
  if data[:4] != MAGIC:
    raise ValueError("not a vlm_jax record (bad magic)")
  (size,) = struct.unpack("<I", data[4:8])
  header = json.loads(data[8:8 + size].decode("utf-8"))
  offsets, position = [], 8 + size
  for blob_size in header.pop("blob_sizes"):
    offsets.append((position, position + blob_size))
    position += blob_size
  if position != len(data):
    raise ValueError(f"record is {len(data)} bytes, header describes {position}")
  blob = lambda i: data[offsets[i][0]:offsets[i][1]]
  if header.get("image") is not None:
    header["image"] = blob(header["image"])
  if "images" in header:
    header["images"] = [None if i is None else blob(i) for i in header["images"]]
  return header


def read_manifest(directory: str) -> dict:
  """The manifest of a directory written by `vlm-data ingest`."""
  return json.loads(storage.read_text(storage.join(directory, MANIFEST)))
