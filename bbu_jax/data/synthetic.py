"""Synthetic, photo-like BBU cabinet images with records, for the demo, the tests and the benchmarks.

  python -m bbu_jax.data.synthetic --output_root data/synth --num_train 200 --num_val 20 \
      --num_teacher 20 --seed 0 [--scale 0.5]

Each image shows a cabinet (frame, rails, clutter, noise) with BBU units in Huawei / ZTE / Ericsson
looks, shields, screws and connectors, fiber (thin, yellow/orange) and other cables (thick, dark),
label stickers, and the cabinet space. Labels are those of labels.SYNTHETIC_LABEL_HIERARCHY (the old
hierarchy with cables split into 光纤/电线: 14 labels). Object counts, label frequencies, box sizes and
positions and image sizes are drawn from real_stats.REAL_STATS (the real records' figures); the cabinet
space (absent from the real exports measured) is added to half of the images. Geometry as the newest
export writes it: `quad` for BBUs, shields and stickers (drawn rotated), `line` for cables, `bbox_2d`
for the rest. Deterministic per (seed, split, index).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from bbu_jax.data import records as records_lib
from bbu_jax.data.real_stats import QUANTILE_LEVELS, REAL_STATS

# Real fine type (real_stats.fine_type) -> synthetic label.
REAL_TO_SYNTHETIC = {
    "螺丝、光纤插头/BBU安装螺丝": "螺丝连接点/BBU安装螺丝",
    "螺丝、光纤插头/BBU端光纤插头": "螺丝连接点/CPRI光缆和BBU连接点",
    "螺丝、光纤插头/地排处接地螺丝": "螺丝连接点/地排处螺丝",
    "螺丝、光纤插头/机柜处接地螺丝": "螺丝连接点/BBU接地线机柜接地端",
    "螺丝、光纤插头/ODF端光纤插头": "螺丝连接点/BBU尾纤和ODF连接点",
    "标签": "标签贴纸",
    "光纤": "线缆/光纤",
    "电线": "线缆/电线",
    "BBU设备/华为": "bbu基带处理单元/华为",
    "BBU设备/中兴": "bbu基带处理单元/中兴",
    "BBU设备/爱立信": "bbu基带处理单元/爱立信",
    "挡风板": "挡风板/安装",
}
CABINET_SPACE_PROBABILITY = 0.5
SPLITS = ("train", "val", "teacher_pool")

# Brand looks: body colour, front-panel colour, logo colour.
_BRAND_LOOKS = {
    "华为": ((38, 38, 42), (55, 55, 60), (220, 30, 40)),
    "中兴": ((165, 170, 176), (190, 194, 200), (20, 90, 200)),
    "爱立信": ((44, 56, 84), (62, 76, 108), (235, 235, 240)),
}


def _label_frequencies() -> tuple[list[str], np.ndarray, dict[str, str]]:
  """Synthetic labels, their object-level probabilities, and label -> real fine type."""
  fine = REAL_STATS["fine_types"]
  names = [real for real in REAL_TO_SYNTHETIC if real in fine]
  counts = np.array([fine[real]["count"] for real in names], dtype=np.float64)
  return ([REAL_TO_SYNTHETIC[r] for r in names], counts / counts.sum(),
          {REAL_TO_SYNTHETIC[r]: r for r in names})


_LABELS, _LABEL_PROBS, _LABEL_TO_REAL = _label_frequencies()
_COUNT_VALUES = np.array([int(k) for k in REAL_STATS["objects_per_image"]["histogram"]])
_COUNT_PROBS = np.array(list(REAL_STATS["objects_per_image"]["histogram"].values()), np.float64)
_COUNT_PROBS /= _COUNT_PROBS.sum()
_SIZE_NAMES = list(REAL_STATS["image_sizes"])
_SIZE_PROBS = np.array(list(REAL_STATS["image_sizes"].values()), np.float64)
_SIZE_PROBS /= _SIZE_PROBS.sum()


def image_size_choices(scale: float = 1.0) -> list[tuple[int, int]]:
  """The real (smart-resized) image sizes as (width, height), scaled and kept multiples of 28."""
  out = []
  for name in _SIZE_NAMES:
    w, h = (int(v) for v in name.split("x"))
    out.append((max(28, round(w * scale / 28) * 28), max(28, round(h * scale / 28) * 28)))
  return out


def _quantile_sample(rng: np.random.Generator, quantiles: Sequence[float], u: float | None = None
                     ) -> float:
  """A draw from the piecewise-linear distribution through the stored quantiles."""
  return float(np.interp(rng.random() if u is None else u, QUANTILE_LEVELS, quantiles))


class _Canvas:
  """An image being drawn, and the records of what was drawn."""

  def __init__(self, width: int, height: int, rng: np.random.Generator):
    self.width, self.height, self.rng = width, height, rng
    self.unit = min(width, height) / 500.0  # line widths and details scale with the image
    self.image = Image.new("RGB", (width, height))
    self.draw = ImageDraw.Draw(self.image)
    self.objects: list[dict] = []

  def px(self, value: float) -> int:
    return max(1, round(value * self.unit))

  def clip_point(self, x: float, y: float) -> tuple[int, int]:
    return min(max(round(x), 0), self.width), min(max(round(y), 0), self.height)

  def sample_box(self, label: str, aspect_bias: float = 1.0) -> tuple[float, float, float, float]:
    """(cx, cy, w, h) in pixels from the real figures of the label's type; w and h are drawn with
    correlated quantile levels (big things are big both ways)."""
    figures = REAL_STATS["fine_types"][_LABEL_TO_REAL[label]]
    u = self.rng.random()
    v = min(max(u + self.rng.normal(0, 0.2), 0.0), 1.0)
    w = max(_quantile_sample(self.rng, figures["box_w_rel"], u) * self.width, 4 * self.unit, 3)
    h = max(_quantile_sample(self.rng, figures["box_h_rel"], v) * self.height * aspect_bias,
            4 * self.unit, 3)
    cx = _quantile_sample(self.rng, figures["center_x_rel"]) * self.width
    cy = _quantile_sample(self.rng, figures["center_y_rel"]) * self.height
    return cx, cy, min(w, self.width), min(h, self.height)

  def add(self, key: str, points: Sequence[float], label: str) -> None:
    flat = []
    for i in range(0, len(points), 2):
      flat.extend(self.clip_point(points[i], points[i + 1]))
    xs, ys = flat[0::2], flat[1::2]
    if max(xs) - min(xs) < 2 or max(ys) - min(ys) < 2:
      return  # clipped away (mostly outside the image): not annotated, as an annotator would not
    self.objects.append({key: flat, "desc": label})


def _rotated_frame(cx: float, cy: float, w: float, h: float, angle: float):
  """A map from local (u, v) in [0, w] x [0, h] to image coordinates, rotated by `angle` radians."""
  cos, sin = math.cos(angle), math.sin(angle)

  def to_image(u: float, v: float) -> tuple[float, float]:
    du, dv = u - w / 2, v - h / 2
    return cx + du * cos - dv * sin, cy + du * sin + dv * cos

  return to_image


def _local_polygon(to_image, x1, y1, x2, y2):
  return [to_image(x1, y1), to_image(x2, y1), to_image(x2, y2), to_image(x1, y2)]


def _jitter(rng, colour, amount=12):
  return tuple(int(min(max(c + rng.integers(-amount, amount + 1), 0), 255)) for c in colour)


def _draw_background(c: _Canvas) -> None:
  rng = c.rng
  interior = _jitter(rng, [(48, 50, 54), (70, 66, 60), (150, 148, 140), (32, 36, 40)][rng.integers(4)],
                     15)
  c.draw.rectangle([0, 0, c.width, c.height], fill=interior)
  # back-plate texture: faint vertical panels
  for x in range(0, c.width, max(8, c.px(rng.integers(30, 70)))):
    c.draw.line([(x, 0), (x, c.height)], fill=_jitter(rng, interior, 10), width=c.px(2))
  # cabinet rails with mounting holes, and top/bottom beams
  rail_colour = _jitter(rng, (95, 98, 104), 20)
  rail_w = c.px(rng.integers(14, 26))
  for x0 in (int(rng.integers(0, max(1, c.width // 12))),
             int(c.width - rail_w - rng.integers(0, max(1, c.width // 12)))):
    c.draw.rectangle([x0, 0, x0 + rail_w, c.height], fill=rail_colour)
    for y in range(c.px(6), c.height, c.px(18)):
      c.draw.rectangle([x0 + rail_w // 3, y, x0 + 2 * rail_w // 3, y + c.px(5)], fill=(20, 20, 22))
  for y0 in (0, c.height - c.px(rng.integers(10, 30))):
    c.draw.rectangle([0, y0, c.width, y0 + c.px(rng.integers(8, 20))], fill=_jitter(rng, rail_colour))
  # clutter: unannotated boxes (other equipment, power units) and stray lines
  for _ in range(int(rng.integers(2, 7))):
    w, h = rng.uniform(0.05, 0.4) * c.width, rng.uniform(0.02, 0.15) * c.height
    x, y = rng.uniform(0, c.width - w), rng.uniform(0, c.height - h)
    # greys, greens and browns: nothing sticker-white, BBU-black or cable-yellow
    colour = _jitter(rng, [(120, 120, 125), (105, 115, 95), (60, 75, 60), (100, 85, 70)][rng.integers(4)],
                     15)
    c.draw.rectangle([x, y, x + w, y + h], fill=colour, outline=_jitter(rng, colour, 40))
  for _ in range(int(rng.integers(0, 4))):
    pts = [(rng.uniform(0, c.width), rng.uniform(0, c.height)) for _ in range(3)]
    c.draw.line(pts, fill=_jitter(rng, (140, 140, 140), 60), width=c.px(1.5))


def _draw_bbu(c: _Canvas, label: str, box: tuple[float, float, float, float] | None = None) -> dict:
  """A BBU: a tall rotated box with a brand front, slot rows, ports and LEDs. Returns its frame.

  `box` (cx, cy, w, h) places it; by default it is drawn from the real figures."""
  brand = label.split("/")[1]
  body, front, logo = (_jitter(c.rng, colour, 8) for colour in _BRAND_LOOKS[brand])
  if box is None:
    cx, cy, w, h = c.sample_box(label)
    if w > h:  # BBUs stand upright in these photos (rotated 90 degrees in the cabinet)
      w, h = h, w
    w, h = max(w, 8 * c.unit), max(h, 24 * c.unit)
  else:
    cx, cy, w, h = box
  angle = c.rng.normal(0, 0.04)
  to_image = _rotated_frame(cx, cy, w, h, angle)
  c.draw.polygon(_local_polygon(to_image, 0, 0, w, h), fill=body, outline=(15, 15, 15))
  margin = 0.1 * w
  c.draw.polygon(_local_polygon(to_image, margin, 0.03 * h, w - margin, 0.97 * h), fill=front)
  # board slots along the unit, each with ports and a LED
  slots = int(c.rng.integers(2, 5))
  for s in range(slots):
    u0 = margin + s * (w - 2 * margin) / slots
    u1 = u0 + (w - 2 * margin) / slots * 0.85
    c.draw.polygon(_local_polygon(to_image, u0, 0.12 * h, u1, 0.88 * h), outline=_jitter(c.rng, body, 30))
    for k in range(int(c.rng.integers(2, 6))):
      v = 0.2 * h + k * 0.12 * h
      c.draw.polygon(_local_polygon(to_image, u0 + 0.2 * (u1 - u0), v, u0 + 0.8 * (u1 - u0),
                                    v + 0.04 * h), fill=(20, 20, 20))
    led = to_image((u0 + u1) / 2, 0.15 * h)
    r = max(1.0, 1.5 * c.unit)
    c.draw.ellipse([led[0] - r, led[1] - r, led[0] + r, led[1] + r],
                   fill=(40, 220, 60) if c.rng.random() < 0.8 else (230, 60, 40))
  # brand logo near the top of the front
  v0 = 0.04 * h
  if brand == "华为":  # a red fan of petals
    for k in range(6):
      a = math.pi * (0.15 + 0.14 * k)
      tip = (w / 2 + 0.3 * w * math.cos(a), v0 + 0.05 * h * (1 - math.sin(a)) + 0.01 * h)
      c.draw.polygon([to_image(w / 2, v0 + 0.06 * h), to_image(*tip),
                      to_image(tip[0] + 0.04 * w, tip[1] + 0.01 * h)], fill=logo)
  elif brand == "中兴":  # blue block letters
    for k in range(3):
      u0 = 0.22 * w + k * 0.2 * w
      c.draw.polygon(_local_polygon(to_image, u0, v0, u0 + 0.14 * w, v0 + 0.05 * h), fill=logo)
  else:  # three slanted bars
    for k in range(3):
      u0 = 0.3 * w + k * 0.14 * w
      c.draw.polygon([to_image(u0, v0 + 0.06 * h), to_image(u0 + 0.08 * w, v0),
                      to_image(u0 + 0.13 * w, v0), to_image(u0 + 0.05 * w, v0 + 0.06 * h)], fill=logo)
  quad = [coord for point in _local_polygon(to_image, 0, 0, w, h) for coord in point]
  c.add("quad", quad, label)
  return {"cx": cx, "cy": cy, "w": w, "h": h, "to_image": to_image}


def _draw_panel(c: _Canvas, label: str, box: tuple[float, float, float, float] | None = None) -> None:
  """A wind shield: a metal plate with ventilation slots across its long side (`box` as _draw_bbu)."""
  cx, cy, w, h = box if box is not None else c.sample_box(label)
  angle = c.rng.normal(0, 0.04)
  to_image = _rotated_frame(cx, cy, w, h, angle)
  metal = _jitter(c.rng, (175, 178, 182), 25)
  c.draw.polygon(_local_polygon(to_image, 0, 0, w, h), fill=metal, outline=(90, 90, 95))
  for k in range(int(c.rng.integers(4, 12))):
    if h >= w:
      v = (k + 1) * h / 13
      slot = (0.2 * w, v, 0.8 * w, v + max(1.0, 0.01 * h))
    else:
      u = (k + 1) * w / 13
      slot = (u, 0.2 * h, u + max(1.0, 0.01 * w), 0.8 * h)
    c.draw.polygon(_local_polygon(to_image, *slot), fill=_jitter(c.rng, (70, 70, 75)))
  c.add("quad", [coord for point in _local_polygon(to_image, 0, 0, w, h) for coord in point], label)


def _anchor_near(c: _Canvas, bbus: list[dict], where: str) -> tuple[float, float] | None:
  """A point on a BBU: its ends ("end", screws) or its front ("front", fiber plugs)."""
  if not bbus or c.rng.random() < 0.35:
    return None
  bbu = bbus[int(c.rng.integers(len(bbus)))]
  u = c.rng.uniform(0.15, 0.85) * bbu["w"]
  v = (c.rng.choice([0.02, 0.98]) if where == "end" else c.rng.uniform(0.2, 0.8)) * bbu["h"]
  return bbu["to_image"](u, v)


def _draw_small(c: _Canvas, label: str, bbus: list[dict]) -> None:
  """Screws, fiber plugs, ODF connectors and grounding points: small axis-aligned objects."""
  cx, cy, w, h = c.sample_box(label)
  anchor = None
  if label.endswith("BBU安装螺丝"):
    anchor = _anchor_near(c, bbus, "end")
  elif label.endswith("CPRI光缆和BBU连接点"):
    anchor = _anchor_near(c, bbus, "front")
  if anchor is not None:
    cx, cy = anchor
  x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
  d = c.draw
  if label.endswith("BBU安装螺丝"):
    d.ellipse([x1, y1, x2, y2], fill=_jitter(c.rng, (185, 185, 190)), outline=(60, 60, 60))
    d.line([(cx - w / 4, cy), (cx + w / 4, cy)], fill=(50, 50, 50), width=c.px(1.5))
    d.line([(cx, cy - h / 4), (cx, cy + h / 4)], fill=(50, 50, 50), width=c.px(1.5))
  elif label.endswith("CPRI光缆和BBU连接点") or label.endswith("BBU尾纤和ODF连接点"):
    body = (40, 110, 200) if label.endswith("CPRI光缆和BBU连接点") else (150, 150, 150)
    d.rectangle([x1, y1, x2, y2], fill=_jitter(c.rng, body), outline=(20, 20, 20))
    n = int(c.rng.integers(1, 4))
    for k in range(n):
      px = x1 + (k + 0.5) * w / n
      d.rectangle([px - w / (4 * n), y1 + h * 0.2, px + w / (4 * n), y2 - h * 0.2],
                  fill=_jitter(c.rng, (235, 190, 40), 20))
  else:  # grounding: yellow-green ring with a bolt
    d.ellipse([x1, y1, x2, y2], fill=_jitter(c.rng, (120, 170, 40)), outline=(230, 210, 40),
              width=c.px(2))
    d.ellipse([cx - w / 5, cy - h / 5, cx + w / 5, cy + h / 5], fill=(170, 170, 175))
  c.add("bbox_2d", [x1, y1, x2, y2], label)


def _cable_points(c: _Canvas, label: str, start: tuple[float, float] | None) -> list[float]:
  cx, cy, w, h = c.sample_box(label)
  w, h = max(w, 3 * c.unit), max(h, 3 * c.unit)
  x1, y1 = cx - w / 2, cy - h / 2
  if start is not None:
    x1, y1 = start[0] - w * c.rng.uniform(0, 1), start[1]
  n = int(c.rng.integers(3, 9))
  vertical = h >= w
  # one smooth bend per cable: a slow sine across the box, a little hand-drawn wobble
  frequency, phase = c.rng.uniform(0.3, 1.2), c.rng.uniform(0, 2 * math.pi)
  points = []
  for k in range(n + 1):
    t = k / n
    across = 0.5 + 0.5 * math.sin(2 * math.pi * frequency * t + phase) + c.rng.normal(0, 0.03)
    across = min(max(across, 0.0), 1.0)
    if vertical:  # runs down the cabinet, drifting sideways
      points.extend([x1 + w * across, y1 + h * t])
    else:
      points.extend([x1 + w * t, y1 + h * across])
  return points


def _draw_cable(c: _Canvas, label: str, bbus: list[dict]) -> list[float]:
  fiber = label.endswith("光纤")
  start = _anchor_near(c, bbus, "front") if fiber else None
  points = _cable_points(c, label, start)
  pairs = list(zip(points[0::2], points[1::2]))
  if fiber:
    colour = _jitter(c.rng, [(235, 200, 30), (240, 140, 30)][int(c.rng.integers(2))], 15)
    width = c.px(c.rng.uniform(1.5, 3.0))
  else:
    colour = _jitter(c.rng, [(20, 20, 22), (90, 90, 95), (30, 30, 60)][int(c.rng.integers(3))], 10)
    width = c.px(c.rng.uniform(4.0, 7.0))
  c.draw.line(pairs, fill=colour, width=width, joint="curve")
  c.add("line", points, label)
  return points


def _draw_sticker(c: _Canvas, label: str, cables: list[list[float]]) -> None:
  """A small white label sticker with text lines, often wrapped around a cable."""
  cx, cy, w, h = c.sample_box(label)
  if cables and c.rng.random() < 0.6:
    cable = cables[int(c.rng.integers(len(cables)))]
    k = int(c.rng.integers(len(cable) // 2))
    cx, cy = cable[2 * k], cable[2 * k + 1]
  angle = c.rng.normal(0, 0.25)
  to_image = _rotated_frame(cx, cy, w, h, angle)
  c.draw.polygon(_local_polygon(to_image, 0, 0, w, h), fill=_jitter(c.rng, (238, 238, 232), 10),
                 outline=(160, 160, 160))
  for k in range(int(c.rng.integers(1, 4))):
    v = (k + 1) * h / 4
    c.draw.line([to_image(0.15 * w, v), to_image(c.rng.uniform(0.4, 0.85) * w, v)], fill=(30, 30, 30),
                width=c.px(1))
  c.add("quad", [coord for point in _local_polygon(to_image, 0, 0, w, h) for coord in point], label)


def _finish(c: _Canvas) -> Image.Image:
  """Camera look: uneven light, a little blur and sensor noise."""
  rng = c.rng
  pixels = np.asarray(c.image, dtype=np.float32)
  ys = np.linspace(-1, 1, c.height, dtype=np.float32)[:, None]
  xs = np.linspace(-1, 1, c.width, dtype=np.float32)[None, :]
  gx, gy = rng.uniform(-0.25, 0.25, size=2)
  light = 1.0 + gx * xs + gy * ys - 0.15 * (xs * xs + ys * ys)
  pixels *= (light * rng.uniform(0.8, 1.15))[..., None]
  pixels += rng.normal(0, rng.uniform(2, 8), size=pixels.shape).astype(np.float32)
  image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
  return image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9))))


PROFILES = ("real", "demo", "blocks")
# The demo profile: what a tiny model trained from scratch for minutes on a CPU can learn to find:
# only the large equipment (BBUs of the three brands and wind shields), one to three per photo, side
# by side without overlap (see _demo_boxes), over the same cabinet background and clutter.
# The blocks profile: the demo's labels and layout drawn as flat blocks, one colour per label, on black,
# with no background, clutter, light or noise: what is left is learning to read where things are. It is
# what configs/exp.py trains on: a tiny model from scratch on 2 CPU cores learns it within 15 minutes.
_BLOCK_COLOURS = {"bbu基带处理单元/华为": (255, 40, 40), "bbu基带处理单元/中兴": (40, 255, 40),
                  "bbu基带处理单元/爱立信": (60, 60, 255), "挡风板/安装": (255, 255, 255)}
_DEMO_LABELS = ["bbu基带处理单元/华为", "bbu基带处理单元/中兴", "bbu基带处理单元/爱立信", "挡风板/安装"]
_DEMO_LABEL_PROBS = np.array([0.3, 0.3, 0.2, 0.2])


def _draw_labels(rng: np.random.Generator, profile: str) -> tuple[list[str], bool]:
  """The labels of one photo and whether the cabinet space is annotated."""
  if profile in ("demo", "blocks"):
    num_objects = int(rng.integers(1, 4))
    return list(rng.choice(_DEMO_LABELS, size=num_objects, p=_DEMO_LABEL_PROBS)), False
  num_objects = int(rng.choice(_COUNT_VALUES, p=_COUNT_PROBS))
  with_space = num_objects >= 2 and rng.random() < CABINET_SPACE_PROBABILITY
  return list(rng.choice(_LABELS, size=num_objects - int(with_space), p=_LABEL_PROBS)), with_space


def _demo_boxes(c: _Canvas, labels: Sequence[str]) -> list[tuple[float, float, float, float]]:
  """Demo placement: the image's long side is cut into one cell per object, and each object fills
  45-90% of its own cell, so objects never overlap and are never cut off (BBUs stay upright)."""
  n = len(labels)
  along_x = c.width > c.height
  cell_w, cell_h = (c.width / n, c.height) if along_x else (c.width, c.height / n)
  boxes = []
  for k, label in enumerate(labels):
    w, h = c.rng.uniform(0.45, 0.9, size=2) * (cell_w, cell_h)
    if label.startswith("bbu") and w > h:
      w = h * c.rng.uniform(0.4, 0.8)
    x0, y0 = (k * cell_w, 0.0) if along_x else (0.0, k * cell_h)
    cx = x0 + w / 2 + c.rng.uniform(0, cell_w - w)
    cy = y0 + h / 2 + c.rng.uniform(0, cell_h - h)
    boxes.append((cx, cy, w, h))
  return boxes


def generate_sample(rng: np.random.Generator, width: int, height: int, profile: str = "real"
                    ) -> tuple[Image.Image, list[dict]]:
  """One synthetic photo and its objects (on-disk form: desc + one of bbox_2d / quad / line).

  profile "real" follows the real records' figures; "demo" draws only large equipment; "blocks" draws
  the demo's objects as flat coloured blocks on black (see PROFILES).
  """
  if profile not in PROFILES:
    raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
  c = _Canvas(width, height, rng)
  if profile == "blocks":
    labels, _ = _draw_labels(rng, profile)
    for label, (cx, cy, w, h) in zip(labels, _demo_boxes(c, labels)):
      box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
      c.draw.rectangle(box, fill=_BLOCK_COLOURS[label])
      c.add("bbox_2d", box, label)
    return c.image, c.objects
  _draw_background(c)
  labels, with_space = _draw_labels(rng, profile)
  if profile == "demo":
    for label, box in zip(labels, _demo_boxes(c, labels)):
      if label.startswith("bbu"):
        _draw_bbu(c, label, box)
      else:
        _draw_panel(c, label, box)
    return _finish(c), c.objects
  by_kind = collections.defaultdict(list)
  for label in labels:
    by_kind[label.split("/")[0] if not label.startswith("线缆") else "线缆"].append(label)
  # painter's order: panels, units, connectors, cables over them, stickers on top
  for label in by_kind["挡风板"]:
    _draw_panel(c, label)
  bbus = [_draw_bbu(c, label) for label in by_kind["bbu基带处理单元"]]
  for label in by_kind["螺丝连接点"]:
    _draw_small(c, label, bbus)
  cables = [_draw_cable(c, label, bbus) for label in by_kind["线缆"]]
  for label in by_kind["标签贴纸"]:
    _draw_sticker(c, label, cables)
  if with_space:  # the cabinet space spans the mounted equipment; full when BBUs fill it
    boxes = [records_lib.object_box(o) for o in c.objects] or [[0, 0, width, height]]
    x1 = max(0, min(b[0] for b in boxes) - rng.integers(0, 20))
    y1 = max(0, min(b[1] for b in boxes) - rng.integers(0, 20))
    x2 = min(width, max(b[2] for b in boxes) + rng.integers(0, 20))
    y2 = min(height, max(b[3] for b in boxes) + rng.integers(0, 20))
    full = "满载" if len(bbus) >= 3 else "非满载"
    c.add("bbox_2d", [x1, y1, x2, y2], f"机柜空间/{full}")
  return _finish(c), c.objects


def generate(out_dir: str | os.PathLike, num_train: int = 200, num_val: int = 20, num_teacher: int = 20,
             seed: int = 0, *, scale: float = 1.0, image_sizes: Sequence[tuple[int, int]] | None = None,
             profile: str = "real", progress: bool = False) -> dict:
  """Write images/ and train.jsonl, val.jsonl, teacher_pool.jsonl, label_vocab.json and SETTINGS_FILE
  (what `generation_settings` returns for these arguments) under out_dir.

  Image sizes are drawn with the real frequencies from `image_sizes` ((width, height) list; default
  the real smart-resized sizes times `scale`, kept multiples of 28). Returns a summary.
  """
  out_dir = os.fspath(out_dir)
  sizes = list(image_sizes) if image_sizes else image_size_choices(scale)
  size_probs = _SIZE_PROBS if not image_sizes else np.full(len(sizes), 1.0 / len(sizes))
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  vocab: collections.Counter = collections.Counter()
  summary = {"seed": seed, "scale": scale, "profile": profile, "sizes": [list(s) for s in sizes]}
  for split_index, (split, count) in enumerate(zip(SPLITS, (num_train, num_val, num_teacher))):
    out_records = []
    for i in tqdm(range(count), desc=f"synthetic {split}", disable=not progress):
      rng = np.random.default_rng([seed, split_index, i])
      width, height = sizes[int(rng.choice(len(sizes), p=size_probs))]
      image, objects = generate_sample(rng, width, height, profile)
      name = f"images/{split}_{i:05d}.jpg"
      image.save(os.path.join(out_dir, name), quality=90)
      record = records_lib.normalize_record(
          {"id": f"{split}_{i:05d}", "images": [name], "width": width, "height": height,
           "objects": objects})
      vocab.update(o["desc"] for o in record["objects"])
      out_records.append(records_lib.export_record(record))
    records_lib.write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), out_records)
    summary[split] = count
  with open(os.path.join(out_dir, "label_vocab.json"), "w", encoding="utf-8") as f:
    json.dump(dict(vocab.most_common()), f, ensure_ascii=False, indent=1)
  with open(os.path.join(out_dir, SETTINGS_FILE), "w", encoding="utf-8") as f:
    json.dump(generation_settings(num_train, num_val, num_teacher, seed, scale=scale, image_sizes=image_sizes,
                                  profile=profile), f, indent=1)
  summary["objects"] = sum(vocab.values())
  summary["labels"] = dict(vocab.most_common())
  return summary


# Bump whenever a profile draws differently, so that a set made by older code is recognized.
GENERATOR_VERSION = 1
SETTINGS_FILE = "synthetic.json"


def generation_settings(num_train: int, num_val: int, num_teacher: int, seed: int, *, scale: float,
                        image_sizes: Sequence[tuple[int, int]] | None = None, profile: str) -> dict:
  """What determines a generated set: the same settings give the same files."""
  return {"generator_version": GENERATOR_VERSION, "profile": profile, "num_train": num_train,
          "num_val": num_val, "num_teacher": num_teacher, "seed": seed, "scale": scale,
          "image_sizes": [list(s) for s in image_sizes] if image_sizes else None}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Generate synthetic BBU cabinet images and records.")
  parser.add_argument("--output_root", required=True)
  parser.add_argument("--num_train", type=int, default=200)
  parser.add_argument("--num_val", type=int, default=20)
  parser.add_argument("--num_teacher", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--scale", type=float, default=1.0,
                      help="image size factor on the real sizes (0.5 for fast CPU demos)")
  parser.add_argument("--profile", choices=PROFILES, default="real",
                      help="real: the real records' figures; demo: only large equipment, for quick demos; "
                           "blocks: the demo's layout as flat coloured blocks on black (a diagnostic)")
  parser.add_argument("--image_size", action="append", default=None, metavar="WxH",
                      help="use these sizes instead (repeatable), e.g. --image_size 448x448")
  args = parser.parse_args(argv)
  sizes = None
  if args.image_size:
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.image_size]
  summary = generate(args.output_root, args.num_train, args.num_val, args.num_teacher, args.seed,
                     scale=args.scale, image_sizes=sizes, profile=args.profile, progress=True)
  print(json.dumps({k: v for k, v in summary.items() if k != "labels"}, ensure_ascii=False))
  return 0


if __name__ == "__main__":
  sys.exit(main())
