"""LoRA adapters on the decoder's projections: their configuration, and merging them into the base kernels.

A targeted `layers.Linear` computes y = x W + b + (alpha / rank) * (x A) B with `lora_a` A (in, rank)
drawn at random and `lora_b` B (rank, out) zero, so a fresh adapter changes nothing. The names contain
"lora", which puts them in the optimizer's "adapter" group. `merge` folds the adapters into W for the
Hugging Face export, where transformers knows nothing of LoRA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

# The decoder projections an adapter can sit on (the names of text.Attention and text.MLP).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_A, LORA_B = "lora_a", "lora_b"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """rank 0 = no adapters at all (the parameter tree is the plain model's)."""

  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if self.rank < 0:
      raise ValueError(f"lora.rank must be >= 0, got {self.rank}")
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown:
      raise ValueError(f"lora.targets: {unknown} are not decoder projections; choose from {list(TARGETS)}")
    if self.rank and not self.targets:
      raise ValueError(f"lora.rank is {self.rank} but lora.targets is empty")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0

  def rank_for(self, projection: str) -> int:
    """The adapter rank of a projection by name (0 when it is not targeted)."""
    return self.rank if projection in self.targets else 0

  def to_dict(self) -> dict[str, Any]:
    return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None) -> "LoraConfig | None":
    """From `to_dict` output or a run config's `lora` block; None (or rank 0) gives None."""
    if not d or not int(d.get("rank", 0)):
      return None
    return cls(rank=int(d["rank"]), alpha=float(d.get("alpha", 16.0)),
               targets=tuple(d.get("targets", cls.targets)))


def from_run_config(config) -> LoraConfig | None:
  """The LoraConfig of a run config (`config.lora.rank`, `.alpha`, `.targets`); None when rank is 0."""
  return LoraConfig.from_dict({"rank": config.lora.rank, "alpha": config.lora.alpha,
                               "targets": tuple(config.lora.targets)})


def has_adapters(params: Mapping) -> bool:
  """Whether a param pure dict holds any LoRA factor."""
  return any(name in (LORA_A, LORA_B) or (isinstance(child, Mapping) and has_adapters(child))
             for name, child in params.items())


def merge(params: Mapping, config: LoraConfig | None) -> dict:
  """A copy of a param pure dict with every adapter folded into its kernel and the adapter params dropped.

  kernel + (alpha / rank) * A @ B, computed in float32 and stored in the kernel's dtype; works on
  stacked layers (a leading "layers" axis on all three). Arrays that are not adapted are passed
  through untouched (not copied).
  """
  if config is None or not config.enabled:
    if has_adapters(params):
      raise ValueError("params hold LoRA adapters but no LoRA config (rank > 0) was given to merge them")
    return dict(params)
  return _merge_node(params, config.scale, path=())


def _merge_node(node: Mapping, scale: float, path: tuple[str, ...]) -> dict:
  out = {}
  for name, child in node.items():
    out[name] = _merge_node(child, scale, path + (str(name),)) if isinstance(child, Mapping) else child
  if LORA_A not in out and LORA_B not in out:
    return out
  where = "/".join(path) or "<root>"
  if LORA_A not in out or LORA_B not in out or "kernel" not in out:
    raise ValueError(f"param {where}: needs kernel, {LORA_A} and {LORA_B} together, has {sorted(out)}")
  kernel, a, b = (_to_numpy(out.pop(k)) for k in ("kernel", LORA_A, LORA_B))
  expected = (*kernel.shape[:-2], kernel.shape[-2], a.shape[-1])
  if a.shape != expected or b.shape != (*kernel.shape[:-2], a.shape[-1], kernel.shape[-1]):
    raise ValueError(f"param {where}: {LORA_A} {a.shape} and {LORA_B} {b.shape} do not fit kernel {kernel.shape}")
  delta = np.matmul(a.astype(np.float32), b.astype(np.float32))
  out["kernel"] = (kernel.astype(np.float32) + np.float32(scale) * delta).astype(kernel.dtype)
  return out


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "get_value"):  # an nnx.Variable
    value = value.get_value()
  return np.asarray(value)
