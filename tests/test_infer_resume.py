"""Interrupted inference resumes from its progress file without redoing or losing rows, refuses progress
made with other settings (or without --resume), and two processes (jax.distributed over loopback, gloo
CPU collectives) write the same responses file as one, and resume each from its own progress file.

The interrupted run is a real `python -m bbu_jax.infer` killed with SIGKILL: one image of the second
batch is a named pipe with no writer, so the run blocks opening it right after the first batch went to
the progress file, and the kill always lands at the same place. Uses test_infer's tiny model and input
(3 synthetic records and one with a missing image; batch 2, so 2 batches)."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_infer import MAX_NEW, MAX_PIXELS, setup  # noqa: E402,F401  (setup is a fixture)
import _loopback  # noqa: E402
from bbu_jax import infer  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
ROW_RESUMED = re.compile(r"resuming from \S+: (\d+) of (\d+) rows already done, (\d+) remain")


def infer_argv(setup, output, data_root=None, *extra) -> list[str]:
  return ["--model_path", str(setup["model_dir"]), "--input_jsonl", str(setup["inputs"]), "--output_file",
          str(output), "--data_root", str(data_root or setup["data"]), "--batch_size", "2", "--max_new_tokens",
          str(MAX_NEW), "--max_pixels", str(MAX_PIXELS), "--no_progress", *extra]


def infer_env(**extra) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
              PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def run_cli(argv, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "bbu_jax.infer", *argv], env=infer_env(**env), cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def samples_of(path) -> list[dict]:
  return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))["samples"]


def data_with_a_blocking_image(setup, root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """A copy of the images with the third row's (the second batch's first) replaced by a pipe nobody
  writes to: a run blocks there once the first batch is done. Returns (data root, the pipe)."""
  data = root / "data"
  shutil.copytree(setup["data"], data)
  blocked = data / setup["val"][2]["images"][0]
  assert all(r["images"][0] != setup["val"][2]["images"][0] for r in setup["val"][:2])
  blocked.unlink()
  os.mkfifo(blocked)
  return data, blocked


def unblock(setup, blocked: pathlib.Path) -> None:
  blocked.unlink()
  shutil.copyfile(setup["data"] / setup["val"][2]["images"][0], blocked)


def wait_for_lines(files: dict, procs, timeout: float = 600) -> None:
  """Until each file holds at least its number of complete lines; fails if a process ends first."""
  deadline = time.monotonic() + timeout
  while not all(f.exists() and f.read_bytes().count(b"\n") >= n for f, n in files.items()):
    for proc in procs:
      assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.monotonic() < deadline, f"progress never reached {files}"
    time.sleep(0.2)


def same_samples(responses, uninterrupted, data, setup) -> bool:
  """The failed row's message names the image under the run's own data root: compare it under the other."""
  for sample in responses["samples"]:
    if "error" in sample:
      sample["error"] = sample["error"].replace(str(data), str(setup["data"]))
  return responses["samples"] == uninterrupted["samples"]


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
  """(a) The run nobody interrupts: the responses every other run must reproduce."""
  output = tmp_path_factory.mktemp("uninterrupted") / "responses.json"
  result = run_cli(infer_argv(setup, output))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "4 rows to decode" in result.stderr
  assert not infer.progress_path(output).exists()  # deleted once the output is written
  responses = json.loads(output.read_text(encoding="utf-8"))
  assert [s["id"] for s in responses["samples"]] == [r["id"] for r in setup["val"]] + ["broken"]
  assert responses["config"]["resumed_samples"] == 0 and responses["config"]["decoded_samples"] == 4
  return responses


def test_a_killed_run_resumes_where_it_stopped_and_ends_as_an_uninterrupted_run(setup, uninterrupted, tmp_path,
                                                                                 capsys):
  data, blocked = data_with_a_blocking_image(setup, tmp_path)
  output = tmp_path / "responses.json"
  progress = infer.progress_path(output)
  assert progress.name == "responses.json.partial.jsonl"

  proc = subprocess.Popen([sys.executable, "-m", "bbu_jax.infer", *infer_argv(setup, output, data)], env=infer_env(),
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    wait_for_lines({progress: 3}, [proc])  # the header and the first batch
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  assert not output.exists()
  lines = progress.read_text(encoding="utf-8").splitlines()
  assert len(lines) == 3 and json.loads(lines[0])["format"] == infer.PROGRESS_FORMAT
  assert [json.loads(l)["id"] for l in lines[1:]] == [r["id"] for r in setup["val"][:2]]
  # A kill in the middle of writing a batch leaves a torn last line: resuming must drop it.
  with open(progress, "a", encoding="utf-8") as f:
    f.write('{"id": "' + setup["val"][2]["id"] + '", "images": ["ima')
  before = progress.read_bytes()

  # (d) Without --resume, existing progress is refused and left as it was.
  assert infer.main(infer_argv(setup, output, data)) == 2
  err = capsys.readouterr().err
  assert f"{progress} exists" in err and "pass --resume" in err and "delete the file" in err
  # (c) Progress made with other settings is refused, naming them.
  assert infer.main(infer_argv(setup, output, data, "--resume", "--max_new_tokens", str(MAX_NEW - 1),
                               "--seed", "3")) == 2
  err = capsys.readouterr().err
  assert f"{progress}:1: written by a run with other settings" in err
  assert f"max_new_tokens was {MAX_NEW}, now {MAX_NEW - 1}" in err and "seed was 0, now 3" in err
  other_input = tmp_path / "other.jsonl"
  other_input.write_text(setup["inputs"].read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
  argv = infer_argv(setup, output, data, "--resume")
  argv[argv.index("--input_jsonl") + 1] = str(other_input)
  assert infer.main(argv) == 2
  assert "the input file's content changed" in capsys.readouterr().err
  assert progress.read_bytes() == before and not output.exists()

  # Resumed with the image back: only the second batch is decoded, and the output is the uninterrupted one.
  unblock(setup, blocked)
  result = run_cli(infer_argv(setup, output, data, "--resume"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert ROW_RESUMED.search(result.stderr).groups() == ("2", "4", "2"), result.stderr[-3000:]
  assert "cut short" in result.stderr
  responses = json.loads(output.read_text(encoding="utf-8"))
  assert responses["config"]["resumed_samples"] == 2 and responses["config"]["decoded_samples"] == 2
  assert same_samples(responses, uninterrupted, data, setup)
  assert not progress.exists()


def test_a_damaged_progress_file_is_refused_naming_its_line(setup, tmp_path):
  output = tmp_path / "responses.json"
  config = infer.InferenceConfig(max_new_tokens=MAX_NEW)
  settings = infer.run_settings(setup["model_dir"], setup["inputs"], None, config)
  ids = {r["id"] for r in setup["val"]} | {"broken"}
  path = infer.progress_path(output)
  header = {"format": infer.PROGRESS_FORMAT, "process": [0, 1], "settings": settings}
  sample = lambda i: json.dumps({"id": setup["val"][i]["id"], "prediction": []})
  path.write_text("\n".join([json.dumps(header), sample(0), "{not json", sample(1), ""]), encoding="utf-8")
  with pytest.raises(ValueError, match=re.escape(f"{path}:3: not a JSON line")):
    infer.read_progress(path, settings, ids)
  path.write_text("\n".join([json.dumps(header), sample(0), json.dumps({"id": "stranger"}), ""]), encoding="utf-8")
  with pytest.raises(ValueError, match=re.escape(f"{path}:3: sample id 'stranger' is not in the input")):
    infer.read_progress(path, settings, ids)
  # An unreadable LAST complete line is a batch cut short: left out, not refused.
  text = "\n".join([json.dumps(header), sample(0), "{not json", ""])
  path.write_text(text, encoding="utf-8")
  done, keep = infer.read_progress(path, settings, ids)
  assert list(done) == [setup["val"][0]["id"]] and keep == len("\n".join([json.dumps(header), sample(0), ""]))


def test_progress_of_another_process_count_is_refused(setup, tmp_path):
  output = tmp_path / "responses.json"
  shard = infer.progress_path(output, 1, 2)
  assert shard.name == "responses.json.partial.1-of-2.jsonl"
  shard.write_text("{}\n", encoding="utf-8")
  with pytest.raises(ValueError, match=re.escape(f"{shard}: progress of a run with another number of processes")):
    infer.run_inference(str(setup["model_dir"]), str(setup["inputs"]), str(output), str(setup["data"]),
                        batch_size=2, max_new_tokens=MAX_NEW, max_pixels=MAX_PIXELS, progress=False, resume=True)
  assert shard.read_text(encoding="utf-8") == "{}\n" and not output.exists()


def test_rows_are_split_in_whole_batches_evenly_and_completely():
  for rows, per_batch, processes in [(4, 2, 2), (9, 2, 2), (10, 4, 3), (1, 8, 4), (0, 2, 2)]:
    shares = [infer.process_batches(rows, per_batch, i, processes) for i in range(processes)]
    flat = [i for share in shares for batch in share for i in batch]
    assert flat == list(range(rows))
    assert all(len(b) == per_batch for share in shares for b in share[:-1])
    counts = [len(share) for share in shares]
    assert max(counts) - min(counts) <= 1


def start_two_processes(argv) -> list[subprocess.Popen]:
  """`python -m bbu_jax.infer argv` as processes 0 and 1 of a jax.distributed run on loopback."""
  return _loopback.start_processes(["-m", "bbu_jax.infer", *argv])


def run_two_processes(argv) -> list[subprocess.CompletedProcess]:
  return _loopback.wait_all(start_two_processes(argv))


def test_two_processes_write_the_same_responses_as_one(setup, uninterrupted, tmp_path):
  output = tmp_path / "responses.json"
  results = run_two_processes(infer_argv(setup, output))
  for process_id, result in enumerate(results):  # each decoded its own batch of two rows
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"process {process_id} of 2: 2 rows to decode" in result.stderr
  responses = json.loads(output.read_text(encoding="utf-8"))
  assert responses["config"]["processes"] == 2 and responses["config"]["decoded_samples"] == 4
  assert responses["samples"] == uninterrupted["samples"]
  assert not list(tmp_path.glob("responses.json.partial*"))


def test_when_one_process_refuses_to_start_the_other_stops_too(setup, tmp_path):
  output = tmp_path / "responses.json"
  shard = infer.progress_path(output, 1, 2)
  shard.write_text("left over\n", encoding="utf-8")
  results = run_two_processes(infer_argv(setup, output))  # no --resume: process 1 refuses its progress file
  assert [r.returncode for r in results] == [2, 2]
  assert "process(es) [1] of 2 could not start" in results[0].stderr
  assert f"{shard} exists" in results[1].stderr and "pass --resume" in results[1].stderr
  assert shard.read_text(encoding="utf-8") == "left over\n" and not output.exists()


@pytest.mark.slow
def test_two_killed_processes_resume_each_from_its_own_progress_file(setup, uninterrupted, tmp_path):
  """Process 0 finishes its batch and waits for process 1, which blocks on the pipe: both are killed."""
  data, blocked = data_with_a_blocking_image(setup, tmp_path)
  output = tmp_path / "responses.json"
  shards = [infer.progress_path(output, i, 2) for i in range(2)]
  procs = start_two_processes(infer_argv(setup, output, data))
  try:
    wait_for_lines({shards[0]: 3, shards[1]: 1}, procs)
  finally:
    for proc in procs:
      proc.send_signal(signal.SIGKILL)
      proc.communicate()
  assert not output.exists()

  unblock(setup, blocked)
  results = run_two_processes(infer_argv(setup, output, data, "--resume"))
  for result in results:
    assert result.returncode == 0, result.stderr[-4000:]
  assert ROW_RESUMED.search(results[0].stderr).groups() == ("2", "2", "0")
  assert ROW_RESUMED.search(results[1].stderr).groups() == ("0", "2", "2")
  responses = json.loads(output.read_text(encoding="utf-8"))
  assert responses["config"]["resumed_samples"] == 2 and responses["config"]["decoded_samples"] == 2
  assert same_samples(responses, uninterrupted, data, setup)
  assert not any(shard.exists() for shard in shards)
