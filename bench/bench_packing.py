"""Packing efficiency (issue 3): real tokens over row capacity on the synthetic set, first-fit decreasing
(`packing.first_fit`, the packer before) against `packing.pack_rows` (minimum bin slack), on the same
samples, with the fewest rows any packing could reach.

  JAX_PLATFORMS=cpu python bench/bench_packing.py [--scales 0.5 1.0] [--num_train 128] [--seed 0]
      [--model_max_length 2048] [--packing_window 64] [--cache_dir /tmp/bbu_jax_bench_packing]
      [--max_rows_listed 20000]

The recipe of tests/test_pipeline.py::test_packing_efficiency_on_synthetic_set_at_2048 at each image
scale: `synthetic.generate(num_train, 4, 8, seed, scale)` (profile "real"; kept in --cache_dir), a BPE of
4096 trained on the set, no teachers, one epoch through `pipeline.build_dataset`. That run packs with
pack_rows; each sample's (tokens, patches) is read back from its rows, and the pipeline's windows (the
epoch's order in chunks of --packing_window) are packed again with first_fit and pack_rows, and with
windows of 128, 256 and the whole set. "optimum" is the fewest rows of each window (an exact integer
program over the rows that fit, scipy's HiGHS) where those rows are few enough to list, else
Martello and Toth's L2 lower bound ("bound"); either way no packing of those windows does better.
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bbu_jax.data import chat as chat_lib  # noqa: E402
from bbu_jax.data import labels as labels_lib  # noqa: E402
from bbu_jax.data import packing, pipeline, records, synthetic  # noqa: E402
from bbu_jax.data import tokenizer as tk  # noqa: E402
from bbu_jax.models.config import VisionConfig  # noqa: E402

VISION = VisionConfig()
# Feasible rows an exact optimum may list per window; beyond, the L2 bound. 20,000 solve in a second;
# the full-size set's 1,024 samples in one window list 395,467 and solve in ~90 s; a scale-0.5 window
# of 64 with ~200,000 took 250 s.
MAX_ROWS_LISTED = 20_000


def synthetic_set(cache_dir: pathlib.Path, scale: float, num_train: int, seed: int) -> pathlib.Path:
  root = cache_dir / f"scale{scale}_n{num_train}_seed{seed}"
  done = root / "done"
  if not done.exists():
    synthetic.generate(root, num_train=num_train, num_val=4, num_teacher=8, seed=seed, scale=scale)
    done.write_text("")
  return root


def run_pipeline(root: pathlib.Path, config: pipeline.PipelineConfig) -> tuple[dict[int, tuple[int, int]], int, float]:
  """One epoch through the pipeline: each sample's (tokens, patches) read back from the rows, the row
  count, and the seconds it took."""
  train, _ = records.load_records(root / "train.jsonl")
  chat_config = chat_lib.ChatConfig(label_hierarchy=labels_lib.SYNTHETIC_LABEL_HIERARCHY)
  tokenizer = tk.train_bpe_tokenizer(chat_lib.tokenizer_training_texts(train, chat_config), vocab_size=4096)
  processor = chat_lib.ChatProcessor(tokenizer, chat_config)
  start = time.perf_counter()
  costs, rows = {}, 0
  for batch in pipeline.build_dataset(train, processor, config, VISION, data_root=root):
    rows += len(batch["segment_ids"])
    for r, slots in enumerate(batch["sample_ids"]):
      for slot, index in enumerate(slots[slots >= 0]):
        costs[int(index)] = (int((batch["segment_ids"][r] == slot + 1).sum()),
                             VISION.merge_unit * int((batch["vision_sample_slot"][r] == slot + 1).sum()))
  return costs, rows, time.perf_counter() - start


def windows_of(costs: dict[int, tuple[int, int]], num_records: int, seed: int,
               size: int) -> list[list[tuple[int, int]]]:
  """The pipeline's windows: the epoch's order in chunks of `size` (rejected samples take their place)."""
  indices = pipeline.EpochShuffledIndices(num_records, 1, seed, True)
  order = [indices[i][1] for i in range(len(indices))]
  return [[costs[i] for i in order[s:s + size] if i in costs] for s in range(0, len(order), size)]


def l2_bound(tokens: list[int], capacity: int) -> int:
  """Martello and Toth's L2 lower bound on the bins of one-dimensional bin packing."""
  best = math.ceil(sum(tokens) / capacity)
  for k in sorted({0} | {t for t in tokens if t <= capacity // 2}):
    big = [t for t in tokens if t > capacity - k]
    mid = [t for t in tokens if capacity / 2 < t <= capacity - k]
    small = sum(t for t in tokens if k <= t <= capacity / 2)
    best = max(best, len(big) + len(mid) + max(0, math.ceil((small - (len(mid) * capacity - sum(mid))) / capacity)))
  return best


def fewest_rows(window: list[tuple[int, int]], config: packing.PackingConfig,
                max_rows_listed: int = MAX_ROWS_LISTED) -> tuple[int, bool]:
  """(rows, exact): the optimum of one window over all limits (tokens, patches, slots), or the L2
  bound on tokens alone where the rows that fit are too many to list."""
  from scipy.optimize import Bounds, LinearConstraint, milp
  from scipy.sparse import csr_matrix
  order = sorted(range(len(window)), key=lambda i: window[i])
  rows: list[tuple[int, ...]] = []

  def extend(start: int, chosen: list[int], tokens: int, patches: int) -> None:
    for j in range(start, len(order)):
      t, p = window[order[j]]
      if tokens + t > config.model_max_length:
        return  # sorted by tokens: no later sample fits either
      if patches + p > config.patch_budget:
        continue
      chosen.append(order[j])
      rows.append(tuple(chosen))
      if len(rows) > max_rows_listed:
        raise OverflowError
      if len(chosen) < config.samples_per_row:
        extend(j + 1, chosen, tokens + t, patches + p)
      chosen.pop()

  try:
    extend(0, [], 0, 0)
  except OverflowError:
    return l2_bound([t for t, _ in window], config.model_max_length), False
  members = [i for row in rows for i in row]
  columns = [j for j, row in enumerate(rows) for _ in row]
  cover = csr_matrix((np.ones(len(members)), (members, columns)), shape=(len(window), len(rows)))
  result = milp(np.ones(len(rows)), constraints=LinearConstraint(cover, 1, 1), integrality=np.ones(len(rows)),
                bounds=Bounds(0, 1))
  if result.status != 0:
    raise RuntimeError(f"integer program: {result.message}")
  return round(result.fun), True


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0])
  parser.add_argument("--num_train", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--model_max_length", type=int, default=2048)
  parser.add_argument("--packing_window", type=int, default=64)
  parser.add_argument("--cache_dir", default="/tmp/bbu_jax_bench_packing")
  parser.add_argument("--max_rows_listed", type=int, default=MAX_ROWS_LISTED,
                      help="feasible rows per window up to which the optimum is solved exactly")
  args = parser.parse_args(argv)
  cache_dir = pathlib.Path(args.cache_dir)
  cache_dir.mkdir(parents=True, exist_ok=True)
  packing_config = packing.PackingConfig(
      model_max_length=args.model_max_length, patch_budget=pipeline.default_patch_budget(args.model_max_length, VISION),
      patch_dim=VISION.patch_dim, packing_window=args.packing_window)
  config = pipeline.PipelineConfig(batch_size=4, packing=packing_config, seed=args.seed, num_epochs=1,
                                   drop_remainder=False)
  figures = {"num_train": args.num_train, "seed": args.seed, "model_max_length": args.model_max_length,
             "packing_window": args.packing_window, "scales": {}}
  for scale in args.scales:
    root = synthetic_set(cache_dir, scale, args.num_train, args.seed)
    costs, pipeline_rows, seconds = run_pipeline(root, config)
    tokens = [t for t, _ in costs.values()]
    capacity = args.model_max_length

    def efficiency(rows: int) -> float:
      return round(sum(tokens) / (rows * capacity), 4)

    print(f"scale {scale}: {len(costs)} samples of {min(tokens)}..{max(tokens)} tokens (median "
          f"{statistics.median(tokens):g}), {sum(t > capacity // 2 for t in tokens)} over {capacity // 2}; "
          f"token sum {sum(tokens)} = {sum(tokens) / capacity:.2f} rows of {capacity}; pipeline {seconds:.1f}s")
    per_window = {}
    for size in sorted({w for w in (args.packing_window, 128, 256) if w < args.num_train} | {args.num_train}):
      windows = windows_of(costs, args.num_train, args.seed, size)
      start = time.perf_counter()
      new_rows = sum(len(packing.pack_rows(w, packing_config)) for w in windows)
      pack_ms = 1000 * (time.perf_counter() - start) / len(windows)
      old_rows = sum(len(packing.first_fit(w, packing_config)) for w in windows)
      optimum = [fewest_rows(w, packing_config, args.max_rows_listed) for w in windows]
      best_rows, exact = sum(r for r, _ in optimum), all(e for _, e in optimum)
      best = "optimum" if exact else "bound"
      per_window[size] = {"first_fit": efficiency(old_rows), "pack_rows": efficiency(new_rows),
                          "first_fit_rows": old_rows, "pack_rows_rows": new_rows, best: efficiency(best_rows),
                          f"{best}_rows": best_rows, "pack_rows_ms_per_window": round(pack_ms, 2)}
      print(f"  window {size:4d}: first_fit {efficiency(old_rows):.4f} ({old_rows} rows)  pack_rows "
            f"{efficiency(new_rows):.4f} ({new_rows} rows, {pack_ms:.1f} ms/window)  "
            f"{best:7s} {efficiency(best_rows):.4f} ({best_rows} rows)")
    if pipeline_rows != per_window[args.packing_window]["pack_rows_rows"]:
      raise RuntimeError(f"the pipeline made {pipeline_rows} rows, pack_rows over its windows "
                         f"{per_window[args.packing_window]['pack_rows_rows']}")
    figures["scales"][str(scale)] = {
        "samples": len(costs), "tokens_min": min(tokens), "tokens_median": statistics.median(tokens),
        "tokens_max": max(tokens), "samples_over_half_a_row": sum(t > capacity // 2 for t in tokens),
        "token_sum_rows": round(sum(tokens) / capacity, 2), "pipeline_efficiency": efficiency(pipeline_rows),
        "pipeline_seconds": round(seconds, 1), "windows": per_window}
  print(json.dumps(figures, ensure_ascii=False))
  return figures


if __name__ == "__main__":
  main()
