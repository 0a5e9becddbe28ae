"""Real photographs with hand-written captions, from scikit-image's bundled data (offline).

Twenty images ship inside the `scikit-image` wheel (no download); each caption was written
by looking at the image. They are written as img2dataset webdataset shards under
`<data_dir>/photos/`, so the same reader that serves LAION serves them:

  train/00000.tar       `crops_per_photo` random crops (60-100% of the area, random flips)
                        of every photo, each with the photo's caption
  validation/00000.tar  every photo whole

The task `photos` is in the catalog (not in the SimVLM sample mixture, whose captions follow
the synthetic grammar): `vlm-data inspect photos`, or `--config.data.mixture=photos`.
"""
import json
import os

import numpy as np
from PIL import Image

from vlm_jax import storage
from vlm_jax.data.synthetic import sample_data

VERSION = 1
SUBDIR = "photos"
MAX_SIDE = 256  # stored size; the pipeline resizes to config.data.image_size

CAPTIONS = {
    "astronaut": "a smiling astronaut in an orange spacesuit with a helmet, in front of an "
                 "american flag and a model of the space shuttle",
    "camera": "a black and white photo of a man in a dark coat looking through a camera on "
              "a tripod in a field",
    "chelsea": "a close up of a tabby cat with green eyes",
    "coffee": "a cup of coffee on a red saucer with a spoon, on a wooden table",
    "coins": "a black and white photo of rows of old coins on a dark background",
    "colorwheel": "a colour wheel with every hue around a white centre on a black background",
    "grass": "a black and white close up of grass",
    "gravel": "a black and white close up of gravel",
    "brick": "a black and white photo of a brick wall seen at an angle",
    "horse": "the black silhouette of a horse on a white background",
    "hubble_deep_field": "a deep field of distant galaxies on a black sky",
    "immunohistochemistry": "a microscope image of stained tissue in brown and blue",
    "logo": "a round logo in green and orange with a snake",
    "moon": "a black and white photo of the surface of the moon with craters",
    "page": "a scanned page of printed text titled region-based segmentation",
    "retina": "a photo of the retina of an eye, orange with red blood vessels",
    "rocket": "a rocket on a launch pad between towers at dusk",
    "text": "a black and white photo of handwritten numbers and letters on a board",
    "cell": "a black and white microscope image of a single round cell",
    "checkerboard": "a black and white checkerboard",
}


def _load(name: str) -> Image.Image:
  import skimage.data  # pylint: disable=g-import-not-at-top
  pixels = np.asarray(getattr(skimage.data, name)())
  if pixels.dtype == bool:
    pixels = pixels.astype(np.uint8) * 255
  image = Image.fromarray(pixels).convert("RGB")
  image.thumbnail((MAX_SIDE, MAX_SIDE))
  return image


def _random_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
  area = rng.uniform(0.6, 1.0)
  aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
  w = min(image.width, int(round(image.width * np.sqrt(area * aspect))))
  h = min(image.height, int(round(image.height * np.sqrt(area / aspect))))
  x, y = int(rng.integers(0, image.width - w + 1)), int(rng.integers(0, image.height - h + 1))
  crop = image.crop((x, y, x + w, y + h))
  return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def _rows(split: str, crops_per_photo: int, seed: int):
  rng = np.random.default_rng([seed, sample_data.SPLIT_SEEDS[split]])
  for name, caption in CAPTIONS.items():
    image = _load(name)
    url = f"skimage://data/{name}"
    variants = ([_random_crop(image, rng) for _ in range(crops_per_photo)]
                if split == "train" else [image])
    for variant in variants:
      yield dict(image=variant, caption=caption, url=url, similarity=None)


def generate(output_dir: str, crops_per_photo: int = 16, seed: int = 0) -> None:
  for split in ("train", "validation"):
    directory = os.path.join(output_dir, split)
    os.makedirs(directory)
    sample_data.write_img2dataset_shard(directory, 0, _rows(split, crops_per_photo, seed))
  with open(os.path.join(output_dir, "manifest.json"), "w") as f:
    json.dump(dict(version=VERSION, crops_per_photo=crops_per_photo, seed=seed), f)


def ensure_photos(data_dir: str = "") -> str:
  """Returns `<data_dir>/photos`, writing it first if missing."""
  return sample_data.ensure_generated(
      storage.join(data_dir or sample_data.default_data_dir(), SUBDIR), VERSION, generate)
