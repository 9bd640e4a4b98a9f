"""The vision tower's optional absolute positions (bbu_jax extensions for models trained from scratch):
off, identical patches give identical features wherever they are (rotary positions are relative only);
on, features say where they are, on the patches (`absolute_positions`) or on the merged tokens the
decoder reads (`output_positions`); each setting survives a checkpoint and blocks the Hugging Face export."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bbu_jax  # noqa: F401  (project-wide flax settings)
from bbu_jax.models import vision as V
from bbu_jax.models import weights
from bbu_jax.models.config import Qwen25VLConfig, TextConfig, VisionConfig
from bbu_jax.models.qwen2_5_vl import Qwen25VL

VISION = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48,
                      window_size=56, fullatt_block_indexes=(1,))
GRID = [[1, 6, 8]]  # 3 x 4 merged tokens
BUDGET = 64


def _merged_features(config: VisionConfig) -> np.ndarray:
  tower = V.VisionTower(config, rngs=nnx.Rngs(0))
  meta = V.vision_metadata(np.array(GRID), BUDGET, config)
  # One grey patch everywhere: only positions can make the features differ.
  pixels = np.zeros((1, BUDGET, config.patch_dim), np.float32)
  pixels[0, :48] = np.random.default_rng(0).standard_normal(config.patch_dim)
  out = tower(jnp.asarray(pixels), {k: jnp.asarray(v)[None] for k, v in meta.items()})
  return np.asarray(out[0, :12])


def test_without_absolute_positions_identical_patches_are_indistinguishable():
  out = _merged_features(VISION)
  np.testing.assert_allclose(out, np.broadcast_to(out[0], out.shape), rtol=1e-5, atol=1e-5)


def test_absolute_positions_tell_every_merged_token_apart():
  out = _merged_features(dataclasses.replace(VISION, absolute_positions=True))
  distances = np.linalg.norm(out[:, None] - out[None], axis=-1)
  off_diagonal = distances[~np.eye(len(out), dtype=bool)]
  assert off_diagonal.min() > 1e-2 * np.linalg.norm(out, axis=-1).mean()


def _sine(row: int, col: int, dim: int) -> np.ndarray:
  freqs = 100.0 ** (-np.arange(dim // 4) / (dim // 4))
  return np.r_[np.sin(row * freqs), np.cos(row * freqs), np.sin(col * freqs), np.cos(col * freqs)]


def test_output_positions_add_each_merged_tokens_row_and_column_at_embedding_scale():
  plain = _merged_features(VISION)
  placed = _merged_features(dataclasses.replace(VISION, output_positions=True))  # same parameters
  # The 3 x 4 merged tokens in the decoder's (row-major) order.
  expected = np.stack([0.02 * _sine(k // 4, k % 4, VISION.out_hidden_size) for k in range(12)])
  np.testing.assert_allclose(placed - plain, expected, atol=1e-6)


def test_embedding_is_the_sine_of_row_and_column():
  rows_cols = jnp.array([[0, 0], [3, 5]])
  emb = np.asarray(V.absolute_position_embedding(rows_cols, 16))
  # 4 frequencies per axis, 1 down to 1/100 rad per patch; rows first: sin then cos.
  freqs = 100.0 ** (-np.arange(4) / 4)
  np.testing.assert_allclose(emb[0], np.tile(np.r_[np.zeros(4), np.ones(4)], 2), atol=1e-7)
  expected = np.r_[np.sin(3 * freqs), np.cos(3 * freqs), np.sin(5 * freqs), np.cos(5 * freqs)]
  np.testing.assert_allclose(emb[1], expected, atol=1e-6)  # float32 sin/cos of values <= 1
  with pytest.raises(ValueError, match="multiple of 4"):
    V.absolute_position_embedding(rows_cols, 18)


@pytest.mark.parametrize("setting", ["absolute_positions", "output_positions"])
def test_setting_survives_the_checkpoint_and_blocks_hf_export(tmp_path, setting):
  config = Qwen25VLConfig(
      vision=dataclasses.replace(VISION, out_hidden_size=32, **{setting: True}),
      text=TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, mrope_section=(2, 3, 3)),
      image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
      bos_token_id=124, eos_token_id=125, pad_token_id=124)
  assert getattr(Qwen25VLConfig.from_hf_dict(config.to_hf_dict()).vision, setting)
  plain = dataclasses.replace(config, vision=dataclasses.replace(config.vision, **{setting: False}))
  assert setting not in plain.to_hf_dict()["vision_config"]  # published layout unchanged
  model = Qwen25VL(config, rngs=nnx.Rngs(0))
  weights.save_checkpoint(model, config, tmp_path / "ckpt")
  assert getattr(weights.read_config(tmp_path / "ckpt").vision, setting)
  with pytest.raises(ValueError, match=f"absolute position embeddings \\(vision {setting},"):
    weights.save_hf(model, config, tmp_path / "hf")
