"""Label vocabulary: the old converter's token map and label hierarchy (defaults, or loaded from JSON),
label normalization/filtering for conversion, and the label set of the synthetic data.

A label is `object_type/property[/extra...]`. The hierarchy lists the object types to keep and, per
type, the allowed properties; a type with no properties keeps the bare type.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

# The old converter's token map (data_conversion/token_map_zh.json): raw platform names -> names used
# in training labels. Applied to each `/`-separated part of a label.
DEFAULT_TOKEN_MAP: dict[str, str] = {
    "标签": "标签贴纸",
    "BBU品牌": "bbu基带处理单元",
    "连接点（螺丝）": "螺丝连接点",
    "连接正确": "安装正确",
}

# The old converter's label hierarchy (data_conversion/label_hierarchy.json): type -> allowed properties.
DEFAULT_LABEL_HIERARCHY: dict[str, list[str]] = {
    "bbu基带处理单元": ["中兴", "华为", "爱立信"],
    "挡风板": ["安装"],
    "机柜空间": ["满载", "非满载"],
    "标签贴纸": [],
    "线缆": [],
    "螺丝连接点": ["BBU安装螺丝", "BBU尾纤和ODF连接点", "BBU接地线机柜接地端", "CPRI光缆和BBU连接点",
               "地排处螺丝"],
}

# The synthetic data's label set: the old hierarchy, with cables split into fiber and non-fiber
# (the real records' coarse types 光纤 / 电线), so that a tiny model sees brands, sub-types and the
# type/property form. 14 labels in all; convert with this hierarchy keeps every one of them.
SYNTHETIC_LABEL_HIERARCHY: dict[str, list[str]] = {
    **DEFAULT_LABEL_HIERARCHY,
    "线缆": ["光纤", "电线"],
}


def synthetic_labels() -> list[str]:
  """Every label the synthetic generator can write, in a fixed order."""
  return [f"{t}/{p}" if p else t for t, props in SYNTHETIC_LABEL_HIERARCHY.items()
          for p in (props or [""])]


def load_token_map(path: str | os.PathLike | None) -> dict[str, str]:
  """The token map from a JSON object file {raw: normalized}; the default when path is None."""
  if path is None:
    return dict(DEFAULT_TOKEN_MAP)
  with open(path, encoding="utf-8") as f:
    value = json.load(f)
  if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in value.items()):
    raise ValueError(f"{path}: a token map must be a JSON object of strings {{raw: normalized}}")
  return value


def load_label_hierarchy(path: str | os.PathLike | None) -> dict[str, list[str]] | None:
  """The hierarchy from JSON: {type: [properties]} or the old list [{object_type, property}].

  None gives the default; the path "none" gives None, meaning keep every label (token-mapped only).
  """
  if path is None:
    return {k: list(v) for k, v in DEFAULT_LABEL_HIERARCHY.items()}
  if str(path).lower() == "none":
    return None
  with open(path, encoding="utf-8") as f:
    value = json.load(f)
  if isinstance(value, list):
    try:
      value = {entry["object_type"]: list(entry.get("property", [])) for entry in value}
    except (TypeError, KeyError) as e:
      raise ValueError(f"{path}: list entries need 'object_type' (and 'property'): {e}") from e
  if not isinstance(value, dict) or not all(
      isinstance(k, str) and isinstance(v, list) and all(isinstance(p, str) for p in v)
      for k, v in value.items()):
    raise ValueError(f"{path}: a label hierarchy is {{type: [property, ...]}} or "
                     f"[{{\"object_type\": ..., \"property\": [...]}}]")
  return value


def label_type(desc: str) -> str:
  """The object type of a hierarchical label: the part before the first `/`."""
  return desc.split("/", 1)[0].strip()


def normalize_label(label: str, token_map: Mapping[str, str] | None = None,
                    hierarchy: Mapping[str, Sequence[str]] | None = None) -> str | None:
  """A raw `type/property/extra` label token-mapped and filtered by the hierarchy; None to drop it.

  With a hierarchy: the type must be listed (else None); a type with allowed properties keeps the
  first listed property found among the label's parts (`螺丝连接点/BBU安装螺丝/安装正确` ->
  `螺丝连接点/BBU安装螺丝`) or, when none is allowed, the bare type; a type with no properties keeps
  the bare type. Without a hierarchy the whole mapped label is kept.
  """
  token_map = DEFAULT_TOKEN_MAP if token_map is None else token_map
  parts = [p.strip() for p in label.strip().split("/")]
  parts = [token_map.get(p, p) for p in parts if p]
  if not parts:
    return None
  if hierarchy is None:
    return "/".join(parts)
  object_type = parts[0]
  if object_type not in hierarchy:
    return None
  allowed = hierarchy[object_type]
  for part in parts[1:]:
    if part in allowed:
      return f"{object_type}/{part}"
  return object_type
