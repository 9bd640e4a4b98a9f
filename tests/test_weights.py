"""HF <-> bbu_jax weights: round trip through the convert_weights commands, export dtypes and sharding,
both key layouts, the bbu_jax checkpoint, and one clear error for every kind of bad checkpoint."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import _tiny_models as tm  # noqa: E402
from _tiny_models import hf_logits, relative_error, sample_inputs  # noqa: E402
from bbu_jax.models import load_pretrained, weights  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER_STUBS = {"tokenizer_config.json": '{"model_max_length": 64}\n', "preprocessor_config.json": '{"patch_size": 14}\n'}


def run_module(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  hf = tm.tiny_hf_model(seed=3, tie_word_embeddings=False, vision_depth=2, fullatt_block_indexes=(1,))
  path = tmp_path_factory.mktemp("hf")
  hf.save_pretrained(path)
  for name, text in TOKENIZER_STUBS.items():
    (path / name).write_text(text)
  return hf, path


def test_round_trip_through_the_commands(hf_dir, tmp_path):
  hf, path = hf_dir
  checkpoint, exported = tmp_path / "flax", tmp_path / "exported"
  result = run_module("convert_weights.hf_to_flax", "--hf_dir", str(path), "--out_dir", str(checkpoint))
  assert result.returncode == 0, result.stderr
  assert (checkpoint / "config.json").is_file() and (checkpoint / weights.PARAMS_DIR).is_dir()
  result = run_module("convert_weights.flax_to_hf", "--checkpoint", str(checkpoint), "--out_dir", str(exported),
                      "--dtype", "float32", "--max_shard_size", "200KB")
  assert result.returncode == 0, result.stderr

  index = json.loads((exported / weights.INDEX_FILE).read_text())
  shard_files = sorted(set(index["weight_map"].values()))
  assert len(shard_files) > 1 and all((exported / f).is_file() for f in shard_files)
  assert "model.layers.0.self_attn.q_proj.bias" in index["weight_map"]
  assert "visual.merger.mlp.0.weight" in index["weight_map"] and "lm_head.weight" in index["weight_map"]
  for name, text in TOKENIZER_STUBS.items():
    assert (exported / name).read_text() == text
  assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == tm.EOS_ID

  reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      exported, dtype=torch.float32, attn_implementation="eager").eval()
  original_state, reloaded_state = hf.state_dict(), reloaded.state_dict()
  assert original_state.keys() == reloaded_state.keys()
  for key, value in original_state.items():
    assert torch.equal(value, reloaded_state[key]), key
  ids, mask, pixels, grids = sample_inputs()
  original = hf_logits(hf, ids, mask, pixels, grids)
  error = relative_error(hf_logits(reloaded, ids, mask, pixels, grids), original, mask)
  print(f"\nROUND TRIP fp32 HF -> bbu_jax -> HF: relative logits error {error:.2e}")
  assert error < 1e-6
  # The bbu_jax checkpoint and the sharded published-layout export give transformers' logits in bbu_jax.
  assert relative_error(load_pretrained(checkpoint)(ids, mask, pixels, grids), original, mask) < 1e-4
  assert relative_error(load_pretrained(exported)(ids, mask, pixels, grids), original, mask) < 1e-4
  # A float32 checkpoint restores as bfloat16 on request.
  model, _ = weights.load_model(checkpoint, dtype=jnp.bfloat16)
  assert model.language_model.embed_tokens.embedding[...].dtype == jnp.bfloat16


def test_bfloat16_export_loads_in_transformers(hf_dir, tmp_path):
  hf, path = hf_dir
  model, config = weights.load_model(path)
  out = weights.save_hf(model, config, tmp_path / "bf16", dtype="bfloat16", source_dir=path)
  index = json.loads((out / weights.INDEX_FILE).read_text())
  first = sorted(set(index["weight_map"].values()))[0]
  with safe_open(str(out / first), framework="numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  ids, mask, pixels, grids = sample_inputs(1)
  error = relative_error(hf_logits(reloaded, ids, mask, pixels, grids), hf_logits(hf, ids, mask, pixels, grids), mask)
  print(f"\nEXPORT bf16 weights, fp32 compute: relative logits error {error:.2e}")
  assert 0 < error < 5e-2
  with pytest.raises(ValueError, match="dtype must be one of"):
    weights.save_hf(model, config, tmp_path / "bad", dtype="int8")


def test_export_applies_the_param_transform_hook(hf_dir, tmp_path):
  # The hook LoRA merging uses: it sees the param pure dict and returns the one to export.
  _, path = hf_dir
  model, config = weights.load_model(path)
  seen = []

  def double_final_norm(pure):
    seen.append(sorted(pure))
    pure["language_model"]["norm"]["scale"] = 2 * pure["language_model"]["norm"]["scale"]
    return pure

  out = weights.save_hf(model, config, tmp_path, dtype="float32", transform_params=double_final_norm)
  assert seen == [["language_model", "lm_head", "visual"]]
  index = json.loads((out / weights.INDEX_FILE).read_text())
  with safe_open(str(out / index["weight_map"]["model.norm.weight"]), framework="numpy") as f:
    exported = f.get_tensor("model.norm.weight")
  np.testing.assert_array_equal(exported, 2 * np.asarray(model.language_model.norm.scale[...]))


def test_transformers5_key_layout_and_tied_head_load(tmp_path):
  # transformers' in-memory names (model.language_model.*, model.visual.*) written as they are.
  hf = tm.tiny_hf_model(seed=4, tie_word_embeddings=True, vision_depth=2, fullatt_block_indexes=(0,))
  hf.config.save_pretrained(tmp_path)
  state = {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
  assert any(k.startswith("model.language_model.layers.") for k in state)
  assert any(k.startswith("model.visual.blocks.") for k in state)
  save_file(state, str(tmp_path / weights.SINGLE_FILE), metadata={"format": "pt"})
  ours = load_pretrained(tmp_path)
  assert ours.model.lm_head is None
  ids, mask, pixels, grids = sample_inputs(2)
  assert relative_error(ours(ids, mask, pixels, grids), hf_logits(hf, ids, mask, pixels, grids), mask) < 1e-4


def test_loaded_params_carry_logical_axes_and_requested_sharding(hf_dir):
  _, path = hf_dir
  device = jax.devices()[0]
  seen = []

  def sharding(param_path, abstract):
    seen.append(param_path)
    return jax.sharding.SingleDeviceSharding(device)

  model, _ = weights.load_model(path, dtype=jnp.bfloat16, shardings=sharding)
  params = nnx.state(model, nnx.Param)
  assert len(seen) == len(jax.tree.leaves(params))
  kernel = model.language_model.layers.self_attn.q_proj.kernel
  assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
  assert kernel[...].dtype == jnp.bfloat16 and kernel[...].sharding == jax.sharding.SingleDeviceSharding(device)
  assert model.visual.blocks.attn.qkv.kernel.get_metadata()["out_sharding"][0] == "layers"


SHARDED_LOAD_SCRIPT = """
import sys
import numpy as np
import jax
from bbu_jax.models import weights
from bbu_jax.models.qwen2_5_vl import PretrainedQwen25VL
from bbu_jax.parallel import sharding
from flax import nnx

path = sys.argv[1]
config = weights.read_config(path)
mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
abstract = weights.abstract_model(config)
shardings = sharding.tree_shardings(nnx.state(abstract, nnx.Param), sharding.param_rules("fsdp"), mesh)
model, _ = weights.load_model(path, shardings=shardings)
q = model.language_model.layers.self_attn.q_proj.kernel[...]
embed = model.language_model.embed_tokens.embedding[...]
assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), q.sharding
assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp"), embed.sharding
assert len(q.addressable_shards) == 4 and q.addressable_shards[0].data.shape == (2, 32, 32)
reference, _ = weights.load_model(path)
ids = np.array([[5, 7, 9, 11, 13, 2]])
ours = np.asarray(PretrainedQwen25VL(model, config)(ids))
ref = np.asarray(PretrainedQwen25VL(reference, config)(ids))
np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
print("SHARDED LOAD OK")
"""


def test_streamed_load_into_a_four_device_mesh(hf_dir, tmp_path):
  _, path = hf_dir
  script = tmp_path / "sharded_load.py"
  script.write_text(SHARDED_LOAD_SCRIPT)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  result = subprocess.run([sys.executable, str(script), str(path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0 and "SHARDED LOAD OK" in result.stdout, result.stderr[-3000:]


def test_loading_reads_each_tensor_once_and_only_after_validation(hf_dir, monkeypatch):
  _, path = hf_dir
  reads = []
  real_safe_open = weights.safe_open

  class CountingHandle:
    def __init__(self, handle):
      self.handle = handle

    def __getattr__(self, name):
      return getattr(self.handle, name)

    def get_tensor(self, name):
      reads.append(name)
      return self.handle.get_tensor(name)

  class CountingOpen:
    def __init__(self, *args, **kwargs):
      self.inner = real_safe_open(*args, **kwargs)

    def __enter__(self):
      return CountingHandle(self.inner.__enter__())

    def __exit__(self, *exc):
      return self.inner.__exit__(*exc)

  monkeypatch.setattr(weights, "safe_open", CountingOpen)
  weights.load_model(path)
  assert len(reads) == len(set(reads)) == len(weights.hf_torch_shapes(weights.read_config(path)))


# --- Bad input --------------------------------------------------------------------------------------


@pytest.fixture()
def broken_copy(hf_dir, tmp_path):
  """A fresh, sharded (published layout) copy of the tiny checkpoint to damage."""
  _, path = hf_dir
  model, config = weights.load_model(path)
  return weights.save_hf(model, config, tmp_path / "broken", dtype="float32", max_shard_size="150KB")


def _assert_refused(path, *fragments):
  with pytest.raises(ValueError) as info:
    load_pretrained(path)
  message = str(info.value)
  for fragment in fragments:
    assert fragment in message, message
  return message


def test_directory_without_config_is_refused(tmp_path):
  _assert_refused(tmp_path, str(tmp_path / "config.json"), "missing")


def test_other_model_type_is_refused(broken_copy):
  config = json.loads((broken_copy / "config.json").read_text())
  config["model_type"] = "llama"
  (broken_copy / "config.json").write_text(json.dumps(config))
  _assert_refused(broken_copy, str(broken_copy / "config.json"), "llama")


def test_missing_shard_file_is_refused(broken_copy):
  index = json.loads((broken_copy / weights.INDEX_FILE).read_text())
  shard = sorted(set(index["weight_map"].values()))[1]
  a_tensor = next(k for k, f in index["weight_map"].items() if f == shard)
  (broken_copy / shard).unlink()
  message = _assert_refused(broken_copy, str(broken_copy / shard), "shard file missing", a_tensor)
  assert "(1 problem(s))" in message  # its tensors are not listed again one by one


def _rewrite_shard(directory, tensor, change):
  index = json.loads((directory / weights.INDEX_FILE).read_text())
  shard = directory / index["weight_map"][tensor]
  with safe_open(str(shard), framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  change(tensors)
  save_file(tensors, str(shard), metadata={"format": "pt"})
  return shard


def test_wrong_shape_is_refused(broken_copy):
  tensor = "model.layers.1.mlp.up_proj.weight"

  def shrink(tensors):
    tensors[tensor] = tensors[tensor][:-1]

  shard = _rewrite_shard(broken_copy, tensor, shrink)
  message = _assert_refused(broken_copy, str(shard), tensor, "expected")
  assert "(143, 64)" in message and "(144, 64)" in message


def test_missing_tensor_is_refused(broken_copy):
  tensor = "visual.blocks.1.attn.qkv.bias"

  def drop(tensors):
    del tensors[tensor]

  shard = _rewrite_shard(broken_copy, tensor, drop)
  _assert_refused(broken_copy, str(shard), tensor, "absent")


def test_missing_tensor_in_single_file_and_unexpected_tensor_are_refused(hf_dir, tmp_path):
  _, path = hf_dir
  shutil.copyfile(path / "config.json", tmp_path / "config.json")
  with safe_open(str(path / weights.SINGLE_FILE), framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  del tensors["model.norm.weight"]
  tensors["model.layers.9.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
  save_file(tensors, str(tmp_path / weights.SINGLE_FILE))
  message = _assert_refused(tmp_path, f"{tmp_path / weights.SINGLE_FILE}: tensor 'model.norm.weight' is missing",
                            "unexpected tensor",
                            "model.layers.9.mlp.up_proj.weight", str(tmp_path / weights.SINGLE_FILE))
  assert "2 problem(s)" in message


def test_bbu_checkpoint_that_does_not_match_its_config_is_refused(hf_dir, tmp_path):
  _, path = hf_dir
  model, config = weights.load_model(path)
  checkpoint = weights.save_checkpoint(model, config, tmp_path / "ckpt")
  raw = json.loads((checkpoint / "config.json").read_text())
  raw["intermediate_size"] = 160
  (checkpoint / "config.json").write_text(json.dumps(raw))
  _assert_refused(checkpoint, "language_model/layers/mlp/up_proj/kernel", "expected", str(checkpoint))


def test_parse_size():
  assert weights.parse_size("5GB") == 5 * 10**9
  assert weights.parse_size("200KB") == 200_000
  assert weights.parse_size("2GiB") == 2 * 2**30
  assert weights.parse_size(123) == 123
  with pytest.raises(ValueError, match="not a size"):
    weights.parse_size("big")


def test_command_reports_bad_input_in_one_line(tmp_path):
  result = run_module("convert_weights.hf_to_flax", "--hf_dir", str(tmp_path), "--out_dir", str(tmp_path / "o"))
  assert result.returncode == 1
  assert "config.json" in result.stderr and "Traceback" not in result.stderr


def test_loading_holds_one_parameter_buffer_at_a_time(tmp_path):
  import dataclasses
  import tracemalloc

  from bbu_jax.models.config import Qwen25VLConfig
  from bbu_jax.models.qwen2_5_vl import Qwen25VL
  tiny = Qwen25VLConfig.from_hf_dict(tm.tiny_hf_config().to_dict())
  # Weights large enough (~50 MB) that Python's own allocations during loading do not matter.
  config = dataclasses.replace(
      tiny, text=dataclasses.replace(tiny.text, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=2, vocab_size=4096,
                                     mrope_section=(8, 12, 12)),
      vision=dataclasses.replace(tiny.vision, out_hidden_size=512))
  weights.save_hf(Qwen25VL(config, rngs=nnx.Rngs(0)), config, tmp_path, dtype="float32")
  shapes = weights.hf_torch_shapes(config)
  total = 4 * sum(int(np.prod(s)) for s in shapes.values())
  tracemalloc.start()
  try:
    model, _ = weights.load_model(tmp_path)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert model.language_model.layers.mlp.up_proj.kernel[...].shape == (4, 512, 1408)
  # Host memory peaks at one parameter buffer plus one tensor being read (which safetensors may hold
  # twice while converting), plus Python's own small change: far below a second copy of the weights.
  largest_param = 4 * 4 * 512 * 1408
  largest_tensor = 4 * max(int(np.prod(s)) for s in shapes.values())
  print(f"\nLOAD host peak {peak / 1e6:.1f} MB for {total / 1e6:.1f} MB of weights")
  assert peak < largest_param + 2 * largest_tensor + 2e6 < total / 2
