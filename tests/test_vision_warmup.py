"""The vision warm-up (`vision_warmup_steps`): its steps train only the vision tower and the detection
head's dense proposals; after it, the whole model trains. A real tiny run (tests/configs/tiny.py) as a
subprocess, its checkpoints compared parameter by parameter."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import _tiny_models as tm
from bbu_jax import config as config_lib
from bbu_jax import train as train_lib
from bbu_jax.data.tokenizer import Tokenizer
from bbu_jax.parallel import sharding
from bbu_jax.training import program as program_lib
from bbu_jax.training.checkpoint import Checkpointer

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "configs" / "tiny.py"
WARMUP = 2
RUN = {"max_steps": WARMUP + 1, "vision_warmup_steps": WARMUP, "save_steps": 1, "save_total_limit": 10,
       "weight_decay": 0.0, "warmup_ratio": 0.0, "eval_steps": 0, "detection_proposal_weight": 1.0}
# What a warm-up step may change: the vision tower (merger included) and the head's path from the vision
# features to the dense proposals.
WARM_PREFIXES = ("visual/", "detection_head/vision_adapter/", "detection_head/vision_proj/",
                 "detection_head/vision_position_proj/", "detection_head/memory_norm/",
                 "detection_head/proposal_hidden/", "detection_head/proposal_out/")


def _config(root: pathlib.Path):
  return tm.tiny_run_config(root, **RUN)


def _params_by_step(config, run_dir: pathlib.Path) -> dict[int, dict[str, np.ndarray]]:
  tokenizer = Tokenizer.from_dir(run_dir / "tokenizer")
  model_config = train_lib.build_model_config(config, tokenizer)
  program = program_lib.build_program(config, model_config, train_lib.detection_config(config, model_config),
                                      sharding.make_mesh(config.mesh), config.max_steps)
  checkpointer = Checkpointer(run_dir / "checkpoints")
  out = {}
  try:
    for step in range(1, config.max_steps + 1):
      _, state, _, _ = checkpointer.restore(program.abstract_sharded_state(), step=step)
      model = nnx.merge(program.graphdef, state.trainable, state.frozen)
      out[step] = {"/".join(str(k) for k in path): np.asarray(v.get_value())
                   for path, v in nnx.state(model, nnx.Param).flat_state()}
  finally:
    checkpointer.close()
  return out


@pytest.mark.slow
def test_warmup_steps_train_only_the_vision_path_then_everything_trains(tmp_path):
  env = {**os.environ, "BBU_TEST_ROOT": str(tmp_path), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  overrides = [f"--config.{k}={v}" for k, v in RUN.items()]
  done = subprocess.run([sys.executable, "-m", "bbu_jax.train", f"--config={CONFIG}", *overrides], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"vision warm-up done after {WARMUP} steps" in done.stderr
  run_dir = tmp_path / "runs" / "tiny"
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  train_rows = {r["step"]: r for r in rows if r["split"] == "train"}
  assert train_rows[1]["lm_loss"] == 0.0 and train_rows[1]["proposal_box_loss"] > 0  # warm-up: proposals only
  assert train_rows[WARMUP + 1]["lm_loss"] > 0

  params = _params_by_step(_config(tmp_path), run_dir)
  warm = lambda name: name.startswith(WARM_PREFIXES)
  moved = lambda name, a, b: not np.array_equal(params[a][name], params[b][name])
  names = sorted(params[1])
  assert any(warm(n) for n in names) and any(not warm(n) for n in names)
  for name in names:  # step 1 -> 2 is a warm-up step
    assert moved(name, 1, 2) == warm(name), f"{name}: {'moved' if moved(name, 1, 2) else 'still'} in a warm-up step"
  frozen_after = [name for name in names if not moved(name, WARMUP, WARMUP + 1)]
  # After the warm-up the decoder, the queries and the caption decoder train too.
  assert not [n for n in frozen_after if n.startswith(("language_model/", "detection_head/layers/"))], frozen_after


def test_full_steps_after_the_warmup_get_their_own_warmup_and_cosine():
  """With vision_warmup_steps W of T steps, every group's learning rate runs warm-up + cosine over the
  first W steps and again over the last T - W: the language model, which starts at step W, starts at
  its peak's warm-up, not at the tail of one long cosine."""
  from bbu_jax.training import optimizer as optimizer_lib
  config = config_lib.base_config()
  config.llm_lr, config.warmup_ratio, config.vision_warmup_steps = 1e-3, 0.1, 100
  schedule = optimizer_lib.make_schedules(config, 300)["llm"]
  lr = np.array([float(schedule(step)) for step in range(300)])
  assert lr[0] == 0.0 and lr[100] == 0.0  # each phase starts its own linear warm-up
  assert lr[10] == pytest.approx(1e-3) and lr[120] == pytest.approx(1e-3)  # 10% of 100, 10% of 200 steps
  assert lr[99] < 1e-5 and lr[299] < 1e-6
  assert np.argmax(lr[100:]) == 20
  config.vision_warmup_steps = 0
  plain = optimizer_lib.make_schedules(config, 300)["llm"]
  assert float(plain(100)) > 0.5e-3 and float(plain(30)) == pytest.approx(1e-3)
