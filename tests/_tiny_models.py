"""Tiny random Qwen2.5-VL models and inputs for tests: transformers configs/models, token rows, patches.

Every parameter of the tiny transformers model is randomised (norm scales and biases included), so a
weight that is mapped to the wrong place or dropped changes the logits.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

TINY_CONFIG = pathlib.Path(__file__).resolve().parent / "configs" / "tiny.py"

# Token ids of the tiny vocabulary (ordinary text tokens are drawn from [0, TEXT_TOKENS)).
VOCAB = 300
TEXT_TOKENS = 280
BOS_ID = PAD_ID = 280
EOS_ID = 281
VISION_START_ID = 290
VISION_END_ID = 291
VISION_PAD_ID = 292
IMAGE_TOKEN_ID = 293
VIDEO_TOKEN_ID = 294
PATCH_SIZE = 14
MERGE = 2
TEMPORAL_PATCH = 2


def tiny_hf_config(*, tie_word_embeddings: bool = False, vision_depth: int = 3,
                   fullatt_block_indexes=(1,), window_size: int = 56, text_layers: int = 2,
                   hidden_size: int = 64, num_heads: int = 4, num_kv_heads: int = 2,
                   mrope_section=(2, 3, 3), vision_hidden: int = 32, vision_heads: int = 2):
  """A transformers Qwen2_5_VLConfig small enough for a 2-core CPU.

  window_size 56 with patch 14 and merge 2 makes windows of 2x2 merged tokens (4x4 patches), so any
  image larger than 4x4 patches is split into several windows.
  """
  import transformers
  head_dim = hidden_size // num_heads
  assert sum(mrope_section) * 2 == head_dim
  return transformers.Qwen2_5_VLConfig(
      text_config=dict(
          vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size + 16,
          num_hidden_layers=text_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
          rms_norm_eps=1e-6, max_position_embeddings=4096, hidden_act="silu",
          rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section)},
          bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=tie_word_embeddings),
      vision_config=dict(
          depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden + 8,
          num_heads=vision_heads, in_channels=3, patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH,
          spatial_merge_size=MERGE, window_size=window_size, fullatt_block_indexes=list(fullatt_block_indexes),
          out_hidden_size=hidden_size, tokens_per_second=2, hidden_act="silu"),
      image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
      vision_end_token_id=VISION_END_ID, tie_word_embeddings=tie_word_embeddings,
  )


def randomize_(model, seed: int = 0) -> None:
  """Draw every parameter at random in place: norms around 1, biases and weights of order 1/sqrt(fan_in)."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
      else:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / np.sqrt(fan_in)))


def tiny_hf_model(seed: int = 0, **config_kwargs):
  """A float32 Qwen2_5_VLForConditionalGeneration with random weights, eager attention, in eval mode."""
  import torch
  import transformers
  config = tiny_hf_config(**config_kwargs)
  config._attn_implementation = "eager"
  config.text_config._attn_implementation = "eager"
  config.vision_config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
  randomize_(model, seed)
  return model


def image_tokens(grid_thw) -> int:
  t, h, w = (int(v) for v in grid_thw)
  return t * h * w // (MERGE * MERGE)


def token_row(rng: np.random.Generator, grids, text_lengths) -> np.ndarray:
  """text, then for each image <vision_start> <image_pad>*n <vision_end> text (len(text_lengths) == len(grids)+1)."""
  assert len(text_lengths) == len(grids) + 1
  parts = [rng.integers(0, TEXT_TOKENS, text_lengths[0])]
  for grid, n_text in zip(grids, text_lengths[1:]):
    parts.append(np.array([VISION_START_ID] + [IMAGE_TOKEN_ID] * image_tokens(grid) + [VISION_END_ID]))
    parts.append(rng.integers(0, TEXT_TOKENS, n_text))
  return np.concatenate(parts).astype(np.int64)


def pad_rows(rows, *, side: str = "right", pad_id: int = PAD_ID) -> tuple[np.ndarray, np.ndarray]:
  """Stack token rows into (input_ids, attention_mask), padding on `side`."""
  seq = max(len(r) for r in rows)
  ids = np.full((len(rows), seq), pad_id, np.int64)
  mask = np.zeros((len(rows), seq), np.int64)
  for i, r in enumerate(rows):
    if side == "right":
      ids[i, :len(r)], mask[i, :len(r)] = r, 1
    else:
      ids[i, seq - len(r):], mask[i, seq - len(r):] = r, 1
  return ids, mask


def random_patches(rng: np.random.Generator, grids) -> np.ndarray:
  """pixel_values (sum t*h*w, 3*2*14*14) float32 for images with these grids, as the processor lays them out."""
  n = int(sum(int(t) * int(h) * int(w) for t, h, w in grids))
  return rng.standard_normal((n, 3 * TEMPORAL_PATCH * PATCH_SIZE * PATCH_SIZE)).astype(np.float32)


# --- Comparing with transformers -----------------------------------------------------------------


def hf_logits(hf, input_ids, attention_mask=None, pixel_values=None, grids=None) -> np.ndarray:
  """transformers' logits (float32 numpy) for the same arguments our callable takes."""
  import torch
  kwargs = {"input_ids": torch.as_tensor(input_ids)}
  if attention_mask is not None:
    kwargs["attention_mask"] = torch.as_tensor(attention_mask)
  if grids is not None:
    kwargs["image_grid_thw"] = torch.as_tensor(np.asarray(grids, np.int64))
    # What the transformers processor returns beside input_ids; without it transformers 5 skips M-RoPE.
    kwargs["mm_token_type_ids"] = torch.as_tensor(input_ids == IMAGE_TOKEN_ID).to(torch.int32)
  if pixel_values is not None:
    kwargs["pixel_values"] = torch.as_tensor(pixel_values).to(next(hf.parameters()).dtype)
  with torch.no_grad():
    return hf(**kwargs).logits.float().numpy()


def relative_error(ours, ref, attention_mask=None) -> float:
  """||ours - ref|| / ||ref|| over the unpadded positions."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  if attention_mask is not None:
    keep = np.asarray(attention_mask).astype(bool)
    ours, ref = ours[keep], ref[keep]
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def sample_inputs(seed: int = 0):
  """A right-padded batch: a row with two images of different sizes, and a text-only row."""
  rng = np.random.default_rng(seed)
  grids = [(1, 8, 8), (1, 4, 6)]
  ids, mask = pad_rows([token_row(rng, grids, [3, 4, 2]), rng.integers(0, TEXT_TOKENS, 9)])
  return ids, mask, random_patches(rng, grids), np.array(grids)


def tiny_run_config(root: pathlib.Path, **fields):
  """tests/configs/tiny.py with its paths under `root` (as a run started with BBU_TEST_ROOT=root reads
  it), unlocked, with `fields` set."""
  from bbu_jax import config as config_lib

  previous = os.environ.get("BBU_TEST_ROOT")
  os.environ["BBU_TEST_ROOT"] = str(root)
  try:
    config = config_lib.load_config_file(TINY_CONFIG)
  finally:
    if previous is None:
      del os.environ["BBU_TEST_ROOT"]
    else:
      os.environ["BBU_TEST_ROOT"] = previous
  config.unlock()
  for name, value in fields.items():
    config[name] = value
  return config
