"""Whole-model parity against transformers' Qwen2_5_VLForConditionalGeneration on tiny random models.

Each case loads the saved transformers model with `load_pretrained` and compares logits over the
unpadded positions: ||ours - ref|| / ||ref|| < 1e-4 in float32. bfloat16 is measured and printed.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import _tiny_models as tm  # noqa: E402
from _tiny_models import hf_logits, relative_error  # noqa: E402
from bbu_jax.models import load_pretrained  # noqa: E402
from bbu_jax.models.qwen2_5_vl import bucket, prepare_inputs, scatter_image_features  # noqa: E402

FP32_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def untied_window(tmp_path_factory):
  """Untied embeddings; vision blocks 0 and 2 use window attention, block 1 full attention."""
  hf = tm.tiny_hf_model(seed=1, tie_word_embeddings=False, vision_depth=3, fullatt_block_indexes=(1,))
  path = tmp_path_factory.mktemp("untied_window")
  hf.save_pretrained(path)
  return hf, path, load_pretrained(path)


@pytest.fixture(scope="module")
def tied_full(tmp_path_factory):
  """Tied embeddings; every vision block uses full attention (window attention off)."""
  hf = tm.tiny_hf_model(seed=2, tie_word_embeddings=True, vision_depth=2, fullatt_block_indexes=(0, 1))
  path = tmp_path_factory.mktemp("tied_full")
  hf.save_pretrained(path)
  return hf, path, load_pretrained(path)


def check(name, model_and_ref, rows, row_grids, side="right"):
  hf, _, ours = model_and_ref
  input_ids, attention_mask = tm.pad_rows(rows, side=side)
  grids = [g for gs in row_grids for g in gs] or None
  pixels = tm.random_patches(np.random.default_rng(len(rows)), grids) if grids else None
  ref = hf_logits(hf, input_ids, attention_mask, pixels, grids)
  logits = ours(input_ids, attention_mask, pixels, None if grids is None else np.asarray(grids))
  assert logits.shape == ref.shape and logits.dtype == jnp.float32
  error = relative_error(logits, ref, attention_mask)
  print(f"\nPARITY fp32 {name}: relative error {error:.2e}")
  assert error < FP32_TOLERANCE, f"{name}: relative error {error:.2e}"
  return error


def test_text_only(untied_window):
  rng = np.random.default_rng(0)
  check("text only", untied_window, [tm.token_row(rng, [], [23])], [[]])


def test_one_image(untied_window):
  rng = np.random.default_rng(1)
  grids = [(1, 8, 12)]  # 4x6 merged tokens: windows of 2x2 split it six ways
  check("one image, window attention", untied_window, [tm.token_row(rng, grids, [5, 7])], [grids])


def test_several_images_of_different_sizes_in_one_row(untied_window):
  rng = np.random.default_rng(2)
  grids = [(1, 6, 10), (1, 4, 4), (1, 12, 6)]  # 3x5 merged: partial windows at the edges
  check("three images in one row, window attention", untied_window,
        [tm.token_row(rng, grids, [4, 3, 0, 6])], [grids])


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch(untied_window, side):
  rng = np.random.default_rng(3)
  row_grids = [[(1, 8, 8)], [], [(1, 4, 6), (1, 6, 4)]]
  rows = [tm.token_row(rng, g, [int(n) for n in rng.integers(1, 9, len(g) + 1)]) for g in row_grids]
  rows[1] = rng.integers(0, tm.TEXT_TOKENS, 11)
  check(f"{side}-padded batch of 3 rows", untied_window, rows, row_grids, side=side)


@pytest.mark.parametrize("side", ["right", "left"])
def test_text_only_padded_batch(untied_window, side):
  # Without image_grid_thw transformers uses positions 0..S-1 even for left-padded rows; so do we.
  rng = np.random.default_rng(4)
  check(f"{side}-padded text-only batch", untied_window,
        [rng.integers(0, tm.TEXT_TOKENS, 17), rng.integers(0, tm.TEXT_TOKENS, 9)], [[], []], side=side)


def test_tied_embeddings_and_full_attention(tied_full):
  _, _, ours = tied_full
  assert ours.model.lm_head is None
  rng = np.random.default_rng(5)
  check("tied, text only", tied_full, [tm.token_row(rng, [], [19])], [[]])
  grids = [(1, 8, 12), (1, 6, 6)]
  check("tied, two images, full attention everywhere", tied_full, [tm.token_row(rng, grids, [2, 5, 3])], [grids])


def test_untied_model_has_its_own_head(untied_window):
  hf, _, ours = untied_window
  head = np.asarray(ours.model.lm_head.kernel[...])
  np.testing.assert_array_equal(head, hf.lm_head.weight.detach().numpy().T)
  assert not np.allclose(head.T, np.asarray(ours.model.language_model.embed_tokens.embedding[...]))


def test_bfloat16_is_close(untied_window):
  hf, path, _ = untied_window
  rng = np.random.default_rng(6)
  grids = [(1, 8, 12), (1, 4, 4)]
  ids, mask = tm.pad_rows([tm.token_row(rng, grids, [6, 4, 3])])
  pixels = tm.random_patches(rng, grids)
  ref = hf_logits(hf, ids, mask, pixels, grids)
  ours = load_pretrained(path, dtype=jnp.bfloat16)
  assert ours.model.language_model.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
  error = relative_error(ours(ids, mask, pixels, np.asarray(grids)), ref, mask)
  hf_bf16 = tm.tiny_hf_model(seed=1, tie_word_embeddings=False, vision_depth=3, fullatt_block_indexes=(1,))
  hf_bf16 = hf_bf16.to(torch.bfloat16)
  hf_error = relative_error(hf_logits(hf_bf16, ids, mask, pixels, grids), ref, mask)
  print(f"\nPARITY bf16 one row two images: ours vs fp32 reference {error:.2e} "
        f"(transformers bf16 vs fp32: {hf_error:.2e})")
  # Loose sanity bound: bf16 rounding of the same size as transformers' own bf16 run, not a broken model.
  assert error < 2 * hf_error + 1e-2


def test_scatter_puts_valid_features_at_image_tokens_in_order():
  embeds = jnp.zeros((2, 6, 1))
  mask = jnp.array([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0]], bool)
  features = jnp.arange(1, 9, dtype=jnp.float32).reshape(2, 4, 1)
  valid = jnp.array([[False, True, True, True], [True, False, False, False]])
  out = scatter_image_features(embeds, mask, features, valid)[..., 0]
  np.testing.assert_array_equal(np.asarray(out), [[0, 2, 3, 0, 4, 0], [5, 0, 0, 0, 0, 0]])


def test_prepare_inputs_buckets_and_splits_images_per_row(untied_window):
  _, _, ours = untied_window
  rng = np.random.default_rng(7)
  row_grids = [[(1, 4, 4)], [(1, 8, 8), (1, 2, 2)]]
  rows = [tm.token_row(rng, g, [1] * (len(g) + 1)) for g in row_grids]
  ids, mask = tm.pad_rows(rows)
  grids = np.array([g for gs in row_grids for g in gs])
  pixels = tm.random_patches(rng, grids)
  inputs = prepare_inputs(ours.config, ids, mask, pixels, grids)
  assert inputs["input_ids"].shape[1] == bucket(ids.shape[1], minimum=16, multiple=8) >= ids.shape[1]
  assert inputs["pixel_values"].shape == (2, 128, pixels.shape[1])  # 68 patches in row 1 -> budget 128
  np.testing.assert_array_equal(inputs["pixel_values"][0, :16], pixels[:16])
  np.testing.assert_array_equal(inputs["pixel_values"][1, :68], pixels[16:])
  assert inputs["vision_meta"]["merged_valid"].sum(axis=1).tolist() == [4, 17]
  with pytest.raises(ValueError, match="pixel_values has shape"):
    prepare_inputs(ours.config, ids, mask, pixels[:-1], grids)
  with pytest.raises(ValueError, match="image"):
    prepare_inputs(ours.config, ids, mask, pixels[:16], grids[:1])


def test_torch_tensors_are_accepted(untied_window):
  hf, _, ours = untied_window
  rng = np.random.default_rng(8)
  grids = [(1, 4, 8)]
  ids, mask = tm.pad_rows([tm.token_row(rng, grids, [3, 2])])
  pixels = tm.random_patches(rng, grids)
  from_numpy = ours(ids, mask, pixels, np.asarray(grids))
  from_torch = ours(torch.as_tensor(ids), torch.as_tensor(mask), torch.as_tensor(pixels).to(torch.bfloat16),
                    torch.as_tensor(grids))
  from_bf16_pixels = ours(ids, mask, torch.as_tensor(pixels).to(torch.bfloat16).float().numpy(), np.asarray(grids))
  np.testing.assert_array_equal(np.asarray(from_torch), np.asarray(from_bf16_pixels))
  assert relative_error(from_torch, from_numpy) < 1e-2


# --- The module itself: remat, scan, named sizes ---------------------------------------------------

from flax import nnx  # noqa: E402

from bbu_jax.models import config as config_lib  # noqa: E402
from bbu_jax.models import layers  # noqa: E402
from bbu_jax.models.qwen2_5_vl import Qwen25VL  # noqa: E402


def _tiny_config(text_layers=2):
  return config_lib.Qwen25VLConfig.from_hf_dict(tm.tiny_hf_config(text_layers=text_layers).to_dict())


def _batch(config):
  rng = np.random.default_rng(9)
  grids = [(1, 4, 8)]
  ids, mask = tm.pad_rows([tm.token_row(rng, grids, [3, 4]), rng.integers(0, tm.TEXT_TOKENS, 6)])
  inputs = prepare_inputs(config, ids, mask, tm.random_patches(rng, grids), np.asarray(grids))
  return [inputs[k] for k in ("input_ids", "positions", "segment_ids", "pixel_values", "vision_meta")]


def test_remat_policies_change_memory_not_results():
  config = _tiny_config()
  batch = _batch(config)[:3]  # text path only: the vision tower's remat is tested with the tower

  def loss_and_grads(policy):
    model = Qwen25VL(config, rngs=nnx.Rngs(0), remat_policy=policy)
    graphdef, state = nnx.split(model)

    def loss(state):
      return jnp.mean(nnx.merge(graphdef, state)(*batch) ** 2)

    return jax.jit(jax.value_and_grad(loss))(state)

  import jax
  ref_loss, ref_grads = loss_and_grads("none")
  for policy in ("full",):  # each policy costs a compile; all share the one nnx.remat wiring
    value, grads = loss_and_grads(policy)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      # The same math, summed in a different order (vision grads are exactly zero on a text batch).
      assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
  assert layers.checkpoint_policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
  with pytest.raises(ValueError, match="remat_policy must be one of"):
    Qwen25VL(config, rngs=nnx.Rngs(0), remat_policy="everything")


def test_scanned_layers_keep_the_program_size_independent_of_depth():
  import jax

  def equations(layers):
    config = _tiny_config(text_layers=layers)
    model = Qwen25VL(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    batch = _batch(config)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(*batch))(state)
    return len(jaxpr.jaxpr.eqns)

  assert equations(2) == equations(6)


@pytest.mark.parametrize("name", ["qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_32b", "qwen2_5_vl_72b"])
def test_named_sizes_match_transformers_parameter_count_and_carry_axes(name):
  import jax
  import transformers
  config = config_lib.named_config(name)
  abstract = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
  params = nnx.state(abstract, nnx.Param)
  ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
  with torch.device("meta"):
    reference = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**config.to_hf_dict()))
  assert ours == sum(p.numel() for p in reference.parameters())
  for path, variable in nnx.to_flat_state(params):
    axes = variable.get_metadata()["out_sharding"]
    assert len(axes) == len(variable.get_value().shape), path
    assert variable.get_value().dtype == jnp.bfloat16
    if "layers" in path or "blocks" in path:
      assert axes[0] == "layers", path


def test_float32_callable_forces_float32_matmuls(untied_window):
  # GPUs (TF32) and TPUs (bf16 passes) default to lower matmul precision; the callable must not.
  import jax
  _, _, ours = untied_window
  rng = np.random.default_rng(10)
  inputs = prepare_inputs(ours.config, tm.token_row(rng, [], [6])[None])
  args = [inputs[k] for k in ("input_ids", "positions", "segment_ids", "pixel_values", "vision_meta")]
  with jax.default_matmul_precision("bfloat16"):
    jaxpr = str(jax.make_jaxpr(ours._pure_forward)(nnx.state(ours.model), *args))
  dots = jaxpr.count("dot_general[")
  assert dots > 0 and jaxpr.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == dots
