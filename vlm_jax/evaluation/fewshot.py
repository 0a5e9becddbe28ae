"""Few-shot in-context prompts (Flamingo): k support examples interleaved before the query.

Support pairs come from the same held-out split (never the query itself), chosen at random
with a seed per query, or by similarity (RICES, as Flamingo and OpenFlamingo evaluate): the
k pairs whose images are nearest the query's by cosine similarity of the model's own vision
features, the vision tower's class-token output (CLIP's pooled image embedding before its
projection; the mean token for a tower without a class token), computed through
`distributed.jit` so that it runs in a multi-process job.
The result is a raw interleaved record: support image, its caption, ..., query image, query
caption; the query's caption is the last loss span, i.e. what the model is asked for.
"""
import numpy as np

from vlm_jax import distributed
from vlm_jax.data import preprocessors


def choose_support(num_pool: int, query: int, shots: int, seed: int) -> list[int]:
  """`shots` distinct pool indices other than `query`, drawn with seed (seed, query)."""
  if shots > num_pool - 1:
    raise ValueError(f"{shots} shots need at least {shots + 1} held-out examples, got "
                     f"{num_pool}.")
  candidates = np.array([i for i in range(num_pool) if i != query])
  rng = np.random.default_rng([seed, query])
  return [int(i) for i in rng.choice(candidates, size=shots, replace=False)]


def nearest(pool_features: np.ndarray, query_feature: np.ndarray, shots: int,
            exclude: int | None = None) -> list[int]:
  """The `shots` rows of pool_features [P, F] nearest query_feature [F] (cosine), most
  similar first; `exclude`: a row never chosen (the query itself, in its own pool)."""
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  similarity = unit(pool_features) @ unit(query_feature)
  if exclude is not None:
    similarity[exclude] = -np.inf
  return [int(i) for i in np.argsort(-similarity, kind="stable")[:shots]]


def nearest_support(features: np.ndarray, query: int, shots: int) -> list[int]:
  """The `shots` rows of features [P, F] nearest row `query` (cosine), query excluded."""
  return nearest(features, features[query], shots, exclude=query)


def first_images(examples) -> np.ndarray:
  """[P, H, W, 3]: each example's first image (first frame of a clip), as preprocessed: the
  images RICES compares."""
  return np.stack([e["images"].reshape((-1,) + e["images"].shape[-3:])[0] for e in examples])


def _pooled_vision_tokens(module, images):
  tokens = module.vision(images)
  return tokens[:, 0] if module.vision.class_token else tokens.mean(axis=1)


@distributed.jit(static_argnames=("model",))
def _vision_features(params, images, *, model):
  return model.apply({"params": params}, images, method=_pooled_vision_tokens)


def vision_features(model, params, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
  """[P, D] RICES features of images [P, H, W, 3] (the model's preprocessing, in [-1, 1])
  from `model.vision`, in batches of `batch_size` (the last one padded: one compiled shape);
  host numpy in every process of a job, which all pass the same images."""
  if not hasattr(model, "vision"):
    raise ValueError(f"{type(model).__name__} has no vision tower (`vision`) for RICES "
                     "support selection; use support='random'.")
  rows = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
    rows.append(distributed.fetch(_vision_features(params, padded, model=model))[:len(chunk)])
  return np.concatenate(rows).astype(np.float32)


def support_sets(pool_size: int, queries: int, shots: int, method: str = "random",
                 seed: int = 0, features: np.ndarray | None = None) -> list[list[int]]:
  """Support indices for each of the first `queries` of `pool_size` entries: 'random'
  (seeded) or 'similar' (the nearest by `features` [pool_size, D], `vision_features`)."""
  if method == "similar":
    if features is None or len(features) != pool_size:
      raise ValueError(f"support='similar' needs features of the {pool_size} pool images.")
    return [nearest_support(features, q, shots) for q in range(queries)]
  if method != "random":
    raise ValueError(f"support={method!r}: expected 'random' or 'similar'")
  return [choose_support(pool_size, q, shots, seed) for q in range(queries)]


def interleaved_record(pool: list[dict], support: list[int], query: int) -> dict:
  """Raw pair records -> one interleaved record (support pairs, then the query pair)."""
  texts, images = [], []
  for i in list(support) + [query]:
    raw = pool[i]
    texts += [None, preprocessors.caption_of(raw)]
    images += [raw["image"], None]
  return {"kind": "interleaved", "texts": texts, "images": images,
          "key": f"{pool[query].get('key', query)}+{len(support)}shot"}
