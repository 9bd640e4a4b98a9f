"""The assistant answer text: the old pipeline's JSON array of boxes and labels, written and read back.

`format_answer` writes the training target; `parse_answer` reads a model's (possibly broken) output back
into objects with the character span of each, so that inference can score an object from its tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Iterable

# The answer's exact spelling is part of the training target, so it is fixed here once:
# Python's default JSON separators (", " and ": ", as in DESIGN.md's example), non-ASCII labels kept
# as they are (ensure_ascii=False), keys in the order bbox_2d then label, integer pixel coordinates.
ITEM_SEPARATOR = ", "
KEY_SEPARATOR = ": "

# Errors parse_answer reports in ParsedAnswer.error (it never raises):
ERROR_EMPTY = "empty"                # blank text
ERROR_NO_JSON = "no json"            # no array or object found in the text
ERROR_TRUNCATED = "truncated"        # text ends inside an object or string; complete objects salvaged
ERROR_INVALID_JSON = "invalid json"  # some object could not be read even after repairs; others salvaged
ERROR_PARSER_FAILURE = "parser failure"  # a bug in this module (never seen in fuzzing); nothing salvaged

# Reasons an object that was read is still dropped, counted in ParsedAnswer.skipped:
SKIP_NOT_OBJECT = "not an object"
SKIP_MISSING_BOX = "missing box"
SKIP_BOX_LENGTH = "box not 4 numbers"
SKIP_BOX_NON_NUMERIC = "non-numeric box"
SKIP_BOX_NON_FINITE = "non-finite box"
SKIP_MISSING_LABEL = "missing label"


class AnswerParseError(ValueError):
  """Raised only by `parse_answer(..., strict=True)` when the answer is not clean; never otherwise."""


@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
  """What was read from one answer text.

  objects: dicts {"bbox_2d": [x1, y1, x2, y2] (numbers as written), "desc": str, "span": (start, end)},
    span being the object's `{...}` text as `text[start:end]`; objects from `quad`/`line` also carry it.
  error: None, or one of the ERROR_* reasons above (structural problems; something may be lost).
  repairs: what was fixed to read the text (code fence, surrounding text, trailing comma, ...).
  skipped: {SKIP_* reason: count} of objects that were read but dropped.
  """
  objects: list[dict[str, Any]]
  error: str | None = None
  repairs: tuple[str, ...] = ()
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Writing.

def _number_list(values: Any) -> list[float] | None:
  if not isinstance(values, (list, tuple)):
    return None
  # Fast path for the usual case (plain ints/floats); the sum is finite iff every value is (or it is huge).
  if all(type(value) is int or type(value) is float for value in values):
    try:
      return list(values) if math.isfinite(sum(values)) else None
    except OverflowError:
      return None
  numbers = []
  for value in values:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      return None
    numbers.append(value)
  return numbers


def object_box(obj: dict[str, Any]) -> list[float] | None:
  """The [x1, y1, x2, y2] of a record object: its bbox_2d, else the min/max of its quad or line points."""
  if "bbox_2d" in obj:
    box = _number_list(obj["bbox_2d"])
    return box if box is not None and len(box) == 4 else None
  for key in ("quad", "line"):
    if key in obj:
      points = _number_list(obj[key])
      if points is None or len(points) < 4 or len(points) % 2:
        return None
      xs, ys = points[0::2], points[1::2]
      return [min(xs), min(ys), max(xs), max(ys)]
  return None


def object_label(obj: dict[str, Any]) -> str | None:
  label = obj.get("desc", obj.get("label"))
  return label if isinstance(label, str) and label.strip() else None


def format_answer(objects: Iterable[dict[str, Any]]) -> str:
  """The assistant answer for `objects` (record objects with bbox_2d/quad/line and desc or label).

  Objects are sorted by (y1, x1) (stable: ties keep their input order), coordinates rounded to integers
  (round half to even); `[]` when there are none. Raises ValueError naming the object when one has no
  usable box or label.
  """
  rows = []
  for index, obj in enumerate(objects):
    box = object_box(obj) if isinstance(obj, dict) else None
    label = object_label(obj) if isinstance(obj, dict) else None
    if box is None or label is None:
      raise ValueError(f"object {index} needs a box (bbox_2d, quad or line) and a desc or label: {obj!r}")
    rows.append(([int(round(v)) for v in box], label))
  rows.sort(key=lambda row: (row[0][1], row[0][0]))
  parts = []
  for box, label in rows:
    box_text = "[" + ITEM_SEPARATOR.join(str(v) for v in box) + "]"
    label_text = json.dumps(label, ensure_ascii=False)
    parts.append('{"bbox_2d"' + KEY_SEPARATOR + box_text + ITEM_SEPARATOR + '"label"' + KEY_SEPARATOR
                 + label_text + "}")
  return "[" + ITEM_SEPARATOR.join(parts) + "]"


# ----------------------------------------------------------------------------------------------------
# Reading.

@dataclasses.dataclass
class _Scan:
  objects: list[tuple[int, int]]  # spans of every balanced {...}, at any depth, in closing order
  first_open: int | None          # index of the first [ or { outside strings
  last_close: int | None          # index after the last ] or } that closed a top-level container
  open_braces: int                # { still open at the end
  open_brackets: int              # [ still open at the end
  in_string: bool                 # text ends inside a string


def _scan(text: str) -> _Scan:
  """One pass over the text, aware of "..." and '...' strings, finding balanced {...} spans."""
  stack: list[tuple[str, int]] = []
  objects: list[tuple[int, int]] = []
  first_open = last_close = None
  quote = None
  index, length = 0, len(text)
  while index < length:
    char = text[index]
    if quote is not None:
      if char == "\\":
        index += 2
        continue
      if char == quote:
        quote = None
    elif char in "\"'":
      # Quotes only open strings inside a container: in prose around the JSON ("it's", 5" screen) they
      # are just characters.
      if stack:
        quote = char
    elif char in "[{":
      if first_open is None:
        first_open = index
      stack.append((char, index))
    elif char in "]}":
      opener = "[" if char == "]" else "{"
      # Unbalanced closers are tolerated: pop up to the matching opener if there is one.
      depth = len(stack) - 1
      while depth >= 0 and stack[depth][0] != opener:
        depth -= 1
      if depth >= 0:
        start = stack[depth][1]
        del stack[depth:]
        if opener == "{":
          objects.append((start, index + 1))
        if not stack:
          last_close = index + 1
    index += 1
  return _Scan(objects=objects, first_open=first_open, last_close=last_close,
               open_braces=sum(1 for c, _ in stack if c == "{"),
               open_brackets=sum(1 for c, _ in stack if c == "["),
               in_string=quote is not None)


_BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")


def _to_strict_json(fragment: str) -> tuple[str, list[str]]:
  """Rewrites single-quoted strings and bare keys to JSON and drops trailing commas (outside strings)."""
  out: list[str] = []
  repairs: list[str] = []
  index, length = 0, len(fragment)
  while index < length:
    char = fragment[index]
    if char == '"':
      end = index + 1
      while end < length and fragment[end] != '"':
        end += 2 if fragment[end] == "\\" else 1
      out.append(fragment[index:end + 1])
      index = end + 1
    elif char == "'":
      end = index + 1
      chars = []
      while end < length and fragment[end] != "'":
        if fragment[end] == "\\" and end + 1 < length:
          chars.append(fragment[end + 1] if fragment[end + 1] in "'\"\\" else fragment[end:end + 2])
          end += 2
        else:
          chars.append(fragment[end])
          end += 1
      out.append(json.dumps("".join(chars), ensure_ascii=False))
      repairs.append("single quotes")
      index = end + 1
    elif char == ",":
      look = index + 1
      while look < length and fragment[look].isspace():
        look += 1
      if look < length and fragment[look] in "}]":
        repairs.append("trailing comma")
      else:
        out.append(char)
      index += 1
    elif _BARE_KEY.match(fragment, index):
      match = _BARE_KEY.match(fragment, index)
      word = match.group(0)
      look = match.end()
      while look < length and fragment[look].isspace():
        look += 1
      if look < length and fragment[look] == ":":
        out.append(json.dumps(word))
        repairs.append("bare key")
      else:
        out.append({"True": "true", "False": "false", "None": "null"}.get(word, word))
      index = match.end()
    else:
      out.append(char)
      index += 1
  return "".join(out), repairs


def _load_fragment(fragment: str) -> tuple[Any, list[str]] | None:
  """The value of one {...} fragment, strict JSON first, then with repairs; None when unreadable."""
  try:
    return json.loads(fragment), []
  except (ValueError, RecursionError):
    pass
  try:
    repaired, repairs = _to_strict_json(fragment)
    return json.loads(repaired), repairs
  except (ValueError, RecursionError):
    return None


def _read_object(value: Any, span: tuple[int, int]) -> tuple[dict[str, Any] | None, str | None]:
  """A detection object from one parsed fragment, or the SKIP_* reason it was dropped."""
  if not isinstance(value, dict):
    return None, SKIP_NOT_OBJECT
  geometry_key = None
  if "bbox_2d" in value:
    raw = value["bbox_2d"]
  else:
    geometry_key = next((key for key in ("quad", "line") if key in value), None)
    if geometry_key is None:
      return None, SKIP_MISSING_BOX
    raw = value[geometry_key]
  if not isinstance(raw, (list, tuple)):
    return None, SKIP_BOX_NON_NUMERIC
  if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in raw):
    return None, SKIP_BOX_NON_NUMERIC
  if not all(math.isfinite(v) for v in raw):
    return None, SKIP_BOX_NON_FINITE
  if geometry_key is None:
    if len(raw) != 4:
      return None, SKIP_BOX_LENGTH
    box = list(raw)
  else:
    if len(raw) < 4 or len(raw) % 2 or (geometry_key == "quad" and len(raw) != 8):
      return None, SKIP_BOX_LENGTH
    box = object_box({geometry_key: raw})
  label = object_label(value)
  if label is None:
    return None, SKIP_MISSING_LABEL
  obj = {"bbox_2d": box, "desc": label, "span": span}
  if geometry_key is not None:
    obj[geometry_key] = list(raw)
  return obj, None


def _looks_like_object(fragment: str) -> bool:
  # Braces in prose ("{note}") are not failed objects; a fragment with a key/value colon is.
  return ":" in fragment


def parse_answer(text: Any, strict: bool = False) -> ParsedAnswer:
  """Reads the objects of an answer text; never raises unless `strict` (then AnswerParseError).

  Reads valid JSON; JSON inside ```json fences or with prose around it; truncated output (every
  complete object is kept, error "truncated"); trailing commas, single quotes, bare keys, a missing
  closing bracket; objects with `label` or `desc`, and with `quad` or `line` instead of `bbox_2d`
  (box = min/max of the points). Objects whose box is not 4 finite numbers or that have no label are
  skipped and counted by reason. With strict=True, any error or skipped object raises
  AnswerParseError naming it; the default never raises for any input.
  """
  if not isinstance(text, str):
    result = ParsedAnswer(objects=[], error=ERROR_NO_JSON)
  elif not text.strip():
    result = ParsedAnswer(objects=[], error=ERROR_EMPTY)
  else:
    try:
      result = _parse_text(text)
    except Exception as failure:  # noqa: BLE001 - the contract is "never raises"; the tests fuzz for this
      result = ParsedAnswer(objects=[], error=f"{ERROR_PARSER_FAILURE}: {type(failure).__name__}")
  if strict and (result.error is not None or result.skipped):
    raise AnswerParseError(f"answer not clean: error={result.error!r}, skipped={result.skipped}")
  return result


def _parse_text(text: str) -> ParsedAnswer:
  scan = _scan(text)
  if scan.first_open is None:
    return ParsedAnswer(objects=[], error=ERROR_NO_JSON)
  repairs: list[str] = []
  if "```" in text:
    repairs.append("code fence")
  prose = text[:scan.first_open].replace("```json", "").replace("```", "").strip()
  if scan.last_close is not None:
    prose += text[scan.last_close:].replace("```", "").strip()
  if prose:
    repairs.append("surrounding text")

  error = None
  if scan.open_braces or scan.in_string:
    error = ERROR_TRUNCATED
  elif scan.open_brackets:
    # All objects closed but the array was not: a clean cut after "}" is a missing bracket, while a
    # dangling comma or fragment after the last object means the output was cut off.
    tail_start = max((end for _, end in scan.objects), default=scan.first_open + 1)
    tail = text[tail_start:].strip()
    if tail.strip("[] \n\t"):
      error = ERROR_TRUNCATED
    else:
      repairs.append("missing closing bracket")

  objects: list[dict[str, Any]] = []
  skipped: dict[str, int] = {}
  taken: list[tuple[int, int]] = []
  # Outermost first, so that a wrapper object ({"objects": [...]}) that is no detection lets its
  # children through, while the children of a detection object are not read again.
  for start, end in sorted(scan.objects, key=lambda span: (span[0], -span[1])):
    if taken and start < taken[-1][1]:
      continue
    fragment = text[start:end]
    loaded = _load_fragment(fragment)
    if loaded is None:
      if _looks_like_object(fragment) and not any(s < start and end <= e for s, e in scan.objects):
        error = error or ERROR_INVALID_JSON
      continue
    value, fragment_repairs = loaded
    obj, reason = _read_object(value, (start, end))
    if obj is None:
      if reason == SKIP_MISSING_BOX and isinstance(value, dict) and not _has_label_key(value):
        continue  # a wrapper or some other object: its children may still be detections
      skipped[reason] = skipped.get(reason, 0) + 1
      taken.append((start, end))
      continue
    repairs.extend(r for r in fragment_repairs if r not in repairs)
    objects.append(obj)
    taken.append((start, end))
  if not objects and not skipped and error is None and not _is_empty_array(text, scan):
    error = ERROR_NO_JSON
  return ParsedAnswer(objects=objects, error=error, repairs=tuple(dict.fromkeys(repairs)), skipped=skipped)


def _has_label_key(value: dict[str, Any]) -> bool:
  return "label" in value or "desc" in value


def _is_empty_array(text: str, scan: _Scan) -> bool:
  end = scan.last_close if scan.last_close is not None else len(text)
  return re.sub(r"\s", "", text[scan.first_open:end]) in ("[]", "[")
