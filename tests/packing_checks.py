"""What every family's packing tests share: stacking rows, packing examples into rows, the
tiny model's parameters, and the packed-iterator resume check."""
import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np

from vlm_jax.data import health, packing, pipeline

COUNTERS = (health.SKIPPED_KEY, health.TASK_KEY)


def stack(rows) -> dict:
  """Examples or packed rows stacked key by key, without the per-row health counters."""
  rows = [{k: v for k, v in row.items() if k not in COUNTERS} for row in rows]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def packed_rows(examples, layout, config: dict) -> dict:
  """`examples` packed (seed 0) by data/packing.py with `layout` and `config`'s
  sequence_length / packed_images / packing_bins, stacked."""
  return stack(packing.pack(grain.MapDataset.source(examples).to_iter_dataset(), layout,
                            ml_collections.ConfigDict(config), seed=0))


def init_params(model, batch) -> dict:
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))["params"]


def resumed_packed_batches(data, family: str, global_batch_size: int, after: int = 3):
  """Runs `family`'s train iterator on `data` for 2 batches, saves its state and runs `after`
  more; an iterator restored from that state must give the same `after` batches and
  counters. Returns (the iterator, its 2 + `after` batches)."""
  make = lambda: pipeline.make_train_iterator(data, family, global_batch_size=global_batch_size,
                                              seed=0, process_index=0, process_count=1)
  it = make()
  batches = [next(it) for _ in range(2)]
  state = it.get_state()
  want = [next(it) for _ in range(after)]
  resumed = make()
  resumed.set_state(state)
  for got, expected in zip([next(resumed) for _ in range(after)], want):
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in got)
  assert resumed.counters == it.counters
  return it, batches + want
