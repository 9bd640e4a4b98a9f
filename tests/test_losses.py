"""Box utilities, GIoU, focal loss, weighted token cross-entropy and the matching cost against
torch re-implementations of torchvision's / DETR's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bbu_jax.training import losses


def _random_xyxy(rng, shape):
  x1y1 = rng.random((*shape, 2)) * 0.7
  wh = rng.random((*shape, 2)) * 0.5 + 0.01
  return np.concatenate([x1y1, x1y1 + wh], -1).astype(np.float32)


def _torch_generalized_box_iou(boxes1, boxes2):
  """torchvision.ops.generalized_box_iou, pairwise (N, M)."""
  area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
  area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
  lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
  rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
  wh = (rb - lt).clamp(min=0)
  inter = wh[..., 0] * wh[..., 1]
  union = area1[:, None] + area2 - inter
  iou = inter / union
  lti = torch.min(boxes1[:, None, :2], boxes2[:, :2])
  rbi = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
  whi = (rbi - lti).clamp(min=0)
  areai = whi[..., 0] * whi[..., 1]
  return iou - (areai - union) / areai


def _torch_sigmoid_focal_loss(inputs, targets, alpha, gamma):
  """torchvision.ops.sigmoid_focal_loss with reduction="none"."""
  p = torch.sigmoid(inputs)
  ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
  p_t = p * targets + (1 - p) * (1 - targets)
  loss = ce_loss * ((1 - p_t) ** gamma)
  if alpha >= 0:
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    loss = alpha_t * loss
  return loss


def test_box_format_round_trip_and_values():
  xyxy = np.array([[0.1, 0.2, 0.5, 0.8]], np.float32)
  cxcywh = np.asarray(losses.box_xyxy_to_cxcywh(jnp.asarray(xyxy)))
  np.testing.assert_allclose(cxcywh, [[0.3, 0.5, 0.4, 0.6]], atol=1e-7)
  boxes = _random_xyxy(np.random.default_rng(0), (3, 5))
  back = losses.box_cxcywh_to_xyxy(losses.box_xyxy_to_cxcywh(jnp.asarray(boxes)))
  np.testing.assert_allclose(np.asarray(back), boxes, atol=1e-6)


def test_generalized_box_iou_matches_torchvision_formula():
  rng = np.random.default_rng(1)
  a, b = _random_xyxy(rng, (7,)), _random_xyxy(rng, (5,))
  b[0] = a[0]  # identical boxes: GIoU 1
  b[1] = [0.9, 0.9, 0.95, 0.97]  # far from most: negative GIoU
  ours = np.asarray(losses.generalized_box_iou(jnp.asarray(a)[:, None], jnp.asarray(b)[None]))
  expected = _torch_generalized_box_iou(torch.from_numpy(a).double(), torch.from_numpy(b).double())
  np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-5, atol=1e-6)
  assert ours[0, 0] == pytest.approx(1.0, abs=1e-6)
  assert (ours < 0).any()
  # Elementwise on matched pairs equals the pairwise diagonal.
  diag = losses.generalized_box_iou(jnp.asarray(a[:5]), jnp.asarray(b))
  np.testing.assert_allclose(np.asarray(diag), np.diagonal(ours[:5]), rtol=1e-6)


def test_degenerate_boxes_give_finite_values_and_gradients():
  pred = jnp.array([[0.2, 0.2, 0.4, 0.5], [0.1, 0.1, 0.3, 0.3]])
  padded = jnp.zeros((2, 4))  # zero-area padded targets

  def loss(p):
    return (1 - losses.generalized_box_iou(p, padded)).sum() + losses.l1_box_distance(p, padded).sum()

  value, grad = jax.value_and_grad(loss)(pred)
  assert np.isfinite(value) and np.isfinite(np.asarray(grad)).all()
  both_empty = losses.generalized_box_iou(jnp.zeros(4), jnp.zeros(4))
  assert float(both_empty) == 0.0


def test_l1_box_distance():
  rng = np.random.default_rng(2)
  a, b = rng.random((4, 4)).astype(np.float32), rng.random((6, 4)).astype(np.float32)
  ours = losses.l1_box_distance(jnp.asarray(a)[:, None], jnp.asarray(b)[None])
  expected = torch.cdist(torch.from_numpy(a), torch.from_numpy(b), p=1).numpy()
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.25, 1.5)])
def test_sigmoid_focal_loss_matches_torchvision_formula(alpha, gamma):
  rng = np.random.default_rng(3)
  logits = (rng.standard_normal((6, 9)) * 4).astype(np.float32)
  logits[0, :3] = [40.0, -40.0, 0.0]  # saturated logits stay finite
  targets = (rng.random((6, 9)) < 0.3).astype(np.float32)
  ours = losses.sigmoid_focal_loss(jnp.asarray(logits), jnp.asarray(targets), alpha=alpha, gamma=gamma)
  expected = _torch_sigmoid_focal_loss(torch.from_numpy(logits).double(),
                                       torch.from_numpy(targets).double(), alpha, gamma)
  np.testing.assert_allclose(np.asarray(ours), expected.numpy(), rtol=1e-5, atol=1e-7)

  ours_grad = jax.grad(lambda x: losses.sigmoid_focal_loss(x, jnp.asarray(targets), alpha=alpha,
                                                           gamma=gamma).sum())(jnp.asarray(logits))
  x = torch.from_numpy(logits).double().requires_grad_()
  _torch_sigmoid_focal_loss(x, torch.from_numpy(targets).double(), alpha, gamma).sum().backward()
  np.testing.assert_allclose(np.asarray(ours_grad), x.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_weighted_token_cross_entropy_matches_torch():
  rng = np.random.default_rng(4)
  logits = rng.standard_normal((3, 7, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, (3, 7))
  weights = rng.choice([0.0, 0.5, 1.0, 2.0], size=(3, 7)).astype(np.float32)
  total, weight_sum = losses.weighted_token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                                          jnp.asarray(weights))
  per_token = F.cross_entropy(torch.from_numpy(logits).double().reshape(-1, 11),
                              torch.from_numpy(targets).reshape(-1), reduction="none").numpy()
  np.testing.assert_allclose(float(total), (per_token * weights.reshape(-1)).sum(), rtol=1e-5)
  assert float(weight_sum) == pytest.approx(weights.sum())

  # Sums combine exactly: two halves add up to the whole.
  first = losses.weighted_token_cross_entropy(jnp.asarray(logits[:1]), jnp.asarray(targets[:1]),
                                              jnp.asarray(weights[:1]))
  rest = losses.weighted_token_cross_entropy(jnp.asarray(logits[1:]), jnp.asarray(targets[1:]),
                                             jnp.asarray(weights[1:]))
  np.testing.assert_allclose(float(first[0] + rest[0]), float(total), rtol=1e-6)

  # Zero-weight tokens contribute nothing, whatever their logits hold.
  poisoned = np.where(weights[..., None] == 0, np.float32(np.inf), logits)
  total_poisoned, _ = losses.weighted_token_cross_entropy(jnp.asarray(poisoned), jnp.asarray(targets),
                                                          jnp.asarray(weights))
  np.testing.assert_allclose(float(total_poisoned), float(total), rtol=1e-6)


def test_weighted_token_cross_entropy_names_bad_shapes():
  with pytest.raises(ValueError, match="weighted_token_cross_entropy"):
    losses.weighted_token_cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32),
                                        jnp.zeros((2, 4)))


def test_matching_cost_components():
  rng = np.random.default_rng(5)
  target_xyxy = _random_xyxy(rng, (4,))
  pred_cxcywh = np.asarray(losses.box_xyxy_to_cxcywh(jnp.asarray(_random_xyxy(rng, (6,)))))
  logits = rng.standard_normal(6).astype(np.float32)
  weights = dict(objectness_weight=2.0, l1_weight=5.0, giou_weight=3.0)
  ours = np.asarray(losses.matching_cost(jnp.asarray(pred_cxcywh), jnp.asarray(logits),
                                         jnp.asarray(target_xyxy), **weights))

  p = torch.sigmoid(torch.from_numpy(logits).double())
  # Deformable DETR's focal class cost.
  pos = 0.25 * (1 - p) ** 2 * -(p.log())
  neg = 0.75 * p ** 2 * -((1 - p).log())
  pred_t = torch.tensor(pred_cxcywh, dtype=torch.float64)
  target_t = torch.from_numpy(target_xyxy).double()
  target_cxcywh = torch.stack([(target_t[:, 0] + target_t[:, 2]) / 2, (target_t[:, 1] + target_t[:, 3]) / 2,
                               target_t[:, 2] - target_t[:, 0], target_t[:, 3] - target_t[:, 1]], -1)
  pred_xyxy = torch.cat([pred_t[:, :2] - pred_t[:, 2:] / 2, pred_t[:, :2] + pred_t[:, 2:] / 2], -1)
  expected = (2.0 * (pos - neg)[:, None] + 5.0 * torch.cdist(pred_t, target_cxcywh, p=1)
              - 3.0 * _torch_generalized_box_iou(pred_xyxy, target_t))
  np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-4, atol=1e-5)
