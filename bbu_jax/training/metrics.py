"""Run logging: a metrics JSONL (one row per logged step and split: "train" rows with the training
metrics, "val" rows with the `val_*` validation losses), TensorBoard event files, and a console progress
line with rate and ETA.

Only the main process writes (multi-host runs call with `enabled=jax.process_index() == 0`).
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Mapping


def _scalar(v) -> float:
  return float(v.item() if hasattr(v, "item") else v)


class MetricsWriter:

  def __init__(self, run_dir: str | pathlib.Path, *, enabled: bool = True):
    self.enabled = enabled
    self.run_dir = pathlib.Path(run_dir)
    self._jsonl = None
    self._tb = None
    if enabled:
      self.run_dir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(self.run_dir / "tb"))

  def write(self, step: int, metrics: Mapping[str, object], *, prefix: str = "train") -> None:
    """One JSONL row `{"step", "split": prefix, **metrics}` and TensorBoard scalars `prefix/name`, where a
    name's own `prefix_` is dropped (`val_loss` -> `val/loss`, beside `train/loss`)."""
    if not self.enabled:
      return
    values = {k: _scalar(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, "split": prefix, **values}, ensure_ascii=False) + "\n")
    self._jsonl.flush()
    for k, v in values.items():
      if math.isfinite(v):
        self._tb.add_scalar(f"{prefix}/{k.removeprefix(prefix + '_')}", v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
      self._jsonl = None
    if self._tb:
      self._tb.close()
      self._tb = None


class ProgressLine:
  """`step 120/400 (30%) | loss 1.234 | 812 tok/s | ETA 3m05s` on one console line per report."""

  def __init__(self, total_steps: int, *, start_step: int = 0, stream=sys.stdout, enabled: bool = True):
    self.total, self.start_step, self.stream, self.enabled = total_steps, start_step, stream, enabled
    self.t0 = time.perf_counter()

  def report(self, step: int, metrics: Mapping[str, object], keys=("loss", "student_lm_loss")) -> str:
    done = step - self.start_step
    elapsed = time.perf_counter() - self.t0
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    parts = [f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
    parts += [f"{k} {_scalar(metrics[k]):.4f}" for k in keys if k in metrics]
    if "tokens_per_s" in metrics:
      parts.append(f"{_scalar(metrics['tokens_per_s']):.0f} tok/s")
    parts.append(f"{rate:.2f} steps/s")
    parts.append(f"ETA {format_duration(eta)}")
    line = " | ".join(parts)
    if self.enabled:
      print(line, file=self.stream, flush=True)
    return line


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
