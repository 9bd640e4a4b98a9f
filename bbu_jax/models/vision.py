"""Qwen2.5-VL vision tower in Flax NNX: host-side window/rotary metadata, the tower, and its HF weight names.

Images are padded to a static per-row patch budget; which patches attend to which is expressed by
segment ids (one per image frame, one per attention window), so the patches keep the image
processor's merge-ordered layout and no window permutation is needed.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bbu_jax.models.config import VisionConfig
from bbu_jax.models import layers
from bbu_jax.models.layers import Linear, RMSNorm, apply_rotary, dot_product_attention, make_attention_mask

Array = jax.Array

VISION_ROPE_THETA = 10000.0

# --- Host-side metadata ------------------------------------------------------------------------


def window_merge_units(config: VisionConfig) -> int:
  """Side of one attention window in merged tokens (transformers' vit_merger_window_size)."""
  return config.window_size // config.spatial_merge_size // config.patch_size


def _merge_ordered_positions(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
  """(row, col) of every patch of one frame in the processor's order: m x m merge blocks row-major."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  block = (h // m, m, w // m, m)
  rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
  cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
  return rows, cols


def _frame_window_ids(h: int, w: int, m: int, win: int) -> tuple[np.ndarray, int]:
  """Window number (0-based, row-major over the frame's windows) of each patch of one frame.

  Windows tile the merged grid with `win` x `win` merged tokens, anchored at the top left; the last
  window of a row/column is partial when the grid is not a multiple of `win` (transformers pads the
  index grid at the bottom/right edge and drops the padding, which is the same partition).
  """
  lh, lw = h // m, w // m
  windows_w = -(-lw // win)
  windows_h = -(-lh // win)
  merged_rows, merged_cols = np.meshgrid(np.arange(lh), np.arange(lw), indexing="ij")
  merged_window = (merged_rows // win) * windows_w + merged_cols // win
  return np.repeat(merged_window.reshape(-1), m * m), windows_h * windows_w


def vision_metadata(image_grid_thw: np.ndarray, patch_budget: int, config: VisionConfig) -> dict[str, np.ndarray]:
  """Rotary positions, attention segments and valid merged tokens for ONE row of padded patches.

  image_grid_thw: (n_images, 3) grids (t, h, w) in patches, in the order their patches are
  concatenated in the row; patch_budget: the row's static patch count P. Returns `rope_pos` (P, 2)
  int32, `window_segment_ids` (P,) int32, `image_segment_ids` (P,) int32 (0 = padding in both) and
  `merged_valid` (P // merge_unit,) bool. Stack rows along a new leading axis for a batch.
  """
  grid = np.asarray(image_grid_thw)
  if grid.ndim == 1 and grid.size == 0:
    grid = grid.reshape(0, 3)
  if grid.ndim != 2 or grid.shape[1] != 3:
    raise ValueError(f"image_grid_thw must have shape (n_images, 3), got {grid.shape}")
  if not np.issubdtype(grid.dtype, np.integer):
    raise ValueError(f"image_grid_thw must be integers, got dtype {grid.dtype}")
  m = config.spatial_merge_size
  unit = config.merge_unit
  if patch_budget <= 0 or patch_budget % unit:
    raise ValueError(f"patch_budget {patch_budget} must be a positive multiple of the merge unit {unit}")
  win = window_merge_units(config)
  if win < 1:
    raise ValueError(f"window_size {config.window_size} is smaller than one merged token "
                     f"({m} x patch_size {config.patch_size})")

  rope_pos = np.zeros((patch_budget, 2), np.int32)
  window_segment_ids = np.zeros((patch_budget,), np.int32)
  image_segment_ids = np.zeros((patch_budget,), np.int32)
  merged_valid = np.zeros((patch_budget // unit,), bool)
  offset = 0
  next_window = 1
  next_frame = 1
  for index, (t, h, w) in enumerate(grid.tolist()):
    if t < 1 or h < 1 or w < 1 or h % m or w % m:
      raise ValueError(f"image {index}: grid (t={t}, h={h}, w={w}) must be positive with h and w "
                       f"divisible by spatial_merge_size {m}")
    frame = h * w
    count = t * frame
    if offset + count > patch_budget:
      raise ValueError(f"image {index}: grid (t={t}, h={h}, w={w}) has {count} patches; with the "
                       f"{offset} patches of the images before it the row needs {offset + count}, "
                       f"more than the patch budget {patch_budget}")
    rows, cols = _merge_ordered_positions(h, w, m)
    window_in_frame, windows_per_frame = _frame_window_ids(h, w, m, win)
    frame_index = np.repeat(np.arange(t), frame)
    span = slice(offset, offset + count)
    rope_pos[span, 0] = np.tile(rows, t)
    rope_pos[span, 1] = np.tile(cols, t)
    window_segment_ids[span] = next_window + frame_index * windows_per_frame + np.tile(window_in_frame, t)
    image_segment_ids[span] = next_frame + frame_index
    merged_valid[offset // unit:(offset + count) // unit] = True
    next_window += t * windows_per_frame
    next_frame += t
    offset += count
  return {
      "rope_pos": rope_pos,
      "window_segment_ids": window_segment_ids,
      "image_segment_ids": image_segment_ids,
      "merged_valid": merged_valid,
  }


def stack_vision_metadata(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks per-row metadata (same patch budget) into (B, ...) arrays."""
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def merged_token_centers(rope_pos: Array, image_segment_ids: Array, merge_size: int) -> Array:
  """(..., P // merge_size**2, 2) float32: each merged token's centre (y, x) in [0, 1] of its own image.

  rope_pos (..., P, 2) and image_segment_ids (..., P) as `vision_metadata` makes them (merge-ordered, so
  each merged token is `merge_size**2` consecutive patches). Padding tokens get (0, 0). In-graph, for
  readers that need absolute image positions (the vision tower itself only has relative ones).
  """
  unit = merge_size * merge_size
  lead, p = rope_pos.shape[:-2], rope_pos.shape[-2]
  pos = rope_pos.reshape(-1, p, 2)
  segments = image_segment_ids.reshape(-1, p)

  def one_row(pos, segments):
    # An image's extent in patches: 1 + the largest row / column among its patches.
    extent = jax.ops.segment_max(pos + 1, segments, num_segments=p + 1)
    first = pos[::unit]  # the top-left patch of every merge block
    size = extent[segments[::unit]]
    centre = (first + merge_size / 2) / jnp.maximum(size, 1)
    return jnp.where((segments[::unit] > 0)[:, None], centre, 0.0).astype(jnp.float32)

  return jax.vmap(one_row)(pos, segments).reshape(*lead, p // unit, 2)


# --- Modules -----------------------------------------------------------------------------------

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def _activation(name: str):
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"vision hidden_act {name!r} is not supported; known: {sorted(_ACTIVATIONS)}") from None


class PatchEmbed(nnx.Module):
  """transformers' Conv3d with stride == kernel, as one matmul over the flattened (C, T, P, P) patch."""

  def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.proj = Linear(config.patch_dim, config.hidden_size, axes=("patch", "vision_embed"), use_bias=False,
                       rngs=rngs, dtype=dtype)

  def __call__(self, pixel_values: Array) -> Array:
    return self.proj(pixel_values)


class VisionAttention(nnx.Module):

  def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, attention_impl: str = "xla"):
    hidden = config.hidden_size
    self.num_heads = config.num_heads
    self.head_dim = config.head_dim
    self.attention_impl = attention_impl
    self.qkv = Linear(hidden, 3 * hidden, axes=("vision_embed", "vision_heads"), use_bias=True, rngs=rngs,
                      dtype=dtype)
    self.proj = Linear(hidden, hidden, axes=("vision_heads", "vision_embed"), use_bias=True, rngs=rngs,
                       dtype=dtype)

  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
    b, p, _ = x.shape
    # transformers lays the qkv output out as (3, heads, head_dim).
    qkv = self.qkv(x).reshape(b, p, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
    out = dot_product_attention(q, k, v, mask, implementation=self.attention_impl)
    return self.proj(out.reshape(b, p, -1))


class VisionMLP(nnx.Module):
  """SwiGLU with biases: down(act(gate(x)) * up(x))."""

  def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    hidden, inner = config.hidden_size, config.intermediate_size
    self.gate_proj = Linear(hidden, inner, axes=("vision_embed", "vision_mlp"), use_bias=True, rngs=rngs,
                            dtype=dtype)
    self.up_proj = Linear(hidden, inner, axes=("vision_embed", "vision_mlp"), use_bias=True, rngs=rngs,
                          dtype=dtype)
    self.down_proj = Linear(inner, hidden, axes=("vision_mlp", "vision_embed"), use_bias=True, rngs=rngs,
                            dtype=dtype)
    self.act = _activation(config.hidden_act)

  def __call__(self, x: Array) -> Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):

  def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, attention_impl: str = "xla"):
    self.norm1 = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, axis_name="vision_embed", rngs=rngs)
    self.norm2 = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, axis_name="vision_embed", rngs=rngs)
    self.attn = VisionAttention(config, rngs=rngs, dtype=dtype, attention_impl=attention_impl)
    self.mlp = VisionMLP(config, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
    x = x + self.attn(self.norm1(x), cos, sin, mask)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm each patch, concatenate each merge unit's consecutive patches, then a 2-layer GELU MLP."""

  def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.merged_size = config.hidden_size * config.merge_unit
    self.ln_q = RMSNorm(config.hidden_size, eps=1e-6, axis_name="vision_embed", rngs=rngs)
    # Both dimensions of mlp_0 are merger-sized; sharding.logical_to_spec gives a mesh axis to the
    # first of them only.
    self.mlp_0 = Linear(self.merged_size, self.merged_size, axes=("merger_mlp", "merger_mlp"), use_bias=True,
                        rngs=rngs, dtype=dtype)
    self.mlp_2 = Linear(self.merged_size, config.out_hidden_size, axes=("merger_mlp", "embed"), use_bias=True,
                        rngs=rngs, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    b, p, _ = x.shape
    x = self.ln_q(x).reshape(b, -1, self.merged_size)
    # torch nn.GELU() is the exact erf form.
    return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


def absolute_position_embedding(rope_pos: Array, dim: int, base: float = 100.0) -> Array:
  """(..., P, dim) float32 fixed 2D sine embedding of each patch's (row, column) in patches (not normalized:
  a patch's place in pixels is its index times the patch size, whatever the image's size).

  Half the channels embed the row, half the column, each as sin/cos pairs at dim / 4 frequencies from 1
  down to 1 / base radians per patch (periods of 6 to ~630 patches).
  """
  if dim % 4:
    raise ValueError(f"absolute position embedding: vision hidden_size {dim} must be a multiple of 4")
  n = dim // 4
  inv_freq = base ** (-jnp.arange(n, dtype=jnp.float32) / n)
  angles = rope_pos.astype(jnp.float32)[..., None] * inv_freq  # (..., P, 2, n)
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # (..., P, 2, 2n)
  return emb.reshape(*emb.shape[:-2], dim)


# The std of a freshly initialized token embedding: output positions neither drown the image content nor
# vanish beside the text embeddings.
OUTPUT_POSITION_SCALE = 0.02


def merged_position_embedding(rope_pos: Array, merge_size: int, dim: int) -> Array:
  """(..., P // merge_size**2, dim) float32: `absolute_position_embedding` of each merged token's
  (row, column) in merged tokens (rope_pos merge-ordered, as `vision_metadata` makes it)."""
  first = rope_pos[..., ::merge_size * merge_size, :]  # each merge block's top-left patch
  return absolute_position_embedding(first // merge_size, dim)


def vision_rotary(rope_pos: Array, head_dim: int) -> tuple[Array, Array]:
  """cos, sin (..., P, head_dim) of transformers' axial 2D rope: [rows, cols, rows, cols] frequencies."""
  quarter = head_dim // 4
  inv_freq = 1.0 / (VISION_ROPE_THETA ** (jnp.arange(0, 2 * quarter, 2, dtype=jnp.float32) / (2 * quarter)))
  freqs = rope_pos.astype(jnp.float32)[..., None] * inv_freq  # (..., P, 2, quarter)
  freqs = freqs.reshape(*freqs.shape[:-2], 2 * quarter)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


class VisionTower(nnx.Module):
  """Patch embedding, `depth` scanned blocks (window or full attention per block) and the patch merger.

  Call with pixel_values (B, P, patch_dim) and the stacked `vision_metadata` of each row; returns
  (B, P // merge_unit, out_hidden_size) merged features in the patches' order. Merged tokens whose
  `merged_valid` is False hold arbitrary values. `attention_impl` is passed to layers.dot_product_attention.
  """

  def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, remat_policy: str = "none",
               attention_impl: str = "xla"):
    if config.hidden_size % config.num_heads or config.head_dim % 4:
      raise ValueError(f"vision hidden_size {config.hidden_size} / num_heads {config.num_heads} must give a "
                       "head_dim divisible by 4 (2D rotary)")
    bad = [i for i in config.fullatt_block_indexes if not 0 <= i < config.depth]
    if bad:
      raise ValueError(f"fullatt_block_indexes {bad} are outside the {config.depth} vision blocks")
    self.config = config
    self.dtype = dtype
    layers.checkpoint_policy(remat_policy)  # a bad name fails at construction
    self.remat_policy = remat_policy
    self.patch_embed = PatchEmbed(config, rngs=rngs, dtype=dtype)

    @nnx.split_rngs(splits=config.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(block_rngs: nnx.Rngs) -> VisionBlock:
      return VisionBlock(config, rngs=block_rngs, dtype=dtype, attention_impl=attention_impl)

    self.blocks = make_blocks(rngs)
    self.merger = PatchMerger(config, rngs=rngs, dtype=dtype)
    self.full_attention_layers = tuple(i in config.fullatt_block_indexes for i in range(config.depth))

  def __call__(self, pixel_values: Array, meta: dict[str, Array]) -> Array:
    x = self.patch_embed(pixel_values)
    if self.config.absolute_positions:
      x = x + absolute_position_embedding(meta["rope_pos"], self.config.hidden_size).astype(x.dtype)
    cos, sin = vision_rotary(meta["rope_pos"], self.config.head_dim)
    image_segments = meta["image_segment_ids"]
    window_segments = meta["window_segment_ids"]
    full_mask = make_attention_mask(image_segments, image_segments, causal=False)
    window_mask = make_attention_mask(window_segments, window_segments, causal=False)
    is_full_attention = jnp.asarray(self.full_attention_layers, dtype=bool)

    def block_forward(block: VisionBlock, h: Array, mask: Array) -> Array:
      return block(h, cos, sin, mask)

    block_forward = layers.maybe_remat(block_forward, self.remat_policy)

    @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def run_blocks(h: Array, block: VisionBlock, full: Array) -> Array:
      mask = jnp.where(full, full_mask, window_mask)
      return block_forward(block, h, mask)

    x = run_blocks(x, self.blocks, is_full_attention)
    x = self.merger(x)
    if self.config.output_positions:
      x = x + OUTPUT_POSITION_SCALE * merged_position_embedding(
          meta["rope_pos"], self.config.spatial_merge_size, self.config.out_hidden_size).astype(x.dtype)
    return x


# --- Hugging Face weight names -----------------------------------------------------------------

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")

# HF suffix inside a block -> our path inside `blocks`, "linear"/"norm" kind.
_BLOCK_PARAMS = {
    "norm1.weight": (("norm1", "scale"), "norm"),
    "norm2.weight": (("norm2", "scale"), "norm"),
    "attn.qkv.weight": (("attn", "qkv", "kernel"), "linear"),
    "attn.qkv.bias": (("attn", "qkv", "bias"), "bias"),
    "attn.proj.weight": (("attn", "proj", "kernel"), "linear"),
    "attn.proj.bias": (("attn", "proj", "bias"), "bias"),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), "linear"),
    "mlp.gate_proj.bias": (("mlp", "gate_proj", "bias"), "bias"),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), "linear"),
    "mlp.up_proj.bias": (("mlp", "up_proj", "bias"), "bias"),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), "linear"),
    "mlp.down_proj.bias": (("mlp", "down_proj", "bias"), "bias"),
}
_TOP_PARAMS = {
    "patch_embed.proj.weight": (("patch_embed", "proj", "kernel"), "conv"),
    "merger.ln_q.weight": (("merger", "ln_q", "scale"), "norm"),
    "merger.mlp.0.weight": (("merger", "mlp_0", "kernel"), "linear"),
    "merger.mlp.0.bias": (("merger", "mlp_0", "bias"), "bias"),
    "merger.mlp.2.weight": (("merger", "mlp_2", "kernel"), "linear"),
    "merger.mlp.2.bias": (("merger", "mlp_2", "bias"), "bias"),
}


def vision_torch_shapes(config: VisionConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor of transformers' vision tower (keys relative to `visual.`) with its torch shape."""
  c = config
  hidden, inner, merged = c.hidden_size, c.intermediate_size, c.hidden_size * c.merge_unit
  block = {
      "norm1.weight": (hidden,), "norm2.weight": (hidden,),
      "attn.qkv.weight": (3 * hidden, hidden), "attn.qkv.bias": (3 * hidden,),
      "attn.proj.weight": (hidden, hidden), "attn.proj.bias": (hidden,),
      "mlp.gate_proj.weight": (inner, hidden), "mlp.gate_proj.bias": (inner,),
      "mlp.up_proj.weight": (inner, hidden), "mlp.up_proj.bias": (inner,),
      "mlp.down_proj.weight": (hidden, inner), "mlp.down_proj.bias": (hidden,),
  }
  shapes = {"patch_embed.proj.weight": (hidden, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)}
  for i in range(c.depth):
    shapes.update({f"blocks.{i}.{suffix}": shape for suffix, shape in block.items()})
  shapes.update({
      "merger.ln_q.weight": (hidden,),
      "merger.mlp.0.weight": (merged, merged), "merger.mlp.0.bias": (merged,),
      "merger.mlp.2.weight": (c.out_hidden_size, merged), "merger.mlp.2.bias": (c.out_hidden_size,),
  })
  return shapes


def _torch_to_ours(kind: str, array: np.ndarray) -> np.ndarray:
  if kind == "linear":
    return array.T
  if kind == "conv":
    return array.reshape(array.shape[0], -1).T
  return array


def vision_param_from_torch(key: str, array: np.ndarray,
                            config: VisionConfig) -> tuple[tuple[str, ...], int | None, np.ndarray]:
  """One HF vision tensor -> (our param path, stacked layer index or None, array in our layout).

  `key` is relative to `visual.` (e.g. `blocks.3.attn.qkv.weight`). Raises ValueError naming the
  tensor when the key is unknown or its shape does not match `config`.
  """
  expected = vision_torch_shapes(config).get(key)
  if expected is None:
    raise ValueError(f"vision tensor {key!r} is not part of a Qwen2.5-VL vision tower with depth "
                     f"{config.depth} (keys are relative to 'visual.')")
  if tuple(array.shape) != expected:
    raise ValueError(f"vision tensor {key!r} has shape {tuple(array.shape)}, expected {expected} for this config")
  if key in _TOP_PARAMS:
    path, kind = _TOP_PARAMS[key]
    return path, None, _torch_to_ours(kind, array)
  layer, suffix = _BLOCK_KEY.fullmatch(key).groups()
  path, kind = _BLOCK_PARAMS[suffix]
  return ("blocks",) + path, int(layer), _torch_to_ours(kind, array)


def vision_param_to_torch(path: tuple[str, ...], array: np.ndarray,
                          config: VisionConfig) -> Iterator[tuple[str, np.ndarray]]:
  """Our param (path, full array; stacked over layers for `blocks`) -> (HF key, torch-layout array) pairs."""
  path = tuple(str(p) for p in path)
  if path[0] == "blocks":
    for suffix, (block_path, kind) in _BLOCK_PARAMS.items():
      if ("blocks",) + block_path == path:
        for layer in range(array.shape[0]):
          yield f"blocks.{layer}.{suffix}", _ours_to_torch(kind, array[layer], config)
        return
  else:
    for key, (top_path, kind) in _TOP_PARAMS.items():
      if top_path == path:
        yield key, _ours_to_torch(kind, array, config)
        return
  raise ValueError(f"vision param {'/'.join(path)} has no Hugging Face counterpart")


def _ours_to_torch(kind: str, array: np.ndarray, config: VisionConfig) -> np.ndarray:
  if kind == "linear":
    return np.ascontiguousarray(array.T)
  if kind == "conv":
    c = config
    return np.ascontiguousarray(array.T).reshape(c.hidden_size, c.in_channels, c.temporal_patch_size,
                                                  c.patch_size, c.patch_size)
  return np.asarray(array)


def abstract_vision_state(config: VisionConfig) -> nnx.State:
  """The VisionTower's Param state with ShapeDtypeStruct leaves (and logical axis metadata); no memory."""
  tower = nnx.eval_shape(lambda: VisionTower(config, rngs=nnx.Rngs(0)))
  return nnx.state(tower, nnx.Param)


def load_vision_params_from_torch_state(state_dict: dict[str, Any], config: VisionConfig) -> nnx.State:
  """transformers' vision state dict (keys relative to `visual.`, numpy arrays) -> VisionTower Param state.

  Every tensor is checked before anything is returned: one ValueError names the first missing,
  unexpected or wrong-shaped tensor. Apply with `nnx.update(tower, state)`.
  """
  expected = vision_torch_shapes(config)
  missing = [key for key in expected if key not in state_dict]
  if missing:
    raise ValueError(f"vision tensor {missing[0]!r} is missing from the state dict "
                     f"({len(missing)} of {len(expected)} vision tensors missing)")
  top: dict[tuple[str, ...], np.ndarray] = {}
  layers: dict[tuple[str, ...], list[np.ndarray | None]] = {}
  for key, value in state_dict.items():
    path, layer, array = vision_param_from_torch(key, np.asarray(value), config)
    if layer is None:
      top[path] = array
    else:
      layers.setdefault(path, [None] * config.depth)[layer] = array
  for path, per_layer in layers.items():
    top[path] = np.stack(per_layer)
  state = abstract_vision_state(config)
  pure: dict = {}
  for path, array in top.items():
    node = pure
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jnp.asarray(array)
  nnx.replace_by_pure_dict(state, pure)
  return state


def vision_params_to_torch_state(state: nnx.State | dict, config: VisionConfig) -> dict[str, np.ndarray]:
  """VisionTower Param state (or its pure dict) -> transformers' vision state dict (keys relative to `visual.`)."""
  pure = state.to_pure_dict() if isinstance(state, nnx.State) else state
  out: dict[str, np.ndarray] = {}

  def walk(node, path):
    if isinstance(node, dict):
      for name, child in node.items():
        walk(child, path + (name,))
      return
    value = node.get_value() if isinstance(node, nnx.Variable) else node
    for key, array in vision_param_to_torch(path, np.asarray(value), config):
      out[key] = array

  walk(pure, ())
  return out
