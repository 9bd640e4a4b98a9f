"""The train step (exact gradient accumulation over micro-batches, trainable/frozen split, metrics) and
the eval step, which computes the same losses through the same code without gradients.

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
  proposal_objectness_weight: float = 2.0  # the head's dense proposals (detection_proposal_weight x objectness)
  proposal_box_weight: float = 10.0  # (detection_proposal_weight x bbox weight, on L1 + 1 - GIoU)


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


# The detection terms that `loss_terms` may add (as `<name>_sum`) and the LossWeights field weighting each.
DETECTION_TERMS = (("bbox_l1", "detection_bbox_weight"), ("giou", "detection_bbox_weight"),
                   ("objectness", "objectness_weight"), ("caption", "detection_caption_weight"),
                   ("proposal_objectness", "proposal_objectness_weight"), ("proposal_box", "proposal_box_weight"))


def batch_normalizers(batch: dict, weights: LossWeights,
                      normalizers_fn: Callable[[dict], dict[str, Array]] | None = None) -> dict[str, Array]:
  """The loss denominators of a batch, unclamped (so that those of several batches add up)."""
  normalizers = {"lm": lm_normalizer(batch, weights)}
  if normalizers_fn is not None:
    normalizers.update(normalizers_fn(batch))
  return normalizers


def clamp_normalizers(normalizers: dict[str, Array]) -> dict[str, Array]:
  """Denominators safe to divide by: a batch without teacher tokens or without objects gives 0 / 1, not NaN."""
  return {k: jnp.maximum(v, 1e-9 if k == "lm" else 1.0) for k, v in normalizers.items()}


def loss_breakdown(terms: dict[str, Array], normalizers: dict[str, Array], weights: LossWeights) -> dict[str, Array]:
  """The losses from loss sums and (clamped) denominators counted over the same batch or batches.

  One definition for the training objective, the training metrics and the validation metrics:
  loss = lm_loss + bbox weight x (bbox_l1_loss + giou_loss) + objectness weight x objectness_loss
  + caption weight x caption_loss + the dense proposals' objectness and box terms, the detection terms
  present when the model has a head.
  """
  lm = (weights.teacher_loss_weight * terms["teacher_lm_sum"]
        + weights.student_loss_weight * terms["student_lm_sum"]) / normalizers["lm"]
  out = {"loss": lm, "lm_loss": lm,
         "teacher_lm_loss": terms["teacher_lm_sum"] / jnp.maximum(terms["teacher_tokens"], 1.0),
         "student_lm_loss": terms["student_lm_sum"] / jnp.maximum(terms["student_tokens"], 1.0)}
  for name, weight_field in DETECTION_TERMS:
    if f"{name}_sum" in terms:
      out["loss"] = out["loss"] + getattr(weights, weight_field) * terms[f"{name}_sum"] / normalizers[name]
      out[f"{name}_loss"] = terms[f"{name}_sum"] / normalizers[name]
  return out


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
    return loss_breakdown(terms, normalizers, weights)["loss"], terms

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    normalizers = clamp_normalizers(batch_normalizers(batch, weights, normalizers_fn))
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
    # "loss" is the differentiated objective summed over micro-batches (equal to the breakdown's "loss"
    # up to rounding), so that a non-finite objective is what the run reports and stops on.
    metrics = {**loss_breakdown(terms, normalizers, weights), "loss": loss, "grad_norm": grad_norm}
    for group, schedule in schedules.items():
      metrics[f"lr/{group}"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, rng=rng)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, loss_terms: Callable[[nnx.Module, dict, Array], dict[str, Array]],
                   weights: LossWeights, normalizers_fn: Callable[[dict], dict[str, Array]] | None = None) -> Callable:
  """Returns `eval_step(trainable, frozen, batch) -> {"terms": sums, "normalizers": denominators}`.

  The train step's loss code on a batch of the same layout (a leading micro-batch axis), without
  gradients and without randomness. Sums and unclamped denominators come back rather than losses, so
  that the caller adds them over many batches and takes `loss_breakdown` of the totals once: the
  validation loss of a split is then exactly its loss as one batch, whatever the batch count.
  """
  rng = jax.random.key_data(jax.random.key(0))  # the loss terms take an rng; evaluation fixes it

  def eval_step(trainable: nnx.State, frozen: nnx.State, batch: dict) -> dict:
    model = nnx.merge(graphdef, trainable, frozen)
    num_micro = jax.tree.leaves(batch)[0].shape[0]
    sums = None
    for i in range(num_micro):  # usually 1: validation batches carry no accumulation
      terms = loss_terms(model, jax.tree.map(lambda x: x[i], batch), rng)
      sums = terms if sums is None else jax.tree.map(jnp.add, sums, terms)
    return {"terms": sums, "normalizers": batch_normalizers(batch, weights, normalizers_fn)}

  return eval_step


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
