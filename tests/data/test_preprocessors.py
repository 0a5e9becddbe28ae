import io

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import preprocessors as pp


def _jpeg(w, h, colour=(255, 0, 0), fmt="JPEG"):
  buf = io.BytesIO()
  Image.new("RGB", (w, h), colour).save(buf, format=fmt)
  return buf.getvalue()


@pytest.mark.parametrize("mode", ["pad", "crop", "stretch"])
def test_resize_and_normalise(mode):
  pixels = pp.load_image(_jpeg(40, 20), 16, mode)
  assert pixels.shape == (16, 16, 3) and pixels.dtype == np.float32
  assert pixels.min() >= -1 and pixels.max() <= 1
  if mode == "pad":  # letterbox rows are grey, the image is red
    assert abs(pixels[0, 8, 0]) < 0.01 and pixels[8, 8, 0] > 0.9
  else:
    assert pixels[0, 8, 0] > 0.9


def test_greyscale_and_png_become_rgb():
  buf = io.BytesIO()
  Image.new("L", (8, 8), 128).save(buf, format="PNG")
  assert pp.load_image(buf.getvalue(), 8).shape == (8, 8, 3)


@pytest.mark.parametrize("data", [b"", b"not an image", _jpeg(32, 32)[:100]])
def test_bad_images_are_bad_records(data):
  with pytest.raises(pp.BadRecord):
    pp.load_image(data, 8)


def test_pixel_limit():
  with pytest.raises(pp.BadRecord, match="exceeds"):
    pp.load_image(_jpeg(200, 200), 8, max_pixels=100 * 100)


def test_caption_cleaning():
  assert pp.clean_text("  two \n red\tcircles ") == "two red circles"
  assert pp.caption_of({"text": None, "meta": '{"caption": "a cat"}'}) == "a cat"
  for bad in (None, "   "):
    with pytest.raises(pp.BadRecord):
      pp.clean_text(bad)
  with pytest.raises(pp.BadRecord):
    pp.text_from_json_line('{"text": ', "text")
