"""Orbax checkpoints of a training run: model + optimizer state, data iterator state, RNG, step.

One layout for every run: `<run_dir>/checkpoints/<step>/{state,data,meta}`. Saves are asynchronous;
the newest `keep_last` checkpoints and the best one by validation loss are kept: a save may carry
`metrics={"val_loss": ...}`, which orbax writes beside the checkpoint (so the best one is still known
after a resume); checkpoints saved without one are kept only while among the newest. A checkpoint becomes
visible only once complete (orbax writes to a temporary folder and renames), and a latest checkpoint
that cannot be read is reported, skipped in favour of the previous one, and moved aside.
"""

from __future__ import annotations

import logging
import math
import pathlib
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

log = logging.getLogger(__name__)


def _val_loss(metrics: dict | None) -> float:
  """The ranking value of a checkpoint's metrics: its validation loss, +inf when it has none (or NaN)."""
  value = (metrics or {}).get("val_loss")
  return float(value) if value is not None and math.isfinite(float(value)) else math.inf


class Checkpointer:

  def __init__(self, directory: str | pathlib.Path, *, keep_last: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute() if "://" not in str(directory) else directory
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=keep_last),
        # Sorted by validation loss, highest first; the last n (the lowest) are kept.
        cm.BestN(get_metric_fn=_val_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False),
    ])
    # best_fn makes orbax write the metrics to disk and read them back on reload; without it the
    # ranking lives in memory only and a resumed run forgets (and may delete) its best checkpoint.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=_val_loss, best_mode="min", enable_async_checkpointing=async_save,
        create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data", "meta"),
                                         options=options)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The kept checkpoint with the lowest finite validation loss; None when no checkpoint has one."""
    ranked = [(_val_loss(self.metrics(s)), s) for s in self.all_steps()]
    ranked = [(loss, s) for loss, s in ranked if math.isfinite(loss)]
    return min(ranked)[1] if ranked else None

  def metrics(self, step: int) -> dict | None:
    """The metrics saved with checkpoint `step` (e.g. {"val_loss": 1.23}), None when it has none."""
    return self.manager.metrics(step)

  def save(self, step: int, state: Any, *, data_state: dict, meta: dict,
           metrics: dict | None = None, force: bool = False) -> bool:
    """Starts an (async) save; `meta` holds small JSON facts (RNG seed, config, counters); `metrics`
    ({"val_loss": ...}) ranks it for best-checkpoint keeping; None leaves it unranked."""
    return self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict, dict]:
    """Restores `step` (default: the newest readable one) into the shardings of `abstract_state`.

    Returns (step, state, data_state, meta). A newest checkpoint that fails to read (truncated,
    corrupt) is logged and the previous one is tried.
    """
    steps = [step] if step is not None else self.all_steps()[::-1]
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    errors, unreadable = [], []
    for s in steps:
      try:
        restored = self.manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                       data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        if errors:
          log.warning("restored checkpoint %d after skipping unreadable newer ones: %s", s, "; ".join(errors))
          self._set_aside(unreadable)
        return s, restored["state"], restored["data"], restored["meta"]
      except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
        errors.append(f"step {s}: {type(e).__name__}: {e}")
        unreadable.append(s)
        log.error("checkpoint %d in %s cannot be restored (%s: %s)", s, self.directory, type(e).__name__, e)
    raise RuntimeError(f"no readable checkpoint in {self.directory}: " + "; ".join(errors))

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable checkpoints out of the step folder so the resumed run can save those steps again
    (kept in `unreadable_checkpoints/` beside it for a post-mortem)."""
    if not isinstance(self.directory, pathlib.Path) or jax.process_index() != 0:
      return  # object stores and other hosts: the step stays listed (a later save of it is refused)
    for step in steps:
      source = self.directory / str(step)
      target = self.directory.parent / "unreadable_checkpoints" / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
      target.parent.mkdir(parents=True, exist_ok=True)
      source.rename(target)
      log.warning("moved unreadable checkpoint %d to %s", step, target)
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
