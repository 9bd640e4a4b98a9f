"""`python -m bbu_jax.aot` compiles the real train step of a small config for a TPU topology on this
CPU-only machine (libtpu), and its analytic FLOP count and batch search behave."""

import os
import pathlib
import subprocess
import sys
import types

import pytest

from bbu_jax import aot
from bbu_jax.models.config import named_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _has_libtpu() -> bool:
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def test_decoder_flops_match_six_n_per_token_plus_attention():
  c = named_config("qwen2_5_vl_3b")
  t = c.text
  seq = 1024
  flops = aot.decoder_flops_per_row(c, seq)
  layer_params = (t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
                  + t.num_attention_heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
  # Forward: 2 FLOPs per weight per token; the 3B decoder has ~2.8e9 weights in its layers.
  assert 2.5e9 < layer_params * t.num_hidden_layers < 3.1e9
  assert flops["decoder"] == 2 * layer_params * t.num_hidden_layers * seq
  assert flops["decoder_attention"] == 4 * seq * seq * t.num_attention_heads * t.head_dim * t.num_hidden_layers
  step = aot.train_flops_per_step(c, rows=2, seq_len=seq, patches=0, head_params=0, head_tokens_per_row=0)
  assert step["decoder"] == 3 * 2 * flops["decoder"]
  assert step["vision"] == 0 and step["vision_attention"] == 0


def test_attention_flops_grow_with_the_square_of_the_row():
  c = named_config("qwen2_5_vl_3b")
  short, long = aot.vision_flops_per_row(c, 256), aot.vision_flops_per_row(c, 512)
  assert long["vision_attention"] == 4 * short["vision_attention"]
  assert long["vision"] == pytest.approx(2 * short["vision"])


def test_batch_search_finds_the_largest_fitting_batch():
  tried = []

  def try_batch(b):
    tried.append(b)
    return types.SimpleNamespace(fits=b <= 11)

  best, reports = aot.largest_fitting_batch(try_batch)
  assert best == 11
  assert set(reports) == set(tried) and 12 in tried and len(tried) <= 8
  assert aot.largest_fitting_batch(lambda b: types.SimpleNamespace(fits=False))[0] == 0
  assert aot.largest_fitting_batch(lambda b: types.SimpleNamespace(fits=True), limit=16)[0] == 16


def test_unknown_chip_is_refused_by_name():
  with pytest.raises(ValueError, match="unknown TPU device kind 'TPU v9'"):
    aot.chip_for("TPU v9")


@pytest.mark.slow
@pytest.mark.skipif(not _has_libtpu(), reason="libtpu is not installed (pip install libtpu): it compiles for TPU")
def test_aot_compiles_the_tiny_config_for_a_v5e_slice():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-m", "bbu_jax.aot", f"--config={REPO / 'tests/configs/tiny.py'}",
                         "--topology=v5e:2x2", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                         "--config.sharding_mode=fsdp", "--mfu=0.5"],
                        env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
  assert done.returncode == 0, done.stderr[-4000:]
  out = done.stdout
  assert "v5e:2x2: 4 x v5e (16.00 GiB HBM each), mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in out
  per_chip = next(line for line in out.splitlines() if line.strip().startswith("per chip:"))
  assert per_chip.endswith(": fits")
  for part in ("parameters", "optimizer", "activations/temporaries", "total"):
    assert part in per_chip
  assert "at MFU 0.50:" in out and "s per step" in out


def test_the_compilers_out_of_memory_figure_is_read_from_its_error():
  message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required "
             "for HLO temporaries (493.99G) exceeds available HBM (15.75G). HLO module: jit_train_step.")
  assert aot.hbm_oom_temporaries(message) == int(493.99 * 2**30)
  assert aot.hbm_oom_temporaries("INTERNAL: something else") is None
