"""Class-agnostic AP of a trained model's dense proposals (the detection head's per-feature objectness
and box, before any query): can the vision features alone say where objects are and how large?

  JAX_PLATFORMS=cpu python bench/proposal_ap.py --model runs/exp/model --data_root data/synthetic

For each image of `--split`: the vision tower, the head's proposals on every merged token, the top
`--top_k` after greedy non-maximum suppression at `--nms_iou`, scored with pycocotools against the
annotated boxes with one category (labels ignored). Also the AP of the proposal nearest each object's
centre alone (where the boxes are, if objectness were perfect). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bbu_jax.data import images as images_lib  # noqa: E402
from bbu_jax.data import records as records_lib  # noqa: E402
from bbu_jax.models import bbu_model  # noqa: E402
from bbu_jax.models import vision as vision_lib  # noqa: E402


def image_proposals(model, image_config, data_root: pathlib.Path, record: dict, run) -> tuple[np.ndarray, np.ndarray]:
  """(boxes (L, 4) xyxy in the record's pixels, objectness probabilities (L,)) of one image."""
  vision_config = model.config.vision
  pixels, grid = images_lib.process_image(images_lib.load_image(data_root / record["images"][0]), image_config)
  budget = -(-len(pixels) // 64) * 64
  meta = vision_lib.vision_metadata(np.array([grid]), budget, vision_config)
  padded = np.zeros((1, budget, pixels.shape[1]), np.float32)
  padded[0, :len(pixels)] = pixels
  boxes, scores = run(model, jnp.asarray(padded), {k: jnp.asarray(v)[None] for k, v in meta.items()})
  n = int(np.prod(grid)) // vision_config.merge_unit
  cx, cy, w, h = np.asarray(boxes)[0, :n].T
  size = np.array([record["width"], record["height"]] * 2, np.float64)
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * size, np.asarray(scores)[0, :n]


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
  lt = np.maximum(box[:2], others[:, :2])
  rb = np.minimum(box[2:], others[:, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
  area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  return inter / np.maximum(area(box) + area(others) - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, top_k: int) -> list[int]:
  keep = []
  for i in np.argsort(-scores, kind="stable"):
    if all(_iou(boxes[i], boxes[[j]])[0] <= iou for j in keep):
      keep.append(int(i))
    if len(keep) == top_k:
      break
  return keep


def coco_ap50(records: list[dict], detections: list[list[tuple[np.ndarray, float]]]) -> float:
  gt = COCO()
  gt.dataset = {"images": [{"id": i} for i in range(len(records))], "categories": [{"id": 1}], "annotations": []}
  for i, record in enumerate(records):
    for o in record["objects"]:
      x1, y1, x2, y2 = records_lib.object_box(o)
      gt.dataset["annotations"].append({"id": len(gt.dataset["annotations"]) + 1, "image_id": i, "category_id": 1,
                                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                        "iscrowd": 0})
  gt.createIndex()
  dets = [{"image_id": i, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
          for i, image in enumerate(detections) for b, s in image]
  if not dets:
    return 0.0
  ev = COCOeval(gt, gt.loadRes(dets), "bbox")
  ev.params.iouThrs = np.array([0.5])
  ev.evaluate()
  ev.accumulate()
  precision = ev.eval["precision"][0, :, :, 0, -1]
  return float(np.mean(precision[precision > -1])) if (precision > -1).any() else 0.0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="a bbu_jax model folder with a detection head")
  parser.add_argument("--data_root", default="data/synthetic")
  parser.add_argument("--split", default="val")
  parser.add_argument("--top_k", type=int, default=16)
  parser.add_argument("--nms_iou", type=float, default=0.5)
  parser.add_argument("--min_pixels", type=int, default=4 * 28 * 28)
  parser.add_argument("--max_pixels", type=int, default=64 * 28 * 28)
  args = parser.parse_args(argv)
  data_root = pathlib.Path(args.data_root)
  records = records_lib.load_records(data_root / f"{args.split}.jsonl")[0]
  image_config = images_lib.ImageProcessorConfig(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
  model = bbu_model.load(args.model)
  if model.detection_head is None:
    raise SystemExit(f"{args.model}: the model has no detection head")
  merge = model.config.vision.spatial_merge_size

  def proposals(m, pixels, meta):
    features = m.visual(pixels, meta)
    places = vision_lib.merged_token_centers(meta["rope_pos"], meta["image_segment_ids"], merge)
    out = m.detection_head.proposals(features, meta["merged_valid"], places)
    return out["proposal_boxes_cxcywh"], jax.nn.sigmoid(out["proposal_logits"])

  run = nnx.jit(proposals)
  ranked, oracle = [], []
  for record in records:
    boxes, scores = image_proposals(model, image_config, data_root, record, run)
    ranked.append([(boxes[i], float(scores[i])) for i in nms(boxes, scores, args.nms_iou, args.top_k)])
    # The proposal of the token under each object's centre, as if objectness had picked it (merged
    # tokens come row-major over the merged grid).
    n_rows, n_cols = _grid_shape(record, image_config, merge)
    chosen = []
    for o in record["objects"]:
      x1, y1, x2, y2 = records_lib.object_box(o)
      col = min(int((x1 + x2) / 2 / record["width"] * n_cols), n_cols - 1)
      row = min(int((y1 + y2) / 2 / record["height"] * n_rows), n_rows - 1)
      chosen.append((boxes[row * n_cols + col], 1.0))
    oracle.append(chosen)
  result = {"proposal_ap50": coco_ap50(records, ranked), "centre_token_ap50": coco_ap50(records, oracle),
            "num_images": len(records)}
  print(f"proposals after NMS (top {args.top_k}): class-agnostic AP@0.5 {result['proposal_ap50']:.3f}; the "
        f"proposal of each object's centre token: {result['centre_token_ap50']:.3f} ({len(records)} images)")
  print(json.dumps(result))
  return 0


def _grid_shape(record: dict, image_config, merge: int) -> tuple[int, int]:
  _, rows, cols = image_config.grid_thw(record["height"], record["width"])
  return rows // merge, cols // merge


if __name__ == "__main__":
  raise SystemExit(main())
