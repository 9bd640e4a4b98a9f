"""LoRA adapters: the Linear formula, the parameter tree (names, axes, optimizer group, rank 0 = none), a
fresh adapter changing nothing, merging, and the merged export matching transformers' logits."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import _tiny_models as tm  # noqa: E402
from _tiny_models import hf_logits, relative_error, sample_inputs  # noqa: E402
from convert_weights import flax_to_hf  # noqa: E402
from bbu_jax.models import bbu_model, layers, lora, weights  # noqa: E402
from bbu_jax.models.qwen2_5_vl import PretrainedQwen25VL  # noqa: E402
from bbu_jax.training import optimizer as optimizer_lib  # noqa: E402

ALL_TARGETS = lora.LoraConfig(rank=3, alpha=6.0, targets=lora.TARGETS)


def adapted_model(hf_path, lora_config, *, seed=0, random_b=True):
  """The HF model's weights in a model with adapters; lora_b drawn at random unless `random_b` is False."""
  config = weights.read_config(hf_path)
  pure = weights.load_hf_params(hf_path, config, weights.abstract_model(config))
  model = bbu_model.BBUModel(config, rngs=nnx.Rngs(seed), lora=lora_config)
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, pure)  # the adapters, absent from `pure`, keep their initial values
  if random_b:
    key = jax.random.key(seed + 1)
    for path, variable in nnx.to_flat_state(params):
      if path[-1] == lora.LORA_B:
        key, sub = jax.random.split(key)
        variable.set_value(0.3 * jax.random.normal(sub, variable.get_value().shape))
  nnx.update(model, params)
  return model, config


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  hf = tm.tiny_hf_model(seed=5, tie_word_embeddings=False, vision_depth=2, fullatt_block_indexes=(1,))
  path = tmp_path_factory.mktemp("hf_lora")
  hf.save_pretrained(path)
  return hf, path


def test_linear_adds_the_scaled_low_rank_product():
  linear = layers.Linear(5, 7, axes=("embed", "heads"), use_bias=True, rngs=nnx.Rngs(0), lora_rank=2, lora_scale=4.0)
  rng = np.random.default_rng(0)
  linear.lora_b.set_value(jnp.asarray(rng.standard_normal((2, 7)), jnp.float32))
  x = rng.standard_normal((3, 5)).astype(np.float32)
  w, b = np.asarray(linear.kernel[...]), np.asarray(linear.bias[...])
  a, bb = np.asarray(linear.lora_a[...]), np.asarray(linear.lora_b[...])
  expected = x @ w + b + 4.0 * (x @ a) @ bb
  np.testing.assert_allclose(np.asarray(linear(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)
  assert np.std(a) > 0  # A is drawn at random, B starts at zero
  assert not np.any(np.asarray(layers.Linear(5, 7, axes=("embed", "heads"), use_bias=False, rngs=nnx.Rngs(0),
                                             lora_rank=2, lora_scale=4.0).lora_b[...]))


def test_adapter_params_names_axes_and_optimizer_group(hf_dir):
  _, path = hf_dir
  config = weights.read_config(path)
  targets = ("q_proj", "v_proj", "down_proj")
  model = nnx.eval_shape(lambda: bbu_model.BBUModel(config, rngs=nnx.Rngs(0),
                                                    lora=lora.LoraConfig(rank=4, targets=targets)))
  adapters = {}
  for path_, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = "/".join(map(str, path_))
    if "lora" in name:
      adapters[name] = (variable.get_value().shape, variable.get_metadata()["out_sharding"])
      assert optimizer_lib.param_group(name) == "adapter"
  t = config.text
  q, mlp = t.num_attention_heads * t.head_dim, t.intermediate_size
  layers_, embed = t.num_hidden_layers, t.hidden_size
  base = "language_model/layers"
  assert adapters == {
      f"{base}/self_attn/q_proj/lora_a": ((layers_, embed, 4), ("layers", "embed", "lora_rank")),
      f"{base}/self_attn/q_proj/lora_b": ((layers_, 4, q), ("layers", "lora_rank", "heads")),
      f"{base}/self_attn/v_proj/lora_a": ((layers_, embed, 4), ("layers", "embed", "lora_rank")),
      f"{base}/self_attn/v_proj/lora_b": ((layers_, 4, t.num_key_value_heads * t.head_dim),
                                          ("layers", "lora_rank", "kv_heads")),
      f"{base}/mlp/down_proj/lora_a": ((layers_, mlp, 4), ("layers", "mlp", "lora_rank")),
      f"{base}/mlp/down_proj/lora_b": ((layers_, 4, embed), ("layers", "lora_rank", "embed")),
  }


def test_rank_zero_leaves_the_parameter_tree_unchanged(hf_dir):
  _, path = hf_dir
  config = weights.read_config(path)
  plain = nnx.state(weights.abstract_model(config), nnx.Param).to_pure_dict()
  rank0 = nnx.state(nnx.eval_shape(lambda: bbu_model.BBUModel(config, rngs=nnx.Rngs(0), lora=lora.LoraConfig(rank=0))),
                    nnx.Param).to_pure_dict()
  assert jax.tree.structure(plain) == jax.tree.structure(rank0)
  assert not lora.has_adapters(rank0)


def test_fresh_adapters_change_nothing(hf_dir):
  hf, path = hf_dir
  ids, mask, pixels, grids = sample_inputs()
  base = PretrainedQwen25VL(*weights.load_model(path))
  model, config = adapted_model(path, ALL_TARGETS, random_b=False)
  np.testing.assert_array_equal(np.asarray(PretrainedQwen25VL(model, config)(ids, mask, pixels, grids)),
                                np.asarray(base(ids, mask, pixels, grids)))


def test_merge_folds_adapters_into_kernels_and_gives_the_same_logits(hf_dir):
  _, path = hf_dir
  ids, mask, pixels, grids = sample_inputs(1)
  model, config = adapted_model(path, ALL_TARGETS)
  adapted = np.asarray(PretrainedQwen25VL(model, config)(ids, mask, pixels, grids))
  pure = nnx.state(model, nnx.Param).to_pure_dict()
  merged = lora.merge(pure, ALL_TARGETS)
  assert not lora.has_adapters(merged)
  q = pure["language_model"]["layers"]["self_attn"]["q_proj"]
  np.testing.assert_allclose(merged["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"],
                             np.asarray(q["kernel"]) + 2.0 * np.einsum("lir,lro->lio", q["lora_a"], q["lora_b"]),
                             rtol=1e-6, atol=1e-6)
  plain = weights.abstract_model(config)
  merged_model = weights._merge(plain, merged)
  ours_merged = np.asarray(PretrainedQwen25VL(merged_model, config)(ids, mask, pixels, grids))
  base = np.asarray(PretrainedQwen25VL(*weights.load_model(path))(ids, mask, pixels, grids))
  assert relative_error(adapted, base, mask) > 1e-2  # the adapters matter
  assert relative_error(ours_merged, adapted, mask) < 1e-5


def test_merge_refuses_adapters_without_config_and_mismatched_shapes():
  kernel = np.zeros((4, 6), np.float32)
  with pytest.raises(ValueError, match="no LoRA config"):
    lora.merge({"proj": {"kernel": kernel, "lora_a": np.zeros((4, 2)), "lora_b": np.zeros((2, 6))}}, None)
  with pytest.raises(ValueError, match="proj: lora_a"):
    lora.merge({"proj": {"kernel": kernel, "lora_a": np.zeros((4, 2)), "lora_b": np.zeros((3, 6))}},
               lora.LoraConfig(rank=2))
  with pytest.raises(ValueError, match="needs kernel"):
    lora.merge({"proj": {"lora_a": np.zeros((4, 2)), "lora_b": np.zeros((2, 6))}}, lora.LoraConfig(rank=2))


def test_config_refuses_unknown_targets_and_round_trips():
  with pytest.raises(ValueError, match=r"lora.targets: \['qkv'\]"):
    lora.LoraConfig(rank=4, targets=("q_proj", "qkv"))
  with pytest.raises(ValueError, match="lora.rank"):
    lora.LoraConfig(rank=-1)
  assert lora.LoraConfig.from_dict(ALL_TARGETS.to_dict()) == ALL_TARGETS
  assert lora.LoraConfig.from_dict({"rank": 0}) is None and lora.LoraConfig.from_dict(None) is None
  assert ALL_TARGETS.scale == 2.0


def test_checkpoint_keeps_adapters_and_the_export_command_merges_them(hf_dir, tmp_path, capsys):
  # bbu_model.save records the LoRA config in bbu_jax.json; flax_to_hf merges the adapters, and
  # transformers' model of the export gives our adapted model's logits.
  _, path = hf_dir
  ids, mask, pixels, grids = sample_inputs(2)
  model, config = adapted_model(path, ALL_TARGETS)
  adapted = np.asarray(PretrainedQwen25VL(model, config)(ids, mask, pixels, grids))
  checkpoint = bbu_model.save(model, tmp_path / "ckpt")
  assert json.loads((checkpoint / bbu_model.EXTRAS_FILE).read_text())["lora"] == ALL_TARGETS.to_dict()
  restored = bbu_model.load(checkpoint)
  assert restored.lora_config == ALL_TARGETS
  np.testing.assert_array_equal(np.asarray(PretrainedQwen25VL(restored, config)(ids, mask, pixels, grids)), adapted)

  assert flax_to_hf.main(["--checkpoint", str(checkpoint), "--out_dir", str(tmp_path / "hf_out"),
                          "--dtype", "float32"]) == 0
  assert "LoRA rank 3 merged" in capsys.readouterr().out
  exported = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      tmp_path / "hf_out", attn_implementation="eager", dtype=torch.float32).eval()
  assert not any("lora" in name for name, _ in exported.named_parameters())
  error = relative_error(hf_logits(exported, ids, mask, pixels, grids), adapted, mask)
  print(f"\nLoRA merged export vs adapted model: relative error {error:.2e}")
  assert error < 1e-5
