"""Multimodal rotary positions (M-RoPE) of Qwen2.5-VL: the host-side position index and the device-side cos/sin.

`get_rope_index` gives one unpadded sequence its (temporal, height, width) positions exactly as
transformers' `Qwen2_5_VLModel.get_rope_index` does; `get_rope_index_batched` adds padding the way
transformers does; `mrope_cos_sin` turns positions into the cos/sin the decoder's attention applies.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _grid_rows(image_grid_thw) -> np.ndarray:
  if image_grid_thw is None:
    return np.zeros((0, 3), np.int64)
  grids = np.asarray(image_grid_thw, dtype=np.int64)
  if grids.ndim != 2 or grids.shape[1] != 3:
    raise ValueError(f"image_grid_thw must have shape (n_images, 3), got {grids.shape}")
  return grids


def _image_positions(start: int, grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
  """(3, t*h*w) positions of one image's merged tokens, offset by `start` (time interval 1 for images)."""
  t = int(grid_thw[0])
  h = int(grid_thw[1]) // spatial_merge_size
  w = int(grid_thw[2]) // spatial_merge_size
  tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
  return np.stack([tt, hh, ww]).reshape(3, -1) + start


def _rope_index_consuming(input_ids: np.ndarray, grids: np.ndarray, first_grid: int, *, image_token_id: int,
                          spatial_merge_size: int) -> tuple[np.ndarray, int, int]:
  """Positions of one sequence, taking images from grids[first_grid:]; returns (positions, next_pos, next_grid)."""
  seq_len = input_ids.shape[0]
  positions = np.zeros((3, seq_len), np.int64)
  current_pos = 0
  grid_index = first_grid
  i = 0
  while i < seq_len:
    if input_ids[i] != image_token_id:
      # A run of text tokens: ordinary 1-D positions on all three axes.
      j = i
      while j < seq_len and input_ids[j] != image_token_id:
        j += 1
      positions[:, i:j] = np.arange(j - i) + current_pos
      current_pos += j - i
      i = j
      continue
    if grid_index >= grids.shape[0]:
      raise ValueError(f"input_ids has an image token at position {i} but image_grid_thw has only "
                       f"{grids.shape[0]} image(s)")
    grid = grids[grid_index]
    if grid[1] % spatial_merge_size or grid[2] % spatial_merge_size:
      raise ValueError(f"image_grid_thw[{grid_index}] = {grid.tolist()} is not divisible by the spatial "
                       f"merge size {spatial_merge_size}")
    image_positions = _image_positions(current_pos, grid, spatial_merge_size)
    n_tokens = image_positions.shape[1]
    run_end = i
    while run_end < seq_len and input_ids[run_end] == image_token_id and run_end - i < n_tokens:
      run_end += 1
    if run_end - i != n_tokens:
      raise ValueError(f"image {grid_index} (grid_thw {grid.tolist()}) needs {n_tokens} image tokens but "
                       f"input_ids has {run_end - i} at position {i}")
    positions[:, i:run_end] = image_positions
    current_pos += int(max(grid[1], grid[2])) // spatial_merge_size
    grid_index += 1
    i = run_end
  next_position = int(positions.max()) + 1 if seq_len else 0
  return positions, next_position, grid_index


def get_rope_index(input_ids, image_grid_thw=None, *, image_token_id: int, vision_start_token_id: int | None = None,
                   spatial_merge_size: int = 2) -> tuple[np.ndarray, int]:
  """M-RoPE positions of ONE unpadded sequence: ((3, seq) int32, next position to use after it).

  Text tokens advance all three axes together; each image's merged tokens take (t, row, col) of its
  grid offset by the current position, and the text after it continues from the current position plus
  max(h, w) / merge. An image is a run of `image_token_id` of exactly t*h*w/merge^2 tokens, taken from
  `image_grid_thw` in order; this is how transformers 5 groups tokens (its processor's
  mm_token_type_ids mark exactly the image-pad tokens). `vision_start_token_id` is accepted so that
  transformers-4-style callers work unchanged; the grouping does not need it.
  Raises ValueError when tokens and grids disagree.
  """
  del vision_start_token_id
  ids = np.asarray(input_ids)
  if ids.ndim != 1:
    raise ValueError(f"get_rope_index takes one sequence (seq,), got shape {ids.shape}")
  grids = _grid_rows(image_grid_thw)
  positions, next_position, used = _rope_index_consuming(ids, grids, 0, image_token_id=image_token_id,
                                                         spatial_merge_size=spatial_merge_size)
  if used != grids.shape[0]:
    raise ValueError(f"image_grid_thw has {grids.shape[0]} image(s) but input_ids holds image tokens for {used}")
  return positions.astype(np.int32), next_position


def get_rope_index_batched(input_ids, image_grid_thw=None, attention_mask=None, *, image_token_id: int,
                           vision_start_token_id: int | None = None,
                           spatial_merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """Padded batch: ((3, batch, seq) int32 positions, (batch,) int32 rope deltas), as transformers computes them.

  Each row's tokens where `attention_mask` is 1 are one sequence (left or right padding alike); padded
  slots get position 0. `image_grid_thw` lists the images of all rows in row order. The rope delta of a
  row is its next position minus its number of real tokens (what decoding adds to plain positions).
  """
  del vision_start_token_id
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must have shape (batch, seq), got {ids.shape}")
  mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
  grids = _grid_rows(image_grid_thw)
  positions = np.zeros((3,) + ids.shape, np.int32)
  deltas = np.zeros((ids.shape[0],), np.int32)
  grid_index = 0
  for row in range(ids.shape[0]):
    row_ids = ids[row][mask[row]]
    try:
      row_positions, next_position, grid_index = _rope_index_consuming(
          row_ids, grids, grid_index, image_token_id=image_token_id, spatial_merge_size=spatial_merge_size)
    except ValueError as e:
      raise ValueError(f"batch row {row}: {e}") from None
    positions[:, row, mask[row]] = row_positions
    deltas[row] = next_position - row_ids.shape[0]
  if grid_index != grids.shape[0]:
    raise ValueError(f"image_grid_thw has {grids.shape[0]} image(s) but input_ids holds image tokens for "
                     f"{grid_index}")
  return positions, deltas


# --- Device side ------------------------------------------------------------------------------------


def inverse_frequencies(head_dim: int, rope_theta: float) -> np.ndarray:
  """(head_dim // 2,) float32, computed in float32 like transformers' default rope init."""
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  return (np.float32(1.0) / np.power(np.float32(rope_theta), exponents, dtype=np.float32)).astype(np.float32)


def mrope_axis_of_frequency(mrope_section: Sequence[int]) -> np.ndarray:
  """(sum(mrope_section),) int: which position axis (0 temporal, 1 height, 2 width) drives each frequency.

  transformers splits the half-dimension into chunks of `mrope_section` and takes chunk i from axis
  i % 3 (sections [16, 24, 24]: 16 temporal, then 24 height, then 24 width frequencies).
  """
  return np.concatenate([np.full((size,), i % 3, np.int32) for i, size in enumerate(mrope_section)])


def mrope_cos_sin(positions: jax.Array, *, head_dim: int, rope_theta: float,
                  mrope_section: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """positions (3, batch, seq) int -> cos, sin (batch, seq, head_dim) float32 in the rotate-half layout."""
  if sum(mrope_section) * 2 != head_dim:
    raise ValueError(f"mrope_section {tuple(mrope_section)} must sum to head_dim / 2 = {head_dim // 2}")
  inv_freq = jnp.asarray(inverse_frequencies(head_dim, rope_theta))
  axis_of_frequency = mrope_axis_of_frequency(mrope_section)
  # (half, batch, seq): each frequency reads the position of its own axis.
  per_frequency_positions = positions[axis_of_frequency].astype(jnp.float32)
  freqs = jnp.moveaxis(per_frequency_positions, 0, -1) * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def text_positions(batch: int, seq: int) -> np.ndarray:
  """(3, batch, seq) int32 positions 0..seq-1 on every axis: what transformers' forward uses when no image
  grid is given (padding included: it does not shift left-padded rows)."""
  return np.broadcast_to(np.arange(seq, dtype=np.int32), (3, batch, seq)).copy()
