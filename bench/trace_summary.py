"""Where a traced step's device time goes: a jax.profiler Perfetto trace summed by kernel kind and by kernel.

  python bench/trace_summary.py TRACE_OR_FOLDER [--device /device:GPU] [--steps 2] [--top 25]

TRACE_OR_FOLDER: a `perfetto_trace.json.gz` (or .json), or a folder holding one at any depth (the newest is
read), e.g. the folder given to `bench_train.py --profile`. The device's kernels are the complete events
("ph": "X") of the processes whose name contains --device. Each kernel is put in one kind by its name:
matmul (cuBLAS / CUTLASS / nvjet GEMMs), attention (cuDNN flash attention), triton (Triton-generated
kernels: XLA's Triton GEMMs and fusions), copy (memcpy / memset) and fusion (XLA's own elementwise and
reduction kernels: everything else). Printed per step (the traced time divided by --steps): the kernels'
summed time, the span from the first kernel's start to the last one's end, each kind's time and share, and
the --top kernels by time with their HLO op where the trace names it. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib

KINDS = (
    ("attention", ("fmha", "flash", "cudnn", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "wgmma", "sm90_")),
    ("triton", ("triton",)),
    ("copy", ("memcpy", "memset")),
)


def kernel_kind(name: str) -> str:
  """The kind of a kernel from its name (the first matching kind of KINDS, else fusion)."""
  lowered = name.lower()
  for kind, words in KINDS:
    if any(word in lowered for word in words):
      return kind
  return "fusion"


def find_trace(path: pathlib.Path) -> pathlib.Path:
  if path.is_file():
    return path
  found = sorted(path.rglob("perfetto_trace.json*"), key=lambda p: p.stat().st_mtime)
  if not found:
    raise SystemExit(f"no perfetto_trace.json(.gz) under {path}")
  return found[-1]


def load_events(trace: pathlib.Path) -> list[dict]:
  opener = gzip.open if trace.suffix == ".gz" else open
  with opener(trace, "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def device_kernels(events: list[dict], device: str) -> tuple[list[dict], list[str]]:
  """The complete events of the processes whose name contains `device`, and the names of the threads read.

  Where those processes have "Stream" threads (a GPU's CUDA streams), only these are read: the profiler's
  derived lines beside them ("XLA Ops", "XLA Modules") repeat the same time.
  """
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  pids = {pid for pid, name in names.items() if device in name}
  if not pids:
    raise SystemExit(f"no process named like {device!r} in the trace; processes: {sorted(set(names.values()))}")
  threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in pids}
  streams = {key for key, name in threads.items() if name.lower().startswith("stream")}
  kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in pids and "dur" in e
             and (not streams or (e["pid"], e.get("tid")) in streams)]
  read = sorted({threads.get((e["pid"], e.get("tid")), str(e.get("tid"))) for e in kernels})
  return kernels, read


def summarize(kernels: list[dict], steps: int, top: int) -> dict:
  if not kernels:
    raise SystemExit("the device processes hold no kernel events")
  total_us = sum(float(e["dur"]) for e in kernels)
  span_us = max(float(e["ts"]) + float(e["dur"]) for e in kernels) - min(float(e["ts"]) for e in kernels)
  by_kind: dict[str, float] = collections.defaultdict(float)
  by_kernel: dict[str, list] = {}
  for e in kernels:
    by_kind[kernel_kind(e["name"])] += float(e["dur"])
    entry = by_kernel.setdefault(e["name"], [0.0, 0, set()])
    entry[0] += float(e["dur"])
    entry[1] += 1
    op = e.get("args", {}).get("hlo_op")
    if op and len(entry[2]) < 4:
      entry[2].add(op)
  per_step_ms = lambda us: round(us / steps / 1e3, 3)  # noqa: E731
  ranked = sorted(by_kernel.items(), key=lambda item: -item[1][0])[:top]
  return {
      "steps": steps, "kernels_per_step": round(len(kernels) / steps, 1),
      "kernel_ms_per_step": per_step_ms(total_us), "span_ms_per_step": per_step_ms(span_us),
      "kinds_ms_per_step": {k: per_step_ms(v) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
      "kinds_share": {k: round(v / total_us, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
      "top": [{"kernel": name[:160], "kind": kernel_kind(name), "ms_per_step": per_step_ms(us),
               "calls_per_step": round(count / steps, 1), "hlo_ops": sorted(ops)}
              for name, (us, count, ops) in ranked],
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("trace", type=pathlib.Path)
  parser.add_argument("--device", default="/device:GPU", help="a part of the device processes' names")
  parser.add_argument("--steps", type=int, default=2, help="steps in the trace (bench_train.py --profile traces 2)")
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args(argv)
  trace = find_trace(args.trace)
  kernels, threads = device_kernels(load_events(trace), args.device)
  summary = summarize(kernels, args.steps, args.top)
  summary["threads"] = threads[:20]
  print(f"{trace}: per step {summary['kernel_ms_per_step']} ms in {summary['kernels_per_step']} kernels "
        f"over a span of {summary['span_ms_per_step']} ms (threads: {', '.join(threads[:8])})")
  for kind, ms in summary["kinds_ms_per_step"].items():
    print(f"  {kind:10s} {ms:10.3f} ms  {100 * summary['kinds_share'][kind]:5.1f}%")
  for row in summary["top"]:
    print(f"  {row['ms_per_step']:9.3f} ms {row['calls_per_step']:7.1f}x {row['kind']:9s} {row['kernel'][:90]} "
          f"{','.join(row['hlo_ops'])[:60]}")
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
