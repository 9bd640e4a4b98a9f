"""Loss building blocks: box formats, L1 and GIoU box losses, sigmoid focal loss, weighted token
cross-entropy, and the DETR-style matching cost that the Hungarian matcher minimizes.

Boxes are normalized to the image (0..1) and either `cxcywh` (centre x, centre y, width, height: what
the detection head predicts) or `xyxy` (x1, y1, x2, y2: what annotations give); function names say
which. Every function broadcasts over leading axes and is safe to differentiate on padded entries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def box_cxcywh_to_xyxy(boxes: Array) -> Array:
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes: Array) -> Array:
  x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def _safe_divide(numerator: Array, denominator: Array) -> Array:
  """numerator / denominator, 0 where the denominator is 0, with finite gradients everywhere."""
  nonzero = denominator != 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


def generalized_box_iou(boxes1_xyxy: Array, boxes2_xyxy: Array) -> Array:
  """GIoU of boxes broadcast against each other (torchvision's formula, elementwise).

  For the pairwise (N, M) matrix pass `boxes1[:, None]` and `boxes2[None, :]`. Degenerate boxes
  (zero area, e.g. padded targets) give IoU 0 instead of NaN.
  """
  area1 = (boxes1_xyxy[..., 2] - boxes1_xyxy[..., 0]) * (boxes1_xyxy[..., 3] - boxes1_xyxy[..., 1])
  area2 = (boxes2_xyxy[..., 2] - boxes2_xyxy[..., 0]) * (boxes2_xyxy[..., 3] - boxes2_xyxy[..., 1])
  top_left = jnp.maximum(boxes1_xyxy[..., :2], boxes2_xyxy[..., :2])
  bottom_right = jnp.minimum(boxes1_xyxy[..., 2:], boxes2_xyxy[..., 2:])
  inter_wh = jnp.clip(bottom_right - top_left, 0)
  inter = inter_wh[..., 0] * inter_wh[..., 1]
  union = area1 + area2 - inter
  iou = _safe_divide(inter, union)
  hull_wh = jnp.clip(jnp.maximum(boxes1_xyxy[..., 2:], boxes2_xyxy[..., 2:])
                     - jnp.minimum(boxes1_xyxy[..., :2], boxes2_xyxy[..., :2]), 0)
  hull = hull_wh[..., 0] * hull_wh[..., 1]
  return iou - _safe_divide(hull - union, hull)


def l1_box_distance(boxes1: Array, boxes2: Array) -> Array:
  """Sum over the 4 coordinates of |boxes1 - boxes2| (same format for both), broadcast."""
  return jnp.abs(boxes1 - boxes2).sum(-1)


def sigmoid_focal_loss(logits: Array, targets: Array, *, alpha: float = 0.25,
                       gamma: float = 2.0) -> Array:
  """Elementwise focal loss of binary targets (torchvision.ops.sigmoid_focal_loss, reduction none).

  alpha < 0 disables the class balancing, as in torchvision.
  """
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  prob = jax.nn.sigmoid(logits)
  # Binary cross-entropy from logits; softplus stays finite for large |logits| and has the exact
  # gradient sigmoid(x) - t everywhere (max/abs forms get a wrong subgradient at 0).
  ce = jax.nn.softplus(logits) - logits * targets
  p_t = prob * targets + (1 - prob) * (1 - targets)
  # gamma 0 is plain (balanced) BCE; x ** 0.0 would give NaN gradients where x == 0.
  loss = ce * (1 - p_t) ** gamma if gamma != 0 else ce
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return loss


def objectness_match_cost(logits: Array, *, alpha: float = 0.25, gamma: float = 2.0) -> Array:
  """Cost of calling a query an object: focal loss if positive minus focal loss if negative.

  The matching counterpart of the focal objectness loss (Deformable DETR's class cost): a query the
  head already believes in is cheap to match.
  """
  return (sigmoid_focal_loss(logits, jnp.ones_like(logits), alpha=alpha, gamma=gamma)
          - sigmoid_focal_loss(logits, jnp.zeros_like(logits), alpha=alpha, gamma=gamma))


def matching_cost(pred_boxes_cxcywh: Array, objectness_logits: Array, target_boxes_xyxy: Array, *,
                  objectness_weight: float, l1_weight: float, giou_weight: float,
                  focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> Array:
  """DETR-style (queries, targets) cost for ONE sample: objectness + L1 (cxcywh) - GIoU.

  pred_boxes_cxcywh (Q, 4), objectness_logits (Q,), target_boxes_xyxy (T, 4) -> (Q, T) float32.
  """
  pred_boxes_cxcywh = pred_boxes_cxcywh.astype(jnp.float32)
  target_boxes_xyxy = target_boxes_xyxy.astype(jnp.float32)
  target_cxcywh = box_xyxy_to_cxcywh(target_boxes_xyxy)
  cost_l1 = l1_box_distance(pred_boxes_cxcywh[:, None, :], target_cxcywh[None, :, :])
  cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes_cxcywh)[:, None, :],
                                   target_boxes_xyxy[None, :, :])
  cost_objectness = objectness_match_cost(objectness_logits, alpha=focal_alpha, gamma=focal_gamma)
  return (objectness_weight * cost_objectness[:, None] + l1_weight * cost_l1
          + giou_weight * cost_giou)


def weighted_token_cross_entropy(logits: Array, target_ids: Array,
                                 weights: Array) -> tuple[Array, Array]:
  """Sum of per-token cross-entropy times `weights`, and the sum of the weights.

  logits (..., vocab), target_ids (...) int, weights (...) (0 = ignore). Returning both sums lets
  callers combine several losses, devices or accumulation steps exactly: loss = sum / weight_sum.
  Computed in float32; weights of 0 keep garbage (even NaN-free padding logits) out of the sum.
  """
  if logits.shape[:-1] != target_ids.shape or target_ids.shape != weights.shape:
    raise ValueError(f"weighted_token_cross_entropy: logits {logits.shape}, target_ids "
                     f"{target_ids.shape} and weights {weights.shape} disagree")
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, target_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
  token_loss = log_normalizer - target_logit
  return jnp.sum(jnp.where(weights != 0, token_loss * weights, 0.0)), jnp.sum(weights)
