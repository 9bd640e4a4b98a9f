"""Fine-tuning a pretrained Hugging Face checkpoint with LoRA: `python -m bbu_jax.train` starts from
model_path's weights, trains only the adapters (and the detection head) with the base frozen, and the
run's model exports, adapters merged, to a directory transformers loads with the same logits."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

import _tiny_models as tm  # noqa: E402
from convert_weights import flax_to_hf  # noqa: E402
from bbu_jax.data import records as records_lib  # noqa: E402
from bbu_jax.data import synthetic  # noqa: E402
from bbu_jax.data.chat import ChatConfig, tokenizer_training_texts  # noqa: E402
from bbu_jax.data.images import ImageProcessorConfig  # noqa: E402
from bbu_jax.data.tokenizer import Tokenizer, train_bpe_tokenizer  # noqa: E402
from bbu_jax.models import bbu_model, weights  # noqa: E402
from bbu_jax.models.qwen2_5_vl import PretrainedQwen25VL  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "configs" / "tiny.py"
LORA_RANK = 4


def tiny_run_config(root: pathlib.Path):
  """tests/configs/tiny.py as the training run will read it (its paths under `root`)."""
  os.environ["BBU_TEST_ROOT"] = str(root)
  try:
    spec = importlib.util.spec_from_file_location("tiny_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
  finally:
    del os.environ["BBU_TEST_ROOT"]


def pretrained_dir(path: pathlib.Path, run_config) -> pathlib.Path:
  """A random transformers Qwen2.5-VL with the tiny config's shapes and a BPE tokenizer trained on the
  run's synthetic answers (generated here as the run would), saved as a Hugging Face directory."""
  c = run_config
  synthetic.generate(c.data_root, c.synthetic.num_train, c.synthetic.num_val, c.synthetic.num_teacher, seed=c.seed,
                     scale=c.synthetic.scale)
  records, _ = records_lib.load_records(c.train_data_path)
  chat_config = ChatConfig(prompt_language=c.prompt_language,
                           images=ImageProcessorConfig(min_pixels=c.min_pixels, max_pixels=c.max_pixels))
  tokenizer = train_bpe_tokenizer(tokenizer_training_texts(records, chat_config), vocab_size=c.tokenizer_vocab_size)
  ids = tokenizer.special
  config = transformers.Qwen2_5_VLConfig(
      text_config=dict(
          vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=4096,
          hidden_act="silu",
          rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
          bos_token_id=ids.bos_token_id, eos_token_id=ids.eos_token_id, pad_token_id=ids.pad_token_id,
          tie_word_embeddings=True),
      vision_config=dict(
          depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=tm.PATCH_SIZE,
          temporal_patch_size=tm.TEMPORAL_PATCH, spatial_merge_size=tm.MERGE, window_size=112,
          fullatt_block_indexes=[1], out_hidden_size=32, tokens_per_second=2, hidden_act="silu"),
      image_token_id=ids.image_token_id, video_token_id=ids.video_token_id,
      vision_start_token_id=ids.vision_start_token_id, vision_end_token_id=ids.vision_end_token_id,
      tie_word_embeddings=True)
  torch.manual_seed(0)
  model = transformers.Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
  tm.randomize_(model, seed=7)
  model.save_pretrained(path)
  tokenizer.save(path)
  return path


def flat_params(pure, prefix=()):
  for name, child in pure.items():
    if isinstance(child, dict):
      yield from flat_params(child, prefix + (name,))
    else:
      yield prefix + (name,), np.asarray(child)


def run(*args, root):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), BBU_TEST_ROOT=str(root))
  out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  root = tmp_path_factory.mktemp("finetune")
  hf_path = pretrained_dir(root / "pretrained", tiny_run_config(root))
  run("bbu_jax.train", f"--config={CONFIG}", f"--config.model_path={hf_path}", "--config.llm_lr=0",
      "--config.vision_lr=0", "--config.merger_lr=0", f"--config.lora.rank={LORA_RANK}", "--config.adapter_lr=1e-3",
      "--config.max_steps=3", "--config.save_steps=3", root=root)
  return root, hf_path, root / "runs" / "tiny"


def test_base_weights_stay_the_pretrained_ones_and_only_adapters_and_head_train(finetuned):
  _, hf_path, run_dir = finetuned
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  losses = [row["loss"] for row in rows if row["split"] == "train"]
  assert len(losses) == 3 and all(np.isfinite(losses))
  model = bbu_model.load(run_dir / "model")
  assert model.lora_config is not None and model.lora_config.rank == LORA_RANK
  assert model.detection_head is not None
  trained = dict(flat_params(nnx.state(model, nnx.Param).to_pure_dict()))

  config = weights.read_config(hf_path)
  pretrained = dict(flat_params(weights.load_hf_params(hf_path, config, weights.abstract_model(config))))
  for path, value in pretrained.items():  # every base weight, bit for bit: the run started from them, frozen
    np.testing.assert_array_equal(trained[path], value, err_msg="/".join(path))
  adapters = {p: v for p, v in trained.items() if "lora_b" in p}
  assert len(adapters) == len(model.lora_config.targets)
  for path, value in adapters.items():  # lora_b starts at zero: non-zero means the adapter group trained
    assert np.abs(value).max() > 0, "/".join(path)
  assert set(trained) - set(pretrained) - {p for p in trained if "lora" in p[-1]} == \
      {p for p in trained if p[0] == "detection_head"}


def test_export_merges_adapters_and_transformers_gives_our_logits(finetuned, capsys):
  root, hf_path, run_dir = finetuned
  out_dir = root / "exported"
  assert flax_to_hf.main(["--checkpoint", str(run_dir / "model"), "--out_dir", str(out_dir), "--dtype", "float32"]) == 0
  printed = capsys.readouterr().out
  assert f"LoRA rank {LORA_RANK} merged" in printed and "detection head not exported" in printed
  index = json.loads((out_dir / weights.INDEX_FILE).read_text())
  assert not [k for k in index["weight_map"] if "lora" in k or "detection" in k]
  assert (out_dir / "tokenizer.json").is_file()

  ours = bbu_model.load(run_dir / "model")
  config = ours.config
  tokenizer = Tokenizer.from_dir(out_dir)
  rng = np.random.default_rng(0)
  grid = np.array([[1, 6, 8]])
  text = lambda n: rng.integers(0, tokenizer.vocab_size - 22, n)
  s = tokenizer.special
  row = np.concatenate([text(5), [s.vision_start_token_id], [s.image_token_id] * (48 // 4), [s.vision_end_token_id],
                        text(7)])
  ids, mask = row[None].astype(np.int64), np.ones((1, len(row)), np.int64)
  pixels = tm.random_patches(rng, grid)
  logits = np.asarray(PretrainedQwen25VL(ours, config)(ids, mask, pixels, grid), np.float64)

  exported = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      out_dir, attn_implementation="eager", dtype=torch.float32).eval()
  original = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      hf_path, attn_implementation="eager", dtype=torch.float32).eval()
  kwargs = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                pixel_values=torch.as_tensor(pixels), image_grid_thw=torch.as_tensor(grid),
                mm_token_type_ids=torch.as_tensor(ids == s.image_token_id).to(torch.int32))
  with torch.no_grad():
    theirs = exported(**kwargs).logits.double().numpy()
    before = original(**kwargs).logits.double().numpy()
  error = np.linalg.norm(theirs - logits) / np.linalg.norm(logits)
  change = np.linalg.norm(before - logits) / np.linalg.norm(logits)
  print(f"\nfine-tuned export vs our adapted model: relative error {error:.2e} "
        f"(fine-tuning moved the logits by {change:.2e})")
  assert error < 1e-5
  assert change > 10 * error  # the merged adapters are in the export, not just the pretrained weights
