"""The packed-iterator resume check that every family's packing tests share."""
import numpy as np

from vlm_jax.data import pipeline


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
