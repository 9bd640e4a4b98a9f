"""Check a record JSONL before training: every problem as `FILE:LINE: what`, then a summary.

  python -m bbu_jax.data.validate --jsonl_path data/train.jsonl --image_root data [--no_images]

exits 1 when any error is found. Training calls `split_valid`, which refuses a file with errors unless
told to skip them, and then counts them and writes them out.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import os
import sys
from typing import Sequence

from PIL import Image

from bbu_jax.data import records as records_lib
from bbu_jax.data.records import RecordError

# Orientation tags that swap width and height when a viewer applies them.
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)


@dataclasses.dataclass(frozen=True)
class Problem:
  file: str
  line: int
  level: str  # "error" or "warning"
  message: str

  def __str__(self) -> str:
    tag = "" if self.level == "error" else "warning: "
    return f"{self.file}:{self.line}: {tag}{self.message}"


@dataclasses.dataclass
class Report:
  """What validate_file found in one file."""
  path: str
  records: int = 0
  objects: int = 0
  labels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  problems: list[Problem] = dataclasses.field(default_factory=list)

  @property
  def errors(self) -> list[Problem]:
    return [p for p in self.problems if p.level == "error"]

  @property
  def warnings(self) -> list[Problem]:
    return [p for p in self.problems if p.level == "warning"]

  @property
  def bad_lines(self) -> set[int]:
    """Lines with at least one error: the records that training must not use."""
    return {p.line for p in self.errors}

  @property
  def ok(self) -> bool:
    return not self.errors

  def summary(self, max_labels: int | None = None) -> str:
    lines = [f"{self.path}: {self.records} records ({len(self.bad_lines)} with errors), "
             f"{self.objects} objects, {len(self.labels)} distinct labels, "
             f"{len(self.errors)} errors, {len(self.warnings)} warnings"]
    for label, count in self.labels.most_common(max_labels):
      lines.append(f"  {count:6d}  {label}")
    if max_labels is not None and len(self.labels) > max_labels:
      lines.append(f"  ... {len(self.labels) - max_labels} more labels")
    return "\n".join(lines)


def _check_image(path: str, width, height) -> list[str]:
  """Problems with one image file against the record's width/height (empty when fine)."""
  if not os.path.exists(path):
    return [f"missing image {path}"]
  try:
    with Image.open(path) as image:
      image.load()  # decodes: catches truncated files that open() alone accepts
      size = image.size
      orientation = image.getexif().get(0x0112, 1)
  except Exception as e:  # PIL raises many types for bad files
    return [f"unreadable image {path}: {type(e).__name__}: {e}"]
  if isinstance(width, int) and isinstance(height, int) and size != (width, height):
    note = (f" (it carries EXIF orientation {orientation}: convert the file so the pixels are stored "
            f"upright)" if orientation in _ROTATING_ORIENTATIONS else "")
    return [f"image {path} is {size[0]}x{size[1]} but the record says {width}x{height}{note}"]
  return []


def _check_record(raw: dict, path: str, line: int, image_root: str | None,
                  report: Report) -> str | None:
  """Add every problem of one parsed record to the report; returns its id (None if it has none)."""

  def add(level: str, message: str) -> None:
    report.problems.append(Problem(path, line, level, message))

  for key in raw:
    if key not in records_lib.KNOWN_RECORD_KEYS:
      add("warning", f"unknown top-level key {key!r}")
  images = raw.get("images")
  image_paths: list[str] = []
  if not isinstance(images, list) or not images:
    add("error", f"images: expected a non-empty list of image paths, got {images!r:.80}")
  else:
    for i, image in enumerate(images):
      if isinstance(image, str) and image.strip():
        image_paths.append(image)
      else:
        add("error", f"images[{i}]: image path must be a non-empty string, got {image!r}")
  if "id" in raw:
    record_id = raw["id"]
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or record_id == "":
      add("error", f"id: must be a non-empty string or an integer, got {record_id!r:.80}")
  size_ok = True
  for key in ("width", "height"):
    value = raw.get(key)
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
      add("error", f"{key}: must be a positive integer, got {value!r}")
      size_ok = False
  width, height = raw.get("width"), raw.get("height")

  if image_root is not None:
    for image in image_paths:
      full = image if os.path.isabs(image) else os.path.join(image_root, image)
      for message in _check_image(full, width if size_ok else None, height if size_ok else None):
        add("error", message)

  objects = raw.get("objects")
  if not isinstance(objects, list):
    add("error", f"objects: expected a list of objects ([] when none), got {objects!r:.80}")
    objects = []
  report.objects += len(objects)
  for i, obj in enumerate(objects):
    field = f"objects[{i}]"
    if not isinstance(obj, dict):
      add("error", f"{field}: an object must be a JSON object, got {type(obj).__name__}")
      continue
    desc = obj.get("desc", obj.get("label"))
    if not isinstance(desc, str) or not desc.strip():
      add("error", f"{field}.desc: empty or missing label, got {desc!r}")
    else:
      report.labels[desc.strip()] += 1
    if not size_ok:
      continue  # a box cannot be checked against an unknown image size
    try:
      normalized = records_lib.normalize_object({**obj, "desc": "-"}, width=width, height=height,
                                                field=field)
    except RecordError as e:
      add("error", f"{e.field}: {e.message}")
      continue
    if "bbox_2d" in obj and "geometry" in obj:
      try:
        records_lib.parse_geometry(obj["geometry"], f"{field}.geometry")
      except RecordError as e:
        add("warning", f"{e.field}: {e.message}; ignored (bbox_2d gives the box)")
    if normalized["geometry"]["kind"] == "line":
      x1, y1, x2, y2 = records_lib.object_box(obj)
      if x2 == x1 or y2 == y1:
        add("warning", f"{field}: straight line with a zero-{'width' if x2 == x1 else 'height'} box "
                       f"{[x1, y1, x2, y2]}; loaded as 1 px")
  record_id = raw.get("id", image_paths[0] if image_paths else None)
  return None if record_id is None else str(record_id)


def validate_file(jsonl_path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                  check_images: bool = True) -> Report:
  """Every problem of a record JSONL. Images are looked up under image_root (default: the file's
  folder) unless check_images is False."""
  path = os.fspath(jsonl_path)
  if check_images and image_root is None:
    image_root = os.path.dirname(os.path.abspath(path))
  root = os.fspath(image_root) if check_images else None
  report = Report(path=path)
  first_line_of_id: dict[str, int] = {}
  for line, item in records_lib.iter_jsonl(path):
    report.records += 1
    if isinstance(item, RecordError):
      report.problems.append(Problem(path, line, "error", item.message))
      continue
    record_id = _check_record(item, path, line, root, report)
    if record_id is None:
      continue
    if record_id in first_line_of_id:
      report.problems.append(Problem(path, line, "error", f"duplicate id {record_id!r} (first at "
                                                          f"line {first_line_of_id[record_id]})"))
    else:
      first_line_of_id[record_id] = line
  return report


class InvalidDataError(ValueError):
  """A record file with problems, refused for training."""


def split_valid(jsonl_path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                skip_invalid: bool = False, rejects_path: str | os.PathLike | None = None,
                check_images: bool = True, max_listed: int = 20) -> tuple[list[dict], Report]:
  """Normalized records of a file that training may use, and the validation report.

  Raises InvalidDataError listing the problems when the file has errors, unless skip_invalid: then the
  records with errors are left out, counted in a log line, and written to rejects_path (JSONL of
  {file, line, problems, raw}) when given.
  """
  report = validate_file(jsonl_path, image_root, check_images=check_images)
  bad_lines = report.bad_lines
  if bad_lines and not skip_invalid:
    listed = "\n".join(str(p) for p in report.errors[:max_listed])
    more = len(report.errors) - max_listed
    raise InvalidDataError(
        f"{jsonl_path}: {len(report.errors)} errors in {len(bad_lines)} of {report.records} records; "
        f"fix them or skip them explicitly:\n{listed}" + (f"\n... {more} more" if more > 0 else ""))
  problems_by_line = collections.defaultdict(list)
  for problem in report.errors:
    problems_by_line[problem.line].append(problem.message)
  kept, rejects = [], []
  for line, item in records_lib.iter_jsonl(jsonl_path):
    if line in bad_lines:
      raw = item.raw if isinstance(item, RecordError) else item
      rejects.append({"file": os.fspath(jsonl_path), "line": line, "problems": problems_by_line[line],
                      "raw": raw})
      continue
    kept.append(records_lib.normalize_record(item, source=(jsonl_path, line)))
  if rejects_path is not None:
    records_lib.write_jsonl(rejects_path, rejects)
  if rejects:
    logging.warning("%s: skipped %d of %d records with errors%s", jsonl_path, len(rejects),
                    report.records, f"; written to {rejects_path}" if rejects_path else "")
  return kept, report


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description="Check record JSONL files before training.")
  parser.add_argument("--jsonl_path", nargs="+", required=True, help="record JSONL file(s)")
  parser.add_argument("--image_root", default=None,
                      help="folder the image paths are relative to (default: each file's folder)")
  parser.add_argument("--no_images", action="store_true", help="do not open the images")
  parser.add_argument("--max_labels", type=int, default=50, help="labels listed in the summary")
  args = parser.parse_args(argv)
  any_errors = False
  for path in args.jsonl_path:
    report = validate_file(path, args.image_root, check_images=not args.no_images)
    for problem in report.problems:
      print(problem)
    print(report.summary(args.max_labels))
    any_errors |= not report.ok
  return 1 if any_errors else 0


if __name__ == "__main__":
  sys.exit(main())
