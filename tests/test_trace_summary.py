"""bench/trace_summary.py: a Perfetto trace's device kernels summed by kind, CUDA streams only."""

import gzip
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import trace_summary  # noqa: E402


def _trace(path: pathlib.Path) -> pathlib.Path:
  meta = lambda pid, tid, kind, name: {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}  # noqa: E731
  kernel = lambda tid, ts, dur, name: {"ph": "X", "pid": 7, "tid": tid, "ts": ts, "dur": dur, "name": name}  # noqa: E731
  events = [meta(7, None, "process_name", "/device:GPU:0 (NVIDIA H200)"), meta(1, None, "process_name", "/host:CPU"),
            meta(7, 1, "thread_name", "Stream #14(Compute,Memset)"), meta(7, 2, "thread_name", "XLA Ops")]
  stream = [kernel(1, 0, 300, "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_NTT"), kernel(1, 300, 100, "loop_add_fusion_10"),
            kernel(1, 400, 40, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"), kernel(1, 500, 60, "memcpy128"),
            kernel(1, 1000, 300, "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_NTT")]
  derived = [dict(e, tid=2) for e in stream]  # the profiler's "XLA Ops" line repeats the same time
  host = [{"ph": "X", "pid": 1, "tid": 5, "ts": 0, "dur": 5000, "name": "PjitFunction(train_step)"}]
  path.parent.mkdir(parents=True, exist_ok=True)
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events + stream + derived + host}, f)
  return path


def test_sums_stream_kernels_by_kind(tmp_path):
  _trace(tmp_path / "plugins" / "profile" / "run" / "perfetto_trace.json.gz")
  summary = trace_summary.main([str(tmp_path), "--steps", "2", "--top", "2"])
  assert summary["kernel_ms_per_step"] == pytest.approx(0.4)  # 800 us over 2 steps, the XLA Ops line not counted
  assert summary["span_ms_per_step"] == pytest.approx(0.65)
  assert summary["kinds_ms_per_step"] == pytest.approx({"matmul": 0.3, "fusion": 0.05, "copy": 0.03,
                                                         "attention": 0.02})
  assert summary["top"][0]["kernel"].startswith("nvjet") and summary["top"][0]["calls_per_step"] == 1
  assert summary["threads"] == ["Stream #14(Compute,Memset)"]


def test_names_the_processes_when_the_device_is_missing(tmp_path):
  trace = _trace(tmp_path / "perfetto_trace.json.gz")
  with pytest.raises(SystemExit, match="/host:CPU"):
    trace_summary.main([str(trace), "--device", "/device:TPU"])
