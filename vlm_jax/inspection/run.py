"""What a training run did: its metrics, its checkpoints, and where a trained encoder-decoder
model looks in the image when it generates a token."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax import config as config_lib
from vlm_jax import distributed
from vlm_jax import params as params_lib
from vlm_jax import storage
from vlm_jax.nn import attention


def read_metrics(workdir: str) -> dict:
  """{metric: ([steps], [values])} from metrics.jsonl; a metric logged twice at a step
  (replayed after a resume) keeps its last value; lines of one step (training, then
  vlm-eval's) are merged."""
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir!r} a training workdir?")
  by_step = {}
  for line in storage.read_text(path).splitlines():
    record = json.loads(line)
    by_step.setdefault(record.pop("step"), {}).update(record)
  series = {}
  for step in sorted(by_step):
    for key, value in by_step[step].items():
      steps, values = series.setdefault(key, ([], []))
      steps.append(step)
      values.append(value)
  return series


def time_accounts(metrics: dict) -> dict:
  """{category: seconds, 'wall': seconds} of the run's newest record (train/goodput.py), from
  read_metrics' series; {} for a run from before goodput accounting."""
  from vlm_jax.train import goodput  # pylint: disable=g-import-not-at-top
  keys = [f"time/{c}_s" for c in (*goodput.CATEGORIES, "wall")]
  if not all(k in metrics for k in keys):
    return {}
  return {k[len("time/"):-len("_s")]: metrics[k][1][-1] for k in keys}


def latest_params(workdir: str) -> tuple[int, dict]:
  """(step, parameters) of the run's newest checkpoint, read with its own config."""
  from vlm_jax.train import loop  # pylint: disable=g-import-not-at-top
  trainer = loop.Trainer(run_config(workdir, ""), workdir)
  step = trainer.checkpointer.latest_step()
  with trainer.mesh_context():
    state = trainer.checkpointer.restore(step, trainer.factory.abstract_with_shardings(), None)
  return step, params_lib.merge_params(state.params, state.frozen)


def checkpoints(workdir: str) -> list:
  """[(step, size in bytes)] of the finished checkpoints (orbax names them by step)."""
  directory = storage.join(workdir, "checkpoints")
  found = []
  for name in sorted(storage.listdir(directory) if storage.isdir(directory) else [],
                     key=_step_key):
    path = storage.join(directory, name)
    if name.isdigit() and storage.isdir(path):
      found.append((int(name), storage.tree_size(path)))
  return found


def _step_key(name):
  return int(name) if name.isdigit() else -1


def _tuples(value):
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def run_config(workdir: str, spec: str, overrides=()) -> ml_collections.ConfigDict:
  """The run's config: `workdir/config.json` (written by vlm-train) when present, else
  `spec` (path.py:arg) with ('a.b', 'value') overrides."""
  path = storage.join(workdir, "config.json")
  if storage.exists(path):
    return ml_collections.ConfigDict(_tuples(json.loads(storage.read_text(path))))
  return config_lib.load_config(spec, overrides)


# ----------------------------------------------------------------------------------------
# Cross-attention maps (encoder-decoder models whose `encoder`/`decoder` stacks follow the
# model's scan_layers: SimVLM, Prismer's decoder)
# ----------------------------------------------------------------------------------------
def unstack_layers(params: dict) -> dict:
  """Scanned `{'layers': stacked}` -> `{'layers_i': layer i}` (transformer.py's layouts)."""
  num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  return {f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], params["layers"])
          for i in range(num_layers)}


def cross_attention_maps(model, params, batch, tokens, bos_id: int) -> np.ndarray:
  """[B, layers, T, S] decoder cross-attention weights (mean over heads) when the decoder
  reads bos_id (the run's Vocab's) + tokens[:, :-1], i.e. while it predicts tokens[:, t];
  S = encoder positions ([image tokens ; prefix]). Recomputed from the captured query/key projections of an
  unscanned copy of the model, with the model's own encoder mask."""
  keys = ("images", "image_mask", "prefix_tokens", "prefix_mask")
  batch = {k: np.asarray(batch[k]) for k in keys}
  return distributed.fetch(_cross_attention_maps(params, batch, np.asarray(tokens), bos_id,
                                                 model=model))


@distributed.jit(static_argnames=("model",))
def _cross_attention_maps(params, batch, tokens, bos_id, *, model):
  if model.scan_layers:
    params = {**params, **{name: unstack_layers(params[name]) for name in ("encoder", "decoder")
                           if "layers" in params.get(name, {})}}
  unscanned = model.clone(scan_layers=False)
  encoded, encoder_mask = unscanned.apply({"params": params}, batch, method="encode")
  inputs = jnp.concatenate([jnp.full_like(tokens[:, :1], bos_id), tokens[:, :-1]], axis=1)

  def is_cross_projection(module, method):
    return method == "__call__" and module.path[-2:-1] == ("cross_attention",) and \
        module.name in ("query", "key")

  _, state = unscanned.apply({"params": params}, encoded, encoder_mask, inputs, method="decode",
                             capture_intermediates=is_cross_projection)
  captured = state["intermediates"]["decoder"]
  mask = attention.padding_mask(None, encoder_mask)  # [B, 1, 1, S]
  maps = []
  for i in range(len(captured)):
    cross = captured[f"layers_{i}"]["cross_attention"]
    q, k = cross["query"]["__call__"][0], cross["key"]["__call__"][0]
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) * q.shape[-1] ** -0.5
    weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    maps.append(weights.mean(axis=1))
  return jnp.stack(maps, axis=1)
