"""M-RoPE positions and cos/sin against transformers' own Qwen2_5_VLModel.get_rope_index and rotary embedding."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import _tiny_models as tm  # noqa: E402
from bbu_jax.models import rope  # noqa: E402


@pytest.fixture(scope="module")
def hf_model():
  config = tm.tiny_hf_config(vision_depth=1, text_layers=1)
  return transformers.Qwen2_5_VLModel(config).eval()


def hf_rope_index(hf_model, input_ids, grids, attention_mask=None):
  ids = torch.as_tensor(input_ids)
  mm_token_type_ids = (ids == tm.IMAGE_TOKEN_ID).to(torch.int32)
  grid_tensor = torch.as_tensor(np.asarray(grids, np.int64).reshape(-1, 3)) if len(grids) else None
  mask = torch.as_tensor(attention_mask) if attention_mask is not None else None
  positions, deltas = hf_model.get_rope_index(ids, mm_token_type_ids, image_grid_thw=grid_tensor, attention_mask=mask)
  return positions.numpy(), deltas.numpy().reshape(-1)


def ours_single(ids, grids):
  return rope.get_rope_index(ids, np.asarray(grids, np.int64).reshape(-1, 3), image_token_id=tm.IMAGE_TOKEN_ID,
                             vision_start_token_id=tm.VISION_START_ID, spatial_merge_size=tm.MERGE)


@pytest.mark.parametrize("grids, text_lengths", [
    ([], [7]),
    ([(1, 4, 4)], [3, 5]),
    ([(1, 4, 6)], [0, 0]),
    ([(1, 6, 4), (1, 2, 8), (1, 10, 6)], [2, 4, 0, 3]),
    ([(2, 4, 4), (1, 4, 2)], [1, 1, 6]),
])
def test_single_sequence_matches_transformers(hf_model, grids, text_lengths):
  rng = np.random.default_rng(len(grids) * 10 + sum(text_lengths))
  ids = tm.token_row(rng, grids, text_lengths)
  positions, next_position = ours_single(ids, grids)
  ref, ref_delta = hf_rope_index(hf_model, ids[None], grids)
  assert positions.dtype == np.int32 and positions.shape == (3, len(ids))
  np.testing.assert_array_equal(positions, ref[:, 0])
  assert next_position - len(ids) == ref_delta[0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_transformers(hf_model, side):
  rng = np.random.default_rng(7 if side == "right" else 8)
  row_grids = [[(1, 4, 6), (1, 8, 4)], [], [(1, 2, 2)], [(1, 6, 6)]]
  rows = [tm.token_row(rng, g, [int(v) for v in rng.integers(0, 6, len(g) + 1)]) for g in row_grids]
  rows[1] = rng.integers(0, tm.TEXT_TOKENS, 5)
  input_ids, attention_mask = tm.pad_rows(rows, side=side)
  grids = [g for gs in row_grids for g in gs]
  positions, deltas = rope.get_rope_index_batched(
      input_ids, np.asarray(grids), attention_mask, image_token_id=tm.IMAGE_TOKEN_ID, spatial_merge_size=tm.MERGE)
  ref, ref_deltas = hf_rope_index(hf_model, input_ids, grids, attention_mask)
  assert positions.shape == (3,) + input_ids.shape and positions.dtype == np.int32
  np.testing.assert_array_equal(positions, ref)
  np.testing.assert_array_equal(deltas, ref_deltas)
  # Each row equals the unpadded single-sequence answer.
  for row, g in zip(range(len(rows)), row_grids):
    single, _ = ours_single(rows[row], g)
    np.testing.assert_array_equal(positions[:, row, attention_mask[row].astype(bool)], single)


def test_adjacent_images_split_by_grid():
  # Two images whose pad tokens touch: the grids say where one ends.
  grids = [(1, 2, 4), (1, 4, 4)]
  ids = np.array([5, tm.VISION_START_ID] + [tm.IMAGE_TOKEN_ID] * 6 + [9], np.int64)
  positions, next_position = ours_single(ids, grids)
  # text 0,1; image 1 at offset 2: rows {0}, cols {0,1}; image 2 at offset 2 + max(1,2)=4: 2x2 grid.
  np.testing.assert_array_equal(positions[1], [0, 1, 2, 2, 4, 4, 5, 5, 6])
  np.testing.assert_array_equal(positions[2], [0, 1, 2, 3, 4, 5, 4, 5, 6])
  assert next_position == 7


def test_token_and_grid_mismatch_is_refused():
  ids = tm.token_row(np.random.default_rng(0), [(1, 4, 4)], [2, 2])
  with pytest.raises(ValueError, match="needs 4 image tokens but input_ids has 3"):
    ours_single(np.delete(ids, 4), [(1, 4, 4)])
  with pytest.raises(ValueError, match="has 2 image"):
    ours_single(ids, [(1, 4, 4), (1, 2, 2)])
  with pytest.raises(ValueError, match="only 0 image"):
    ours_single(ids, [])
  with pytest.raises(ValueError, match="batch row 1"):
    # One grid for two rows that each hold one image token.
    rope.get_rope_index_batched(np.array([[1, tm.IMAGE_TOKEN_ID, 2]] * 2), np.array([(1, 2, 2)]),
                                image_token_id=tm.IMAGE_TOKEN_ID, spatial_merge_size=2)


def test_mrope_axis_interleave():
  np.testing.assert_array_equal(rope.mrope_axis_of_frequency((2, 3, 3)), [0, 0, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(rope.mrope_axis_of_frequency((1, 1, 1, 1)), [0, 1, 2, 0])


def test_mrope_cos_sin_matches_transformers():
  config = tm.tiny_hf_config(mrope_section=(2, 3, 3)).text_config
  rotary = transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLRotaryEmbedding(config)
  positions = np.random.default_rng(0).integers(0, 3000, (3, 2, 11))
  ref_cos, ref_sin = rotary(torch.zeros(1, dtype=torch.float32), torch.as_tensor(positions))
  cos, sin = rope.mrope_cos_sin(jnp.asarray(positions), head_dim=16, rope_theta=10000.0, mrope_section=(2, 3, 3))
  assert cos.shape == (2, 11, 16)
  np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), atol=2e-6)
  np.testing.assert_allclose(np.asarray(sin), ref_sin.numpy(), atol=2e-6)
  with pytest.raises(ValueError, match="must sum"):
    rope.mrope_cos_sin(jnp.asarray(positions), head_dim=16, rope_theta=1e4, mrope_section=(2, 2, 2))


def test_text_positions_ignore_padding_like_transformers_forward():
  np.testing.assert_array_equal(rope.text_positions(2, 4)[:, 1], [[0, 1, 2, 3]] * 3)
