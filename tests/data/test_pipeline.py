import numpy as np
import pytest

import dataclasses

from vlm_jax import config as config_lib
from vlm_jax.data import catalog, mixture, pipeline, processor
from vlm_jax.data.families import simvlm
from vlm_jax.data.vocab import Vocab
from vlm_jax.evaluation import heldout

BATCH = 8


def _batches(cfg, n, **kw):
  it = pipeline.make_train_iterator(cfg, "simvlm", global_batch_size=kw.pop("batch", BATCH),
                                    seed=kw.pop("seed", 0), process_index=0, process_count=1,
                                    **kw)
  out = [next(it) for _ in range(n)]
  return it, out


def _equal(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_batch_layout(data_config):
  _, (batch,) = _batches(data_config, 1)
  lp, ls, s = data_config.prefix_length, data_config.suffix_length, data_config.image_size
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
      "images": ((BATCH, 1, s, s, 3), "float32"), "image_mask": ((BATCH, 1), "float32"),
      "prefix_tokens": ((BATCH, lp), "int32"), "prefix_mask": ((BATCH, lp), "float32"),
      "tokens": ((BATCH, ls), "int32"), "targets": ((BATCH, ls), "int32"),
      "loss_mask": ((BATCH, ls), "float32"), "loss_weight": ((BATCH,), "float32")}
  assert batch["images"].min() >= -1 and batch["images"].max() <= 1


def test_same_seed_same_stream(data_config):
  _, a = _batches(data_config, 3)
  _, b = _batches(data_config, 3)
  _, c = _batches(data_config, 3, seed=1)
  assert _equal(a, b) and not _equal(a, c)


def test_process_rows_put_together_are_the_single_process_global_batches(data_config):
  """Multi-host: the global batch stream does not depend on the number of processes."""
  single = pipeline.make_train_iterator(data_config, "simvlm", global_batch_size=12, seed=0,
                                        process_index=0, process_count=1)
  parts = [pipeline.make_train_iterator(data_config, "simvlm", global_batch_size=12, seed=0,
                                        process_index=i, process_count=3) for i in range(3)]
  for _ in range(3):
    want = next(single)
    got = [next(p) for p in parts]
    for key in want:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])


def test_two_processes_read_disjoint_records_covering_an_epoch(data_config):
  """Over one epoch of the global stream, process 0's and process 1's rows are different
  records and together every record of the dataset."""
  data_config.mixture = "synthetic_pairs"
  stream = pipeline.mixed_records(data_config, "simvlm", seed=3)
  source = catalog.make_source(catalog.tasks()["synthetic_pairs"], data_config.data_dir,
                               "train")
  epoch, per_process = len(source), 4
  batches = -(-epoch // (2 * per_process))
  keys = []
  for index in range(2):
    rows = pipeline.ProcessRows(stream, per_process, index, 2)
    this_epoch = [rows[k] for k in range(batches * per_process)]
    keys.append([element[1]["key"] for position, element in this_epoch if position < epoch])
    assert len(set(keys[-1])) == len(keys[-1])
  assert not set(keys[0]) & set(keys[1])
  assert set(keys[0]) | set(keys[1]) == {source[i]["key"] for i in range(epoch)}


def test_process_batches_differ(data_config):
  its = [pipeline.make_train_iterator(data_config, "simvlm", global_batch_size=16, seed=0,
                                      process_index=i, process_count=2) for i in range(2)]
  a, b = next(its[0]), next(its[1])
  assert a["tokens"].shape[0] == 8 and not np.array_equal(a["images"], b["images"])
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_train_iterator(data_config, "simvlm", global_batch_size=15, seed=0, process_index=0,
                                 process_count=2)


def test_state_restore_continues_stream(data_config):
  it, _ = _batches(data_config, 3)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  fresh, _ = _batches(data_config, 1)
  fresh.set_state(state)
  assert _equal(want, [next(fresh) for _ in range(3)])


def test_state_restore_with_workers(data_config):
  data_config.num_workers = 2
  it, _ = _batches(data_config, 2)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  fresh, _ = _batches(data_config, 1)
  fresh.set_state(state)
  got = [next(fresh) for _ in range(3)]
  it.close()
  fresh.close()
  assert _equal(want, got)


def test_orbax_checkpoint(data_config, tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  it, _ = _batches(data_config, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
    mgr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    want = [next(it) for _ in range(2)]
    fresh, _ = _batches(data_config, 1)
    mgr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert _equal(want, [next(fresh) for _ in range(2)])


def test_realised_mixture_rates(data_config):
  records = pipeline.mixed_records(data_config, "simvlm", seed=0)
  names = [records[i][0].name for i in range(10_000)]
  for name, rate in simvlm.MIXTURES["pretrain_simvlm"]:
    assert abs(names.count(name) / 10_000 - rate) < 0.02


def test_mixture_rates_in_batches(data_config):
  it, batches = _batches(data_config, 25, batch=40)
  image_fraction = np.mean([b["image_mask"].mean() for b in batches])
  assert abs(image_fraction - 0.8) < 0.02
  assert pipeline.skipped_record_counts(it) == {
      "examples": 1000, "skipped_records": 0, "examples/synthetic_pairs": 800,
      "examples/synthetic_text": 200, "rate/synthetic_pairs": 0.8, "rate/synthetic_text": 0.2}


def test_held_out_examples_are_captioning(data_config):
  """Evaluation reads a task's validation split in file order through the family's
  processor in evaluation mode: SimVLM pairs without a text prefix."""
  vocab = Vocab()
  config = config_lib.load_config("configs/simvlm.py:tiny")
  config.data = data_config
  examples = heldout.load_examples(config, "synthetic_pairs", 8)
  assert len(examples) == 8
  for example, raw in examples:
    assert example["images"].shape == (1, 32, 32, 3) and not example["prefix_mask"].any()
    assert vocab.decode(example["targets"]) == raw["text"]
  again = heldout.load_examples(config, "synthetic_pairs", 8)
  assert _equal([e for e, _ in examples], [e for e, _ in again])


def test_unknown_mixture_names_choices(data_config):
  data_config.mixture = "pretrain_simvlmm"
  with pytest.raises(mixture.MixtureError, match="did you mean pretrain_simvlm"):
    _batches(data_config, 1)


def test_single_task_as_mixture(data_config):
  data_config.mixture = "synthetic_text"
  _, (batch,) = _batches(data_config, 1)
  assert not batch["image_mask"].any() and batch["prefix_mask"][:, 0].all()


def test_a_task_the_family_cannot_read_is_a_clear_error(data_config):
  data_config.mixture = "flamingo_mmc4"  # another family's task
  with pytest.raises(mixture.MixtureError,
                     match="config.data.mixture='flamingo_mmc4': unknown source"):
    _batches(data_config, 1)
  documents = catalog.TaskSpec("docs", "interleaved", "mmc4", "docs/*.jsonl")
  with pytest.raises(ValueError, match="task 'docs' holds 'interleaved' records; no template"):
    processor.with_template(documents, simvlm.TEMPLATES, "simvlm")
  questions = dataclasses.replace(documents, kind="pairs", template="vqa")
  with pytest.raises(ValueError, match="template 'vqa' is not one of the 'simvlm' family's"):
    processor.with_template(questions, simvlm.TEMPLATES, "simvlm")
