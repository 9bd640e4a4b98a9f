"""Soak: the tiny config trained for 3x its usual steps, a checkpoint every 3 steps (the newest 2 kept),
killed in the middle and resumed. Host memory stays flat, no file descriptor leaks, and the checkpoint
folder never holds more than save_total_limit finished checkpoints."""

import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time

import psutil
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "configs" / "tiny.py"
STEPS = 30
SAVE_STEPS = 3
KEEP = 2
KILL_AFTER = 16  # a SIGKILL once step 16 is logged: the resumed run restarts from checkpoint 15


def _logged(metrics: pathlib.Path) -> list[int]:
  if not metrics.exists():
    return []
  return [row["step"] for row in map(json.loads, metrics.read_text().splitlines()) if row["split"] == "train"]


def _run_and_watch(root: pathlib.Path, kill_after: int | None) -> tuple[int, list[dict]]:
  """Runs training, sampling (step, RSS, open fds, finished checkpoints) every 0.05 s; SIGKILL once
  `kill_after` is logged. Returns the exit code and the samples."""
  command = [sys.executable, "-m", "bbu_jax.train", f"--config={CONFIG}", f"--config.max_steps={STEPS}",
             "--config.num_train_epochs=20", f"--config.save_steps={SAVE_STEPS}",
             f"--config.save_total_limit={KEEP}"]
  env = {**os.environ, "BBU_TEST_ROOT": str(root), "JAX_PLATFORMS": "cpu"}
  run_dir = root / "runs" / "tiny"
  proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  watched = psutil.Process(proc.pid)
  samples = []
  logged_before = len(_logged(run_dir / "metrics.jsonl"))  # a resumed run appends to the killed one's log
  deadline = time.time() + 1200
  try:
    while proc.poll() is None and time.time() < deadline:
      try:
        if watched.status() == psutil.STATUS_ZOMBIE:  # exited: no memory or files left to measure
          break
        rss = watched.memory_info().rss
        files = _open_files(proc.pid)
      except (psutil.NoSuchProcess, FileNotFoundError):
        break
      logged = _logged(run_dir / "metrics.jsonl")[logged_before:]
      step = logged[-1] if logged else 0
      checkpoints = run_dir / "checkpoints"
      finished = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.exists() else []
      saving = sum(1 for f in files if f.startswith(_EVENT_LOOP) or ".orbax-checkpoint-tmp" in f)
      samples.append({"step": step, "rss": rss, "fds": len(files) - saving, "saving_fds": saving,
                      "checkpoints": finished})
      if kill_after is not None and step >= kill_after:
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.05)  # steps take ~0.3 s: several samples each, some between checkpoint writes
  finally:
    if proc.poll() is None and (kill_after is None or time.time() >= deadline):
      proc.kill()
    proc.wait()
  return proc.returncode, samples


# An asynchronous checkpoint write runs an asyncio event loop (a socket pair and an epoll instance) and
# holds files in its `N.orbax-checkpoint-tmp` folder until it is renamed into place.
_EVENT_LOOP = ("socket:", "anon_inode:[eventpoll]")
_FDS_PER_WRITE = 3


def _open_files(pid: int) -> list[str]:
  """What each open file descriptor of `pid` points at (a path, `socket:[inode]`, `pipe:[inode]`, ...)."""
  targets = []
  for fd in os.listdir(f"/proc/{pid}/fd"):
    try:
      targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    except FileNotFoundError:  # closed between listing and reading
      pass
  return targets


def _window(samples: list[dict], first: int, last: int) -> list[dict]:
  return [s for s in samples if first <= s["step"] <= last]


@pytest.mark.slow
def test_soak_memory_flat_no_fd_leak_checkpoints_bounded(tmp_path):
  code, first = _run_and_watch(tmp_path, kill_after=KILL_AFTER)
  assert code == -signal.SIGKILL
  code, second = _run_and_watch(tmp_path, kill_after=None)
  assert code == 0
  run_dir = tmp_path / "runs" / "tiny"
  steps = _logged(run_dir / "metrics.jsonl")
  assert sorted(set(steps)) == list(range(1, STEPS + 1)) and steps[-1] == STEPS
  restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
  resumed_from = steps[restart] - 1  # the checkpoint the second process restored
  assert resumed_from % SAVE_STEPS == 0 and resumed_from >= KILL_AFTER - 2 * SAVE_STEPS

  figures = {}
  for name, samples, first_step in (("before_kill", first, 1), ("after_resume", second, resumed_from + 1)):
    last = max(s["step"] for s in samples)
    third = first_step + (last - first_step) // 3
    # Point samples swing with each checkpoint write, so compare a window of SAVE_STEPS steps a third
    # of the way in with the last SAVE_STEPS steps: median and peak RSS. Open files are split in two:
    # those of a checkpoint write in flight (its event loop, its temporary folder's files) and the rest
    # (logs, pipes, a checkpoint folder being renamed or deleted for a moment). On a busy machine a write
    # can be in flight at every sample of a few steps (a floor of 11 open files against 8 came from
    # timing alone), so the rest's floor is compared over the two halves of the steps after the first
    # third, and the writes' floor over the second half must be at most one write's: a leaked event
    # loop or file raises one of the two floors with every save (a socket pair leaked per save gave a
    # writes' floor of 8).
    early, late = _window(samples, third, third + SAVE_STEPS - 1), _window(samples, last - SAVE_STEPS + 1, last)
    middle = (third + last) // 2
    # (not the last step: the process closes everything as it exits)
    files_early, files_late = _window(samples, third, middle), _window(samples, middle + 1, last - 1)
    rss_early, rss_late = [s["rss"] / 2**20 for s in early], [s["rss"] / 2**20 for s in late]
    figures[name] = {
        "steps": [first_step, last], "third": third,
        "rss_mib_median": [statistics.median(rss_early), statistics.median(rss_late)],
        "rss_mib_peak": [max(rss_early), max(rss_late)],
        "fds_floor": [min(s["fds"] for s in files_early), min(s["fds"] for s in files_late)],
        "fds_peak": max(s["fds"] for s in samples),
        "saving_fds_floor_late": min(s["saving_fds"] for s in files_late),
        "saving_fds_peak": max(s["saving_fds"] for s in samples),
        "max_finished_checkpoints": max(len(s["checkpoints"]) for s in samples), "samples": len(samples)}
  print("soak figures:", json.dumps(figures))
  for name, f in figures.items():
    for kind in ("rss_mib_median", "rss_mib_peak"):
      early, late = f[kind]
      assert late < 1.15 * early, (name, kind, f)
    assert f["fds_floor"][1] <= f["fds_floor"][0], (name, f)
    assert f["saving_fds_floor_late"] <= _FDS_PER_WRITE, (name, f)
    # A new checkpoint is renamed into place before the oldest is deleted: KEEP + 1 for a moment.
    assert f["max_finished_checkpoints"] <= KEEP + 1, (name, f)
  # Across the kill: the resumed process ends no bigger than the first one was a third of the way in.
  assert figures["after_resume"]["rss_mib_peak"][1] < 1.15 * figures["before_kill"]["rss_mib_peak"][0]
  final = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
  assert final == [str(STEPS - SAVE_STEPS), str(STEPS)]  # the newest save_total_limit, nothing half-written
