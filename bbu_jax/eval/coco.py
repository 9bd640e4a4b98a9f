"""COCO metrics of evaluation samples by pycocotools' COCOeval, plus the old pipeline's extra figures.

Labels are mapped onto the ground-truth vocabulary (matching.py), each class becomes a COCO category,
and COCOeval computes AP/AR. Its per-image matching (greedy by score, same class) also gives the
precision/recall/F1 counts and, for the HTML browser, which boxes matched; the error breakdown adds
why each unmatched prediction is wrong. Per category (categories.py) the same figures come from the
same COCOeval run, restricted to the category's classes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import multiprocessing
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bbu_jax.eval.categories import Categorizer
from bbu_jax.eval.matching import LabelMatcher
from bbu_jax.eval.responses import Sample

COCO_IOU_THRESHOLDS = [round(float(t), 2) for t in np.linspace(0.5, 0.95, 10)]
EXTRA_IOU_THRESHOLDS = (0.5, 0.75)
# An unmatched prediction that overlaps a ground truth of its class at least this much (but below the
# match threshold) is a localization error rather than background.
LOCALIZATION_MIN_IOU = 0.1
ERROR_KINDS = ("localization", "classification", "duplicate", "background", "missed")


@dataclasses.dataclass
class Flat:
  """All objects of all samples as flat arrays (index i of a box is its COCO annotation id i + 1)."""
  gt_sample: np.ndarray   # (G,) sample index
  gt_boxes: np.ndarray    # (G, 4) x1, y1, x2, y2
  gt_class: np.ndarray    # (G,) class id (1-based)
  dt_sample: np.ndarray
  dt_boxes: np.ndarray
  dt_class: np.ndarray
  dt_score: np.ndarray
  dt_similarity: np.ndarray  # (D,) label similarity to the class it was mapped to
  class_labels: list[str]    # class id - 1 -> label: the ground-truth vocabulary, then unmatched labels
  vocabulary_size: int       # classes 1..vocabulary_size are ground-truth labels
  class_category: list[str]  # class id - 1 -> category


@dataclasses.dataclass
class Evaluation:
  overall: dict[str, Any]
  categories: dict[str, dict[str, Any]]
  flat: Flat
  dt_status: np.ndarray      # (D,) "tp" or an error kind, at the match IoU threshold
  dt_matched_gt: np.ndarray  # (D,) matched gt index or -1
  gt_matched: np.ndarray     # (G,) bool
  pr_curves: dict[str, dict[str, np.ndarray]]  # category ("all" too) -> IoU "0.5"/"0.75" -> (101,) precision
  score_source: str
  match_iou_threshold: float


# ----------------------------------------------------------------------------------------------------
# Samples -> classes and flat arrays.

def flatten(samples: Sequence[Sample], matcher: LabelMatcher, categorizer: Categorizer
            ) -> tuple[Flat, str]:
  """Flat arrays of all boxes with class ids, and how predictions were ranked."""
  class_ids: dict[str, int] = {label: i + 1 for i, label in enumerate(matcher.vocabulary)}
  extra_labels: list[str] = []
  gt_sample, gt_boxes, gt_class = [], [], []
  dt_sample, dt_boxes, dt_label, dt_score, dt_similarity = [], [], [], [], []
  all_scored = all(o["score"] is not None for s in samples for o in s.prediction)
  for index, sample in enumerate(samples):
    for obj in sample.ground_truth:
      gt_sample.append(index)
      gt_boxes.append(obj["bbox"])
      gt_class.append(class_ids[matcher.canonical(obj["desc"])])
    count = len(sample.prediction)
    for rank, obj in enumerate(sample.prediction):
      label, similarity = matcher.match(obj["desc"])
      dt_sample.append(index)
      dt_boxes.append(obj["bbox"])
      dt_label.append(label)
      dt_similarity.append(similarity)
      # Without scores the answer's order is the ranking: decreasing pseudo-scores in (0, 1].
      dt_score.append(obj["score"] if all_scored else 1.0 - rank / count)
  for label in sorted(set(dt_label) - set(class_ids)):
    class_ids[label] = len(class_ids) + 1
    extra_labels.append(label)
  labels = list(matcher.vocabulary) + extra_labels
  flat = Flat(
      gt_sample=np.asarray(gt_sample, np.int64), gt_boxes=np.asarray(gt_boxes, np.float64).reshape(-1, 4),
      gt_class=np.asarray(gt_class, np.int64),
      dt_sample=np.asarray(dt_sample, np.int64), dt_boxes=np.asarray(dt_boxes, np.float64).reshape(-1, 4),
      dt_class=np.asarray([class_ids[label] for label in dt_label], np.int64),
      dt_score=np.asarray(dt_score, np.float64), dt_similarity=np.asarray(dt_similarity, np.float64),
      class_labels=labels, vocabulary_size=len(matcher.vocabulary),
      class_category=[categorizer(label) for label in labels])
  source = "responses" if all_scored else "prediction order (pseudo-scores 1 - rank/count per image)"
  return flat, source


# ----------------------------------------------------------------------------------------------------
# COCO objects and COCOeval.

def _xywh(boxes: np.ndarray) -> np.ndarray:
  return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _annotations(sample: np.ndarray, boxes: np.ndarray, classes: np.ndarray, scores: np.ndarray | None
                 ) -> list[dict[str, Any]]:
  xywh = _xywh(boxes)
  areas = (xywh[:, 2] * xywh[:, 3]).tolist()
  image_ids = (sample + 1).tolist()
  class_ids = classes.tolist()
  xywh = xywh.tolist()
  if scores is None:
    return [{"id": i + 1, "image_id": image_ids[i], "category_id": class_ids[i], "bbox": xywh[i],
             "area": areas[i], "iscrowd": 0} for i in range(len(class_ids))]
  scores = scores.tolist()
  return [{"id": i + 1, "image_id": image_ids[i], "category_id": class_ids[i], "bbox": xywh[i],
           "area": areas[i], "iscrowd": 0, "score": scores[i]} for i in range(len(class_ids))]


def build_coco(flat: Flat, num_samples: int) -> tuple[COCO, COCO]:
  """Ground-truth and detection COCO objects in memory (annotation id = flat index + 1).

  The detections get the fields COCO.loadRes gives bbox results (id, area = w*h, iscrowd 0), built
  from arrays in one pass; loadRes would also add an unused polygon per box and loop in Python.
  """
  images = [{"id": i + 1} for i in range(num_samples)]
  categories = [{"id": i + 1, "name": label} for i, label in enumerate(flat.class_labels)]
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": _annotations(flat.gt_sample, flat.gt_boxes, flat.gt_class,
                                                                     None),
                       "categories": categories}
    coco_gt.createIndex()
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(images), "categories": copy.deepcopy(categories),
                       "annotations": _annotations(flat.dt_sample, flat.dt_boxes, flat.dt_class, flat.dt_score)}
    coco_dt.createIndex()
  return coco_gt, coco_dt


_WORKER_EVAL: COCOeval | None = None


def _evaluate_pairs(pairs: list[tuple[int, int]]) -> list[dict | None]:
  ev = _WORKER_EVAL
  max_det = ev.params.maxDets[-1]
  return [ev.evaluateImg(img, cat, area, max_det) for img, cat in pairs for area in ev.params.areaRng]


def evaluate_sparse(ev: COCOeval, workers: int = 1) -> None:
  """COCOeval.evaluate, visiting only the (image, class) pairs that have a box.

  The dense loop calls computeIoU and evaluateImg for every image x class; for the pairs without any
  box those return [] and None, which is what this leaves in place. _prepare's category filter is
  skipped because every annotation's category is evaluated (a linear scan per annotation otherwise).
  evaluateImg may run in `workers` forked processes. Equal to evaluate() (tests check it).
  """
  global _WORKER_EVAL
  p = ev.params
  p.imgIds = sorted({int(i) for i in p.imgIds})
  p.catIds = sorted({int(c) for c in p.catIds})
  p.maxDets = sorted(p.maxDets)
  cat_ids = p.catIds
  p.catIds = []
  try:
    ev._prepare()  # pylint: disable=protected-access
  finally:
    p.catIds = cat_ids
  pairs = sorted(set(ev._gts) | set(ev._dts))  # pylint: disable=protected-access
  ev.ious = {pair: ev.computeIoU(*pair) for pair in pairs}
  _WORKER_EVAL = ev
  try:
    if workers > 1 and len(pairs) > 2000 and "fork" in multiprocessing.get_all_start_methods():
      chunks = [pairs[i::workers] for i in range(workers)]
      with multiprocessing.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_evaluate_pairs, chunks)
      results = {}
      for chunk, part in zip(chunks, parts):
        areas = len(p.areaRng)
        for n, pair in enumerate(chunk):
          results[pair] = part[n * areas:(n + 1) * areas]
    else:
      part = _evaluate_pairs(pairs)
      areas = len(p.areaRng)
      results = {pair: part[n * areas:(n + 1) * areas] for n, pair in enumerate(pairs)}
  finally:
    _WORKER_EVAL = None
  num_images, num_areas = len(p.imgIds), len(p.areaRng)
  image_pos = {img: i for i, img in enumerate(p.imgIds)}
  cat_pos = {cat: k for k, cat in enumerate(p.catIds)}
  ev.evalImgs = [None] * (len(p.catIds) * num_areas * num_images)
  for (img, cat), per_area in results.items():
    for a, result in enumerate(per_area):
      ev.evalImgs[(cat_pos[cat] * num_areas + a) * num_images + image_pos[img]] = result
  ev._paramsEval = copy.deepcopy(p)  # pylint: disable=protected-access


def run_cocoeval(coco_gt: COCO, coco_dt: COCO, iou_thresholds: Sequence[float] | None = None,
                 workers: int = 1) -> COCOeval:
  """COCOeval (bbox) evaluated and accumulated, on the 'all' area range only (the figures we report;
  COCOeval evaluates each area range independently, so the 'all' figures are unchanged)."""
  with contextlib.redirect_stdout(io.StringIO()):
    ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
    ev.params.areaRng = [ev.params.areaRng[0]]
    ev.params.areaRngLbl = [ev.params.areaRngLbl[0]]
    if iou_thresholds is not None:
      ev.params.iouThrs = np.asarray(iou_thresholds, np.float64)
    evaluate_sparse(ev, workers)
    ev.accumulate()
  return ev


def summarize_classes(ev: COCOeval, class_positions: Sequence[int] | None) -> dict[str, float | None]:
  """mAP, AP@0.5, AP@0.75, mAR of COCOeval.summarize over the given classes (positions in catIds).

  COCOeval accumulates each class on its own, so summarizing a slice of its arrays is what accumulate
  with those catIds gives. Undefined figures (no ground truth) are None.
  """
  full = ev.eval
  if class_positions is not None:
    ks = np.asarray(class_positions, np.int64)
    ev.eval = dict(full, precision=full["precision"][:, :, ks], recall=full["recall"][:, ks],
                   scores=full["scores"][:, :, ks])
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      ev.summarize()
    stats = ev.stats
  finally:
    ev.eval = full
  def value(x: float) -> float | None:
    return None if x < 0 else float(x)
  return {"mAP": value(stats[0]), "AP@0.5": value(stats[1]), "AP@0.75": value(stats[2]),
          "mAR": value(stats[8])}


def pr_curve(ev: COCOeval, class_positions: Sequence[int] | None, iou_threshold: float = 0.5
             ) -> np.ndarray | None:
  """Precision at COCO's 101 recall points (ev.params.recThrs), at one IoU threshold of the grid,
  maxDets 100, averaged over the classes with ground truth (as COCO averages AP); None when none has."""
  hits = np.flatnonzero(np.isclose(ev.params.iouThrs, iou_threshold))
  if not len(hits) or "precision" not in ev.eval:
    return None
  precision = ev.eval["precision"][hits[0], :, :, 0, -1]  # (R, K)
  if class_positions is not None:
    precision = precision[:, np.asarray(class_positions, np.int64)]
  valid = precision[0] > -1 if precision.shape[1] else np.zeros(0, bool)
  if not valid.any():
    return None
  return precision[:, valid].mean(axis=1)


def pr_curves_of(ev: COCOeval, class_positions: Sequence[int] | None) -> dict[str, np.ndarray]:
  curves = {f"{t:g}": pr_curve(ev, class_positions, t) for t in EXTRA_IOU_THRESHOLDS}
  return {key: curve for key, curve in curves.items() if curve is not None}


# ----------------------------------------------------------------------------------------------------
# Matches and errors.

def matches_at(ev: COCOeval, threshold_indices: Sequence[int], num_dt: int, num_gt: int
               ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per threshold index: (dt -> matched gt index or -1, gt matched?) from COCOeval's greedy matching."""
  indices = np.asarray(threshold_indices, np.int64)
  dt_ids, dt_matches, gt_ids, gt_matches = [], [], [], []
  for result in ev.evalImgs:
    if result is not None:
      dt_ids.append(result["dtIds"])
      dt_matches.append(result["dtMatches"][indices])
      gt_ids.append(result["gtIds"])
      gt_matches.append(result["gtMatches"][indices])
  dt_matched_gt = np.full((len(indices), num_dt), -1, np.int64)
  gt_matched = np.zeros((len(indices), num_gt), bool)
  if dt_ids:
    dt_index = np.fromiter((i for ids in dt_ids for i in ids), np.int64) - 1
    gt_index = np.fromiter((i for ids in gt_ids for i in ids), np.int64) - 1
    dt_matched_gt[:, dt_index] = np.concatenate(dt_matches, axis=1).astype(np.int64) - 1
    gt_matched[:, gt_index] = np.concatenate(gt_matches, axis=1) > 0
  return [(dt_matched_gt[i], gt_matched[i]) for i in range(len(indices))]


def classify_errors(flat: Flat, dt_matched_gt: np.ndarray, threshold: float) -> np.ndarray:
  """Per prediction: "tp", or why it is a false positive at IoU `threshold`:
  duplicate (a ground truth of its class overlaps enough but was matched by a better-scored box),
  classification (a ground truth of another class overlaps enough), localization (one of its class
  overlaps at least LOCALIZATION_MIN_IOU), background (nothing)."""
  status = np.full(len(flat.dt_class), "background", dtype=object)
  status[dt_matched_gt >= 0] = "tp"
  unmatched = np.flatnonzero(dt_matched_gt < 0)
  if not len(unmatched) or not len(flat.gt_class):
    return status
  gt_order = np.argsort(flat.gt_sample, kind="stable")
  gt_starts = np.searchsorted(flat.gt_sample[gt_order], np.arange(flat.gt_sample.max(initial=0) + 2))
  dt_by_sample = {}
  for d in unmatched:
    dt_by_sample.setdefault(int(flat.dt_sample[d]), []).append(d)
  for sample, dts in dt_by_sample.items():
    if sample + 1 >= len(gt_starts):
      continue
    gts = gt_order[gt_starts[sample]:gt_starts[sample + 1]]
    if not len(gts):
      continue
    dts = np.asarray(dts)
    ious = mask_utils.iou(_xywh(flat.dt_boxes[dts]).tolist(), _xywh(flat.gt_boxes[gts]).tolist(),
                          [0] * len(gts))
    ious = np.asarray(ious).reshape(len(dts), len(gts))
    same = flat.dt_class[dts][:, None] == flat.gt_class[gts][None, :]
    duplicate = (same & (ious >= threshold)).any(1)
    wrong_class = (~same & (ious >= threshold)).any(1)
    localization = (same & (ious >= LOCALIZATION_MIN_IOU)).any(1)
    kinds = np.where(duplicate, "duplicate", np.where(wrong_class, "classification",
                                                      np.where(localization, "localization", "background")))
    status[dts] = kinds
  return status


def _ratio(a: float, b: float) -> float | None:
  return float(a / b) if b else None


def extra_figures(flat: Flat, matches: dict[float, tuple[np.ndarray, np.ndarray]], dt_status: np.ndarray,
                  gt_matched: np.ndarray, match_threshold: float, dt_mask: np.ndarray,
                  gt_mask: np.ndarray) -> dict[str, Any]:
  """Precision/recall/F1 counts at each threshold and the error breakdown, over masked boxes."""
  figures: dict[str, Any] = {"num_gt": int(gt_mask.sum()), "num_pred": int(dt_mask.sum())}
  for threshold, (dt_matched_gt, gt_hit) in sorted(matches.items()):
    tp = int((dt_matched_gt[dt_mask] >= 0).sum())
    fp = int(dt_mask.sum()) - tp
    fn = int((~gt_hit[gt_mask]).sum())
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall) if precision is not None and recall is not None \
        else None
    key = f"{threshold:g}"
    figures.update({f"precision@{key}": precision, f"recall@{key}": recall, f"f1@{key}": f1,
                    f"tp@{key}": tp, f"fp@{key}": fp, f"fn@{key}": fn})
  errors = {kind: int((dt_status[dt_mask] == kind).sum()) for kind in ERROR_KINDS if kind != "missed"}
  errors["missed"] = int((~gt_matched[gt_mask]).sum())
  figures[f"errors@{match_threshold:g}"] = errors
  return figures


# ----------------------------------------------------------------------------------------------------
# The whole evaluation.

def evaluate_samples(samples: Sequence[Sample], matcher: LabelMatcher, categorizer: Categorizer,
                     match_iou_threshold: float = 0.5, workers: int | None = None) -> Evaluation:
  """Overall and per-category metrics of samples whose labels `matcher` maps onto its vocabulary."""
  if workers is None:
    workers = 1
  flat, score_source = flatten(samples, matcher, categorizer)
  coco_gt, coco_dt = build_coco(flat, len(samples))
  ev = run_cocoeval(coco_gt, coco_dt, workers=workers)
  thresholds = np.asarray(ev.params.iouThrs)

  matches: dict[float, tuple[np.ndarray, np.ndarray]] = {}
  on_grid, off_grid = {}, []
  for threshold in sorted(set(EXTRA_IOU_THRESHOLDS) | {match_iou_threshold}):
    hits = np.flatnonzero(np.isclose(thresholds, threshold))
    if len(hits):
      on_grid[threshold] = int(hits[0])
    else:
      off_grid.append(threshold)
  found = matches_at(ev, list(on_grid.values()), len(flat.dt_class), len(flat.gt_class))
  matches.update(zip(on_grid, found))
  for threshold in off_grid:
    # Off COCO's grid: one more matching pass at just this threshold.
    extra = run_cocoeval(coco_gt, coco_dt, iou_thresholds=[threshold], workers=workers)
    matches[threshold] = matches_at(extra, [0], len(flat.dt_class), len(flat.gt_class))[0]
  dt_matched_gt, gt_matched = matches[match_iou_threshold]
  dt_status = classify_errors(flat, dt_matched_gt, match_iou_threshold)

  all_dt = np.ones(len(flat.dt_class), bool)
  all_gt = np.ones(len(flat.gt_class), bool)
  overall = summarize_classes(ev, None)
  overall.update(extra_figures(flat, matches, dt_status, gt_matched, match_iou_threshold, all_dt, all_gt))
  pr_curves = {"all": pr_curves_of(ev, None)}

  class_category = np.asarray(flat.class_category + [""], dtype=object)
  dt_category = class_category[flat.dt_class - 1] if len(flat.dt_class) else np.asarray([], object)
  gt_category = class_category[flat.gt_class - 1] if len(flat.gt_class) else np.asarray([], object)
  cat_pos = {cat: k for k, cat in enumerate(ev.params.catIds)}
  categories: dict[str, dict[str, Any]] = {}
  for name in categorizer.names:
    positions = [cat_pos[i + 1] for i, c in enumerate(flat.class_category) if c == name]
    if not positions:
      continue
    metrics = summarize_classes(ev, positions)
    metrics.update(extra_figures(flat, matches, dt_status, gt_matched, match_iou_threshold,
                                 dt_category == name, gt_category == name))
    categories[name] = metrics
    pr_curves[name] = pr_curves_of(ev, positions)
  return Evaluation(overall=overall, categories=categories, flat=flat, dt_status=dt_status,
                    dt_matched_gt=dt_matched_gt, gt_matched=gt_matched, pr_curves=pr_curves,
                    score_source=score_source, match_iou_threshold=match_iou_threshold)
