"""Figures measured on the real annotation records (../shared/data), shipped as numbers so that the
synthetic generator follows them without the records: object counts, label-type frequencies, box sizes
and positions, image sizes and geometry kinds.

Regenerate (and check against the shipped numbers) with
  python -m bbu_jax.data.real_stats --records ../shared/data/bbu_records.jsonl ../shared/data/bbu_records_v3.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
from typing import Iterable, Sequence

# Quantile levels kept for every continuous figure (0 and 1 are the min and max); a sampler inverts
# the piecewise-linear CDF through these points.
QUANTILE_LEVELS = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)

_BRANDS = ("华为", "中兴", "爱立信")
_CONNECTOR_KINDS = ("BBU安装螺丝", "BBU端光纤插头", "地排处接地螺丝", "机柜处接地螺丝", "ODF端光纤插头")


def fine_type(desc: str) -> str:
  """The real label's coarse type, refined by brand (BBU设备) or connector kind (螺丝、光纤插头)."""
  object_type, _, rest = desc.partition("/")
  if object_type == "BBU设备":
    brand = next((b for b in _BRANDS if b in rest), None)
    return f"{object_type}/{brand}" if brand else object_type
  if object_type == "螺丝、光纤插头":
    kind = next((k for k in _CONNECTOR_KINDS if re.search(k, rest)), None)
    return f"{object_type}/{kind}" if kind else object_type
  return object_type


def quantiles(values: Sequence[float]) -> list[float]:
  """Values at QUANTILE_LEVELS (linear interpolation between order statistics), rounded to 4 places."""
  ordered = sorted(values)
  out = []
  for level in QUANTILE_LEVELS:
    position = level * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    value = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    out.append(round(value, 4))
  return out


def measure(records: Iterable[dict]) -> dict:
  """The figures of normalized records (see bbu_jax.data.records.normalize_record)."""
  records = list(records)
  counts = [len(r["objects"]) for r in records]
  sizes = collections.Counter(f"{r['width']}x{r['height']}" for r in records)
  desc_counts = collections.Counter(o["desc"] for r in records for o in r["objects"])
  type_counts = collections.Counter(o["desc"].split("/", 1)[0] for r in records for o in r["objects"])
  kinds = collections.Counter(o["geometry"]["kind"] for r in records for o in r["objects"])
  per_type: dict[str, dict] = collections.defaultdict(lambda: collections.defaultdict(list))
  images_with: collections.Counter = collections.Counter()
  for record in records:
    width, height = record["width"], record["height"]
    for name in {fine_type(o["desc"]) for o in record["objects"]}:
      images_with[name] += 1
    for obj in record["objects"]:
      x1, y1, x2, y2 = obj["bbox_2d"]
      figures = per_type[fine_type(obj["desc"])]
      figures["w"].append((x2 - x1) / width)
      figures["h"].append((y2 - y1) / height)
      figures["cx"].append((x1 + x2) / 2 / width)
      figures["cy"].append((y1 + y2) / 2 / height)
      figures["kind"].append(obj["geometry"]["kind"])
  fine = {}
  for name, figures in sorted(per_type.items(), key=lambda kv: -len(kv[1]["w"])):
    fine[name] = {
        "count": len(figures["w"]), "images_with": images_with[name],
        "box_w_rel": quantiles(figures["w"]), "box_h_rel": quantiles(figures["h"]),
        "center_x_rel": quantiles(figures["cx"]), "center_y_rel": quantiles(figures["cy"]),
        "geometry": dict(collections.Counter(figures["kind"]).most_common()),
    }
  return {
      "records": len(records),
      "objects": sum(counts),
      "image_sizes": dict(sizes.most_common()),
      "objects_per_image": {
          "min": min(counts), "median": statistics.median(counts),
          "mean": round(statistics.fmean(counts), 3), "max": max(counts),
          "histogram": {str(k): v for k, v in sorted(collections.Counter(counts).items())},
      },
      "distinct_desc": len(desc_counts),
      "desc_seen_once": sum(1 for v in desc_counts.values() if v == 1),
      "type_counts": dict(type_counts.most_common()),
      "geometry_kinds": dict(kinds.most_common()),
      "fine_types": fine,
  }


# Measured with the command in the module docstring (both files pooled: 619 records; some photos
# appear in both files with different annotations). tests/test_synthetic.py re-measures and compares.
REAL_STATS: dict = {
  "records": 619,
  "objects": 6632,
  "image_sizes": {"532x728": 353, "420x896": 138, "420x924": 80, "448x896": 17, "728x532": 17, "448x868": 14},
  "objects_per_image": {
    "min": 1,
    "median": 8,
    "mean": 10.714,
    "max": 53,
    "histogram": {
      "1": 2, "2": 4, "3": 63, "4": 50, "5": 61, "6": 89, "7": 40, "8": 38, "9": 20, "10": 24,
      "11": 29, "12": 20, "13": 16, "14": 17, "15": 16, "16": 14, "17": 13, "18": 10, "19": 10,
      "20": 10, "21": 8, "22": 4, "23": 4, "24": 4, "25": 8, "26": 4, "27": 4, "28": 1, "29": 8,
      "30": 2, "31": 4, "32": 4, "33": 3, "35": 1, "36": 3, "37": 1, "38": 3, "40": 3, "43": 1,
      "45": 1, "48": 1, "53": 1
    },
  },
  "distinct_desc": 440,
  "desc_seen_once": 232,
  "type_counts": {"螺丝、光纤插头": 2446, "标签": 1900, "光纤": 911, "BBU设备": 602, "电线": 568, "挡风板": 205},
  "geometry_kinds": {"quad": 3037, "bbox": 2116, "line": 1479},
  "fine_types": {
    "标签": {
      "count": 1900,
      "images_with": 504,
      "box_w_rel": [0.0056, 0.0376, 0.0788, 0.1241, 0.2124, 0.4139, 0.8906],
      "box_h_rel": [0.0069, 0.0302, 0.0563, 0.0865, 0.1528, 0.2941, 0.6272],
      "center_x_rel": [0.016, 0.1071, 0.3268, 0.4701, 0.61, 0.8619, 0.981],
      "center_y_rel": [0.0179, 0.1422, 0.3468, 0.5577, 0.6983, 0.9114, 0.9835],
      "geometry": {"quad": 1892, "bbox": 8},
    },
    "螺丝、光纤插头/BBU安装螺丝": {
      "count": 976,
      "images_with": 396,
      "box_w_rel": [0.0038, 0.0207, 0.0338, 0.062, 0.1053, 0.1762, 0.3786],
      "box_h_rel": [0.0014, 0.0151, 0.0246, 0.0402, 0.0663, 0.0989, 0.2067],
      "center_x_rel": [0.0041, 0.1371, 0.3947, 0.5038, 0.619, 0.8465, 0.9869],
      "center_y_rel": [0.0069, 0.0467, 0.1676, 0.4303, 0.7536, 0.9321, 0.9856],
      "geometry": {"bbox": 968, "quad": 8},
    },
    "光纤": {
      "count": 911,
      "images_with": 263,
      "box_w_rel": [0.0019, 0.0583, 0.1335, 0.2331, 0.3929, 0.6334, 0.8665],
      "box_h_rel": [0.0069, 0.0412, 0.1449, 0.2692, 0.4396, 0.6889, 0.9547],
      "center_x_rel": [0.0188, 0.1302, 0.3251, 0.4361, 0.6239, 0.8167, 0.9652],
      "center_y_rel": [0.0323, 0.1323, 0.3467, 0.5543, 0.6959, 0.8438, 0.9725],
      "geometry": {"line": 911},
    },
    "螺丝、光纤插头/BBU端光纤插头": {
      "count": 751,
      "images_with": 261,
      "box_w_rel": [0.0188, 0.0301, 0.0451, 0.0604, 0.0996, 0.259, 0.515],
      "box_h_rel": [0.0151, 0.0262, 0.0388, 0.0632, 0.1016, 0.1745, 0.4437],
      "center_x_rel": [0.0122, 0.1565, 0.422, 0.5273, 0.6397, 0.8686, 0.9868],
      "center_y_rel": [0.0197, 0.1696, 0.2998, 0.5027, 0.6027, 0.7778, 0.9766],
      "geometry": {"bbox": 503, "quad": 248},
    },
    "电线": {
      "count": 568,
      "images_with": 298,
      "box_w_rel": [0.0022, 0.0381, 0.14, 0.2774, 0.4381, 0.7152, 0.9976],
      "box_h_rel": [0.0011, 0.0108, 0.0702, 0.1951, 0.419, 0.7122, 0.9988],
      "center_x_rel": [0.0262, 0.114, 0.2652, 0.4405, 0.6319, 0.8325, 0.9798],
      "center_y_rel": [0.0312, 0.1378, 0.3997, 0.5921, 0.7354, 0.9288, 0.9773],
      "geometry": {"line": 568},
    },
    "BBU设备/华为": {
      "count": 516,
      "images_with": 412,
      "box_w_rel": [0.0451, 0.1631, 0.25, 0.4054, 0.5849, 0.9981, 1.0],
      "box_h_rel": [0.0014, 0.1992, 0.4156, 0.5996, 0.7864, 0.9781, 1.0],
      "center_x_rel": [0.0226, 0.118, 0.3047, 0.4991, 0.6713, 0.8513, 0.9596],
      "center_y_rel": [0.0488, 0.1972, 0.428, 0.4938, 0.5446, 0.807, 0.9368],
      "geometry": {"quad": 471, "bbox": 45},
    },
    "螺丝、光纤插头/地排处接地螺丝": {
      "count": 306,
      "images_with": 81,
      "box_w_rel": [0.0262, 0.048, 0.0786, 0.1083, 0.1429, 0.2075, 0.4095],
      "box_h_rel": [0.0112, 0.0268, 0.0412, 0.0558, 0.0766, 0.1049, 0.1529],
      "center_x_rel": [0.0238, 0.1295, 0.3455, 0.4661, 0.6218, 0.9116, 0.9607],
      "center_y_rel": [0.019, 0.1399, 0.3234, 0.444, 0.5884, 0.7744, 0.965],
      "geometry": {"bbox": 306},
    },
    "螺丝、光纤插头/机柜处接地螺丝": {
      "count": 233,
      "images_with": 213,
      "box_w_rel": [0.0055, 0.0199, 0.0451, 0.0762, 0.119, 0.1833, 0.3976],
      "box_h_rel": [0.0082, 0.0165, 0.0282, 0.0481, 0.0701, 0.0919, 0.2121],
      "center_x_rel": [0.0821, 0.1621, 0.4012, 0.5075, 0.5789, 0.7948, 0.9492],
      "center_y_rel": [0.0158, 0.102, 0.3627, 0.4918, 0.6559, 0.8948, 0.9794],
      "geometry": {"bbox": 231, "quad": 2},
    },
    "挡风板": {
      "count": 205,
      "images_with": 184,
      "box_w_rel": [0.0658, 0.0981, 0.1786, 0.4041, 0.6262, 0.9981, 1.0],
      "box_h_rel": [0.0453, 0.1001, 0.1923, 0.3283, 0.7344, 0.919, 1.0],
      "center_x_rel": [0.0461, 0.1395, 0.2969, 0.4784, 0.6607, 0.8217, 0.9252],
      "center_y_rel": [0.033, 0.3457, 0.495, 0.5547, 0.7132, 0.9116, 0.976],
      "geometry": {"quad": 192, "bbox": 13},
    },
    "螺丝、光纤插头/ODF端光纤插头": {
      "count": 180,
      "images_with": 45,
      "box_w_rel": [0.0244, 0.0524, 0.0804, 0.1316, 0.218, 0.3214, 0.8405],
      "box_h_rel": [0.0302, 0.0371, 0.0655, 0.0975, 0.1611, 0.2528, 0.6387],
      "center_x_rel": [0.0423, 0.241, 0.4126, 0.5503, 0.6656, 0.8945, 0.9803],
      "center_y_rel": [0.0367, 0.2084, 0.3077, 0.4461, 0.6004, 0.8476, 0.9794],
      "geometry": {"quad": 142, "bbox": 38},
    },
    "BBU设备/中兴": {
      "count": 70,
      "images_with": 58,
      "box_w_rel": [0.1335, 0.2024, 0.2914, 0.4348, 0.6444, 0.9981, 1.0],
      "box_h_rel": [0.1305, 0.2686, 0.4289, 0.5434, 0.7882, 0.8911, 1.0],
      "center_x_rel": [0.0667, 0.149, 0.256, 0.4995, 0.5914, 0.7602, 0.9164],
      "center_y_rel": [0.1127, 0.2103, 0.454, 0.5034, 0.5483, 0.7814, 0.9334],
      "geometry": {"quad": 67, "bbox": 3},
    },
    "BBU设备/爱立信": {
      "count": 15,
      "images_with": 13,
      "box_w_rel": [0.1071, 0.1438, 0.2202, 0.3976, 0.469, 0.9942, 0.9981],
      "box_h_rel": [0.3709, 0.3847, 0.6181, 0.7467, 0.8411, 0.9506, 0.9989],
      "center_x_rel": [0.1988, 0.2182, 0.4885, 0.4991, 0.6406, 0.7992, 0.8064],
      "center_y_rel": [0.3565, 0.3771, 0.4652, 0.495, 0.523, 0.7132, 0.717],
      "geometry": {"quad": 14, "bbox": 1},
    },
    "BBU设备": {
      "count": 1,
      "images_with": 1,
      "box_w_rel": [0.2595, 0.2595, 0.2595, 0.2595, 0.2595, 0.2595, 0.2595],
      "box_h_rel": [0.8471, 0.8471, 0.8471, 0.8471, 0.8471, 0.8471, 0.8471],
      "center_x_rel": [0.6798, 0.6798, 0.6798, 0.6798, 0.6798, 0.6798, 0.6798],
      "center_y_rel": [0.4559, 0.4559, 0.4559, 0.4559, 0.4559, 0.4559, 0.4559],
      "geometry": {"quad": 1},
    },
  },
}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--records", nargs="+", required=True, help="record JSONL files, pooled")
  parser.add_argument("--check", action="store_true",
                      help="exit 1 unless the measured figures equal the shipped REAL_STATS")
  args = parser.parse_args(argv)
  from bbu_jax.data.records import load_records
  pooled = []
  for path in args.records:
    pooled.extend(load_records(path)[0])
  figures = measure(pooled)
  print(json.dumps(figures, ensure_ascii=False, indent=1))
  if args.check and figures != REAL_STATS:
    print("measured figures differ from the shipped REAL_STATS", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
