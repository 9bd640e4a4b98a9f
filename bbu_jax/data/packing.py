"""Packing ChatProcessor samples into fixed-shape rows: windows of samples bin-packed (Minimum Bin Slack,
first-fit decreasing where that needs fewer rows) into `model_max_length` tokens and a fixed patch budget
("packed"), or one sample per row ("padded"), plus the row arrays the train step reads.

A row holds up to `max_samples_per_row` samples, each a segment (ids 1..k; 0 = padding) whose M-RoPE
positions restart at 0, whose images follow the previous sample's in the row's patch array, and whose
detection targets sit in the sample's slot. `PackedRowsIterDataset` does this inside a Grain pipeline
with a checkpointable state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import grain
import numpy as np

from bbu_jax.models.config import VisionConfig
from bbu_jax.models.vision import vision_metadata

COLLATOR_TYPES = ("packed", "padded")

REJECT_TOO_LONG = "too many tokens"
REJECT_TOO_MANY_PATCHES = "too many image patches"
REJECT_TOO_MANY_OBJECTS = "too many objects"
REJECT_IMAGE = "unreadable image"


@dataclasses.dataclass(frozen=True)
class PackingConfig:
  """Static row shapes. patch_budget must be a multiple of 4 (one merged vision token = 4 patches)."""

  model_max_length: int
  patch_budget: int
  patch_dim: int
  max_samples_per_row: int = 8  # Kmax: detection-target slots per row
  max_objects: int = 64  # Omax: detection targets per sample
  max_caption_tokens: int = 32  # Lcap
  collator_type: str = "packed"
  packing_window: int = 64  # samples packed together (pack_rows) before rows are emitted

  def __post_init__(self):
    if self.collator_type not in COLLATOR_TYPES:
      raise ValueError(f"collator_type must be one of {COLLATOR_TYPES}, got {self.collator_type!r}")
    if self.patch_budget <= 0 or self.patch_budget % 4:
      raise ValueError(f"patch_budget must be a positive multiple of 4, got {self.patch_budget}")
    if self.model_max_length < 2:
      raise ValueError(f"model_max_length must be >= 2, got {self.model_max_length}")
    if self.max_samples_per_row < 1 or self.packing_window < 1:
      raise ValueError("max_samples_per_row and packing_window must be >= 1")

  @property
  def samples_per_row(self) -> int:
    return 1 if self.collator_type == "padded" else self.max_samples_per_row


def sample_cost(sample: dict) -> tuple[int, int]:
  """(tokens, patches) a sample takes in a row."""
  return int(sample["input_ids"].shape[0]), int(sample["pixel_values"].shape[0])


def rejection_reason(sample: dict, config: PackingConfig) -> str | None:
  """Why a sample can never fit a row (None when it fits)."""
  tokens, patches = sample_cost(sample)
  if tokens > config.model_max_length:
    return f"{REJECT_TOO_LONG}: {tokens} > model_max_length {config.model_max_length}"
  if patches > config.patch_budget:
    return f"{REJECT_TOO_MANY_PATCHES}: {patches} > patch_budget {config.patch_budget}"
  if sample["det_boxes"].shape[0] > config.max_objects:
    return f"{REJECT_TOO_MANY_OBJECTS}: {sample['det_boxes'].shape[0]} > max_objects {config.max_objects}"
  return None


def first_fit(costs: Sequence[tuple[int, int]], config: PackingConfig) -> list[list[int]]:
  """Bins of sample indices: first-fit decreasing by tokens, limited by tokens, patches and slots.

  Each bin lists its samples in their original order; bins come in order of their first sample, so
  the result does not depend on how ties in size are broken across windows.
  """
  capacity = config.samples_per_row
  bins: list[list[int]] = []
  used: list[list[int]] = []  # [tokens, patches] per bin
  for i in _largest_first(costs):
    tokens, patches = costs[i]
    for b, (bin_tokens, bin_patches) in enumerate(used):
      if (len(bins[b]) < capacity and bin_tokens + tokens <= config.model_max_length
          and bin_patches + patches <= config.patch_budget):
        bins[b].append(i)
        used[b][0] += tokens
        used[b][1] += patches
        break
    else:
      bins.append([i])
      used.append([tokens, patches])
  return _in_sample_order(bins)


# Subsets one row's search tries before it settles for the best found. Windows of 64 of the synthetic
# sets (scales 0.25 to 1.0) pack the same without it, in ~2 ms (equal-cost samples are tried once, a
# row with no slack ends the search); it bounds the worst case, many small samples of which no subset
# fills a row exactly, to ~6 ms per window of 64 (10,000: ~30 ms).
SEARCH_NODES_PER_ROW = 1000


def minimum_bin_slack(costs: Sequence[tuple[int, int]], config: PackingConfig) -> list[list[int]]:
  """Bins of sample indices by Minimum Bin Slack (Gupta & Ho 1999, in the MBS' form of Fleszar &
  Hindi 2002): each bin takes the largest sample left plus the subset of the others that leaves the
  fewest tokens free within the token, patch and slot limits, searched largest first and bounded by
  `SEARCH_NODES_PER_ROW`. Same contract as `first_fit`; deterministic (ties go to the first found).
  """
  left = _largest_first(costs)
  bins: list[list[int]] = []
  while left:
    row = _least_slack_row(left[0], left[1:], costs, config)
    bins.append(row)
    taken = set(row)
    left = [i for i in left if i not in taken]
  return _in_sample_order(bins)


def pack_rows(costs: Sequence[tuple[int, int]], config: PackingConfig) -> list[list[int]]:
  """The bins a window of samples is packed into: `minimum_bin_slack`'s, or `first_fit`'s where those
  are fewer (rare: MBS's greedy exact fill of one row can strand small samples FFD would spread)."""
  slack_bins = minimum_bin_slack(costs, config)
  fit_bins = first_fit(costs, config)
  return fit_bins if len(fit_bins) < len(slack_bins) else slack_bins


def _largest_first(costs: Sequence[tuple[int, int]]) -> list[int]:
  return sorted(range(len(costs)), key=lambda i: (-costs[i][0], -costs[i][1], i))


def _in_sample_order(bins: list[list[int]]) -> list[list[int]]:
  bins = [sorted(b) for b in bins]
  bins.sort(key=lambda b: b[0])
  return bins


def _least_slack_row(first: int, others: Sequence[int], costs: Sequence[tuple[int, int]],
                     config: PackingConfig) -> list[int]:
  """`first` plus the subset of `others` (largest first) that fills the most tokens of one row."""
  capacity, max_tokens, max_patches = config.samples_per_row, config.model_max_length, config.patch_budget
  best = [first]
  best_slack = max_tokens - costs[first][0]
  chosen = [first]
  nodes = 0

  def search(start: int, tokens: int, patches: int) -> None:
    nonlocal best, best_slack, nodes
    tried = None
    for j in range(start, len(others)):
      if best_slack == 0 or nodes >= SEARCH_NODES_PER_ROW:
        return
      cost = costs[others[j]]
      # an equal-cost sample gives the same subsets as the one just tried
      if cost == tried or tokens + cost[0] > max_tokens or patches + cost[1] > max_patches:
        continue
      tried = cost
      nodes += 1
      chosen.append(others[j])
      if max_tokens - tokens - cost[0] < best_slack:
        best, best_slack = list(chosen), max_tokens - tokens - cost[0]
      if len(chosen) < capacity:
        search(j + 1, tokens + cost[0], patches + cost[1])
      chosen.pop()

  if capacity > 1:
    search(0, costs[first][0], costs[first][1])
  return best


def make_row(samples: Sequence[dict], config: PackingConfig, vision_config: VisionConfig) -> dict:
  """The arrays of one row (see pipeline.py's batch format; positions are (3, S) here)."""
  S, P, K = config.model_max_length, config.patch_budget, config.max_samples_per_row
  O, L = config.max_objects, config.max_caption_tokens
  merge_unit = vision_config.merge_unit
  row = {
      "input_ids": np.zeros((S,), np.int32),
      "segment_ids": np.zeros((S,), np.int32),
      "positions": np.zeros((3, S), np.int32),
      "target_ids": np.zeros((S,), np.int32),
      "teacher_loss_mask": np.zeros((S,), np.float32),
      "student_loss_mask": np.zeros((S,), np.float32),
      "text_sample_slot": np.zeros((S,), np.int32),
      "student_text_mask": np.zeros((S,), bool),
      "pixel_values": np.zeros((P, config.patch_dim), np.float32),
      "vision_sample_slot": np.zeros((P // merge_unit,), np.int32),
      "vision_is_student": np.zeros((P // merge_unit,), bool),
      "det_boxes": np.zeros((K, O, 4), np.float32),
      "det_box_valid": np.zeros((K, O), bool),
      "det_caption_ids": np.zeros((K, O, L), np.int32),
      "sample_ids": np.full((K,), -1, np.int64),
  }
  if len(samples) > K:
    raise ValueError(f"{len(samples)} samples for a row of {K} slots")
  grids = []
  t0 = p0 = 0
  for slot, sample in enumerate(samples):
    tokens, patches = sample_cost(sample)
    t1, p1 = t0 + tokens, p0 + patches
    if t1 > S or p1 > P:
      raise ValueError(f"sample {sample.get('id')}: row overflow ({t1} tokens / {p1} patches)")
    ids = sample["input_ids"]
    row["input_ids"][t0:t1] = ids
    row["segment_ids"][t0:t1] = slot + 1
    row["positions"][:, t0:t1] = sample["positions"]
    # Next-token targets within the sample; a mask at t marks that token t+1 is an answer token.
    row["target_ids"][t0:t1 - 1] = ids[1:]
    row["teacher_loss_mask"][t0:t1 - 1] = sample["teacher_mask"][1:]
    row["student_loss_mask"][t0:t1 - 1] = sample["student_mask"][1:]
    row["text_sample_slot"][t0:t1] = slot + 1
    row["student_text_mask"][t0:t1] = sample["student_text_mask"]
    row["pixel_values"][p0:p1] = sample["pixel_values"]
    m0 = p0 // merge_unit
    merged_sizes = sample["image_grid_thw"].prod(-1) // merge_unit
    row["vision_sample_slot"][m0:p1 // merge_unit] = slot + 1
    student_start = m0 + int(merged_sizes[~sample["image_is_student"]].sum())
    row["vision_is_student"][student_start:student_start + int(merged_sizes[sample["image_is_student"]].sum())] = True
    n_obj = sample["det_boxes"].shape[0]
    if n_obj > O:
      raise ValueError(f"sample {sample.get('id')}: {n_obj} objects > max_objects {O}")
    row["det_boxes"][slot, :n_obj] = sample["det_boxes"]
    row["det_box_valid"][slot, :n_obj] = True
    row["det_caption_ids"][slot, :n_obj] = sample["det_caption_ids"][:, :L]
    row["sample_ids"][slot] = sample["index"]
    grids.append(sample["image_grid_thw"])
    t0, p0 = t1, p1
  grid = np.concatenate(grids, 0) if grids else np.zeros((0, 3), np.int64)
  row.update(vision_metadata(grid.astype(np.int64), P, vision_config))
  return row


def empty_row(config: PackingConfig, vision_config: VisionConfig) -> dict:
  return make_row([], config, vision_config)


def collate_rows(rows: Sequence[dict]) -> dict:
  """Stacks rows into a batch; positions become (3, B, S)."""
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  batch["positions"] = np.ascontiguousarray(batch["positions"].transpose(1, 0, 2))
  return batch


def packing_efficiency(batch: dict) -> float:
  """Real tokens over token capacity of the batch (segment_ids > 0 over B * S)."""
  segment_ids = np.asarray(batch["segment_ids"])
  return float((segment_ids > 0).sum() / segment_ids.size)


# --- Grain -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rejected:
  """A sample that cannot fit a row or whose image cannot be read; travels through the pipeline so it
  is logged, never lost."""

  index: int
  epoch: int
  id: str
  reason: str


class RejectsLog:
  """Appends rejected samples as JSON lines (one write per line, so worker processes may share it)."""

  def __init__(self, path: str | os.PathLike | None):
    self.path = None if path is None else os.fspath(path)

  def write(self, rejected: Rejected) -> None:
    logging.warning("skipping sample %s (index %d, epoch %d): %s", rejected.id, rejected.index,
                    rejected.epoch, rejected.reason)
    if self.path is None:
      return
    line = json.dumps(dataclasses.asdict(rejected), ensure_ascii=False) + "\n"
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(line)


def read_rejects(path: str | os.PathLike) -> list[dict]:
  """The rejects file's entries, each (epoch, index) once (a resumed run may log a window again)."""
  if not os.path.exists(path):
    return []
  seen, out = set(), []
  with open(path, encoding="utf-8") as f:
    for line in f:
      entry = json.loads(line)
      key = (entry["epoch"], entry["index"])
      if key not in seen:
        seen.add(key)
        out.append(entry)
  return out


class PackedRowsIterDataset(grain.IterDataset):
  """Rows from a stream of samples (dicts from ChatProcessor with `index`) and `Rejected` markers."""

  def __init__(self, parent: grain.IterDataset, config: PackingConfig, vision_config: VisionConfig,
               rejects_path: str | os.PathLike | None = None):
    super().__init__(parent)
    self.config = config
    self.vision_config = vision_config
    self.rejects_path = rejects_path

  def __iter__(self) -> grain.DatasetIterator:
    return _PackedRowsIterator(self._parent.__iter__(), self.config, self.vision_config,
                               RejectsLog(self.rejects_path))

  def __str__(self) -> str:
    return f"PackedRowsIterDataset(collator_type={self.config.collator_type})"


class _PackedRowsIterator(grain.DatasetIterator):
  """Packs windows of `packing_window` samples. The state is the parent's state at the start of the
  current window plus the rows of it already emitted, so a restore re-reads and re-packs that window
  (deterministically) and continues with exactly the next row."""

  def __init__(self, parent: grain.DatasetIterator, config: PackingConfig, vision_config: VisionConfig,
               rejects: RejectsLog):
    super().__init__(parent)
    self._config = config
    self._vision_config = vision_config
    self._rejects = rejects
    self._window_state = self._parent.get_state()
    self._rows: list[list[dict]] = []
    self._emitted = 0

  def _fill(self, log_rejects: bool) -> None:
    self._window_state = self._parent.get_state()
    self._emitted = 0
    window_size = self._config.packing_window if self._config.collator_type == "packed" else 1
    samples: list[dict] = []
    pulled = 0
    while pulled < window_size:
      try:
        item = next(self._parent)
      except StopIteration:
        break
      pulled += 1
      if isinstance(item, Rejected):
        if log_rejects:
          self._rejects.write(item)
        continue
      samples.append(item)
    bins = pack_rows([sample_cost(s) for s in samples], self._config)
    self._rows = [[samples[i] for i in b] for b in bins]
    if pulled and not self._rows:  # a window of rejects only: read on
      self._fill(log_rejects)

  def __next__(self) -> dict:
    if self._emitted >= len(self._rows):
      self._fill(log_rejects=True)
      if not self._rows:
        raise StopIteration
    row = make_row(self._rows[self._emitted], self._config, self._vision_config)
    self._emitted += 1
    return row

  def get_state(self) -> dict[str, Any]:
    if self._emitted >= len(self._rows):
      return {"parent": self._parent.get_state(), "emitted": 0}
    return {"parent": self._window_state, "emitted": self._emitted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._rows, self._emitted = [], 0
    if state["emitted"]:
      self._fill(log_rejects=False)
      self._emitted = state["emitted"]

