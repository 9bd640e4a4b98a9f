"""Qwen2.5-VL's image preprocessing in numpy: smart_resize, PIL bicubic resize, CLIP normalization,
temporal duplication and merge-ordered patchify, equal to transformers' Qwen2VLImageProcessor(Pil).

Order as transformers: resize the uint8 image with PIL BICUBIC, then rescale by 1/255, then normalize
with the OpenAI CLIP mean/std, then cut patches so that each 2x2 group of merged patches is contiguous.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

from bbu_jax.data.geometry import MAX_PIXELS, MIN_PIXELS, smart_resize

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
  """The Qwen2VLImageProcessor settings bbu_jax uses (min/max pixels as DESIGN.md's defaults)."""

  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  min_pixels: int = MIN_PIXELS
  max_pixels: int = MAX_PIXELS

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

  def resized_size(self, height: int, width: int) -> tuple[int, int]:
    """(height, width) of the frame the model sees for an image file of this size."""
    return smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels,
                        max_pixels=self.max_pixels)

  def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of an image file of this size, without reading the image."""
    rh, rw = self.resized_size(height, width)
    return 1, rh // self.patch_size, rw // self.patch_size

  def num_patches(self, height: int, width: int) -> int:
    t, h, w = self.grid_thw(height, width)
    return t * h * w

  def num_image_tokens(self, height: int, width: int) -> int:
    """`<|image_pad|>` tokens the image takes in the text (one per merged 2x2 patch group)."""
    return self.num_patches(height, width) // (self.merge_size * self.merge_size)


def load_image(path: str | os.PathLike) -> Image.Image:
  """An RGB PIL image (EXIF orientation is applied by the converter, so files are upright already)."""
  try:
    with Image.open(path) as image:
      return image.convert("RGB")
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read image: {e}") from e


def resize_image(image: Image.Image, height: int, width: int) -> np.ndarray:
  """(height, width, 3) uint8: the image resized with PIL BICUBIC as transformers does."""
  rgb = image if image.mode == "RGB" else image.convert("RGB")
  if rgb.size != (width, height):
    rgb = rgb.resize((width, height), resample=Image.BICUBIC)
  return np.asarray(rgb, dtype=np.uint8)


def normalize_image(pixels: np.ndarray) -> np.ndarray:
  """(3, H, W) float32 from (H, W, 3) uint8: rescale by 1/255 (in float64 as transformers), then CLIP mean/std."""
  scaled = (pixels.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
  mean = np.asarray(OPENAI_CLIP_MEAN, np.float32)
  std = np.asarray(OPENAI_CLIP_STD, np.float32)
  return np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1))


def patchify(chw: np.ndarray, config: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
  """(N, C*T*P*P) float32 patches in merge order and grid_thw (3,) for one normalized (C, H, W) image.

  Rows run over 2x2 merge groups in row-major order, and within a group over its 4 patches; each row
  is (channel, temporal copy, patch row, patch col) flattened, the still image repeated T times.
  """
  c, h, w = chw.shape
  p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
  if h % (p * m) or w % (p * m):
    raise ValueError(f"patchify: image of {h}x{w} is not a multiple of {p * m} on both sides")
  gh, gw = h // p, w // p
  x = chw.reshape(c, gh // m, m, p, gw // m, m, p)
  x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, c, p, p)
  x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t, p, p))
  patches = np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p), dtype=np.float32)
  return patches, np.array([1, gh, gw], np.int64)


def process_image(image: Image.Image, config: ImageProcessorConfig = ImageProcessorConfig()
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(pixel_values (N, patch_dim) float32, image_grid_thw (3,) int64) for one PIL image."""
  height, width = config.resized_size(image.height, image.width)
  return patchify(normalize_image(resize_image(image, height, width)), config)
