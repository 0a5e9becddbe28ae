"""Iterator state saved mid-epoch (with worker processes running) through orbax, restored in
a new Python process: the next 1,000 examples equal those of the uninterrupted stream."""
import importlib.util
import json
import subprocess
import sys

import grain
import orbax.checkpoint as ocp

from vlm_jax.data import pipeline

BATCH, AHEAD, NEXT = 8, 5, 1000

CHILD = r'''
import hashlib, json, sys
import grain, ml_collections, numpy as np, orbax.checkpoint as ocp
from vlm_jax.data import pipeline

def fingerprints(it, n):
  out = []
  while len(out) < n:
    batch = next(it)
    for i in range(len(batch["tokens"])):
      h = hashlib.sha1()
      for key in sorted(batch):
        h.update(key.encode()); h.update(np.ascontiguousarray(batch[key][i]).tobytes())
      out.append(h.hexdigest())
  return out[:n]

if __name__ == "__main__":
  config_json, checkpoint_dir, out_path, batch, n = sys.argv[1:]
  cfg = ml_collections.ConfigDict(json.loads(config_json))
  it = pipeline.make_train_iterator(cfg, "simvlm", global_batch_size=int(batch), seed=0,
                                    process_index=0, process_count=1)
  with ocp.CheckpointManager(checkpoint_dir) as mgr:
    mgr.restore(mgr.latest_step(),
                args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))
  with open(out_path, "w") as f:
    json.dump(fingerprints(it, int(n)), f)
  it.close()
'''


def test_state_restored_in_a_new_process_continues_the_stream(data_config, sizes, tmp_path):
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  spec = importlib.util.spec_from_file_location("child", script)
  child = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(child)  # the parent fingerprints with the child's very function

  data_config.num_workers = 2
  epoch = sizes.train_pairs + sizes.train_docs
  assert AHEAD * BATCH < epoch  # the state is saved mid-epoch
  it = pipeline.make_train_iterator(data_config, "simvlm", global_batch_size=BATCH, seed=0,
                                    process_index=0, process_count=1)
  for _ in range(AHEAD):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
    mgr.save(AHEAD, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
  want = child.fingerprints(it, NEXT)
  it.close()

  out = tmp_path / "restored.json"
  subprocess.run([sys.executable, str(script), data_config.to_json(), str(tmp_path / "ckpt"),
                  str(out), str(BATCH), str(NEXT)], check=True, timeout=600)
  got = json.loads(out.read_text())
  assert len(got) == len(want) == NEXT
  assert got == want
  assert len(set(want)) > NEXT * 0.5  # the stream is not trivially repetitive
