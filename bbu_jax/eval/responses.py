"""Reading responses files into samples for evaluation: ours (DESIGN.md) and the old pipeline's.

Malformed content never stops the evaluation: every problem is counted in `Problems` under a named
key, and the sample or object is kept as far as it is usable. Only an unreadable file raises.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
from typing import Any

from bbu_jax.data.answer import object_box, parse_answer

# Keys counted in Problems (evaluation_info.input_problems):
#   unreadable_samples         a sample that is not a JSON object (or a JSONL line that is not JSON)
#   missing_ground_truth       a sample without a ground_truth field (evaluated as having none)
#   missing_prediction         a sample without prediction (or head_prediction for --source head) and
#                              without a raw_response to parse (evaluated as predicting nothing)
#   missing_size               a sample without a positive width/height (taken from the boxes)
#   invalid_gt_objects         ground-truth objects dropped: no usable box or label
#   invalid_pred_objects       predicted objects dropped: no usable box or label (parser skips included)
#   inverted_boxes             boxes with x2 < x1 or y2 < y1, evaluated with their corners reordered
#   zero_area_boxes            boxes with x1 == x2 or y1 == y2 (a horizontal line, say): never matched
#   empty_predictions          samples with no usable prediction at all
#   images_without_ground_truth samples with no usable ground-truth object
#   predictions_without_score  predicted objects with no finite score
#   inference_errors           samples whose inference failed (their `error`, e.g. an unreadable image)


class Problems(collections.Counter):
  """Counts of what was malformed in the input, by the keys listed above."""


@dataclasses.dataclass
class Sample:
  """One image: ground truth and predictions as {"bbox": [x1, y1, x2, y2], "desc", ...} dicts.

  Ground-truth objects keep their `quad` or `line` geometry when they have one; predictions carry
  `score` (a float, or None when the responses gave none).
  """
  sample_id: str
  image: str | None
  width: int | None
  height: int | None
  ground_truth: list[dict[str, Any]]
  prediction: list[dict[str, Any]]
  parse_error: str | None = None
  raw_response: str | None = None


@dataclasses.dataclass
class Responses:
  samples: list[Sample]
  problems: Problems
  parse_errors: collections.Counter  # reason -> count, for samples whose answer did not parse cleanly
  file_format: str                   # "bbu_jax" or "old_pipeline"
  model_path: str | None = None
  mode: str | None = None


_NUMBER_TYPES = (int, float)


def _plain_box(obj: dict[str, Any]) -> list[float] | None:
  """The common case, fast: bbox_2d a list of 4 plain finite numbers; else None (use object_box)."""
  box = obj.get("bbox_2d")
  if type(box) is not list or len(box) != 4:
    return None
  x1, y1, x2, y2 = box
  if type(x1) in _NUMBER_TYPES and type(y1) in _NUMBER_TYPES and type(x2) in _NUMBER_TYPES \
      and type(y2) in _NUMBER_TYPES and -1e300 < x1 + y1 + x2 + y2 < 1e300:
    return box
  return None


def _flat_points(coordinates: Any) -> list[float]:
  """[[x, y], ...] at any nesting depth -> [x, y, x, y, ...]; [] when malformed."""
  while isinstance(coordinates, list) and len(coordinates) == 1 and isinstance(coordinates[0], list) \
      and coordinates[0] and isinstance(coordinates[0][0], list):
    coordinates = coordinates[0]
  points: list[float] = []
  for point in coordinates if isinstance(coordinates, list) else []:
    if not (isinstance(point, list) and len(point) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point)):
      return []
    points.extend(float(v) for v in point)
  return points


def _platform_geometry(geometry: Any) -> dict[str, list[float]]:
  """The labeling platform's `geometry` of older records (same frame as bbox_2d), for drawing only:
  a Square becomes `quad` (4 points, the closing point dropped), a LineString `line`."""
  if not isinstance(geometry, dict):
    return {}
  points = _flat_points(geometry.get("coordinates"))
  kind = geometry.get("type")
  if kind == "Square" and len(points) >= 8:
    return {"quad": points[:8]}
  if kind == "LineString" and len(points) >= 4:
    return {"line": points}
  return {}


def _clean_object(obj: Any, kind: str, problems: Problems) -> dict[str, Any] | None:
  """A usable {"bbox", "desc", ...} from a record or prediction object, or None (counted)."""
  if type(obj) is not dict:
    problems[f"invalid_{kind}_objects"] += 1
    return None
  box = _plain_box(obj) or object_box(obj)
  label = obj.get("desc", obj.get("label"))
  if box is None or type(label) is not str:
    problems[f"invalid_{kind}_objects"] += 1
    return None
  label = label.strip()
  if not label:
    problems[f"invalid_{kind}_objects"] += 1
    return None
  x1, y1, x2, y2 = box
  if x2 < x1 or y2 < y1:
    problems["inverted_boxes"] += 1
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
  if x1 == x2 or y1 == y2:
    problems["zero_area_boxes"] += 1  # kept, but no IoU can reach a threshold with them
  cleaned: dict[str, Any] = {"bbox": [float(x1), float(y1), float(x2), float(y2)], "desc": label}
  if kind == "gt":
    for key in ("quad", "line"):
      if key in obj and "bbox_2d" not in obj:
        cleaned[key] = [float(v) for v in obj[key]]
    if "geometry" in obj:
      cleaned.update(_platform_geometry(obj["geometry"]))
  else:
    score = obj.get("score")
    finite = isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)
    cleaned["score"] = float(score) if finite else None
    if not finite:
      problems["predictions_without_score"] += 1
  return cleaned


def _clean_objects(objects: Any, kind: str, problems: Problems) -> list[dict[str, Any]]:
  if not isinstance(objects, list):
    problems[f"invalid_{kind}_objects"] += 0 if objects is None else 1
    return []
  cleaned = (_clean_object(obj, kind, problems) for obj in objects)
  return [obj for obj in cleaned if obj is not None]


def _truth_objects(truth: Any, problems: Problems) -> list[dict[str, Any]]:
  """Ground-truth objects from a list, or from a JSON string of one (the old pipeline's files)."""
  if isinstance(truth, str):
    try:
      truth = json.loads(truth)
    except ValueError:
      parsed = parse_answer(truth)
      problems["invalid_gt_objects"] += sum(parsed.skipped.values()) + (parsed.error is not None)
      truth = [{"bbox_2d": o["bbox_2d"], "desc": o["desc"]} for o in parsed.objects]
  return _clean_objects(truth, "gt", problems)


def _size(value: Any) -> int | None:
  return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
      and math.isfinite(value) and value > 0 else None


def _parsed_predictions(text: Any, problems: Problems, parse_errors: collections.Counter
                        ) -> tuple[list[dict[str, Any]], str | None]:
  parsed = parse_answer(text)
  problems["invalid_pred_objects"] += sum(parsed.skipped.values())
  if parsed.error is not None:
    parse_errors[parsed.error] += 1
  objects = [{"bbox_2d": obj["bbox_2d"], "desc": obj["desc"]} for obj in parsed.objects]
  return _clean_objects(objects, "pred", problems), parsed.error


def _finish(sample: Sample, problems: Problems) -> Sample:
  if not sample.prediction:
    problems["empty_predictions"] += 1
  if not sample.ground_truth:
    problems["images_without_ground_truth"] += 1
  if sample.width is None or sample.height is None:
    problems["missing_size"] += 1
    boxes = [o["bbox"] for o in sample.ground_truth + sample.prediction]
    sample.width = sample.width or max([int(math.ceil(b[2])) for b in boxes] + [1])
    sample.height = sample.height or max([int(math.ceil(b[3])) for b in boxes] + [1])
  return sample


def _our_sample(index: int, raw: dict[str, Any], source: str, problems: Problems,
                parse_errors: collections.Counter) -> Sample:
  images = raw.get("images")
  image = images[0] if isinstance(images, list) and images and isinstance(images[0], str) else \
      (raw.get("image") if isinstance(raw.get("image"), str) else None)
  if raw.get("ground_truth") is None:
    problems["missing_ground_truth"] += 1
  ground_truth = _truth_objects(raw.get("ground_truth"), problems)
  field = "head_prediction" if source == "head" else "prediction"
  parse_error = raw.get("parse_error") if source == "lm" else None
  if raw.get(field) is not None:
    prediction = _clean_objects(raw[field], "pred", problems)
    if parse_error:
      parse_errors[str(parse_error)[:60]] += 1
  elif source == "lm" and isinstance(raw.get("raw_response"), str):
    prediction, parse_error = _parsed_predictions(raw["raw_response"], problems, parse_errors)
  else:
    problems["missing_prediction"] += 1
    prediction = []
  if raw.get("error"):
    problems["inference_errors"] += 1
  sample_id = raw.get("id")
  return _finish(Sample(sample_id=str(sample_id if sample_id is not None else image or index), image=image,
                        width=_size(raw.get("width")), height=_size(raw.get("height")),
                        ground_truth=ground_truth, prediction=prediction,
                        parse_error=str(parse_error) if parse_error else None,
                        raw_response=raw.get("raw_response") if isinstance(raw.get("raw_response"), str)
                        else None), problems)


def _old_sample(index: int, raw: dict[str, Any], problems: Problems,
                parse_errors: collections.Counter) -> Sample:
  if raw.get("ground_truth") is None:
    problems["missing_ground_truth"] += 1
  ground_truth = _truth_objects(raw.get("ground_truth"), problems)
  text = raw.get("pred_result")
  if isinstance(text, str):
    prediction, parse_error = _parsed_predictions(text, problems, parse_errors)
  elif isinstance(text, list):  # some old runs stored the parsed list
    prediction, parse_error, text = _clean_objects(text, "pred", problems), None, None
  else:
    problems["missing_prediction"] += 1
    prediction, parse_error, text = [], None, None
  image = raw.get("image") if isinstance(raw.get("image"), str) else None
  return _finish(Sample(sample_id=image or str(index), image=image, width=_size(raw.get("width")),
                        height=_size(raw.get("height")), ground_truth=ground_truth, prediction=prediction,
                        parse_error=parse_error, raw_response=text), problems)


def _load_json(path: pathlib.Path) -> tuple[Any, int]:
  """The file's JSON value, or for JSONL a list of its lines' values; also the count of bad lines."""
  try:
    text = path.read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as error:
    raise ValueError(f"{path}: cannot read responses file: {error}") from error
  try:
    return json.loads(text), 0
  except ValueError as error:
    lines = [line for line in text.splitlines() if line.strip()]
    values, bad = [], 0
    for line in lines:
      try:
        values.append(json.loads(line))
      except ValueError:
        values.append(None)
        bad += 1
    if not lines or bad == len(lines):
      raise ValueError(f"{path}: not a JSON responses file: {error}") from error
    return values, bad


def read_responses(path: str | pathlib.Path, source: str = "lm") -> Responses:
  """Samples of a responses file in either format; `source` "lm" or "head" picks our predictions."""
  if source not in ("lm", "head"):
    raise ValueError(f"--source must be 'lm' or 'head', got {source!r}")
  path = pathlib.Path(path)
  data, _ = _load_json(path)
  problems, parse_errors = Problems(), collections.Counter()
  meta: dict[str, Any] = {}
  if isinstance(data, dict) and isinstance(data.get("samples"), list):
    raw_samples, file_format = data["samples"], "bbu_jax"
    meta = {"model_path": data.get("model_path"), "mode": data.get("mode")}
  elif isinstance(data, list):
    old = any(isinstance(s, dict) and "pred_result" in s for s in data)
    raw_samples, file_format = data, "old_pipeline" if old else "bbu_jax"
  else:
    raise ValueError(f"{path}: expected {{'samples': [...]}} (bbu_jax) or a JSON array (old pipeline)")
  samples = []
  for index, raw in enumerate(raw_samples):
    if not isinstance(raw, dict):
      problems["unreadable_samples"] += 1
      continue
    if file_format == "old_pipeline":
      samples.append(_old_sample(index, raw, problems, parse_errors))
    else:
      samples.append(_our_sample(index, raw, source, problems, parse_errors))
  return Responses(samples=samples, problems=problems, parse_errors=parse_errors, file_format=file_format,
                   **meta)
