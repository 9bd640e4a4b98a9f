"""images.py against transformers' Qwen2VLImageProcessorPil: the backend transformers picks for
Qwen2.5-VL when torchvision is absent (as here; the torchvision `Qwen2VLImageProcessor` cannot load)."""

import numpy as np
import pytest
from PIL import Image

from bbu_jax.data import images

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

CONFIG = images.ImageProcessorConfig()


def _random_image(width: int, height: int, seed: int) -> Image.Image:
  rng = np.random.default_rng(seed)
  # Smooth structure plus noise, so bicubic filtering has both edges and gradients to get right.
  yy, xx = np.mgrid[0:height, 0:width]
  base = np.stack([(xx * 255 // max(width, 1)), (yy * 255 // max(height, 1)), (xx + yy) % 256], -1)
  noisy = base + rng.integers(-40, 41, base.shape)
  return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


# (width, height): tiny (upscaled to min_pixels), odd mid sizes, large (downscaled to max_pixels),
# strongly non-square, and an already smart-resized size (no resize at all).
SIZES = [(37, 53), (533, 731), (1441, 1919), (100, 700), (1000, 333), (532, 728)]


@pytest.mark.parametrize("width,height", SIZES)
def test_equals_transformers(width, height):
  image = _random_image(width, height, seed=width * 7 + height)
  hf = Qwen2VLImageProcessorPil(min_pixels=CONFIG.min_pixels, max_pixels=CONFIG.max_pixels)
  expected = hf(images=[image], return_tensors="np")
  pixel_values, grid_thw = images.process_image(image, CONFIG)
  np.testing.assert_array_equal(grid_thw[None], expected["image_grid_thw"])
  assert pixel_values.shape == expected["pixel_values"].shape
  np.testing.assert_allclose(pixel_values, expected["pixel_values"], atol=1e-5, rtol=0)


def test_auto_image_processor_backend_is_the_pil_one():
  """The comparison above is against the class transformers actually picks for Qwen2.5-VL here."""
  from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
  names = IMAGE_PROCESSOR_MAPPING_NAMES["qwen2_5_vl"]
  assert names["pil"] == "Qwen2VLImageProcessorPil"
  try:
    import torchvision  # noqa: F401
    pytest.skip("torchvision present: the torchvision backend would be the default")
  except ImportError:
    pass


def test_grid_without_reading_matches_processing():
  for width, height in SIZES:
    image = _random_image(width, height, seed=1)
    pixel_values, grid_thw = images.process_image(image, CONFIG)
    assert tuple(grid_thw) == CONFIG.grid_thw(height, width)
    assert pixel_values.shape[0] == CONFIG.num_patches(height, width)
    assert CONFIG.num_image_tokens(height, width) * 4 == pixel_values.shape[0]


def test_patchify_merge_order():
  """Row 0..3 are the 2x2 patches of the top-left merge group, then the group to its right."""
  config = images.ImageProcessorConfig(patch_size=2, temporal_patch_size=2, merge_size=2)
  h, w = 4, 8  # grid 2 x 4 patches, merge groups 1 x 2
  chw = np.arange(3 * h * w, dtype=np.float32).reshape(3, h, w)
  patches, grid = images.patchify(chw, config)
  assert tuple(grid) == (1, 2, 4)
  # patch (row 0, col 1) is the second row; its channel-0, time-0 block is chw[0, 0:2, 2:4].
  np.testing.assert_array_equal(patches[1, :4], chw[0, 0:2, 2:4].reshape(-1))
  # temporal copy equals the frame.
  np.testing.assert_array_equal(patches[1, 4:8], chw[0, 0:2, 2:4].reshape(-1))
  # row 2 is patch (row 1, col 0) of the same merge group.
  np.testing.assert_array_equal(patches[2, :4], chw[0, 2:4, 0:2].reshape(-1))
  # row 4 starts the next merge group: patch (row 0, col 2).
  np.testing.assert_array_equal(patches[4, :4], chw[0, 0:2, 4:6].reshape(-1))


def test_patchify_rejects_unaligned_image():
  with pytest.raises(ValueError, match="not a multiple of 28"):
    images.patchify(np.zeros((3, 30, 28), np.float32), CONFIG)
