"""Pixel-frame geometry shared by conversion, the image processor and inference: Qwen2.5-VL's
smart_resize and the scaling of boxes and point lists between an image file's frame and a resized one.
"""

from __future__ import annotations

import math
from typing import Sequence

# Qwen2.5-VL defaults as the old pipeline used them: 14-px patches merged 2x2, so sizes are multiples
# of 28, and at most 512 merged tokens per image.
IMAGE_FACTOR = 28
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 512 * 28 * 28


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
  """(height, width) rounded to multiples of `factor` with min_pixels <= h*w <= max_pixels.

  The same arithmetic as transformers' qwen2_vl smart_resize (so the frames agree exactly); note the
  argument and result order is (height, width).
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"smart_resize: image size must be positive, got height={height} width={width}")
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"smart_resize: absolute aspect ratio must be smaller than 200, got "
                     f"{max(height, width) / min(height, width)}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def scale_points(points: Sequence[float], from_size: tuple[int, int], to_size: tuple[int, int]
                 ) -> list[float]:
  """Flat [x, y, x, y, ...] scaled from a (width, height) frame to another, unrounded."""
  sx = to_size[0] / from_size[0]
  sy = to_size[1] / from_size[1]
  return [p * (sx if i % 2 == 0 else sy) for i, p in enumerate(points)]


def clip_box(box: Sequence[int], width: int, height: int) -> list[int]:
  """An [x1, y1, x2, y2] box clipped to the image, kept at least one pixel wide and tall."""
  x1 = min(max(int(box[0]), 0), width - 1)
  y1 = min(max(int(box[1]), 0), height - 1)
  x2 = min(max(int(box[2]), x1 + 1), width)
  y2 = min(max(int(box[3]), y1 + 1), height)
  return [x1, y1, x2, y2]


def scale_box(box: Sequence[float], from_size: tuple[int, int], to_size: tuple[int, int]
              ) -> list[int]:
  """An [x1, y1, x2, y2] box moved from a (width, height) frame to another: rounded, clipped, >= 1 px."""
  x1, y1, x2, y2 = scale_points(box, from_size, to_size)
  return clip_box([round(x1), round(y1), round(x2), round(y2)], to_size[0], to_size[1])
