"""Per-group optimizer: five parameter groups named by path, each with its own learning rate schedule.

Groups: vision (vision tower), merger (the patch merger), llm (decoder and lm_head), detection
(detection head), adapter (LoRA). A group whose learning rate is 0 is frozen: its parameters are left
out of differentiation and of the optimizer altogether (no state allocated), so they stay
bit-identical. Weight decay skips norms and biases. Gradients are clipped by their global norm over
the trainable parameters, or with `clip_grad_norm_per_group` by each group's own norm (a detection head
whose loss spikes then does not shrink the language model's step).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

GROUPS = ("vision", "merger", "llm", "detection", "adapter")


def path_str(path) -> str:
  """'visual/blocks/attn/qkv/kernel' from a jax tree path or a tuple of names."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        k = getattr(k, attr)
        break
    parts.append(str(k))
  return "/".join(parts)


def param_group(path) -> str:
  """The group of a parameter from its path in the model (see module docstring)."""
  name = path if isinstance(path, str) else path_str(path)
  parts = name.split("/")
  if any("lora" in p for p in parts):
    return "adapter"
  if parts[0] == "detection_head":
    return "detection"
  if parts[0] == "visual":
    return "merger" if len(parts) > 1 and parts[1] == "merger" else "vision"
  if parts[0] in ("language_model", "lm_head"):
    return "llm"
  raise ValueError(f"parameter {name} belongs to no optimizer group {GROUPS}")


def group_learning_rates(config) -> dict[str, float]:
  return {g: float(config[f"{g}_lr"]) for g in GROUPS}


def trainable_groups(config) -> tuple[str, ...]:
  return tuple(g for g, lr in group_learning_rates(config).items() if lr > 0)


def is_trainable(config) -> Callable[[Any], bool]:
  """A predicate on parameter paths: True for parameters of groups with a learning rate > 0."""
  groups = set(trainable_groups(config))
  return lambda path: param_group(path) in groups


def _decays(path) -> bool:
  leaf = path_str(path).split("/")[-1]
  return leaf not in ("bias", "scale") and "norm" not in path_str(path)


def _warmup_cosine(lr: float, steps: int, warmup_ratio: float) -> optax.Schedule:
  if steps <= 1:
    return optax.constant_schedule(lr)
  warmup = int(round(warmup_ratio * steps))
  return optax.warmup_cosine_decay_schedule(init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
                                            decay_steps=max(steps, warmup + 1), end_value=0.0)


def make_schedules(config, total_steps: int) -> dict[str, optax.Schedule]:
  """Per trained group: linear warm-up (`warmup_ratio` of the steps) then cosine decay to 0.

  With a vision warm-up (`vision_warmup_steps`), the warm-up steps and the full steps that follow each
  get their own warm-up and cosine: one schedule over both would leave the language model and the
  queries, which start learning only after the vision warm-up, the low tail of the cosine.
  """
  first = min(config.vision_warmup_steps, total_steps)  # validate() keeps it >= 0
  schedules = {}
  for group, lr in group_learning_rates(config).items():
    if lr <= 0:
      continue
    if 0 < first < total_steps:
      schedules[group] = optax.join_schedules(
          [_warmup_cosine(lr, first, config.warmup_ratio),
           _warmup_cosine(lr, total_steps - first, config.warmup_ratio)], boundaries=[first])
    else:
      schedules[group] = _warmup_cosine(lr, total_steps, config.warmup_ratio)
  return schedules


def make_optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, dict]:
  """The optimizer over the TRAINABLE parameters only (frozen groups are never passed to it)."""
  schedules = make_schedules(config, total_steps)
  per_group = config.max_grad_norm > 0 and config.clip_grad_norm_per_group

  def group_transform(schedule):
    adamw = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, weight_decay=config.weight_decay,
                        mask=lambda params: jax.tree_util.tree_map_with_path(lambda p, _: _decays(p), params))
    # multi_transform hands each group's transform only that group's gradients (the others masked out)
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw) if per_group else adamw

  transforms = {group: group_transform(schedule) for group, schedule in schedules.items()}

  def labels(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: param_group(p), params)

  chain = [optax.multi_transform(transforms, labels)]
  if config.max_grad_norm > 0 and not per_group:
    chain.insert(0, optax.clip_by_global_norm(config.max_grad_norm))
  return optax.chain(*chain), schedules
