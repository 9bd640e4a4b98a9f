"""The train step: exact gradient accumulation over micro-batches, trainable/frozen split, metrics.

Losses are sums divided by normalizers counted over the WHOLE global batch before the first
micro-batch runs, so k micro-batches of b rows give the same gradient as one batch of k*b rows (the
old pipeline's per-micro-batch means did not). The model is a pure function of
(graphdef, trainable, frozen): frozen parameters are never differentiated, so XLA drops their
backward pass entirely (a frozen vision tower costs its forward only).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array
  trainable: nnx.State
  frozen: nnx.State
  opt_state: optax.OptState
  rng: Array


@dataclasses.dataclass(frozen=True)
class LossWeights:
  teacher_loss_weight: float = 0.3
  student_loss_weight: float = 1.0
  detection_bbox_weight: float = 10.0
  detection_caption_weight: float = 1.0
  objectness_weight: float = 2.0


def token_cross_entropy(logits: Array, targets: Array) -> Array:
  """Per-token cross-entropy in float32: (B, S, V), (B, S) -> (B, S)."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z - target_logit


def lm_loss_sums(logits: Array, batch: dict) -> dict[str, Array]:
  """Teacher and student answer-token loss sums and token counts of one micro-batch."""
  ce = token_cross_entropy(logits, batch["target_ids"])
  teacher = batch["teacher_loss_mask"].astype(jnp.float32)
  student = batch["student_loss_mask"].astype(jnp.float32)
  return {
      "teacher_lm_sum": jnp.sum(ce * teacher), "teacher_tokens": jnp.sum(teacher),
      "student_lm_sum": jnp.sum(ce * student), "student_tokens": jnp.sum(student),
  }


def lm_normalizer(batch: dict, w: LossWeights) -> Array:
  """sum of per-token weights over the global batch (all micro-batches)."""
  return (w.teacher_loss_weight * jnp.sum(batch["teacher_loss_mask"].astype(jnp.float32))
          + w.student_loss_weight * jnp.sum(batch["student_loss_mask"].astype(jnp.float32)))


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    loss_terms: Callable[[nnx.Module, dict, Array], dict[str, Array]],
                    weights: LossWeights, schedules: dict[str, optax.Schedule],
                    normalizers_fn: Callable[[dict], dict[str, Array]] | None = None,
                    grad_shardings: Any = None) -> Callable:
  """Returns `train_step(state, batch) -> (state, metrics)`.

  `batch` arrays carry a leading micro-batch axis (gradient_accumulation_steps, rows, ...).
  `loss_terms(model, micro_batch, rng)` returns sums and counts: at least `lm_loss_sums`'s keys; the
  detection head adds `<name>_sum` terms (bbox_l1, giou, objectness, caption) whose denominators over
  the whole batch `normalizers_fn(batch)` returns.
  `grad_shardings` (the optimizer state's layout, trainable's tree) keeps the accumulated gradient
  sharded: under zero2 each micro-batch's gradient is reduce-scattered, never all-reduced to full size.
  """

  def constrain(grads):
    if grad_shardings is None:
      return grads
    return jax.lax.with_sharding_constraint(grads, grad_shardings)

  def objective(trainable, frozen, micro, rng, normalizers):
    model = nnx.merge(graphdef, trainable, frozen)
    terms = loss_terms(model, micro, rng)
    lm = (weights.teacher_loss_weight * terms["teacher_lm_sum"]
          + weights.student_loss_weight * terms["student_lm_sum"]) / normalizers["lm"]
    total = lm
    for name, weight in (("bbox_l1", weights.detection_bbox_weight), ("giou", weights.detection_bbox_weight),
                         ("objectness", weights.objectness_weight), ("caption", weights.detection_caption_weight)):
      if f"{name}_sum" in terms:
        total = total + weight * terms[f"{name}_sum"] / normalizers[name]
    return total, terms

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    normalizers = {"lm": jnp.maximum(lm_normalizer(batch, weights), 1e-9)}
    if normalizers_fn is not None:
      normalizers.update({k: jnp.maximum(v, 1.0) for k, v in normalizers_fn(batch).items()})
    rng, step_rng = jax.random.split(state.rng)
    num_micro = jax.tree.leaves(batch)[0].shape[0]
    micro_rngs = jax.random.split(step_rng, num_micro)

    # The parameters ride in the carry (unchanged) so that every module the loss builds lives at the
    # scan body's trace level: NNX refuses graphs that mix variables of two trace levels.
    def accumulate(carry, xs):
      trainable, frozen, grads_acc, loss_acc, terms_acc = carry
      micro, micro_rng = xs
      (loss, terms), grads = grad_fn(trainable, frozen, micro, micro_rng, normalizers)
      grads_acc = constrain(jax.tree.map(jnp.add, grads_acc, constrain(grads)))
      terms_acc = jax.tree.map(jnp.add, terms_acc, terms)
      return (trainable, frozen, grads_acc, loss_acc + loss, terms_acc), None

    zero_grads = constrain(jax.tree.map(jnp.zeros_like, state.trainable))
    first = jax.tree.map(lambda x: x[0], batch)
    terms_shape = jax.eval_shape(lambda t, f, m, r: objective(t, f, m, r, normalizers)[1],
                                 state.trainable, state.frozen, first, micro_rngs[0])
    zero_terms = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), terms_shape)
    init = (state.trainable, state.frozen, zero_grads, jnp.zeros((), jnp.float32), zero_terms)
    (_, _, grads, loss, terms), _ = jax.lax.scan(accumulate, init, (batch, micro_rngs))
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {
        "loss": loss,
        "lm_loss": (weights.teacher_loss_weight * terms["teacher_lm_sum"]
                    + weights.student_loss_weight * terms["student_lm_sum"]) / normalizers["lm"],
        "teacher_lm_loss": terms["teacher_lm_sum"] / jnp.maximum(terms["teacher_tokens"], 1.0),
        "student_lm_loss": terms["student_lm_sum"] / jnp.maximum(terms["student_tokens"], 1.0),
        "grad_norm": grad_norm,
    }
    for name in ("bbox_l1", "giou", "objectness", "caption"):
      if f"{name}_sum" in terms:
        metrics[f"{name}_loss"] = terms[f"{name}_sum"] / normalizers[name]
    for group, schedule in schedules.items():
      metrics[f"lr/{group}"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, rng=rng)
    return new_state, metrics

  return train_step


def split_trainable(model: nnx.Module, is_trainable: Callable[[Any], bool]):
  """(graphdef, trainable params, everything else) by a predicate on parameter paths."""

  def trainable_filter(path, value):
    return isinstance(value, nnx.Param) and is_trainable(path)

  graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
  return graphdef, trainable, frozen


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation,
                     is_trainable: Callable[[Any], bool], seed: int):
  graphdef, trainable, frozen = split_trainable(model, is_trainable)
  state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                     opt_state=optimizer.init(trainable), rng=jax.random.key_data(jax.random.key(seed)))
  return graphdef, state
