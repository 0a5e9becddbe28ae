r"""MiniGPT-v2 stage 2 (fine-grained tasks) on RefCOCO, read through a seqio tasks module.

    # RefCOCO from TFDS (its manual download: COCO train2014 images + the refer annotations),
    # prepared as tfrecord (TFDS's default), which seqio streams with tf.data
    tfds build ref_coco --config refcoco_unc --manual_dir /data/refcoco_manual
    vlm-data inspect --config configs/examples/minigpt_v2_refcoco.py:7b
    vlm-train --config configs/examples/minigpt_v2_refcoco.py:7b,init_from=/runs/stage1 \
        --workdir /runs/stage2
    vlm-eval --config configs/examples/minigpt_v2_refcoco.py:7b --workdir /runs/stage2 \
        --task refer                       # iou@0.5 on RefCOCO's validation split

`arg`: configs/minigpt_v2.py's argument (a size, then its options; the stage is 2).
config.data.tasks_module is refcoco_tasks.py beside this file: it registers the seqio Task
`refcoco` (the TFDS dataset named by $VLM_REFCOCO_TFDS, default ref_coco/refcoco_unc:1.1.0,
in $VLM_REFCOCO_TFDS_DIR or TFDS's data dir), whose examples are grounding records (each
referred object's box and first referring expression). The mixture feeds that one task to
four of MiniGPT-v2's templates, in the proportions the synthetic stage-2 mixture gives
them (vlm_jax/data/families/minigpt_v2.py):

    name       template   rate
    refer      refer      0.15   [refer] expression -> {<x1><y1><x2><y2>}
    identify   identify   0.10   [identify] box -> expression
    grounded   grounding  0.15   [grounding] grounded caption of the referred objects
    detection  detection  0.15   [detection] expressions -> their boxes

A seqio source is a tf.data stream: a resumed run replays it from its start to the restored
position (exact, but it re-reads what the run has consumed); prepare RefCOCO as array_record
and name it `tfds:ref_coco/refcoco_unc:1.1.0` with a `fields` mapping for random access.
"""
import os

from vlm_jax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))
# name: (template, rate)
TEMPLATES = {"refer": ("refer", 0.15), "identify": ("identify", 0.1),
             "grounded": ("grounding", 0.15), "detection": ("detection", 0.15)}


def get_config(arg: str = "tiny"):
  family_arg = ",".join(o for o in arg.split(",") if not o.startswith("stage=")) + ",stage=2"
  c = config_lib.load_config_file(
      os.path.join(os.path.dirname(HERE), "minigpt_v2.py") + ":" + family_arg)
  c.data.tasks_module = os.path.join(HERE, "refcoco_tasks.py")
  c.data.mixture = tuple(dict(source="refcoco", name=name, template=template, rate=rate)
                         for name, (template, rate) in TEMPLATES.items())
  return c
