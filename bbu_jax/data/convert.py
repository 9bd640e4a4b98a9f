"""Raw annotations (the labeling platform's JSON, COCO, LabelMe) to train/val/teacher-pool record JSONL.

  python -m bbu_jax.data.convert --input_folder raw/ --image_folder images/ --output_root data/ \
      [--label_map F] [--hierarchy F|none] [--rescale --min_pixels N --max_pixels N] \
      [--val_ratio 0.1 --seed 0] [--teacher_pool_size N]

Writes train.jsonl, val.jsonl, teacher_pool.jsonl, label_vocab.json, rejects.jsonl and
conversion_report.json under output_root, and the images (upright; smart-resized with --rescale) under
output_root/images/ or output_root/ds_rescaled/, which the records name relative to output_root.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import shutil
import sys
from typing import Any, Iterator, Mapping, Sequence

from PIL import Image, ImageOps
from tqdm import tqdm

from bbu_jax.data import labels as labels_lib
from bbu_jax.data import records as records_lib
from bbu_jax.data.geometry import MAX_PIXELS, MIN_PIXELS, IMAGE_FACTOR, smart_resize
from bbu_jax.data.records import RecordError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
# Object-count buckets of the teacher-pool cover (the real records: median 8, mean 10.7 per image).
COUNT_BUCKETS = ((5, "sparse"), (15, "medium"), (10**9, "dense"))
SIZE_BUCKETS = ((0.1, "small"), (0.3, "medium"), (10.0, "large"))  # sqrt(box area / image area)


@dataclasses.dataclass
class RawObject:
  kind: str  # "bbox" | "quad" | "line"
  points: list[float]  # flat [x, y, ...] in the annotation's frame
  label: str


@dataclasses.dataclass
class RawSample:
  source: str  # the annotation file
  image_name: str  # as the annotation names it
  width: int | None  # the annotation's declared frame (None when it does not say)
  height: int | None
  objects: list[RawObject]


class ConversionError(ValueError):
  """An input that cannot be converted; it goes to rejects.jsonl with its reason."""


# ------------------------------------------------------------------------------------------------
# Reading the three input formats.


def detect_format(data: Any) -> str:
  """"platform", "coco" or "labelme" for a parsed annotation JSON; raises ConversionError otherwise."""
  if isinstance(data, dict):
    if "markResult" in data or "dataList" in data:
      return "platform"
    if isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list):
      return "coco"
    if isinstance(data.get("shapes"), list):
      return "labelme"
  raise ConversionError("unknown annotation format: expected the platform's JSON (markResult or "
                        "dataList), COCO (images + annotations) or LabelMe (shapes)")


def platform_label(properties: Any) -> str | None:
  """The label of a platform feature: the first contentZh value whose key contains 标签, else
  content.label."""
  if not isinstance(properties, dict):
    return None
  content_zh = properties.get("contentZh")
  if isinstance(content_zh, dict):
    for key, value in content_zh.items():
      if "标签" in key and isinstance(value, str) and value.strip():
        return value.strip()
  content = properties.get("content")
  if isinstance(content, dict) and isinstance(content.get("label"), str) and content["label"].strip():
    return content["label"].strip()
  return None


def _platform_shape(geometry: Any) -> tuple[str, list[float]]:
  parsed = records_lib.parse_geometry(geometry, "geometry")
  return parsed["kind"], _float_points(geometry)


def _float_points(geometry: dict) -> list[float]:
  """Unrounded points of a platform geometry (parse_geometry rounds; conversion may rescale first)."""
  coords = geometry["coordinates"]
  if geometry["type"] in ("Square", "Polygon") and coords and isinstance(coords[0][0], list):
    coords = coords[0]
  points = [float(c) for point in coords for c in point[:2]]
  if geometry["type"] != "LineString" and len(points) >= 4 and points[-2:] == points[:2]:
    points = points[:-2]
  if geometry["type"] == "ExtentPolygon" or (geometry["type"] != "LineString" and len(points) != 8):
    xs, ys = points[0::2], points[1::2]
    points = [min(xs), min(ys), max(xs), max(ys)]
  return points


def read_platform(data: dict, source: str, rejects: list) -> RawSample:
  """One platform JSON (one photo): markResult features, or the older dataList."""
  info = data.get("info") if isinstance(data.get("info"), dict) else {}
  width, height = info.get("width"), info.get("height")
  objects = []
  if "markResult" in data:
    features = (data["markResult"] or {}).get("features")
    if not isinstance(features, list):
      raise ConversionError("markResult.features is not a list")
    items = [(f"markResult.features[{i}]", f.get("geometry") if isinstance(f, dict) else None,
              f.get("properties") if isinstance(f, dict) else None) for i, f in enumerate(features)]
  else:
    if not isinstance(data["dataList"], list):
      raise ConversionError("dataList is not a list")
    items = []
    for i, entry in enumerate(data["dataList"]):
      entry = entry if isinstance(entry, dict) else {}
      coords = entry.get("coordinates")
      geometry = {"type": "ExtentPolygon", "coordinates": coords}
      if isinstance(coords, list) and len(coords) == 4:
        geometry = {"type": "Square", "coordinates": coords}
      items.append((f"dataList[{i}]", geometry, entry.get("properties")))
  for where, geometry, properties in items:
    label = platform_label(properties)
    if label is None:
      rejects.append({"source": source, "what": "object", "where": where,
                      "reason": "no label (no contentZh key with 标签, no content.label)"})
      continue
    try:
      kind, points = _platform_shape(geometry)
    except (RecordError, KeyError, TypeError, IndexError) as e:
      rejects.append({"source": source, "what": "object", "where": where,
                      "reason": f"bad geometry: {e}"})
      continue
    objects.append(RawObject(kind, points, label))
  stem = os.path.splitext(os.path.basename(source))[0]
  return RawSample(source, stem, _int_or_none(width), _int_or_none(height), objects)


def read_coco(data: dict, source: str, rejects: list) -> list[RawSample]:
  """A COCO detection JSON: one sample per image, labels from category names, boxes from bbox."""
  categories = {c["id"]: c["name"] for c in data.get("categories", []) if isinstance(c, dict)}
  samples: dict[Any, RawSample] = {}
  for image in data["images"]:
    samples[image["id"]] = RawSample(source, image["file_name"], _int_or_none(image.get("width")),
                                     _int_or_none(image.get("height")), [])
  for i, ann in enumerate(data["annotations"]):
    where = f"annotations[{i}]"
    sample = samples.get(ann.get("image_id"))
    label = categories.get(ann.get("category_id"))
    bbox = ann.get("bbox")
    if sample is None or label is None:
      rejects.append({"source": source, "what": "object", "where": where,
                      "reason": "unknown image_id or category_id"})
      continue
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
      rejects.append({"source": source, "what": "object", "where": where,
                      "reason": f"bbox must be [x, y, w, h], got {bbox!r}"})
      continue
    x, y, w, h = (float(v) for v in bbox)
    sample.objects.append(RawObject("bbox", [x, y, x + w, y + h], label))
  return list(samples.values())


def read_labelme(data: dict, source: str, rejects: list) -> RawSample:
  """A LabelMe JSON: rectangles -> boxes, 4-point polygons -> quads, line/linestrip -> lines."""
  objects = []
  for i, shape in enumerate(data["shapes"]):
    where = f"shapes[{i}]"
    shape = shape if isinstance(shape, dict) else {}
    kind_name = shape.get("shape_type", "polygon")
    label = shape.get("label")
    try:
      points = [float(c) for p in shape["points"] for c in p[:2]]
    except (KeyError, TypeError, ValueError):
      points = []
    if not isinstance(label, str) or not label.strip() or len(points) < 4:
      rejects.append({"source": source, "what": "object", "where": where,
                      "reason": "needs a label and at least two points"})
      continue
    xs, ys = points[0::2], points[1::2]
    if kind_name == "rectangle":
      objects.append(RawObject("bbox", [min(xs), min(ys), max(xs), max(ys)], label.strip()))
    elif kind_name == "polygon":
      if len(points) == 8:
        objects.append(RawObject("quad", points, label.strip()))
      else:
        objects.append(RawObject("bbox", [min(xs), min(ys), max(xs), max(ys)], label.strip()))
    elif kind_name in ("line", "linestrip"):
      objects.append(RawObject("line", points, label.strip()))
    else:
      rejects.append({"source": source, "what": "object", "where": where,
                      "reason": f"unsupported shape_type {kind_name!r}"})
  return RawSample(source, os.path.basename(str(data.get("imagePath") or
                                                os.path.splitext(source)[0] + ".jpg")),
                   _int_or_none(data.get("imageWidth")), _int_or_none(data.get("imageHeight")), objects)


def _int_or_none(value: Any) -> int | None:
  return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 \
      else None


def read_annotation_file(path: str, rejects: list) -> tuple[str, list[RawSample]]:
  """(format, samples) of one annotation file; raises ConversionError for unreadable/unknown files."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"unreadable JSON: {e}") from e
  kind = detect_format(data)
  try:
    if kind == "platform":
      return kind, [read_platform(data, path, rejects)]
    if kind == "coco":
      return kind, read_coco(data, path, rejects)
    return kind, [read_labelme(data, path, rejects)]
  except (KeyError, TypeError, AttributeError) as e:
    raise ConversionError(f"malformed {kind} JSON: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------------------------------------
# From a raw sample to a record.


class ImageIndex:
  """Finds an annotation's image in image_folder: by relative path, by file name, or by stem."""

  def __init__(self, image_folder: str):
    self.folder = image_folder
    self.by_name: dict[str, str] = {}
    self.by_stem: dict[str, str] = {}
    for root, _, files in os.walk(image_folder):
      for name in sorted(files):
        if name.lower().endswith(IMAGE_EXTENSIONS):
          full = os.path.join(root, name)
          self.by_name.setdefault(name, full)
          self.by_stem.setdefault(os.path.splitext(name)[0], full)

  def find(self, image_name: str) -> str | None:
    direct = os.path.join(self.folder, image_name)
    if os.path.isfile(direct):
      return direct
    name = os.path.basename(image_name)
    return self.by_name.get(name) or self.by_stem.get(os.path.splitext(name)[0])


def count_bucket(num_objects: int) -> str:
  return next(name for limit, name in COUNT_BUCKETS if num_objects <= limit)


def _scale_and_clip(points: Sequence[float], sx: float, sy: float, width: int, height: int
                    ) -> list[float]:
  out = []
  for i, p in enumerate(points):
    if i % 2 == 0:
      out.append(min(max(p * sx, 0.0), float(width)))
    else:
      out.append(min(max(p * sy, 0.0), float(height)))
  return out


@dataclasses.dataclass
class Settings:
  token_map: Mapping[str, str]
  hierarchy: Mapping[str, Sequence[str]] | None
  rescale: bool = False
  min_pixels: int = MIN_PIXELS
  max_pixels: int = MAX_PIXELS


def convert_sample(sample: RawSample, image_path: str, output_root: str, settings: Settings,
                   rejects: list, report: dict) -> dict:
  """The record of one sample; writes its upright (and, with rescale, smart-resized) image under
  output_root. Objects the hierarchy drops are counted in report["dropped_labels"]."""
  try:
    with Image.open(image_path) as opened:
      stored_size = opened.size
      opened_orientation = opened.getexif().get(0x0112, 1)
      image = ImageOps.exif_transpose(opened)
      image.load()
  except Exception as e:  # PIL raises many types for bad files
    raise ConversionError(f"unreadable image {image_path}: {type(e).__name__}: {e}") from e
  width, height = image.size  # the displayed frame: the boxes are drawn on this
  declared = (sample.width, sample.height)
  sx = sy = 1.0
  if None not in declared and declared != (width, height):
    if declared == stored_size and stored_size != (width, height):
      report["warnings"].append(
          f"{sample.source}: declared size {declared[0]}x{declared[1]} is the stored (un-rotated) size "
          f"of {image_path}, whose EXIF orientation shows it as {width}x{height}; the boxes are taken "
          f"in the displayed frame")
    else:
      sx, sy = width / declared[0], height / declared[1]
      report["warnings"].append(
          f"{sample.source}: declared size {declared[0]}x{declared[1]} differs from the image's "
          f"{width}x{height}; boxes scaled by ({sx:.4f}, {sy:.4f})")

  out_width, out_height = width, height
  if settings.rescale:
    out_height, out_width = smart_resize(height, width, IMAGE_FACTOR, settings.min_pixels,
                                         settings.max_pixels)
  sx *= out_width / width
  sy *= out_height / height

  objects = []
  for i, obj in enumerate(sample.objects):
    label = labels_lib.normalize_label(obj.label, settings.token_map, settings.hierarchy)
    if label is None:
      report["dropped_labels"][obj.label] += 1
      continue
    points = _scale_and_clip(obj.points, sx, sy, out_width, out_height)
    key = "bbox_2d" if obj.kind == "bbox" else obj.kind
    try:
      objects.append(records_lib.normalize_object({key: points, "desc": label}, width=out_width,
                                                  height=out_height, field=f"objects[{i}]"))
    except RecordError as e:
      rejects.append({"source": sample.source, "what": "object", "where": f"objects[{i}]",
                      "reason": f"{e.field}: {e.message}", "label": obj.label})

  folder = "ds_rescaled" if settings.rescale else "images"
  relative = f"{folder}/{os.path.basename(image_path)}"
  destination = os.path.join(output_root, relative)
  os.makedirs(os.path.dirname(destination), exist_ok=True)
  if image.mode not in ("RGB", "L") and destination.lower().endswith((".jpg", ".jpeg")):
    image = image.convert("RGB")  # JPEG has no alpha or palette
  if (out_width, out_height) != (width, height):
    image.resize((out_width, out_height), Image.BICUBIC).save(destination, quality=95)
  elif stored_size != (width, height) or opened_orientation != 1:
    image.save(destination, quality=95)  # rotated upright: the orientation tag is not copied
  else:
    shutil.copyfile(image_path, destination)
  stem = os.path.splitext(os.path.basename(image_path))[0]
  return {"id": stem, "images": [relative], "width": out_width, "height": out_height,
          "objects": records_lib.sort_objects(objects)}


# ------------------------------------------------------------------------------------------------
# Teacher pool and split.


def teacher_features(record: dict) -> set[str]:
  """What a teacher demonstrates: its labels, object-count bucket, 3x3 grid cells and size buckets."""
  width, height = record["width"], record["height"]
  features = {f"count:{count_bucket(len(record['objects']))}"}
  for obj in record["objects"]:
    x1, y1, x2, y2 = obj["bbox_2d"]
    features.add(f"label:{obj['desc']}")
    col = min(int((x1 + x2) / 2 / width * 3), 2)
    row = min(int((y1 + y2) / 2 / height * 3), 2)
    features.add(f"cell:{row},{col}")
    relative = ((x2 - x1) * (y2 - y1) / (width * height)) ** 0.5
    features.add("size:" + next(name for limit, name in SIZE_BUCKETS if relative < limit))
  return features


def _cover_gain(features: set[str], uncovered: set[str]) -> tuple[int, int]:
  new = features & uncovered
  layout = sum(1 for f in new if not f.startswith("label:"))
  return layout, len(new) - layout


def select_teacher_pool(records: Sequence[dict], size: int, seed: int = 0) -> tuple[list[int], dict]:
  """Indices of `size` records chosen greedily to cover every teacher feature (see teacher_features);
  once all are covered the cover starts over, for variety. The few layout features (count, cell and
  size buckets) come first, so that hundreds of rare free-text labels cannot crowd them out of a small
  pool. Returns (indices, coverage report)."""
  order = list(range(len(records)))
  random.Random(seed).shuffle(order)
  features = [teacher_features(records[i]) for i in range(len(records))]
  universe = set().union(*features) if features else set()
  uncovered = set(universe)
  chosen: list[int] = []
  remaining = list(order)
  while remaining and len(chosen) < size:
    if not uncovered:
      uncovered = set(universe)
    best = max(remaining, key=lambda i: _cover_gain(features[i], uncovered))  # ties: seeded order
    chosen.append(best)
    remaining.remove(best)
    uncovered -= features[best]
  covered = set().union(*(features[i] for i in chosen)) if chosen else set()
  return chosen, {"features": len(universe), "covered": len(covered & universe),
                  "uncovered": sorted(universe - covered)}


def split_records(records: Sequence[dict], *, val_ratio: float, seed: int, teacher_pool_size: int
                  ) -> tuple[list[dict], list[dict], list[dict], dict]:
  """(train, val, teacher_pool, coverage): val drawn first by seed; teachers then taken from the
  rest and removed from train, so validation images never appear as demonstrations."""
  if not 0.0 <= val_ratio < 1.0:
    raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
  order = list(range(len(records)))
  random.Random(seed).shuffle(order)
  num_val = int(round(len(records) * val_ratio))
  if val_ratio > 0 and len(records) > 1:
    num_val = max(1, num_val)
  val = [records[i] for i in sorted(order[:num_val])]
  rest = [records[i] for i in sorted(order[num_val:])]
  if teacher_pool_size > len(rest):
    raise ValueError(f"teacher_pool_size {teacher_pool_size} exceeds the {len(rest)} non-validation "
                     f"records")
  chosen, coverage = select_teacher_pool(rest, teacher_pool_size, seed)
  chosen_set = set(chosen)
  teachers = [rest[i] for i in chosen]
  train = [r for i, r in enumerate(rest) if i not in chosen_set]
  return train, val, teachers, coverage


# ------------------------------------------------------------------------------------------------
# The whole conversion.


def iter_annotation_files(input_folder: str) -> Iterator[str]:
  for root, _, files in os.walk(input_folder):
    for name in sorted(files):
      if name.lower().endswith(".json"):
        yield os.path.join(root, name)


def convert(input_folder: str, image_folder: str, output_root: str, *,
            token_map: Mapping[str, str] | None = None,
            hierarchy: Mapping[str, Sequence[str]] | None | str = "default",
            rescale: bool = False, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
            val_ratio: float = 0.1, seed: int = 0, teacher_pool_size: int = 0,
            progress: bool = True) -> dict:
  """Convert every annotation file under input_folder; returns the report (also written as
  conversion_report.json). hierarchy="default" is the old converter's; None keeps every label."""
  settings = Settings(
      token_map=labels_lib.DEFAULT_TOKEN_MAP if token_map is None else token_map,
      hierarchy=labels_lib.load_label_hierarchy(None) if hierarchy == "default" else hierarchy,
      rescale=rescale, min_pixels=min_pixels, max_pixels=max_pixels)
  os.makedirs(output_root, exist_ok=True)
  images = ImageIndex(image_folder)
  rejects: list[dict] = []
  report: dict = {"formats": collections.Counter(), "dropped_labels": collections.Counter(),
                  "warnings": []}
  converted: list[dict] = []
  seen_ids: dict[str, str] = {}
  files = list(iter_annotation_files(input_folder))
  for path in tqdm(files, desc="convert", unit="file", disable=not progress):
    try:
      kind, samples = read_annotation_file(path, rejects)
    except ConversionError as e:
      rejects.append({"source": path, "what": "file", "reason": str(e)})
      continue
    report["formats"][kind] += 1
    for sample in samples:
      image_path = images.find(sample.image_name)
      if image_path is None:
        rejects.append({"source": path, "what": "sample", "image": sample.image_name,
                        "reason": f"no image named {sample.image_name!r} in {image_folder}"})
        continue
      stem = os.path.splitext(os.path.basename(image_path))[0]
      if stem in seen_ids:
        rejects.append({"source": path, "what": "sample", "image": sample.image_name,
                        "reason": f"image {stem!r} already converted from {seen_ids[stem]}"})
        continue
      try:
        record = convert_sample(sample, image_path, output_root, settings, rejects, report)
      except ConversionError as e:
        rejects.append({"source": path, "what": "sample", "image": sample.image_name,
                        "reason": str(e)})
        continue
      seen_ids[stem] = path
      converted.append(record)

  train, val, teachers, coverage = split_records(converted, val_ratio=val_ratio, seed=seed,
                                                 teacher_pool_size=teacher_pool_size)
  for name, part in (("train", train), ("val", val), ("teacher_pool", teachers)):
    records_lib.write_jsonl(os.path.join(output_root, f"{name}.jsonl"),
                            [records_lib.export_record(r) for r in part])
  vocab = collections.Counter(o["desc"] for r in converted for o in r["objects"])
  with open(os.path.join(output_root, "label_vocab.json"), "w", encoding="utf-8") as f:
    json.dump(dict(vocab.most_common()), f, ensure_ascii=False, indent=1)
  records_lib.write_jsonl(os.path.join(output_root, "rejects.jsonl"), rejects)
  summary = {
      "input_files": len(files), "formats": dict(report["formats"]),
      "records": len(converted), "train": len(train), "val": len(val), "teacher_pool": len(teachers),
      "objects": sum(len(r["objects"]) for r in converted),
      "empty_records": sum(1 for r in converted if not r["objects"]),
      "rejects": len(rejects), "rejects_by_kind": dict(collections.Counter(r["what"] for r in rejects)),
      "dropped_labels": dict(report["dropped_labels"].most_common()),
      "labels": len(vocab), "teacher_coverage": coverage, "warnings": report["warnings"],
      "settings": {"rescale": rescale, "min_pixels": min_pixels, "max_pixels": max_pixels,
                   "val_ratio": val_ratio, "seed": seed, "teacher_pool_size": teacher_pool_size,
                   "hierarchy": None if settings.hierarchy is None else sorted(settings.hierarchy)},
  }
  with open(os.path.join(output_root, "conversion_report.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, ensure_ascii=False, indent=1)
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Convert raw annotations to record JSONL.")
  parser.add_argument("--input_folder", required=True, help="annotation JSON files (searched recursively)")
  parser.add_argument("--image_folder", required=True, help="the photos the annotations name")
  parser.add_argument("--output_root", required=True, help="where records and images are written")
  parser.add_argument("--label_map", default=None, help="token map JSON {raw: normalized}")
  parser.add_argument("--hierarchy", default=None,
                      help="label hierarchy JSON ({type: [props]} or [{object_type, property}]), or "
                           "'none' to keep every label; default: the old converter's")
  parser.add_argument("--rescale", action="store_true", help="smart-resize images into ds_rescaled/")
  parser.add_argument("--min_pixels", type=int, default=MIN_PIXELS)
  parser.add_argument("--max_pixels", type=int, default=MAX_PIXELS)
  parser.add_argument("--val_ratio", type=float, default=0.1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--teacher_pool_size", type=int, default=0)
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  summary = convert(
      args.input_folder, args.image_folder, args.output_root,
      token_map=labels_lib.load_token_map(args.label_map),
      hierarchy=labels_lib.load_label_hierarchy(args.hierarchy), rescale=args.rescale,
      min_pixels=args.min_pixels, max_pixels=args.max_pixels, val_ratio=args.val_ratio,
      seed=args.seed, teacher_pool_size=args.teacher_pool_size, progress=not args.no_progress)
  printable = {k: v for k, v in summary.items() if k not in ("warnings", "dropped_labels")}
  print(json.dumps(printable, ensure_ascii=False, indent=1))
  print(f"{len(summary['warnings'])} warnings, {summary['rejects']} rejects, "
        f"{sum(summary['dropped_labels'].values())} objects dropped by the hierarchy; details in "
        f"{os.path.join(args.output_root, 'conversion_report.json')} and rejects.jsonl")
  return 0


if __name__ == "__main__":
  sys.exit(main())
