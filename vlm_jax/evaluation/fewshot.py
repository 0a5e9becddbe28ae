"""Few-shot in-context prompts (Flamingo): k support examples interleaved before the query.

Support pairs come from the same held-out split (never the query itself), chosen at random
with a seed per query, or by similarity: the k pairs whose images are nearest the query's
in pixel space (a cheap stand-in for Flamingo's RICES, which uses CLIP image features).
The result is a raw interleaved record: support image, its caption, ..., query image, query
caption; the query's caption is the last loss span, i.e. what the model is asked for.
"""
import numpy as np

from vlm_jax.data import preprocessors


def choose_support(num_pool: int, query: int, shots: int, seed: int) -> list[int]:
  """`shots` distinct pool indices other than `query`, drawn with seed (seed, query)."""
  if shots > num_pool - 1:
    raise ValueError(f"{shots} shots need at least {shots + 1} held-out examples, got "
                     f"{num_pool}.")
  candidates = np.array([i for i in range(num_pool) if i != query])
  rng = np.random.default_rng([seed, query])
  return [int(i) for i in rng.choice(candidates, size=shots, replace=False)]


def nearest_support(features: np.ndarray, query: int, shots: int) -> list[int]:
  """The `shots` rows of features [P, F] nearest row `query` (cosine), query excluded."""
  unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  similarity = unit @ unit[query]
  similarity[query] = -np.inf
  return [int(i) for i in np.argsort(-similarity, kind="stable")[:shots]]


def pixel_features(pool: list[dict], size: int = 16) -> np.ndarray:
  """[P, size*size*3] per-image pixel vectors of raw records, each centred on its own mean
  (so a shared background does not make every pair look alike)."""
  rows = []
  for raw in pool:
    image = preprocessors.decode_image(raw["image"]).convert("RGB").resize((size, size))
    pixels = np.asarray(image, np.float32).reshape(-1)
    rows.append(pixels - pixels.mean())
  return np.stack(rows)


def support_sets(pool: list[dict], queries: int, shots: int, method: str = "random",
                 seed: int = 0) -> list[list[int]]:
  """Support indices for each of the first `queries` pool entries: 'random' (seeded) or
  'similar' (nearest images)."""
  if method == "similar":
    features = pixel_features(pool)
    return [nearest_support(features, q, shots) for q in range(queries)]
  if method != "random":
    raise ValueError(f"support={method!r}: expected 'random' or 'similar'")
  return [choose_support(len(pool), q, shots, seed) for q in range(queries)]


def interleaved_record(pool: list[dict], support: list[int], query: int) -> dict:
  """Raw pair records -> one interleaved record (support pairs, then the query pair)."""
  texts, images = [], []
  for i in list(support) + [query]:
    raw = pool[i]
    texts += [None, preprocessors.caption_of(raw)]
    images += [raw["image"], None]
  return {"kind": "interleaved", "texts": texts, "images": images,
          "key": f"{pool[query].get('key', query)}+{len(support)}shot"}
