"""Qwen2.5-VL assembled: vision tower, image features scattered into <|image_pad|> tokens, decoder, LM head.

`Qwen25VL` is the jit-friendly module (static shapes, positions and segment ids given).
`prepare_inputs` turns transformers-style arguments (input_ids, attention_mask, pixel_values,
image_grid_thw) into its static-shape inputs on the host, and `PretrainedQwen25VL` is the callable that
`load_pretrained` returns: same arguments and same logits as transformers' model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bbu_jax.models import layers, rope
from bbu_jax.models.config import Qwen25VLConfig
from bbu_jax.models.lora import LoraConfig
from bbu_jax.models.text import TextDecoder, cast_params
from bbu_jax.models.vision import VisionTower, stack_vision_metadata, vision_metadata

Array = jax.Array


def scatter_image_features(inputs_embeds: Array, image_token_mask: Array, features: Array,
                           merged_valid: Array) -> Array:
  """Put each row's valid merged image features, in order, at that row's image-token positions.

  inputs_embeds (B, S, D); image_token_mask (B, S) bool; features (B, M, D); merged_valid (B, M) bool.
  Valid features are compacted with a stable sort, then the k-th image token of a row takes the k-th
  valid feature: static shapes, no loop over images. Token and feature counts must agree (checked on
  the host by `prepare_inputs`).
  """
  order = jnp.argsort(jnp.logical_not(merged_valid), axis=1, stable=True)
  compact = jnp.take_along_axis(features, order[..., None], axis=1)
  rank = jnp.clip(jnp.cumsum(image_token_mask, axis=1) - 1, 0, features.shape[1] - 1)
  gathered = jnp.take_along_axis(compact, rank[..., None], axis=1)
  return jnp.where(image_token_mask[..., None], gathered.astype(inputs_embeds.dtype), inputs_embeds)


class Qwen25VL(nnx.Module):
  """Qwen2_5_VLForConditionalGeneration in Flax NNX: `visual`, `language_model`, `lm_head` (None when tied).

  `lora` (rank > 0) adds LoRA adapters to the decoder projections it targets; `lora_config` keeps it.
  """

  def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               remat_policy: str = "none", attention_impl: str = "xla", lora: LoraConfig | None = None):
    if config.vision.out_hidden_size != config.text.hidden_size:
      raise ValueError(f"vision out_hidden_size {config.vision.out_hidden_size} differs from the text "
                       f"hidden_size {config.text.hidden_size}")
    self.config = config
    self.dtype = dtype
    self.lora_config = lora if lora is not None and lora.enabled else None
    self.visual = VisionTower(config.vision, rngs=rngs, dtype=dtype, remat_policy=remat_policy,
                              attention_impl=attention_impl)
    self.language_model = TextDecoder(config.text, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                      remat_policy=remat_policy, attention_impl=attention_impl,
                                      lora=self.lora_config)
    if config.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = layers.Linear(config.text.hidden_size, config.text.vocab_size, axes=("embed", "vocab"),
                                   use_bias=False, rngs=rngs, dtype=dtype)
    cast_params(self, param_dtype)

  def embed(self, input_ids: Array, pixel_values: Array | None = None,
            vision_meta: dict[str, Array] | None = None) -> Array:
    """Token embeddings with image features at the <|image_pad|> tokens: (B, S, hidden)."""
    embeds = self.language_model.embed_tokens(input_ids)
    if pixel_values is None:
      return embeds
    if vision_meta is None:
      raise ValueError("pixel_values given without vision_meta")
    features = self.visual(pixel_values.astype(self.dtype), vision_meta)
    return scatter_image_features(embeds, input_ids == self.config.image_token_id, features,
                                  vision_meta["merged_valid"])

  def logits(self, hidden: Array) -> Array:
    if self.lm_head is None:
      return self.language_model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def __call__(self, input_ids: Array, positions: Array, segment_ids: Array, pixel_values: Array | None = None,
               vision_meta: dict[str, Array] | None = None, *, return_hidden: bool = False):
    """input_ids (B, S), positions (3, B, S), segment_ids (B, S) [0 = padding] -> logits (B, S, vocab).

    With return_hidden, returns (logits, final normed hidden states (B, S, hidden)).
    """
    embeds = self.embed(input_ids, pixel_values, vision_meta)
    hidden = self.language_model(embeds, positions, segment_ids)
    logits = self.logits(hidden)
    return (logits, hidden) if return_hidden else logits


# --- Host side: transformers-style arguments -> static-shape inputs ----------------------------------


def bucket(n: int, *, minimum: int, multiple: int) -> int:
  """A size >= n from few distinct values: powers of two up to 1024, then multiples of 1024; a multiple of `multiple`."""
  size = max(minimum, 1)
  while size < n and size < 1024:
    size *= 2
  if size < n:
    size = -(-n // 1024) * 1024
  return -(-size // multiple) * multiple


def _images_per_row(input_ids: np.ndarray, attention_mask: np.ndarray, grids: np.ndarray, image_token_id: int,
                    merge_unit: int) -> list[list[int]]:
  """Indices into `grids` of each row's images, by counting the row's image tokens."""
  rows, next_grid = [], 0
  for row in range(input_ids.shape[0]):
    n_tokens = int(np.sum((input_ids[row] == image_token_id) & attention_mask[row]))
    mine = []
    while n_tokens > 0:
      if next_grid >= grids.shape[0]:
        raise ValueError(f"batch row {row} has more image tokens than image_grid_thw provides")
      n_tokens -= int(np.prod(grids[next_grid])) // merge_unit
      mine.append(next_grid)
      next_grid += 1
    if n_tokens:
      raise ValueError(f"batch row {row}: its image tokens do not match the grids of images {mine}")
    rows.append(mine)
  return rows


def _numpy(value, dtype=None) -> np.ndarray | None:
  """np.ndarray from numpy, jax, lists or torch tensors (bfloat16 included) without importing torch."""
  if value is None:
    return None
  if hasattr(value, "detach"):  # a torch tensor: numpy cannot take its bfloat16 directly
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  array = np.asarray(value)
  return array.astype(dtype) if dtype is not None else array


def prepare_inputs(config: Qwen25VLConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   *, mm_token_type_ids=None, seq_bucket: bool = True) -> dict[str, Any]:
  """transformers-style arguments -> numpy inputs of `Qwen25VL.__call__` with bucketed static shapes.

  Positions follow transformers' forward: with image_grid_thw, M-RoPE from get_rope_index honouring
  attention_mask; without it, plain 0..S-1 on every row. pixel_values (sum of t*h*w patches, patch_dim)
  are split per row in image order and padded to a shared patch budget. Returns a dict with
  input_ids, positions, segment_ids, pixel_values, vision_meta (the last two None without images) and
  seq_len (the caller's S, to cut the logits back).
  """
  ids = _numpy(input_ids)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.ndim != 2:
    raise ValueError(f"input_ids must have shape (batch, seq), got {ids.shape}")
  ids = ids.astype(np.int32)
  batch, seq = ids.shape
  mask = np.ones_like(ids, bool) if attention_mask is None else _numpy(attention_mask).reshape(ids.shape) != 0
  if mm_token_type_ids is not None:
    types = _numpy(mm_token_type_ids).reshape(ids.shape)
    if np.any((types == 1) != (ids == config.image_token_id)) or np.any(types > 1):
      raise ValueError("mm_token_type_ids must mark exactly the image tokens (videos are not supported)")
  vc = config.vision
  grids = None if image_grid_thw is None else _numpy(image_grid_thw, np.int64).reshape(-1, 3)
  if grids is not None:
    positions, _ = rope.get_rope_index_batched(ids, grids, mask, image_token_id=config.image_token_id,
                                               spatial_merge_size=vc.spatial_merge_size)
  else:
    positions = rope.text_positions(batch, seq)

  padded_seq = bucket(seq, minimum=16, multiple=8) if seq_bucket else seq
  pad = padded_seq - seq
  out = {
      "input_ids": np.pad(ids, ((0, 0), (0, pad)), constant_values=config.pad_token_id),
      "positions": np.pad(positions, ((0, 0), (0, 0), (0, pad))),
      "segment_ids": np.pad(mask.astype(np.int32), ((0, 0), (0, pad))),
      "pixel_values": None,
      "vision_meta": None,
      "seq_len": seq,
  }
  if pixel_values is None:
    return out
  if grids is None:
    raise ValueError("pixel_values given without image_grid_thw")
  pixels = _numpy(pixel_values, np.float32)
  patches_per_image = np.prod(grids, axis=1)
  if pixels.ndim != 2 or pixels.shape != (int(patches_per_image.sum()), vc.patch_dim):
    raise ValueError(f"pixel_values has shape {pixels.shape}, expected ({int(patches_per_image.sum())}, "
                     f"{vc.patch_dim}) for image_grid_thw {grids.tolist()}")
  starts = np.concatenate([[0], np.cumsum(patches_per_image)])
  rows = _images_per_row(ids, mask, grids, config.image_token_id, vc.merge_unit)
  row_patches = [int(sum(patches_per_image[i] for i in r)) for r in rows]
  budget = bucket(max(row_patches), minimum=64, multiple=vc.merge_unit)
  row_pixels = np.zeros((batch, budget, vc.patch_dim), np.float32)
  metas = []
  for row, images in enumerate(rows):
    offset = 0
    for i in images:
      n = int(patches_per_image[i])
      row_pixels[row, offset:offset + n] = pixels[starts[i]:starts[i] + n]
      offset += n
    metas.append(vision_metadata(grids[images].reshape(-1, 3), budget, vc))
  out["pixel_values"] = row_pixels
  out["vision_meta"] = stack_vision_metadata(metas)
  return out


class PretrainedQwen25VL:
  """The callable `load_pretrained` returns: model(input_ids, attention_mask=None, pixel_values=None,
  image_grid_thw=None) -> float32 logits (B, S, vocab), as transformers' Qwen2_5_VLForConditionalGeneration.

  `.model` is the NNX module and `.config` its Qwen25VLConfig. Shapes are bucketed, so calls with
  similar sizes reuse one compilation.
  """

  def __init__(self, model: Qwen25VL, config: Qwen25VLConfig):
    self.model = model
    self.config = config
    graphdef, state = nnx.split(model)
    self._graphdef = graphdef
    self._forward = jax.jit(self._pure_forward)

  def _pure_forward(self, state, input_ids, positions, segment_ids, pixel_values, vision_meta):
    model = nnx.merge(self._graphdef, state)
    # A float32 model means float32 matmuls, also on GPU (TF32) and TPU (bf16 passes) whose default
    # precision is lower: this callable promises transformers' logits.
    precision = "highest" if jnp.dtype(model.dtype) == jnp.float32 else None
    with jax.default_matmul_precision(precision):
      return model(input_ids, positions, segment_ids, pixel_values, vision_meta).astype(jnp.float32)

  def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
               mm_token_type_ids=None) -> Array:
    inputs = prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                            mm_token_type_ids=mm_token_type_ids)
    state = nnx.state(self.model)
    logits = self._forward(state, inputs["input_ids"], inputs["positions"], inputs["segment_ids"],
                           inputs["pixel_values"], inputs["vision_meta"])
    return logits[:, :inputs["seq_len"]]
