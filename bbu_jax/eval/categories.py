"""Per-category analysis: hierarchical labels grouped into equipment categories by keyword rules.

A label `type/attr,attr,...` is put in the category whose keywords its top-level type contains. When the
type fits several categories (`螺丝、光纤插头` is both screw and connection) or none, the rest of the
label decides, rules tried in order. Rules come from DEFAULT_RULES or a JSON file (`--category_rules`).
"""

from __future__ import annotations

import json
import pathlib
from typing import Sequence

from bbu_jax.eval.matching import normalize_label

OTHER = "other"

# Order matters when the rest of a label decides: specific kinds (label, grounding, connection, screw)
# come before the broad ones, so "螺丝连接点/BBU安装螺丝" is a screw and "标签/5G-BBU-接地线" a label.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("label", ("标签", "贴纸", "label", "tag", "sticker")),
    ("grounding", ("接地", "地排", "地线", "ground", "earth")),
    ("connection", ("光纤插头", "插头", "尾纤", "连接点", "odf", "cpri", "connector", "connection", "plug",
                    "pigtail")),
    ("screw", ("螺丝", "螺钉", "screw", "bolt")),
    ("bbu", ("bbu", "基带", "baseband")),
    ("shield", ("挡风板", "挡板", "shield", "baffle", "windshield")),
    ("cabinet", ("机柜", "cabinet", "rack")),
    ("cable", ("线缆", "电线", "光纤", "电源线", "信号线", "cable", "fiber", "fibre", "wire", "cord")),
)


def load_rules(path: str | pathlib.Path | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """Rules from a JSON file `{"category": ["keyword", ...], ...}` (in order), or the defaults."""
  if path is None:
    return DEFAULT_RULES
  try:
    data = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
  except (OSError, ValueError) as error:
    raise ValueError(f"{path}: cannot read category rules: {error}") from error
  if not isinstance(data, dict) or not all(
      isinstance(name, str) and isinstance(words, list) and all(isinstance(w, str) and w for w in words)
      for name, words in data.items()):
    raise ValueError(f'{path}: category rules must be a JSON object {{"category": ["keyword", ...]}}')
  return tuple((name, tuple(words)) for name, words in data.items())


class Categorizer:
  """label -> category name by keyword rules; cached, deterministic."""

  def __init__(self, rules: Sequence[tuple[str, Sequence[str]]] = DEFAULT_RULES):
    self.rules = tuple((name, tuple(normalize_label(w) for w in words)) for name, words in rules)
    self.names = tuple(name for name, _ in self.rules) + (OTHER,)
    self._cache: dict[str, str] = {}

  def _matching(self, text: str, candidates: Sequence[str] | None = None) -> list[str]:
    return [name for name, words in self.rules
            if (candidates is None or name in candidates) and any(w and w in text for w in words)]

  def __call__(self, label: str) -> str:
    cached = self._cache.get(label)
    if cached is not None:
      return cached
    type_name, _, rest = label.partition("/")
    by_type = self._matching(normalize_label(type_name))
    if len(by_type) == 1:
      category = by_type[0]
    else:
      by_rest = self._matching(normalize_label(rest))
      # An ambiguous or unknown type: the first rule the rest of the label names, else the type's first.
      category = by_rest[0] if by_rest else (by_type[0] if by_type else OTHER)
    self._cache[label] = category
    return category
