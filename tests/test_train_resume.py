"""A run killed with SIGKILL (mid-step or mid-checkpoint) resumes to the same losses as an unbroken run,
and SIGTERM saves a checkpoint, exits non-zero, and the same command finishes the run."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "configs" / "tiny.py"
STEPS = 6


def _command(root: pathlib.Path, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "bbu_jax.train", f"--config={CONFIG}", f"--config.max_steps={STEPS}", *overrides]


def _env(root: pathlib.Path) -> dict:
  return {**os.environ, "BBU_TEST_ROOT": str(root), "JAX_PLATFORMS": "cpu"}


def _losses(run_dir: pathlib.Path) -> dict[int, float]:
  """The last logged training loss of every step (a resumed run logs the steps after its checkpoint again)."""
  out = {}
  for line in (run_dir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if row["split"] == "train":
      out[row["step"]] = row["loss"]
  return out


def _wait_for_step(run_dir: pathlib.Path, step: int, proc: subprocess.Popen, timeout: float = 600) -> None:
  deadline = time.time() + timeout
  metrics = run_dir / "metrics.jsonl"
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"training exited early with {proc.returncode}")
    if metrics.exists() and sum('"split": "train"' in line for line in metrics.read_text().splitlines()) >= step:
      return
    time.sleep(0.2)
  raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  root = tmp_path_factory.mktemp("reference")
  subprocess.run(_command(root), env=_env(root), check=True, capture_output=True, timeout=900)
  return root, _losses(root / "runs" / "tiny")


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_losses(reference, tmp_path):
  ref_root, ref_losses = reference
  assert sorted(ref_losses) == list(range(1, STEPS + 1))
  # Same data (copied, so generation cannot differ), a fresh run folder.
  subprocess.run(["cp", "-r", str(ref_root / "data"), str(tmp_path / "data")], check=True)
  run_dir = tmp_path / "runs" / "tiny"
  proc = subprocess.Popen(_command(tmp_path), env=_env(tmp_path), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    _wait_for_step(run_dir, 3, proc)
  finally:
    proc.send_signal(signal.SIGKILL)  # wherever it is: mid-step or mid-checkpoint
    proc.wait()
  killed_at = max(_losses(run_dir))
  assert killed_at < STEPS, "the run finished before it could be killed"
  done = subprocess.run(_command(tmp_path), env=_env(tmp_path), capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from checkpoint" in done.stderr
  assert _losses(run_dir) == ref_losses  # bit-identical on CPU


@pytest.mark.slow
def test_sigterm_saves_exits_nonzero_and_the_same_command_finishes(reference, tmp_path):
  ref_root, ref_losses = reference
  subprocess.run(["cp", "-r", str(ref_root / "data"), str(tmp_path / "data")], check=True)
  run_dir = tmp_path / "runs" / "tiny"
  proc = subprocess.Popen(_command(tmp_path, "--config.save_steps=1000"), env=_env(tmp_path),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for_step(run_dir, 2, proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  stopped_at = max(_losses(run_dir))
  assert stopped_at < STEPS
  steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] == stopped_at  # the checkpoint written on SIGTERM, not a periodic one
  done = subprocess.run(_command(tmp_path, "--config.save_steps=1000"), env=_env(tmp_path), capture_output=True,
                        text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  assert _losses(run_dir) == ref_losses
