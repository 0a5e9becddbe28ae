"""The toy family's data: an image-text pair -> [image slot, BOS, caption, EOS] with the loss
on the caption and EOS; captions of the sample scenes."""
import numpy as np

from vlm_jax.data import catalog, preprocessors
from vlm_jax.data import processor as processor_lib
from vlm_jax.data.synthetic import scenes
from vlm_jax.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

TEMPLATES = {"caption": ("pairs",)}
MIXTURES = {"toy_captions": (("synthetic_pairs", 1.0),)}
EVAL_TASKS = (catalog.EvalTask("toy_scenes", "synthetic_pairs", keep=scenes.is_scene,
                               captions=True, num_examples=8, max_new_tokens=12),)


class Processor(processor_lib.RecordProcessor):

  def convert(self, spec, raw, rng):
    del rng
    length = self.data_config.sequence_length
    image = preprocessors.load_image(raw["image"], self.data_config.image_size)
    ids = [UNK_ID, BOS_ID] + self.vocab.encode(preprocessors.caption_of(raw))[:length - 2]
    ids.append(EOS_ID)
    n = len(ids) - 1
    arrays = {key: np.full((length,), PAD_ID, np.int32) for key in ("tokens", "targets")}
    arrays["tokens"][:n], arrays["targets"][:n] = ids[:-1], ids[1:]
    loss_mask = np.zeros((length,), np.float32)
    loss_mask[1:n] = 1.0  # the caption and EOS; not the BOS predicted from the image slot
    token_mask = (np.arange(length) < n).astype(np.float32)
    return dict(arrays, images=image[None].astype(np.float32),
                image_mask=np.ones((1,), np.float32),
                image_positions=np.zeros((1,), np.int32), loss_mask=loss_mask,
                token_mask=token_mask, loss_weight=np.float32(spec.loss_weight))
