"""The Flax vision tower against transformers' Qwen2.5-VL vision tower: metadata, weights and outputs."""

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

import bbu_jax  # noqa: F401  (project-wide flax settings)
from bbu_jax.models import layers
from bbu_jax.models import vision as V
from bbu_jax.models.config import VisionConfig

# Windows of 56 px = 2 merged tokens per side, so the grids below split into several windows with
# partial windows at the right and bottom edges.
TINY = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=96, patch_size=14,
            temporal_patch_size=2, in_channels=3, spatial_merge_size=2, window_size=56)
FULL_ATT = (1, 3)
BUDGET = 128


def our_config(fullatt=FULL_ATT) -> VisionConfig:
  return VisionConfig(**TINY, fullatt_block_indexes=tuple(fullatt))


def torch_tower(fullatt=FULL_ATT, seed=0) -> Qwen2_5_VisionTransformerPretrainedModel:
  hf_config = Qwen2_5_VLVisionConfig(**TINY, fullatt_block_indexes=list(fullatt), hidden_act="silu")
  hf_config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = Qwen2_5_VisionTransformerPretrainedModel(hf_config).eval()
  # Random everything (norm scales and biases included) so that no mapping mistake hides behind 1s/0s.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("ln_q.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.08 * torch.randn_like(p))
  return model


def torch_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def our_tower(config, model, dtype=jnp.float32, remat_policy="none") -> V.VisionTower:
  tower = V.VisionTower(config, rngs=nnx.Rngs(1), dtype=dtype, remat_policy=remat_policy)
  nnx.update(tower, V.load_vision_params_from_torch_state(torch_state(model), config))
  return tower


def reference(model, pixels: np.ndarray, grids) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.from_numpy(pixels), torch.tensor(grids, dtype=torch.long))
  return out.pooler_output.numpy()


def random_pixels(grids, seed) -> np.ndarray:
  n = sum(t * h * w for t, h, w in grids)
  return np.random.default_rng(seed).standard_normal((n, our_config().patch_dim)).astype(np.float32)


TRACES = []  # one entry per trace of run_tower: different images of one budget must not retrace


@nnx.jit
def run_tower(tower, pixel_values, meta):
  TRACES.append(pixel_values.shape)
  return tower(pixel_values, meta)


def run_rows(tower, rows, budget=BUDGET):
  """rows: list of (grids, pixels). Returns our (B, budget // 4, out) output and the stacked metadata."""
  config = tower.config
  metas = [V.vision_metadata(np.array(grids), budget, config) for grids, _ in rows]
  padded = np.zeros((len(rows), budget, config.patch_dim), np.float32)
  for i, (_, pixels) in enumerate(rows):
    padded[i, :len(pixels)] = pixels
  meta = V.stack_vision_metadata(metas)
  out = run_tower(tower, jnp.asarray(padded), {k: jnp.asarray(v) for k, v in meta.items()})
  return np.asarray(out, np.float32), meta


def rel_err(ours, ref) -> float:
  return float(np.linalg.norm(ours.astype(np.float64) - ref) / np.linalg.norm(ref))


# --- Metadata ----------------------------------------------------------------------------------

METADATA_GRIDS = [
    [[1, 4, 6]],
    [[1, 4, 6], [1, 8, 10], [1, 6, 4]],
    [[2, 6, 8], [1, 16, 16], [1, 2, 2]],  # a two-frame clip, a grid that windows divide exactly
    [[1, 18, 14], [1, 10, 22]],
]


def _partition(labels: np.ndarray) -> set[frozenset]:
  return {frozenset(np.flatnonzero(labels == v).tolist()) for v in np.unique(labels) if v != 0}


@pytest.mark.parametrize("window_size", [56, 112])
@pytest.mark.parametrize("grids", METADATA_GRIDS)
def test_metadata_matches_transformers(grids, window_size):
  config = VisionConfig(**{**TINY, "window_size": window_size}, fullatt_block_indexes=FULL_ATT)
  grid_t = torch.tensor(grids)
  total = int(sum(t * h * w for t, h, w in grids))
  budget = total + 12
  meta = V.vision_metadata(np.array(grids), budget, config)

  np.testing.assert_array_equal(meta["rope_pos"][:total], get_vision_position_ids(grid_t, 2).numpy())
  assert not meta["rope_pos"][total:].any()

  # Full attention: one segment per frame, as cu_seqlens.
  cu = get_vision_cu_seqlens(grid_t).numpy()
  frames = {frozenset(range(a, b)) for a, b in zip(cu[:-1], cu[1:])}
  assert _partition(meta["image_segment_ids"]) == frames

  # Windows: transformers permutes merged tokens into window order; map each window of that
  # permuted sequence back to the original patch indices.
  window_index, cu_window = get_vision_window_index(grid_t, 2, window_size, 14)
  window_index, cu_window = window_index.numpy(), cu_window.numpy()
  original_patch = (window_index[:, None] * 4 + np.arange(4)).reshape(-1)
  windows = {frozenset(original_patch[a:b].tolist()) for a, b in zip(cu_window[:-1], cu_window[1:])}
  ours = _partition(meta["window_segment_ids"])
  assert ours == windows
  if window_size == 56:
    assert len(ours) > len(frames)  # the test grids really are split into several windows

  assert (meta["window_segment_ids"][total:] == 0).all() and (meta["image_segment_ids"][total:] == 0).all()
  np.testing.assert_array_equal(meta["merged_valid"], np.arange(budget // 4) < total // 4)
  assert meta["rope_pos"].dtype == np.int32 and meta["window_segment_ids"].dtype == np.int32


@pytest.mark.parametrize("grids", METADATA_GRIDS[1:])
def test_merged_token_centers_place_every_token_in_its_own_image(grids):
  config = our_config()
  total = int(sum(t * h * w for t, h, w in grids))
  meta = V.vision_metadata(np.array(grids), total + 8, config)
  rows = [meta, V.vision_metadata(np.array(grids[:1]), total + 8, config)]
  centres = np.asarray(V.merged_token_centers(np.stack([r["rope_pos"] for r in rows]),
                                              np.stack([r["image_segment_ids"] for r in rows]), 2))
  # Reference: each image's merged grid in raster order within its 2 x 2 blocks' merge order.
  expected = []
  for t, h, w in grids:
    ys, xs = np.meshgrid((np.arange(h // 2) + 0.5) / (h // 2), (np.arange(w // 2) + 0.5) / (w // 2), indexing="ij")
    expected += [np.stack([ys.reshape(-1), xs.reshape(-1)], -1)] * t
  expected = np.concatenate(expected)
  np.testing.assert_allclose(centres[0, :len(expected)], expected, rtol=0, atol=1e-6)
  assert not centres[0, len(expected):].any()  # padding
  first = grids[0][0] * grids[0][1] * grids[0][2] // 4
  np.testing.assert_allclose(centres[1, :first], expected[:first], atol=1e-6)
  assert not centres[1, first:].any()


def test_metadata_errors():
  config = our_config()
  with pytest.raises(ValueError, match=r"image 1: grid \(t=1, h=8, w=10\) has 80 patches.*needs 104.*budget 100"):
    V.vision_metadata(np.array([[1, 4, 6], [1, 8, 10]]), 100, config)
  with pytest.raises(ValueError, match=r"image 0: grid \(t=1, h=5, w=6\).*divisible by spatial_merge_size 2"):
    V.vision_metadata(np.array([[1, 5, 6]]), 128, config)
  with pytest.raises(ValueError, match="patch_budget 30 must be a positive multiple of the merge unit 4"):
    V.vision_metadata(np.array([[1, 4, 6]]), 30, config)
  with pytest.raises(ValueError, match=r"shape \(n_images, 3\)"):
    V.vision_metadata(np.array([4, 6]), 32, config)
  empty = V.vision_metadata(np.zeros((0, 3), np.int64), 16, config)
  assert not empty["merged_valid"].any() and not empty["window_segment_ids"].any()


# --- Weights -----------------------------------------------------------------------------------


def test_weights_round_trip_and_metadata():
  config = our_config()
  model = torch_tower()
  state = torch_state(model)
  ours = V.load_vision_params_from_torch_state(state, config)
  back = V.vision_params_to_torch_state(ours, config)
  assert set(back) == set(state)
  for key in state:
    np.testing.assert_array_equal(back[key], state[key], err_msg=key)

  path, layer, array = V.vision_param_from_torch("blocks.2.attn.qkv.weight", state["blocks.2.attn.qkv.weight"], config)
  assert path == ("blocks", "attn", "qkv", "kernel") and layer == 2
  np.testing.assert_array_equal(array, state["blocks.2.attn.qkv.weight"].T)

  # Every parameter carries logical axis names, the stacked ones with "layers" in front.
  tower = nnx.eval_shape(lambda: V.VisionTower(config, rngs=nnx.Rngs(0)))
  for path, var in nnx.to_flat_state(nnx.state(tower, nnx.Param)):
    names = var.get_metadata()["out_sharding"]
    assert len(names) == len(var.shape) and all(isinstance(n, str) for n in names), (path, names)
    assert (names[0] == "layers") == (path[0] == "blocks"), (path, names)
    assert var.shape[0] == config.depth or path[0] != "blocks"


def test_weight_errors():
  config = our_config()
  state = torch_state(torch_tower())
  missing = dict(state)
  del missing["blocks.3.mlp.up_proj.bias"]
  with pytest.raises(ValueError, match=re.escape("'blocks.3.mlp.up_proj.bias' is missing")):
    V.load_vision_params_from_torch_state(missing, config)
  wrong = dict(state)
  wrong["merger.mlp.0.weight"] = np.zeros((256, 255), np.float32)
  with pytest.raises(ValueError, match=re.escape("'merger.mlp.0.weight' has shape (256, 255), expected (256, 256)")):
    V.load_vision_params_from_torch_state(wrong, config)
  extra = dict(state)
  extra["blocks.4.norm1.weight"] = state["blocks.0.norm1.weight"]
  with pytest.raises(ValueError, match=re.escape("'blocks.4.norm1.weight' is not part of")):
    V.load_vision_params_from_torch_state(extra, config)
  with pytest.raises(ValueError, match="remat_policy"):
    V.VisionTower(config, rngs=nnx.Rngs(0), remat_policy="everything")


# --- Parity ------------------------------------------------------------------------------------

ONE_IMAGE = [[1, 4, 6]]
SEVERAL = [[1, 4, 6], [1, 8, 10], [1, 6, 4]]


@pytest.fixture(scope="module")
def windowed():
  model = torch_tower()
  return model, our_tower(our_config(), model)


def test_one_image(windowed):
  model, tower = windowed
  pixels = random_pixels(ONE_IMAGE, seed=1)
  ref = reference(model, pixels, ONE_IMAGE)
  out, meta = run_rows(tower, [(ONE_IMAGE, pixels)])
  assert out.shape == (1, BUDGET // 4, 96)
  ours = out[0][meta["merged_valid"][0]]
  assert ours.shape == ref.shape
  assert rel_err(ours, ref) < 1e-4


def test_several_images_and_batched_rows(windowed):
  model, tower = windowed
  row_a = SEVERAL
  row_b = [[1, 8, 10], [2, 4, 4]]  # different images, a two-frame clip, different padding
  pixels_a = random_pixels(row_a, seed=2)
  pixels_b = random_pixels(row_b, seed=3)
  ref_a = reference(model, pixels_a, row_a)
  ref_b = reference(model, pixels_b, row_b)

  out, meta = run_rows(tower, [(row_a, pixels_a)])
  assert rel_err(out[0][meta["merged_valid"][0]], ref_a) < 1e-4
  traces = len(TRACES)
  out, meta = run_rows(tower, [(row_b, pixels_b)])
  assert rel_err(out[0][meta["merged_valid"][0]], ref_b) < 1e-4
  assert len(TRACES) == traces  # other grids, same budget: same compiled program

  out, meta = run_rows(tower, [(row_a, pixels_a), (row_b, pixels_b)])
  assert meta["merged_valid"].sum(axis=1).tolist() == [len(ref_a), len(ref_b)] != [BUDGET // 4] * 2
  assert rel_err(out[0][meta["merged_valid"][0]], ref_a) < 1e-4
  assert rel_err(out[1][meta["merged_valid"][1]], ref_b) < 1e-4

  # Each image of the row equals the reference run of that image alone (images never mix).
  alone = reference(model, pixels_a[24:104], [row_a[1]])
  assert rel_err(out[0][6:26], alone) < 1e-4


def test_window_attention_off():
  model_full = torch_tower(fullatt=range(4))
  model_window = torch_tower()  # same seed: same weights, only the attention pattern differs
  pixels = random_pixels(SEVERAL, seed=4)
  ref_full = reference(model_full, pixels, SEVERAL)
  ref_window = reference(model_window, pixels, SEVERAL)
  # The windows matter at this size, so matching each reference below checks the attention pattern.
  assert rel_err(ref_window, ref_full) > 1e-2
  tower = our_tower(our_config(fullatt=range(4)), model_full)
  out, meta = run_rows(tower, [(SEVERAL, pixels)])
  assert rel_err(out[0][meta["merged_valid"][0]], ref_full) < 1e-4


def test_remat_policies_match():
  config = our_config()
  model = torch_tower()
  pixels = random_pixels(SEVERAL, seed=5)
  padded = np.zeros((1, BUDGET, config.patch_dim), np.float32)
  padded[0, :len(pixels)] = pixels
  meta = {k: jnp.asarray(v[None]) for k, v in V.vision_metadata(np.array(SEVERAL), BUDGET, config).items()}
  valid = meta["merged_valid"][..., None]

  def loss(tower):
    return jnp.sum(jnp.where(valid, tower(jnp.asarray(padded), meta), 0.0) ** 2)

  results = {}
  for policy, checkpoint_policy in layers.REMAT_POLICIES.items():
    tower = our_tower(config, model, remat_policy=policy)
    graphdef, params = nnx.split(tower)
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(nnx.merge(graphdef, p))))(params))
    assert ("remat" in grad_jaxpr) == (policy != "none"), policy
    if checkpoint_policy is not None:
      assert getattr(checkpoint_policy, "__name__", repr(checkpoint_policy)) in grad_jaxpr, policy
    # Compiling every policy's backward pass costs ~10 s each on 2 cores; the remat wrapper is the
    # same code for all of them, so run two.
    if policy in ("none", "dots_saveable"):
      value, grads = nnx.jit(nnx.value_and_grad(loss))(tower)
      results[policy] = (float(value), jax.tree.leaves(nnx.to_pure_dict(grads)))
  (base_value, base_grads), (value, grads) = results["none"], results["dots_saveable"]
  assert value == pytest.approx(base_value, rel=1e-6)
  assert len(grads) == len(base_grads) == 18
  # Recomputation changes XLA's fusion and summation order, so compare as relative norms.
  for a, b in zip(grads, base_grads):
    assert rel_err(np.asarray(a), np.asarray(b, np.float64)) < 1e-5


def test_bf16_error_reported(windowed):
  model, _ = windowed
  tower = our_tower(our_config(), model, dtype=jnp.bfloat16)
  pixels = random_pixels(SEVERAL, seed=6)
  ref = reference(model, pixels, SEVERAL)
  start = time.perf_counter()
  out, meta = run_rows(tower, [(SEVERAL, pixels)])
  err = rel_err(out[0][meta["merged_valid"][0]], ref)
  print(f"vision tower bf16 compute vs fp32 transformers: relative error {err:.2e} "
        f"({time.perf_counter() - start:.1f} s incl. compile)")
  # bf16 keeps 8 mantissa bits; several layers of rounding stay well under a few percent.
  assert err < 5e-2


def test_rotary_matches_transformers():
  from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionRotaryEmbedding
  grids = [[1, 8, 10], [2, 4, 6]]
  positions = get_vision_position_ids(torch.tensor(grids), 2)
  rotary = Qwen2_5_VLVisionRotaryEmbedding(torch_tower().config)
  cos_ref, sin_ref = rotary(torch.zeros(1), positions)
  meta = V.vision_metadata(np.array(grids), 128, our_config())
  cos, sin = V.vision_rotary(jnp.asarray(meta["rope_pos"][:len(positions)]), our_config().head_dim)
  np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), rtol=0, atol=1e-6)
