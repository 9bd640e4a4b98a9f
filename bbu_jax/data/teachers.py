"""Teacher sampling: which teacher-pool records a training sample shows as demonstrations.

With probability `teacher_ratio` a sample gets `num_teacher_samples` teachers drawn without replacement,
never the student itself and never for validation. The draw is a pure function of (seed, epoch, index),
so a resumed run and every worker process draw exactly the same teachers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Mixed into the seed so that teacher draws are independent of the shuffle's draws with the same seed.
_TEACHER_STREAM = 0x7EAC


def sample_teachers(pool_ids: Sequence[str], student_id: str | None, *, seed: int, epoch: int, index: int,
                    teacher_ratio: float, num_teacher_samples: int, is_training: bool = True) -> list[int]:
  """Indices into the teacher pool for sample `index` of `epoch` ([] when it draws none).

  pool_ids: the pool's record ids (a pool entry with the student's id is never drawn).
  index: the sample's index in the source (not its shuffled position), so the draw follows the record.
  """
  if not 0.0 <= teacher_ratio <= 1.0:
    raise ValueError(f"teacher_ratio must be in [0, 1], got {teacher_ratio}")
  if num_teacher_samples < 0:
    raise ValueError(f"num_teacher_samples must be >= 0, got {num_teacher_samples}")
  if not is_training or teacher_ratio == 0.0 or num_teacher_samples == 0 or not pool_ids:
    return []
  rng = np.random.default_rng([_TEACHER_STREAM, seed, epoch, index])
  if rng.random() >= teacher_ratio:
    return []
  candidates = np.array([i for i, pid in enumerate(pool_ids) if pid != student_id], dtype=np.int64)
  if len(candidates) == 0:
    return []
  count = min(num_teacher_samples, len(candidates))
  return [int(i) for i in rng.choice(candidates, size=count, replace=False)]
