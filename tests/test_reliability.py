"""Faults and bad inputs lose nothing: a kill while a checkpoint is being written, a corrupt newest
checkpoint, images that go bad after validation, and out-of-range configs refused at start by name.

The training runs are real subprocesses of the tiny config. Faults are injected by a small launcher that
patches one function before calling `bbu_jax.train.main()`, so each fault happens at a known point:
SIGKILL inside orbax's finalize of one step (data written, folder not yet renamed into place), or image
files deleted and truncated right after the training records were validated.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bbu_jax import config as config_lib
from bbu_jax.data import chat as chat_lib
from bbu_jax.data import packing, pipeline, records, synthetic
from bbu_jax.data import tokenizer as tk
from bbu_jax.models.config import VisionConfig
from bbu_jax.training.checkpoint import Checkpointer

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "configs" / "tiny.py"
STEPS = 6

_LAUNCHER = '''
import json, os, signal, sys

kill_step = os.environ.get("BBU_KILL_IN_CHECKPOINT_FINALIZE")
if kill_step:
  from orbax.checkpoint._src.path import atomicity
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize_or_die(self):
    if self.get_final().name == kill_step:  # everything written, the rename into place not yet done
      os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die

break_images = os.environ.get("BBU_BREAK_IMAGES_AFTER_VALIDATION")
if break_images:
  from bbu_jax.data import validate
  split_valid = validate.split_valid

  def split_valid_then_break(path, *args, **kwargs):
    result = split_valid(path, *args, **kwargs)
    if str(path).endswith("train.jsonl"):
      todo = json.loads(break_images)
      for name in todo["delete"]:
        os.remove(name)
      for name in todo["truncate"]:
        data = open(name, "rb").read()
        open(name, "wb").write(data[: len(data) // 2])
    return result

  validate.split_valid = split_valid_then_break

from bbu_jax import train
train.main()
'''


def _env(root: pathlib.Path, **extra: str) -> dict:
  return {**os.environ, "BBU_TEST_ROOT": str(root), "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


def _train(root: pathlib.Path, *overrides: str, launcher: pathlib.Path | None = None, timeout: float = 900,
           **env: str) -> subprocess.CompletedProcess:
  entry = [str(launcher)] if launcher else ["-m", "bbu_jax.train"]
  command = [sys.executable, *entry, f"--config={CONFIG}", f"--config.max_steps={STEPS}", *overrides]
  return subprocess.run(command, env=_env(root, **env), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _metrics(run_dir: pathlib.Path) -> dict[int, dict]:
  """The last logged training metrics of every step (a resumed run logs the steps after its checkpoint again)."""
  rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
  return {row["step"]: row for row in rows if row["split"] == "train"}


def _losses(run_dir: pathlib.Path) -> dict[int, float]:
  return {step: row["loss"] for step, row in _metrics(run_dir).items()}


def _steps(checkpoints: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("launcher") / "launch_train.py"
  path.write_text(_LAUNCHER)
  return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An unbroken run: its folder and losses."""
  root = tmp_path_factory.mktemp("reference")
  done = _train(root)
  assert done.returncode == 0, done.stderr[-3000:]
  return root, _losses(root / "runs" / "tiny")


def _copy_data(reference_root: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
  shutil.copytree(reference_root / "data", root / "data")  # the same data, not a regenerated one
  return root / "runs" / "tiny"


# --- Checkpoints ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(reference, launcher, tmp_path):
  ref_root, ref_losses = reference
  assert sorted(ref_losses) == list(range(1, STEPS + 1))
  run_dir = _copy_data(ref_root, tmp_path)
  killed = _train(tmp_path, launcher=launcher, BBU_KILL_IN_CHECKPOINT_FINALIZE="4")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  checkpoints = run_dir / "checkpoints"
  partial = [p.name for p in checkpoints.iterdir() if p.name.startswith("4.")]
  assert partial, f"no partial checkpoint 4 in {sorted(p.name for p in checkpoints.iterdir())}"
  assert (checkpoints / partial[0] / "state").is_dir()  # its data was written: only the rename is missing
  assert _steps(checkpoints) == [1, 2, 3]

  done = _train(tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from checkpoint 3 " in done.stderr  # the last complete one, never the partial 4
  assert not [p.name for p in checkpoints.iterdir() if not p.name.isdigit()]  # the partial one was cleaned up
  assert _steps(checkpoints) == [4, 5, 6]
  assert _losses(run_dir) == ref_losses  # bit-identical on CPU


@pytest.mark.slow
def test_truncated_newest_checkpoint_is_reported_set_aside_and_the_previous_one_used(reference, tmp_path):
  ref_root, ref_losses = reference
  shutil.copytree(ref_root, tmp_path, dirs_exist_ok=True)
  run_dir = tmp_path / "runs" / "tiny"
  checkpoints = run_dir / "checkpoints"
  assert _steps(checkpoints) == [4, 5, 6]
  data_files = [p for p in (checkpoints / "6" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  largest = max(data_files, key=lambda p: p.stat().st_size)
  size = largest.stat().st_size
  with open(largest, "r+b") as f:
    f.truncate(size // 2)

  done = _train(tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  log = (run_dir / "train.log").read_text()
  assert "checkpoint 6 in" in log and "cannot be restored" in log  # reported, with the reason
  assert "restored checkpoint 5 after skipping unreadable newer ones" in log
  assert "resumed from checkpoint 5 " in done.stderr
  aside = list((run_dir / "unreadable_checkpoints").iterdir())
  assert [p.name.split("-")[0] for p in aside] == ["6"]  # kept for a post-mortem, out of the step folder
  assert _steps(checkpoints) == [4, 5, 6]  # step 6 saved again, complete this time
  assert _losses(run_dir) == ref_losses  # step 6 recomputed from checkpoint 5: the same loss


@pytest.mark.parametrize("damage", ["truncate", "zero"])
def test_checkpointer_skips_and_sets_aside_a_damaged_newest_checkpoint(tmp_path, damage):
  checkpointer = Checkpointer(tmp_path / "checkpoints", keep_last=3)
  for step in (1, 2, 3):
    checkpointer.save(step, {"w": jnp.arange(1000, dtype=jnp.float32) * step}, data_state={"step": step},
                      meta={"step": step})
  checkpointer.wait()
  state_dir = tmp_path / "checkpoints" / "3" / "state"
  data_files = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  largest = max(data_files, key=lambda p: p.stat().st_size)
  size = largest.stat().st_size
  if damage == "truncate":
    with open(largest, "r+b") as f:
      f.truncate(size // 2)
  else:
    largest.write_bytes(bytes(size))
  abstract = {"w": jax.ShapeDtypeStruct((1000,), jnp.float32)}
  step, state, data_state, meta = checkpointer.restore(abstract)
  assert (step, data_state, meta) == (2, {"step": 2}, {"step": 2})
  np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(1000, dtype=np.float32) * 2)
  assert checkpointer.all_steps() == [1, 2]
  assert [p.name.split("-")[0] for p in (tmp_path / "unreadable_checkpoints").iterdir()] == ["3"]
  # The resumed run saves step 3 again, and that one reads.
  checkpointer.save(3, {"w": jnp.full((1000,), 7.0)}, data_state={"step": 3}, meta={"step": 3})
  checkpointer.wait()
  step, state, _, _ = checkpointer.restore(abstract)
  assert step == 3 and float(state["w"][0]) == 7.0
  checkpointer.close()


# --- Data that goes bad after validation ---------------------------------------------------------


@pytest.mark.slow
def test_images_deleted_or_truncated_after_validation_are_skipped_counted_and_logged(reference, launcher,
                                                                                     tmp_path):
  ref_root, _ = reference
  run_dir = _copy_data(ref_root, tmp_path)
  ref_rejects = packing.read_rejects(ref_root / "runs" / "tiny" / "rejected_samples_0.jsonl")
  ref_count = _metrics(ref_root / "runs" / "tiny")[1]["rejected_samples"]
  assert ref_count == len(ref_rejects)
  records = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
  never_rejected = [r for r in records if r["id"] not in {e["id"] for e in ref_rejects}]
  deleted, truncated = never_rejected[:2]
  images = {r["id"]: str(tmp_path / "data" / r["images"][0]) for r in (deleted, truncated)}
  breakage = {"delete": [images[deleted["id"]]], "truncate": [images[truncated["id"]]]}

  done = _train(tmp_path, "--config.max_steps=3", launcher=launcher,
                BBU_BREAK_IMAGES_AFTER_VALIDATION=json.dumps(breakage))
  assert done.returncode == 0, done.stderr[-3000:]
  assert not os.path.exists(images[deleted["id"]])  # the fault did happen, after validation passed
  metrics = _metrics(run_dir)
  assert sorted(metrics) == [1, 2, 3]  # the run went on
  rejects = packing.read_rejects(run_dir / "rejected_samples_0.jsonl")
  bad = [e for e in rejects if e["id"] in images]
  # Both epochs of both samples (the whole run fits one packing window), each with its reason.
  assert sorted((e["id"], e["epoch"]) for e in bad) == sorted((i, ep) for i in images for ep in (0, 1))
  for entry in bad:
    assert entry["reason"].startswith(packing.REJECT_IMAGE + ": record " + entry["id"])
    assert images[entry["id"]] in entry["reason"]
  assert {e["id"] for e in rejects} - set(images) == {e["id"] for e in ref_rejects}  # nothing else changed
  assert all(row["rejected_samples"] == ref_count + 4 for row in metrics.values())
  log = (run_dir / "train.log").read_text()
  assert f"skipping sample {deleted['id']}" in log and f"skipping sample {truncated['id']}" in log


def test_sample_builder_turns_unreadable_images_into_rejects(tmp_path):
  root = tmp_path / "data"
  synthetic.generate(root, num_train=4, num_val=1, num_teacher=2, seed=0, scale=0.2)
  train, _ = records.load_records(root / "train.jsonl")
  pool, _ = records.load_records(root / "teacher_pool.jsonl")
  processor = chat_lib.ChatProcessor(tk.train_bpe_tokenizer(chat_lib.tokenizer_training_texts(train), 600))
  vision = VisionConfig()
  packing_config = packing.PackingConfig(model_max_length=4096, patch_budget=4096, patch_dim=vision.patch_dim)
  builder = pipeline.SampleBuilder(train, pool, processor, chat_lib.ImageLoader(root),
                                   pipeline.PipelineConfig(batch_size=1, packing=packing_config, teacher_ratio=1.0))
  assert isinstance(builder((0, 0)), dict)  # with teachers
  student, teacher = root / train[1]["images"][0], root / pool[0]["images"][0]
  student.unlink()
  data = (root / train[2]["images"][0]).read_bytes()
  (root / train[2]["images"][0]).write_bytes(data[: len(data) // 3])
  Image.new("RGB", (7, 9)).save(root / train[3]["images"][0])  # replaced by a file of another size
  for index, words in ((1, ["No such file", str(student)]), (2, ["truncated"]), (3, ["7x9", "but the record says"])):
    rejected = builder((1, index))
    assert isinstance(rejected, packing.Rejected) and (rejected.index, rejected.epoch) == (index, 1)
    assert rejected.reason.startswith(f"{packing.REJECT_IMAGE}: record {train[index]['id']}: ")
    assert all(w in rejected.reason for w in words), rejected.reason
  teacher.unlink()  # a teacher's image gone: the sample that drew it is skipped, naming the file
  outcomes = [builder((epoch, 0)) for epoch in range(8)]  # each epoch draws one of the two teachers
  rejected = [r for r in outcomes if isinstance(r, packing.Rejected)]
  assert rejected and len(rejected) < len(outcomes) and all(str(teacher) in r.reason for r in rejected)


# --- Configuration refused at start ----------------------------------------------------------------


def _tiny_config(**fields):
  config = config_lib.load_config_file(CONFIG)
  for name, value in fields.items():
    node = config
    *parents, leaf = name.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


@pytest.mark.parametrize("fields, num_devices, num_processes, field", [
    ({"llm_lr": -1e-4}, 1, 1, "llm_lr"),
    ({"vision_lr": -1.0}, 1, 1, "vision_lr"),
    ({"teacher_ratio": 1.5}, 1, 1, "teacher_ratio"),
    ({"teacher_ratio": -0.1}, 1, 1, "teacher_ratio"),
    ({"mesh.data": 3}, 2, 1, "mesh"),  # 3 rows of the data axis on 2 devices: no mesh
    ({"mesh.data": 1, "mesh.fsdp": 2}, 4, 1, "mesh"),  # 2 devices named, 4 present
    # 4 devices all on the tensor axis: one row per step cannot be split over 4 processes.
    ({"mesh.data": -1, "mesh.tensor": 4, "per_device_train_batch_size": 1}, 4, 4, "per_device_train_batch_size"),
    ({"eval_steps": -1}, 1, 1, "eval_steps"),
    ({"detection_decoder_gradient_scale": 0.0}, 1, 1, "detection_decoder_gradient_scale"),
    # The best checkpoint by val_loss needs evaluations, and a val_loss at every checkpoint.
    ({"load_best_model_at_end": True}, 1, 1, "load_best_model_at_end"),
    ({"load_best_model_at_end": True, "eval_steps": 2, "val_data_path": ""}, 1, 1, "load_best_model_at_end"),
    ({"load_best_model_at_end": True, "eval_steps": 2, "save_steps": 3}, 1, 1, "save_steps"),
])
def test_out_of_range_config_is_refused_naming_the_field(fields, num_devices, num_processes, field):
  config = _tiny_config(**fields)
  with pytest.raises(config_lib.ConfigError) as raised:
    config_lib.validate(config, num_devices=num_devices, num_processes=num_processes)
  message = str(raised.value)
  assert message.startswith(f"config field {field}:") and "\n" not in message
  config_lib.validate(_tiny_config(), num_devices=num_devices, num_processes=num_processes)  # defaults pass


def test_batch_that_divides_across_processes_is_accepted():
  config = _tiny_config(**{"mesh.tensor": 2, "per_device_train_batch_size": 2})
  config_lib.validate(config, num_devices=4, num_processes=4)  # 2 rows x data 2 = 4 rows over 4 processes


def _cli(root: pathlib.Path, *overrides: str) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "bbu_jax.train", f"--config={CONFIG}", *overrides]
  return subprocess.run(command, env=_env(root), cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override, expected", [
    ("--config.llm_lrr=1", 'config field llm_lrr: no such field; Did you mean "llm_lr"'),
    ("--config.model.text_layerz=3", 'config field model.text_layerz: no such field; Did you mean "text_layers"'),
    ("--config.llm_lr=-1", "config field llm_lr: must be >= 0, got -1.0"),
    ("--config.teacher_ratio=2", "config field teacher_ratio: must be in [0, 1], got 2"),
])
def test_cli_refuses_bad_fields_in_one_line_before_any_work(tmp_path, override, expected):
  done = _cli(tmp_path, override)
  assert done.returncode == 1
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("bbu_jax.train: config error: ") and expected in last, done.stderr[-2000:]
  assert "Traceback" not in done.stderr
  assert not (tmp_path / "data").exists()  # refused before generating data or building anything


@pytest.mark.slow
def test_model_max_length_shorter_than_one_sample_is_refused_at_start(reference, tmp_path):
  ref_root, _ = reference
  run_dir = _copy_data(ref_root, tmp_path)
  done = _cli(tmp_path, "--config.model_max_length=64")
  assert done.returncode == 1
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("bbu_jax.train: config error: config field model_max_length: 64 tokens is shorter than "
                         "the smallest of the first 16 training samples"), done.stderr[-2000:]
  assert "Traceback" not in done.stderr
  assert not (run_dir / "checkpoints").exists() and not (run_dir / "rejected_samples_0.jsonl").exists()
