"""Benchmark of the evaluation job: a generated responses file of N images x K objects, read and scored.

  python bench/bench_evaluate.py [--images 10000] [--objects 50] [--reference_images 1000]

Prints wall seconds, the process's CPU seconds and the load average before the run (the machine may
be shared). Also times pycocotools' plain COCOeval.evaluate()+accumulate() on the same boxes of the first
--reference_images images (the competitor: the dense reference loop) and prints the per-image ratio.
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bbu_jax import evaluate  # noqa: E402
from bbu_jax.eval import coco  # noqa: E402
from bbu_jax.eval.categories import Categorizer  # noqa: E402
from bbu_jax.eval.responses import read_responses  # noqa: E402

# Label shapes of the real data (type/attr,attr), composed here: 30 ground-truth labels.
TYPES_AND_ATTRIBUTES = [
    ("BBU设备", ["华为,显示完整", "中兴,显示完整", "华为,只显示部分", "爱立信,显示完整"]),
    ("螺丝、光纤插头", ["BBU安装螺丝,显示完整,符合要求", "BBU端光纤插头,显示完整,符合要求",
                   "ODF端光纤插头,只显示部分,符合要求", "地排处接地螺丝,显示完整,符合要求",
                   "机柜处接地螺丝,显示完整,不符合要求"]),
    ("标签", ["5G-BBU-接地线", "NR900-RRU1-光纤", "NR900-RRU2-光纤", "无法识别", "5G-GPS信号线"]),
    ("光纤", ["有保护措施,弯曲半径合理,蛇形管", "有保护措施,弯曲半径合理,铠装", "无保护措施,弯曲半径合理"]),
    ("电线", ["捆扎整齐", "有遮挡,捆扎整齐"]),
    ("挡风板", ["华为,显示完整,安装方向正确", "中兴,只显示部分"]),
    ("机柜空间", ["充足", "非满载"]),
    ("接地线", ["黄绿色", "连接牢固"]),
]
LABELS = [f"{t}/{a}" for t, attrs in TYPES_AND_ATTRIBUTES for a in attrs]


def spelling_variant(label: str) -> str:
  """The same label as a model may write it: spaces around '/', fullwidth commas."""
  return label.replace("/", " / ").replace(",", "，")


def generate_responses(path: pathlib.Path, images: int, objects: int, seed: int = 0) -> None:
  """A bbu_jax responses file: jittered true boxes, label variants and errors, background boxes."""
  rng = np.random.default_rng(seed)
  width, height = 532, 728
  label_p = rng.dirichlet(np.ones(len(LABELS)) * 0.7)
  samples = []
  for index in range(images):
    xy = rng.uniform(0, [width - 40, height - 40], size=(objects, 2))
    wh = rng.uniform(8, 120, size=(objects, 2))
    gt_boxes = np.round(np.concatenate([xy, np.minimum(xy + wh, [width, height])], 1))
    gt_labels = rng.choice(len(LABELS), size=objects, p=label_p)
    ground_truth = [{"bbox_2d": box.astype(int).tolist(), "desc": LABELS[l]} for box, l in zip(gt_boxes, gt_labels)]
    prediction = []
    kept = rng.random(objects) < 0.85
    for box, label, keep in zip(gt_boxes, gt_labels, kept):
      if not keep:
        continue
      noise = rng.normal(0, rng.choice([2.0, 6.0, 15.0]), size=4)
      roll = rng.random()
      desc = LABELS[label]
      if roll < 0.15:
        desc = spelling_variant(desc)
      elif roll < 0.2:
        desc = LABELS[rng.integers(len(LABELS))]
      prediction.append({"bbox_2d": np.round(box + noise).tolist(), "desc": desc,
                         "score": float(np.clip(rng.normal(0.7, 0.2), 0.01, 1.0))})
    for _ in range(objects - len(prediction)):
      x, y = rng.uniform(0, [width - 50, height - 50])
      prediction.append({"bbox_2d": [round(x), round(y), round(x) + 40, round(y) + 30],
                         "desc": LABELS[rng.integers(len(LABELS))], "score": float(rng.uniform(0, 0.6))})
    samples.append({"id": f"img{index:06d}", "images": [f"images/img{index:06d}.jpeg"], "width": width,
                    "height": height, "ground_truth": ground_truth, "prediction": prediction,
                    "raw_response": None, "parse_error": None, "teachers": []})
  path.write_text(json.dumps({"model_path": "bench", "mode": "standard", "config": {}, "samples": samples},
                             ensure_ascii=False), encoding="utf-8")


def time_reference(responses_file: pathlib.Path, images: int) -> float:
  """Seconds of plain COCOeval (dense evaluate, default params) + accumulate on the first images."""
  responses = read_responses(responses_file)
  responses.samples = responses.samples[:images]
  matcher = evaluate.build_matcher(responses, 0.7)
  flat, _ = coco.flatten(responses.samples, matcher, Categorizer())
  coco_gt, coco_dt = coco.build_coco(flat, len(responses.samples))
  start = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()):
    ev = coco.COCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--images", type=int, default=10_000)
  parser.add_argument("--objects", type=int, default=50)
  parser.add_argument("--reference_images", type=int, default=1000)
  parser.add_argument("--workers", type=int, default=None)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    responses_file = pathlib.Path(tmp) / "responses.json"
    start = time.perf_counter()
    generate_responses(responses_file, args.images, args.objects)
    print(f"generated {args.images} images x {args.objects} objects in {time.perf_counter() - start:.1f}s")
    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    result = evaluate.main(["--responses_file", str(responses_file), "--output_file",
                            str(pathlib.Path(tmp) / "metrics.json")]
                           + (["--workers", str(args.workers)] if args.workers else []))
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    assert result == 0
    metrics = json.loads((pathlib.Path(tmp) / "metrics.json").read_text(encoding="utf-8"))
    reference_seconds = time_reference(responses_file, args.reference_images) if args.reference_images else None
  # Wall time depends on what else runs on the machine: the CPU time and the load average say how much.
  figures = {"images": args.images, "objects_per_image": args.objects, "seconds": round(seconds, 2),
             "images_per_s": round(args.images / seconds, 1), "cpu_seconds": round(cpu_seconds, 2),
             "load_average_1min": round(load_before, 2), "mAP": metrics["overall_metrics"]["mAP"]}
  if reference_seconds is not None:
    reference_rate = args.reference_images / reference_seconds
    figures.update({"reference_cocoeval_images_per_s": round(reference_rate, 1),
                    "speedup_vs_reference": round(figures["images_per_s"] / reference_rate, 2)})
  print(json.dumps(figures))


if __name__ == "__main__":
  main()
