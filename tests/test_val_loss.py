"""Validation loss during training, best-by-val-loss checkpoints, and the stop on a non-finite loss.

Real tiny runs (tests/configs/tiny.py) as subprocesses: `val_*` metrics at every `eval_steps` and at the
end, equal to a recomputation outside the run on the same validation samples (numpy cross-entropy from
the model's logits, in the run's batches); the checkpoint with the lowest val_loss kept
beside the newest and exported by `load_best_model_at_end`; and a batch whose images turn into Inf
stopping the run non-zero, naming the step and its samples, with no checkpoint of the bad state.
"""

import collections
import json
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny_models as tm
from bbu_jax import config as config_lib
from bbu_jax import train as train_lib
from bbu_jax.data import packing
from bbu_jax.data import pipeline as pipeline_lib
from bbu_jax.data.chat import ChatProcessor
from bbu_jax.data.tokenizer import Tokenizer
from bbu_jax.models import bbu_model
from bbu_jax.models.detection_head import DetectionLossWeights
from bbu_jax.parallel import sharding
from bbu_jax.training import program as program_lib
from bbu_jax.training import step as step_lib
from bbu_jax.training.checkpoint import Checkpointer

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "configs" / "tiny.py"

# A learning rate that rises over the whole run (warmup_ratio 1) to a value too high for this model, so that the
# validation loss rises after the first evaluation (measured: 32.1 at step 2, 44.6, 46.0, 72.2 at step 7)
# and the best checkpoint is not the last one.
LR = 0.2
STEPS = 7
VAL_RUN = {"max_steps": STEPS, "eval_steps": 2, "save_steps": 2, "save_total_limit": 1,
           "load_best_model_at_end": True, "warmup_ratio": 1.0, "log_steps": 1,
           "vision_lr": LR, "merger_lr": LR, "llm_lr": LR, "detection_lr": LR}
DETECTION_TERMS = ("bbox_l1", "giou", "objectness", "caption", "proposal_objectness", "proposal_box")

# Runs bbu_jax.train with the train step's input poisoned at call BBU_POISON_STEP: the batch's pixels become
# +Inf (an image that decodes to Inf), and the real forward pass turns them into a NaN loss.
_LAUNCHER = '''
import json, os
import jax.numpy as jnp
import numpy as np
from bbu_jax.training import program

poison_step = int(os.environ["BBU_POISON_STEP"])
build_program = program.build_program

def build_poisoned_program(*args, **kwargs):
  built = build_program(*args, **kwargs)
  train_step, calls = built.train_step, [0]

  def poisoned_train_step(state, batch):
    calls[0] += 1
    if calls[0] == poison_step:
      batch = dict(batch, pixel_values=batch["pixel_values"] + jnp.inf)
      with open(os.environ["BBU_POISON_IDS"], "w") as f:
        json.dump(np.asarray(batch["sample_ids"]).reshape(-1).tolist(), f)
    return train_step(state, batch)

  built.train_step = poisoned_train_step
  return built

program.build_program = build_poisoned_program
from bbu_jax import train
train.main()
'''


def _config(root: pathlib.Path, **fields) -> config_lib.ml_collections.ConfigDict:
  return tm.tiny_run_config(root, **fields)


def _overrides(fields: dict) -> list[str]:
  return [f"--config.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in fields.items()]


def _train(root: pathlib.Path, fields: dict, *, launcher: pathlib.Path | None = None,
           **env: str) -> subprocess.CompletedProcess:
  entry = [str(launcher)] if launcher else ["-m", "bbu_jax.train"]
  env = {**os.environ, "BBU_TEST_ROOT": str(root), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}
  return subprocess.run([sys.executable, *entry, f"--config={CONFIG}", *_overrides(fields)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=900)


def _rows(run_dir: pathlib.Path, split: str) -> dict[int, dict]:
  rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
  return {row["step"]: row for row in rows if row["split"] == split}


def _steps(checkpoints: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def val_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("val_run")
  done = _train(root, VAL_RUN)
  assert done.returncode == 0, done.stderr[-3000:]
  return root, root / "runs" / "tiny", done.stderr


# --- Validation loss -----------------------------------------------------------------------------


@pytest.mark.slow
def test_val_loss_is_logged_at_every_eval_steps_and_at_the_end(val_run):
  _, run_dir, stderr = val_run
  val = _rows(run_dir, "val")
  assert sorted(val) == [2, 4, 6, 7]  # every eval_steps=2, and the end
  for row in val.values():
    for name in ("loss", "lm_loss", "student_lm_loss", *(f"{t}_loss" for t in DETECTION_TERMS)):
      assert np.isfinite(row[f"val_{name}"]), (name, row)
    assert row["val_samples"] >= 1 and row["val_batches"] >= 1
    assert "val_teacher_lm_loss" not in row  # validation draws no teachers
  assert sorted(_rows(run_dir, "train")) == list(range(1, STEPS + 1))  # training rows unchanged beside them
  for step, row in val.items():  # the console says it in words
    assert f"step {step}: validation loss {row['val_loss']:.4f} (language model {row['val_lm_loss']:.4f}" in stderr
  events = b"".join(p.read_bytes() for p in (run_dir / "tb").iterdir())
  assert b"val/loss" in events and b"val/caption_loss" in events and b"train/loss" in events


def _validation_batches(config, run_dir: pathlib.Path, tmp_path: pathlib.Path) -> tuple[list[dict], dict]:
  """The validation split through the run's ChatProcessor and packing in the run's batches (its training
  rows, the last batch completed with empty rows), and the pieces to rebuild the model.

  The same batches, not merely the same samples: at a checkpoint with large weights (this test's high
  learning rate) the caption loss's float32 rounding differs by 2e-4 relative between 1-row and 2-row
  batches, while in the same batches it agrees to 1e-7."""
  tokenizer = Tokenizer.from_dir(run_dir / "tokenizer")
  chat_config = pipeline_lib.chat_config_from(config)
  model_config = train_lib.build_model_config(config, tokenizer)
  records = train_lib.load_split(config.val_data_path, config, tmp_path, "val")
  rows = config.per_device_train_batch_size
  pipeline_config = pipeline_lib.pipeline_config_from(config, model_config.vision, batch_size=rows, is_training=False,
                                                      max_caption_tokens=chat_config.max_caption_tokens)
  dataset = pipeline_lib.build_dataset(records, ChatProcessor(tokenizer, chat_config), pipeline_config,
                                       model_config.vision, data_root=config.data_root)
  empty = packing.collate_rows([packing.empty_row(pipeline_config.packing, model_config.vision)] * rows)
  batches = []
  for batch in dataset:
    missing = rows - batch["input_ids"].shape[0]
    batch = {k: np.concatenate([v, empty[k][:, :missing] if k == "positions" else empty[k][:missing]],
                               axis=1 if k == "positions" else 0) for k, v in batch.items()}
    batches.append(dict(batch, sample_ids=batch["sample_ids"].astype(np.int32)))
  return batches, {"model_config": model_config, "det_config": train_lib.detection_config(config, model_config)}


def _recomputed_val_losses(model, batches: list[dict], config) -> dict[str, float]:
  """The validation losses of `model`, written out here: student answer-token cross-entropy in float64 from
  the logits; detection sums from the model's loss terms over the matched boxes and caption tokens."""
  graphdef, params = nnx.split(model)
  det_weights = DetectionLossWeights(bbox_weight=config.detection_bbox_weight,
                                     caption_weight=config.detection_caption_weight)

  @jax.jit
  def forward(params, batch):
    model = nnx.merge(graphdef, params)
    logits, _, _ = model.forward_features(batch)
    return logits, bbu_model.loss_terms(model, batch, None, det_weights=det_weights)

  sums = collections.defaultdict(float)
  for batch in batches:
    logits, terms = jax.device_get(forward(params, jax.tree.map(jnp.asarray, batch)))
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_z = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
    ce = log_z - np.take_along_axis(logits, batch["target_ids"][..., None], -1)[..., 0]
    assert batch["teacher_loss_mask"].sum() == 0
    sums["student_lm"] += float((ce * batch["student_loss_mask"]).sum())
    sums["student_tokens"] += float(batch["student_loss_mask"].sum())
    for name in DETECTION_TERMS:
      sums[name] += float(terms[f"{name}_sum"])
    denominators = bbu_model.global_normalizers(batch, eos_token_id=model.config.eos_token_id,
                                                merge_size=model.config.vision.spatial_merge_size)
    for name in DETECTION_TERMS:
      sums[f"{name}_count"] += float(denominators[name])
  out = {"val_student_lm_loss": sums["student_lm"] / sums["student_tokens"]}
  out["val_lm_loss"] = out["val_student_lm_loss"]  # no teacher tokens: the weighted mean is the student's
  for name in DETECTION_TERMS:
    out[f"val_{name}_loss"] = sums[name] / max(sums[f"{name}_count"], 1.0)
  out["val_loss"] = (out["val_lm_loss"]
                     + config.detection_bbox_weight * (out["val_bbox_l1_loss"] + out["val_giou_loss"])
                     + DetectionLossWeights().objectness_weight * out["val_objectness_loss"]
                     + config.detection_caption_weight * out["val_caption_loss"]
                     + config.detection_proposal_weight
                     * (DetectionLossWeights().objectness_weight * out["val_proposal_objectness_loss"]
                        + config.detection_bbox_weight * out["val_proposal_box_loss"]))
  return out


def _restore_model(config, run_dir: pathlib.Path, pieces: dict, step: int):
  program = program_lib.build_program(config, pieces["model_config"], pieces["det_config"],
                                      sharding.make_mesh(config.mesh), config.max_steps)
  checkpointer = Checkpointer(run_dir / "checkpoints")
  try:
    restored_step, state, _, meta = checkpointer.restore(program.abstract_sharded_state(), step=step)
  finally:
    checkpointer.close()
  assert restored_step == step and meta == {"step": step}
  return nnx.merge(program.graphdef, state.trainable, state.frozen), state


def _assert_close(logged: dict, recomputed: dict, what: str) -> None:
  for name, value in recomputed.items():
    assert logged[name] == pytest.approx(value, rel=2e-5, abs=1e-6), f"{what}: {name}"


@pytest.mark.slow
def test_best_checkpoint_is_kept_exported_and_its_val_loss_recomputes(val_run, tmp_path):
  root, run_dir, stderr = val_run
  config = _config(root, **VAL_RUN)
  val = _rows(run_dir, "val")
  best = min(val, key=lambda s: val[s]["val_loss"])
  assert best != STEPS, (f"the validation loss fell at every evaluation ({[val[s]['val_loss'] for s in sorted(val)]}), "
                     "so the best checkpoint is the last and this test cannot tell them apart: raise LR")
  # save_total_limit=1 keeps the newest; the best by val_loss stays beside it; the others went.
  assert _steps(run_dir / "checkpoints") == [best, STEPS]
  checkpointer = Checkpointer(run_dir / "checkpoints")
  assert checkpointer.best_step() == best
  assert checkpointer.metrics(best)["val_loss"] == pytest.approx(val[best]["val_loss"])
  checkpointer.close()
  assert f"load_best_model_at_end: exporting checkpoint {best}" in stderr

  batches, pieces = _validation_batches(config, run_dir, tmp_path)
  assert sum(int((b["sample_ids"] >= 0).sum()) for b in batches) == val[best]["val_samples"]
  for step in (best, STEPS):  # the run's jitted eval step and sums == a recomputation written out here
    model, _ = _restore_model(config, run_dir, pieces, step)
    _assert_close(val[step], _recomputed_val_losses(model, batches, config), f"checkpoint {step}")

  exported = bbu_model.load(run_dir / "model")
  best_model, _ = _restore_model(config, run_dir, pieces, best)
  exported_params = nnx.state(exported, nnx.Param).flat_state()
  best_params = dict(nnx.state(best_model, nnx.Param).flat_state())
  assert len(exported_params) == len(best_params)
  for path, value in exported_params:
    np.testing.assert_array_equal(np.asarray(value.get_value()), np.asarray(best_params[path].get_value()),
                                  err_msg=str(path))


def test_validation_loss_adds_up_the_split_pads_the_last_batch_and_stops_at_eval_max_batches():
  """validation_loss on a stub eval step: one shape for every batch, sums over the split before dividing."""
  rows, seq = 2, 4

  def host_batch(n_rows, first_id):
    ids = np.arange(first_id, first_id + n_rows)
    return {"input_ids": np.ones((n_rows, seq), np.int32), "positions": np.zeros((3, n_rows, seq), np.int32),
            "student_loss_mask": np.ones((n_rows, seq), np.float32) * (1 + ids[:, None]),
            "sample_ids": np.stack([ids, np.full(n_rows, -1)], axis=1).astype(np.int64)}

  empty = {"input_ids": np.zeros((rows, seq), np.int32), "positions": np.zeros((3, rows, seq), np.int32),
           "student_loss_mask": np.zeros((rows, seq), np.float32), "sample_ids": np.full((rows, 2), -1, np.int64)}
  shapes = []

  def eval_step(trainable, frozen, batch):  # row i's tokens weigh i + 1 and each loses i + 1
    shapes.append(batch["input_ids"].shape)
    mask = batch["student_loss_mask"]
    tokens = mask.sum()
    terms = {"teacher_lm_sum": jnp.zeros(()), "teacher_tokens": jnp.zeros(()),
             "student_lm_sum": (mask * mask).sum(), "student_tokens": tokens}
    return {"terms": terms, "normalizers": {"lm": tokens}}

  program = SimpleNamespace(eval_step=eval_step, loss_weights=step_lib.LossWeights())
  state = SimpleNamespace(trainable=None, frozen=None)
  mesh = sharding.make_mesh(config_lib.base_config().mesh)
  batches = [host_batch(2, 0), host_batch(2, 2), host_batch(1, 4)]
  val = train_lib.validation_loss(program, state, batches, empty_batch=empty, mesh=mesh)
  assert shapes == [(1, rows, seq)] * 3  # the last batch completed with an empty row
  assert val["val_samples"] == 5 and val["val_batches"] == 3
  # The split's sums over its denominators (4 tokens a row): not the mean of the batch means (3.41).
  whole = sum(4 * (i + 1) ** 2 for i in range(5)) / sum(4 * (i + 1) for i in range(5))
  assert val["val_loss"] == pytest.approx(whole) and val["val_student_lm_loss"] == pytest.approx(whole)
  val = train_lib.validation_loss(program, state, batches, empty_batch=empty, mesh=mesh, max_batches=2)
  assert val["val_samples"] == 4 and val["val_batches"] == 2
  assert val["val_loss"] == pytest.approx(sum(4 * (i + 1) ** 2 for i in range(4)) / sum(4 * (i + 1) for i in range(4)))
  assert train_lib.validation_loss(program, state, [], empty_batch=empty, mesh=mesh) is None


# --- Checkpoints ranked by val_loss ----------------------------------------------------------------


def test_checkpointer_keeps_the_lowest_val_loss_across_reopening_and_unranked_saves(tmp_path):
  directory = tmp_path / "checkpoints"
  checkpointer = Checkpointer(directory, keep_last=2)
  # Steps 3 and 7 have no validation (a SIGTERM or periodic save); step 5's is NaN, which ranks last.
  for step, val_loss in {1: 3.0, 2: 1.0, 3: None, 4: 2.0, 5: float("nan"), 6: 4.0, 7: None}.items():
    checkpointer.save(step, {"w": jnp.full((4,), float(step))}, data_state={"step": step}, meta={"step": step},
                      metrics=None if val_loss is None else {"val_loss": val_loss})
  checkpointer.wait()
  assert checkpointer.all_steps() == [2, 6, 7]  # the newest two and the best
  assert checkpointer.best_step() == 2 and checkpointer.metrics(7) is None
  checkpointer.close()
  # A resumed run still knows which one is best, and keeps it while saving more.
  checkpointer = Checkpointer(directory, keep_last=2)
  assert checkpointer.best_step() == 2
  checkpointer.save(8, {"w": jnp.full((4,), 8.0)}, data_state={}, meta={}, metrics={"val_loss": 5.0})
  checkpointer.save(9, {"w": jnp.full((4,), 9.0)}, data_state={}, meta={})
  checkpointer.wait()
  assert checkpointer.all_steps() == [2, 8, 9]
  _, state, _, _ = checkpointer.restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32)}, step=checkpointer.best_step())
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4,), 2.0))
  checkpointer.close()


# --- Non-finite loss ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_non_finite_loss_stops_naming_step_and_samples_and_keeps_the_last_good_checkpoint(tmp_path):
  launcher = tmp_path / "launch_poisoned.py"
  launcher.write_text(_LAUNCHER)
  ids_file = tmp_path / "poisoned_sample_ids.json"
  # Step 3 is bad; nothing is logged after step 1 (log_steps=100), so only the check before the save of
  # step 4 reads its loss: the state of steps 3 and 4 must not be saved.
  fields = {"max_steps": 6, "save_steps": 2, "log_steps": 100}
  done = _train(tmp_path, fields, launcher=launcher, BBU_POISON_STEP="3", BBU_POISON_IDS=str(ids_file))
  assert done.returncode == 1, done.stderr[-3000:]
  message = done.stderr.strip().splitlines()[-1]
  assert message.startswith("bbu_jax.train: the loss is nan at step 3;"), message
  config = _config(tmp_path, **fields)
  records = [json.loads(line) for line in pathlib.Path(config.train_data_path).read_text().splitlines()]
  indices = sorted({i for i in json.loads(ids_file.read_text()) if i >= 0})
  assert indices and all(records[i]["id"] in message for i in indices), message
  assert f"indices {indices}" in message
  assert "the last good checkpoint is step 2" in message

  run_dir = tmp_path / "runs" / "tiny"
  assert _steps(run_dir / "checkpoints") == [2]
  assert not (run_dir / "model").exists()  # nothing exported from a failed run
  assert sorted(_rows(run_dir, "train")) == [1]
  tokenizer = Tokenizer.from_dir(run_dir / "tokenizer")
  model_config = train_lib.build_model_config(config, tokenizer)
  pieces = {"model_config": model_config, "det_config": train_lib.detection_config(config, model_config)}
  _, state = _restore_model(config, run_dir, pieces, 2)
  assert int(state.step) == 2
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves((state.trainable, state.opt_state)))
