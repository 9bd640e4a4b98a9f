"""Reading, normalizing and writing the JSONL annotation records of DESIGN.md (train, val, teachers).

Every reader of records goes through `normalize_record`, which turns the three on-disk geometries
(`bbox_2d`, `quad`, `line`; older records with `geometry`/`square`/`line` beside `bbox_2d`) into one
in-memory form:

  {"id": str, "images": [str, ...], "width": int, "height": int,
   "objects": [{"bbox_2d": [x1, y1, x2, y2], "desc": str,
                "geometry": {"kind": "bbox" | "quad" | "line", "points": [x, y, ...]}}, ...]}

with integer boxes in the image file's frame and objects sorted by (y1, x1). `export_record` is the
inverse for writing: one geometry key per object, as the newest export writes them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from typing import Any, Iterable, Iterator, Sequence

GEOMETRY_KEYS = ("bbox_2d", "quad", "line")
GEOMETRY_KINDS = ("bbox", "quad", "line")
KNOWN_RECORD_KEYS = ("id", "images", "width", "height", "objects")
# Old-export object keys that are not used as boxes: `square`/`line` there are in the ORIGINAL photo's
# frame (about 1440x1920), not the record's; the record-frame shape lives in `geometry`.
_OLD_SHAPE_KEYS = ("square",)
_PLATFORM_TYPES = ("ExtentPolygon", "Square", "LineString", "Polygon")


class RecordError(ValueError):
  """A problem with one record: str() gives `FILE:LINE: field: message`."""

  def __init__(self, message: str, *, file: str | os.PathLike | None = None, line: int | None = None,
               field: str | None = None, raw: Any = None):
    super().__init__(message)
    self.message = message
    self.file = None if file is None else str(file)
    self.line = line
    self.field = field
    self.raw = raw  # the offending line's text or parsed value, kept for the rejects file

  def __str__(self) -> str:
    where = f"{self.file or '<record>'}:{self.line if self.line is not None else '?'}"
    what = f"{self.field}: {self.message}" if self.field else self.message
    return f"{where}: {what}"

  def to_json(self) -> dict:
    """The rejects-file entry for this error."""
    return {"file": self.file, "line": self.line, "field": self.field, "error": self.message,
            "where": str(self), "raw": self.raw}


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict | RecordError]]:
  """(1-based line number, parsed object or RecordError) for each non-blank line of a JSONL file."""
  with open(path, "rb") as f:
    for line_no, raw_line in enumerate(f, start=1):
      try:
        text = raw_line.decode("utf-8")
      except UnicodeDecodeError as e:
        yield line_no, RecordError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=path,
                                   line=line_no, raw=raw_line.decode("utf-8", errors="replace"))
        continue
      if not text.strip():
        continue
      try:
        value = json.loads(text)
      except json.JSONDecodeError as e:
        yield line_no, RecordError(f"bad JSON: {e.msg} at column {e.colno}", file=path,
                                   line=line_no, raw=text.rstrip("\n"))
        continue
      if not isinstance(value, dict):
        yield line_no, RecordError(f"a record must be a JSON object, got {type(value).__name__}",
                                   file=path, line=line_no, raw=value)
        continue
      yield line_no, value


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flat_points(value: Any, field: str, err) -> list[float]:
  """[x, y, x, y, ...] from a flat list or a list of [x, y] pairs."""
  if not isinstance(value, list) or not value:
    raise err(f"expected a non-empty list of coordinates, got {value!r:.80}", field)
  if all(isinstance(p, list) for p in value):
    if not all(len(p) >= 2 for p in value):
      raise err("every point must be [x, y]", field)
    value = [c for p in value for c in p[:2]]
  if not all(_is_number(c) for c in value):
    raise err(f"coordinates must be finite numbers, got {value!r:.80}", field)
  if len(value) % 2:
    raise err(f"odd number of coordinates ({len(value)})", field)
  return [float(c) for c in value]


def points_box(points: Sequence[float]) -> list[int]:
  """The [x1, y1, x2, y2] integer box of flat points: min/max, rounded."""
  xs, ys = points[0::2], points[1::2]
  return [round(min(xs)), round(min(ys)), round(max(xs)), round(max(ys))]


def _platform_geometry(geometry: dict, field: str, err) -> dict:
  """The labeling platform's geometry ({type, coordinates}) as {kind, points} in the same frame."""
  kind_name = geometry.get("type")
  coords = geometry.get("coordinates")
  if kind_name not in _PLATFORM_TYPES:
    raise err(f"unknown geometry type {kind_name!r}; expected one of {_PLATFORM_TYPES}", field)
  if kind_name in ("Square", "Polygon") and isinstance(coords, list) and coords and \
      isinstance(coords[0], list) and coords[0] and isinstance(coords[0][0], list):
    coords = coords[0]  # one nesting level deeper: a list of rings, the first is the outline
  points = _flat_points(coords, field + ".coordinates", err)
  if kind_name == "LineString":
    if len(points) < 4:
      raise err("a LineString needs at least two points", field)
    return {"kind": "line", "points": [round(c) for c in points]}
  if len(points) >= 4 and points[-2:] == points[:2]:
    points = points[:-2]  # closed ring: drop the repeated first point
  if kind_name in ("Square", "Polygon") and len(points) == 8:
    return {"kind": "quad", "points": [round(c) for c in points]}
  return {"kind": "bbox", "points": points_box(points)}


def parse_geometry(value: Any, field: str = "geometry") -> dict:
  """{kind, points} from an already-normalized geometry or a platform {type, coordinates}; raises
  RecordError naming the field."""
  return _geometry_from(value, field, lambda message, f: RecordError(message, field=f))


def _geometry_from(value: dict, field: str, err) -> dict:
  """Either an already-normalized {kind, points} or a platform {type, coordinates}."""
  if not isinstance(value, dict):
    raise err(f"expected an object, got {type(value).__name__}", field)
  if "kind" in value:
    kind = value["kind"]
    if kind not in GEOMETRY_KINDS:
      raise err(f"unknown geometry kind {kind!r}; expected one of {GEOMETRY_KINDS}", field)
    points = _flat_points(value.get("points"), field + ".points", err)
    expected = {"bbox": lambda n: n == 4, "quad": lambda n: n == 8, "line": lambda n: n >= 4}[kind]
    if not expected(len(points)):
      raise err(f"{kind} geometry with {len(points)} coordinates", field)
    return {"kind": kind, "points": [round(c) for c in points]}
  return _platform_geometry(value, field, err)


def _pad_thin_box(box: list[int], width: int, height: int) -> list[int]:
  """A straight horizontal/vertical line has a zero-area min/max box; give it one pixel."""
  x1, y1, x2, y2 = box
  if x2 == x1:
    x1, x2 = (x1, x1 + 1) if x1 + 1 <= width else (x1 - 1, x1)
  if y2 == y1:
    y1, y2 = (y1, y1 + 1) if y1 + 1 <= height else (y1 - 1, y1)
  return [x1, y1, x2, y2]


def object_box(obj: dict) -> list[int]:
  """The [x1, y1, x2, y2] integer box of an object, raw or normalized (bbox_2d wins; else the min/max
  of quad, line or geometry points). No range checks: see normalize_record."""
  if "bbox_2d" in obj:
    return [round(c) for c in obj["bbox_2d"]]
  for key in ("quad", "line"):
    if key in obj:
      return points_box(_flat_points(obj[key], key, _plain_error))
  if "geometry" in obj:
    return points_box(_geometry_from(obj["geometry"], "geometry", _plain_error)["points"])
  raise ValueError(f"object has none of {GEOMETRY_KEYS}: {obj!r:.120}")


def _plain_error(message: str, field: str) -> ValueError:
  return ValueError(f"{field}: {message}")


def sort_objects(objects: Iterable[dict]) -> list[dict]:
  """Objects in reading order: by (y1, x1) of their boxes; ties keep their input order."""
  return sorted(objects, key=lambda o: tuple(object_box(o)[1::-1]))


def normalize_object(obj: Any, *, width: int, height: int, field: str = "object",
                     source: tuple[Any, Any] = (None, None)) -> dict:
  """One object in the in-memory form (see the module docstring). Raises RecordError naming the field."""
  file, line = source

  def err(message: str, sub_field: str) -> RecordError:
    return RecordError(message, file=file, line=line, field=sub_field)

  if not isinstance(obj, dict):
    raise err(f"an object must be a JSON object, got {type(obj).__name__}", field)
  desc = obj.get("desc", obj.get("label"))
  if not isinstance(desc, str) or not desc.strip():
    raise err(f"empty or missing label (desc/label), got {desc!r}", field + ".desc")
  desc = desc.strip()

  if "bbox_2d" in obj:
    coords = _flat_points(obj["bbox_2d"], field + ".bbox_2d", err)
    if len(coords) != 4:
      raise err(f"bbox_2d needs 4 numbers [x1, y1, x2, y2], got {len(coords)}", field + ".bbox_2d")
    box = [round(c) for c in coords]
    box_field = field + ".bbox_2d"
    # The old export's `geometry` is in the record's frame (its `square`/`line` are not). Beside a
    # bbox_2d it is an extra that only drawing uses, so an unreadable one is dropped, not fatal.
    geometry = {"kind": "bbox", "points": list(box)}
    if "geometry" in obj:
      try:
        geometry = _geometry_from(obj["geometry"], field + ".geometry", err)
      except RecordError:
        pass
  elif "quad" in obj or "line" in obj:
    key = "quad" if "quad" in obj else "line"
    points = _flat_points(obj[key], f"{field}.{key}", err)
    if key == "quad" and len(points) != 8:
      raise err(f"quad needs 8 numbers (4 points), got {len(points)}", f"{field}.quad")
    if key == "line" and len(points) < 4:
      raise err(f"line needs at least 2 points, got {len(points) // 2}", f"{field}.line")
    geometry = {"kind": key, "points": [round(c) for c in points]}
    box = points_box(points)
    box_field = f"{field}.{key}"
  elif "geometry" in obj:
    geometry = _geometry_from(obj["geometry"], field + ".geometry", err)
    box = points_box(geometry["points"])
    box_field = field + ".geometry"
  else:
    raise err(f"no geometry: an object needs one of {GEOMETRY_KEYS}", field)

  x1, y1, x2, y2 = box
  if x2 < x1 or y2 < y1:
    raise err(f"box {box} has x2 < x1 or y2 < y1", box_field)
  if x2 == x1 or y2 == y1:
    if geometry["kind"] != "line":
      raise err(f"box {box} has zero width or height (x2 <= x1 or y2 <= y1)", box_field)
    box = _pad_thin_box(box, width, height)
  if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height:
    raise err(f"box {box} outside the {width}x{height} image", box_field)

  extras = {k: v for k, v in obj.items()
            if k not in GEOMETRY_KEYS + _OLD_SHAPE_KEYS + ("desc", "label", "geometry")}
  return {"bbox_2d": box, "desc": desc, "geometry": geometry, **extras}


def _positive_int(value: Any, field: str, err) -> int:
  if _is_number(value) and float(value).is_integer() and value > 0:
    return int(value)
  raise err(f"must be a positive integer, got {value!r}", field)


def normalize_record(raw: Any, *, source: tuple[Any, Any] = (None, None)) -> dict:
  """A new record in the in-memory form of the module docstring; `source` is (file, line) for errors.

  `label` is accepted for `desc`, `image` (one path) for `images`. `id` is the record's own when it
  has one, else its first image path. Unknown top-level keys are carried over unchanged.
  Raises RecordError naming the first bad field.
  """
  file, line = source

  def err(message: str, field: str) -> RecordError:
    return RecordError(message, file=file, line=line, field=field, raw=raw)

  if not isinstance(raw, dict):
    raise err(f"a record must be a JSON object, got {type(raw).__name__}", None)
  images = raw.get("images")
  if images is None and isinstance(raw.get("image"), str):
    images = [raw["image"]]
  if not isinstance(images, list) or not images:
    raise err(f"expected a non-empty list of image paths, got {images!r:.80}", "images")
  for i, image in enumerate(images):
    if not isinstance(image, str) or not image.strip():
      raise err(f"image path must be a non-empty string, got {image!r}", f"images[{i}]")
  width = _positive_int(raw.get("width"), "width", err)
  height = _positive_int(raw.get("height"), "height", err)
  objects = raw.get("objects")
  if not isinstance(objects, list):
    raise err(f"expected a list of objects ([] when none), got {objects!r:.80}", "objects")
  record_id = raw.get("id", images[0])
  if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or record_id == "":
    raise err(f"id must be a non-empty string or an integer, got {record_id!r}", "id")

  normalized = []
  for i, obj in enumerate(objects):
    try:
      normalized.append(normalize_object(obj, width=width, height=height, field=f"objects[{i}]",
                                         source=source))
    except RecordError as e:
      e.raw = raw
      raise
  extras = {k: v for k, v in raw.items() if k not in KNOWN_RECORD_KEYS + ("image",)}
  return {"id": str(record_id), "images": list(images), "width": width, "height": height,
          "objects": sort_objects(normalized), **extras}


def export_object(obj: dict) -> dict:
  """A normalized object as the newest export writes it: `desc` and ONE of bbox_2d / quad / line."""
  geometry = obj.get("geometry") or {"kind": "bbox", "points": obj["bbox_2d"]}
  kind = geometry["kind"]
  out = {"bbox_2d": list(obj["bbox_2d"])} if kind == "bbox" else {kind: list(geometry["points"])}
  out["desc"] = obj["desc"]
  out.update({k: v for k, v in obj.items()
              if k not in GEOMETRY_KEYS + _OLD_SHAPE_KEYS + ("desc", "label", "geometry")})
  return out


def export_record(record: dict) -> dict:
  """A normalized record in the on-disk form (inverse of normalize_record up to rounding)."""
  out = {"id": record["id"], "images": list(record["images"]), "width": record["width"],
         "height": record["height"], "objects": [export_object(o) for o in record["objects"]]}
  out.update({k: v for k, v in record.items() if k not in out})
  return out


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
  """Write dicts one per line (UTF-8, not ASCII-escaped) atomically: a temp file, then os.replace.

  Returns the number of lines written. Readers never see a half-written file.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
  count = 0
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for record in records:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += 1
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
  return count


def load_records(path: str | os.PathLike, *, on_error: str = "raise",
                 rejects_path: str | os.PathLike | None = None) -> tuple[list[dict], list[dict]]:
  """Normalized records of a JSONL file, and the rejected lines.

  on_error="raise" raises the first RecordError (bad JSON, bad field, duplicate id).
  on_error="skip" leaves bad lines out, returns them as rejects ({file, line, field, error, where,
  raw}), logs how many, and writes them to `rejects_path` as JSONL when given: nothing silently lost.
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  records: list[dict] = []
  rejects: list[dict] = []
  first_line_of_id: dict[str, int] = {}
  for line_no, item in iter_jsonl(path):
    try:
      if isinstance(item, RecordError):
        raise item
      record = normalize_record(item, source=(path, line_no))
      if record["id"] in first_line_of_id:
        raise RecordError(f"duplicate id {record['id']!r} (first at line "
                          f"{first_line_of_id[record['id']]})", file=path, line=line_no,
                          field="id", raw=item)
      first_line_of_id[record["id"]] = line_no
      records.append(record)
    except RecordError as e:
      if on_error == "raise":
        raise
      rejects.append(e.to_json())
  if rejects_path is not None:
    write_jsonl(rejects_path, rejects)
  if rejects:
    logging.warning("%s: skipped %d of %d records%s", path, len(rejects), len(records) + len(rejects),
                    f"; reasons in {rejects_path}" if rejects_path is not None else "")
  return records, rejects
