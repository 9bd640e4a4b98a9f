"""Building blocks shared by the vision tower, the decoder and the detection head.

Every parameter carries logical axis names (see bbu_jax.parallel.sharding for the vocabulary); the
one attention function of the project lives here.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


# Remat policy names from config (gradient_checkpointing) -> jax.checkpoint policies; one table for
# every scanned stack (decoder, vision tower).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def checkpoint_policy(name: str):
  """The jax.checkpoint policy for a config name; raises ValueError naming the known ones."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {name!r}")
  return REMAT_POLICIES[name]


def maybe_remat(fn, name: str):
  """`fn` wrapped in nnx.remat with the named policy, or `fn` itself for "none".

  prevent_cse=False: the scan around each stack already stops XLA from merging the recomputation
  away; the extra barriers would only slow the step.
  """
  policy = checkpoint_policy(name)
  if name == "none":
    return fn
  return nnx.remat(fn, policy=policy, prevent_cse=False)


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], *, std: float = 0.02,
          init: str = "normal", dtype=jnp.float32) -> nnx.Param:
  """A parameter with logical axis names; `init` is "normal" (std), "zeros" or "ones"."""
  if len(shape) != len(axes):
    raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(axes)} differ in rank")
  if init == "normal":
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    raise ValueError(f"unknown init {init!r}")
  return nnx.Param(value, out_sharding=tuple(axes))


class Linear(nnx.Module):
  """y = x @ kernel (+ bias). `kernel` is (in, out): the transpose of torch's nn.Linear.weight.

  The kernel starts normal with `std` (0.02: transformers' initializer_range for Qwen2.5-VL).
  With `lora_rank` > 0 it also holds a LoRA adapter (see bbu_jax.models.lora) and adds
  `lora_scale` * (x @ lora_a) @ lora_b; lora_b starts at zero, so a fresh adapter changes nothing.
  """

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
               use_bias: bool, rngs: nnx.Rngs, dtype=jnp.float32, lora_rank: int = 0, lora_scale: float = 0.0,
               std: float = 0.02):
    self.kernel = param(rngs, (in_features, out_features), axes, std=std)
    self.bias = param(rngs, (out_features,), (axes[1],), init="zeros") if use_bias else None
    self.dtype = dtype  # compute dtype
    if lora_rank > 0:
      # The variance of PEFT's default (kaiming-uniform) A, so learning rates carry over from it.
      self.lora_a = param(rngs, (in_features, lora_rank), (axes[0], "lora_rank"), std=(3 * in_features) ** -0.5)
      self.lora_b = param(rngs, (lora_rank, out_features), ("lora_rank", axes[1]), init="zeros")
      self.lora_scale = lora_scale

  def __call__(self, x: Array) -> Array:
    x = x.astype(self.dtype)
    y = jnp.dot(x, self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if hasattr(self, "lora_a"):
      low_rank = jnp.dot(x, self.lora_a[...].astype(self.dtype))
      y = y + self.lora_scale * jnp.dot(low_rank, self.lora_b[...].astype(self.dtype))
    return y


class RMSNorm(nnx.Module):
  """Qwen2RMSNorm: normalize in float32, cast back to the input dtype, then scale."""

  def __init__(self, dim: int, *, eps: float, axis_name: str, rngs: nnx.Rngs):
    self.scale = param(rngs, (dim,), (axis_name,), init="ones")
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(dtype) * x32.astype(dtype)


def make_attention_mask(q_segment_ids: Array, kv_segment_ids: Array, *, causal: bool,
                        q_positions: Array | None = None, kv_positions: Array | None = None) -> Array:
  """Boolean mask (batch, 1, q_len, kv_len): same non-zero segment, and kv before q when causal.

  Segment id 0 marks padding: a padded query attends to nothing (its output is garbage that callers
  mask out); a padded key is never attended. `q_positions`/`kv_positions` (token indices in the
  sequence, default arange) define causality, so the same function serves prefill, packed rows and
  decoding against a KV cache.
  """
  mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
  if causal:
    if q_positions is None:
      q_positions = jnp.arange(q_segment_ids.shape[1])[None, :]
    if kv_positions is None:
      kv_positions = jnp.arange(kv_segment_ids.shape[1])[None, :]
    mask = mask & (kv_positions[:, None, :] <= q_positions[:, :, None])
  return mask[:, None, :, :]


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None, *,
                          implementation: str = "xla") -> Array:
  """Softmax attention with grouped KV heads.

  q: (batch, q_len, heads, head_dim); k, v: (batch, kv_len, kv_heads, head_dim), heads a multiple of
  kv_heads; mask: bool, broadcastable to (batch, heads, q_len, kv_len). Softmax in float32, as
  transformers' eager attention does. Rows whose mask is all False return zeros, never NaN.
  `implementation`: "xla" (portable einsum), or "cudnn" (jax.nn.dot_product_attention's fused flash
  kernel on GPU; the boolean mask becomes an additive bias). cuDNN's kernel takes only 16-bit inputs:
  float32 q/k/v take the "xla" path whatever `implementation` says.
  """
  if implementation == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  if implementation not in ("xla", "cudnn"):
    raise ValueError(f"unknown attention implementation {implementation!r}")
  b, s, h, d = q.shape
  kvh = k.shape[2]
  groups = h // kvh
  # Heads go in front of the sequence BEFORE the matmuls: the dots then write the (s, t) score
  # blocks in their final layout, and only the small q/k/v/out tensors are transposed (XLA CPU
  # otherwise copies the (B, heads, S, S) scores and their gradients into a transposed layout).
  qg = q.reshape(b, s, kvh, groups, d).transpose(0, 2, 3, 1, 4)  # (b, kvh, groups, s, d)
  kt = k.transpose(0, 2, 1, 3)  # (b, kvh, t, d)
  vt = v.transpose(0, 2, 1, 3)
  logits = jnp.einsum("bkgsd,bktd->bkgst", qg, kt).astype(jnp.float32) * (d ** -0.5)
  if mask is not None:
    # (b, 1|h, s, t) -> (b, kvh|1, groups|1, s, t)
    m = mask.reshape(mask.shape[0], kvh, groups, s, -1) if mask.shape[1] == h else mask[:, :, None]
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    probs = jnp.where(m, probs, 0.0)
  out = jnp.einsum("bkgst,bktd->bkgsd", probs.astype(v.dtype), vt)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


def rotate_half(x: Array) -> Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
  """Rotary embedding in the rotate-half layout of transformers' Qwen2/Qwen2.5-VL.

  x: (..., seq, heads, head_dim); cos, sin: (..., seq, head_dim), broadcast over heads. Computed in
  float32 (as transformers' vision rotary does) and cast back to x's dtype.
  """
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  cos = cos[..., None, :].astype(jnp.float32)
  sin = sin[..., None, :].astype(jnp.float32)
  return (x32 * cos + rotate_half(x32) * sin).astype(dtype)
