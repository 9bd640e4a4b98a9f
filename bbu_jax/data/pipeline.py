"""The training input pipeline (Grain): records -> per-epoch global shuffle -> per-host shard -> teacher
sampling -> ChatProcessor + image processing (in worker processes) -> packed or padded rows -> batches,
through an iterator whose state (get_state/set_state) is saved with the training state.

BATCH FORMAT (numpy; B = batch_size rows, S = model_max_length, P = patch_budget, K = max_samples_per_row,
O = max_objects, L = max_caption_tokens):
  input_ids          (B, S)        int32    tokens; 0 in padding
  segment_ids        (B, S)        int32    0 = padding, 1..k = the k samples packed in the row
  positions          (3, B, S)     int32    M-RoPE (t, h, w) positions, restarting at 0 in each segment
  target_ids         (B, S)        int32    the next token within the same segment, 0 where none
  teacher_loss_mask  (B, S)        float32  1 where target_ids is a teacher answer token (incl. its <|im_end|>)
  student_loss_mask  (B, S)        float32  1 where target_ids is a student answer token (incl. its <|im_end|>)
  text_sample_slot   (B, S)        int32    slot + 1 of the sample a token belongs to, 0 = padding
  student_text_mask  (B, S)        bool     the student's user turn: vision block (image pads) and prompt
  pixel_values       (B, P, C*T*p*p) float32 the row's images' patches, in text order, zero padded
  rope_pos           (B, P, 2)     int32    } vision_metadata of bbu_jax.models.vision for each row
  window_segment_ids (B, P)        int32    }
  image_segment_ids  (B, P)        int32    }
  merged_valid       (B, P // 4)   bool     }
  vision_sample_slot (B, P // 4)   int32    slot + 1 of the sample a merged vision token belongs to, 0 = padding
  vision_is_student  (B, P // 4)   bool     merged vision tokens of a student's image
  det_boxes          (B, K, O, 4)  float32  student boxes, xyxy normalized by the student's resized image size
  det_box_valid      (B, K, O)     bool
  det_caption_ids    (B, K, O, L)  int32    desc tokens + eos, 0 padded
  sample_ids         (B, K)        int64    indices into the record source of each slot's sample, -1 = empty
Rows are "packed" (bin-packed by packing.pack_rows in windows of `packing_window` samples) or "padded" (one
sample per row; same shapes). Samples that cannot fit a row, or whose image can no longer be read
(deleted or truncated after validation), are logged to `rejects_path` with the reason and skipped.
The worker count does not change the batches (packing happens after the workers, in the main process),
but a saved iterator state restores only into a pipeline built the same way: same records, config,
process count, batch size and worker count.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import grain
from absl import flags
import numpy as np
from PIL import Image

from bbu_jax.config import ConfigError
from bbu_jax.data import packing
from bbu_jax.data.chat import ChatConfig, ChatProcessor, ImageLoader, ImageReadError
from bbu_jax.data.images import ImageProcessorConfig
from bbu_jax.data.teachers import sample_teachers
from bbu_jax.models.config import VisionConfig

# Length of the index space when num_epochs is None (train until stopped).
_FOREVER_EPOCHS = 1_000_000


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  batch_size: int  # rows per batch on this host
  packing: packing.PackingConfig
  seed: int = 0
  num_epochs: int | None = 1  # None: repeat until stopped
  shuffle: bool = True
  is_training: bool = True  # False: no teachers (validation)
  teacher_ratio: float = 0.0
  num_teacher_samples: int = 1
  num_workers: int = 0  # processes running ChatProcessor + image processing; 0 = in this process
  drop_remainder: bool = True
  process_index: int = 0
  process_count: int = 1
  rejects_path: str | None = None

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} not in [0, process_count {self.process_count})")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")


def default_patch_budget(model_max_length: int, vision_config: VisionConfig, *, max_pixels: int | None = None,
                         images_per_row: int | None = None) -> int:
  """A patch budget that never binds before the token budget does (each merged vision token is one
  text token), or, when smaller, room for `images_per_row` images of `max_pixels`; rounded up to a
  multiple of the attention window's patch count."""
  window = max(vision_config.window_size // vision_config.patch_size, vision_config.spatial_merge_size) ** 2
  budget = model_max_length * vision_config.merge_unit
  if max_pixels is not None and images_per_row is not None:
    budget = min(budget, images_per_row * (max_pixels // (vision_config.patch_size ** 2)))
  return -(-budget // window) * window


def chat_config_from(c, label_hierarchy=None) -> ChatConfig:
  """The ChatConfig of a run config (bbu_jax.config fields); training and inference both use this."""
  images = ImageProcessorConfig(min_pixels=c.min_pixels, max_pixels=c.max_pixels)
  kwargs = {} if label_hierarchy is None else {"label_hierarchy": dict(label_hierarchy)}
  return ChatConfig(prompt_language=c.prompt_language, images=images,
                    max_caption_tokens=c.detection_caption_max_len, **kwargs)


def pipeline_config_from(c, vision_config: VisionConfig, *, batch_size: int, is_training: bool = True,
                         num_epochs: int | None = 1, process_index: int = 0, process_count: int = 1,
                         rejects_path: str | None = None, max_caption_tokens: int = 32) -> PipelineConfig:
  """The PipelineConfig of a run config (bbu_jax.config fields); patch_budget 0 = default_patch_budget."""
  samples_per_row = c.max_samples_per_row if c.collator_type == "packed" else 1
  teachers = c.num_teacher_samples if is_training and c.teacher_ratio > 0 else 0
  patch_budget = c.patch_budget or default_patch_budget(
      c.model_max_length, vision_config, max_pixels=c.max_pixels, images_per_row=samples_per_row * (1 + teachers))
  packing_config = packing.PackingConfig(
      model_max_length=c.model_max_length, patch_budget=patch_budget, patch_dim=vision_config.patch_dim,
      max_samples_per_row=c.max_samples_per_row, max_objects=c.max_objects, max_caption_tokens=max_caption_tokens,
      collator_type=c.collator_type)
  return PipelineConfig(batch_size=batch_size, packing=packing_config, seed=c.seed, num_epochs=num_epochs,
                        shuffle=is_training, is_training=is_training, teacher_ratio=c.teacher_ratio,
                        num_teacher_samples=c.num_teacher_samples, num_workers=c.num_data_workers,
                        drop_remainder=is_training, process_index=process_index, process_count=process_count,
                        rejects_path=rejects_path)


def check_samples_can_fit(records: Sequence[dict], processor: ChatProcessor, config: packing.PackingConfig, *,
                          num_records: int = 16) -> None:
  """Refuses at start a model_max_length or patch_budget that not even the smallest of the first
  records fits (without teachers), rather than rejecting every sample once training runs."""
  sample = list(records[:num_records])
  if not sample:
    return
  tokens = [len(processor.tokenizer.encode(processor.training_text(r))) for r in sample]
  merge_unit = processor.config.images.merge_size ** 2
  patches = [processor.config.images.num_image_tokens(r["height"], r["width"]) * merge_unit for r in sample]
  if min(tokens) > config.model_max_length:
    raise ConfigError(f"config field model_max_length: {config.model_max_length} tokens is shorter than the "
                      f"smallest of the first {len(sample)} training samples ({min(tokens)} tokens: system "
                      f"prompt, one image, user prompt and answer)")
  if min(patches) > config.patch_budget:
    raise ConfigError(f"config field patch_budget: {config.patch_budget} patches is smaller than the smallest "
                      f"image of the first {len(sample)} training samples ({min(patches)} patches)")


class EpochShuffledIndices(grain.MapDataset):
  """(epoch, index) pairs: every record once per epoch, in a fresh permutation of (seed, epoch)."""

  def __init__(self, num_records: int, num_epochs: int | None, seed: int, shuffle: bool):
    super().__init__()
    if num_records < 1:
      raise ValueError("the record source is empty")
    self._n = num_records
    self._epochs = _FOREVER_EPOCHS if num_epochs is None else num_epochs
    self._seed = seed
    self._shuffle = shuffle
    self._cached_epoch = -1
    self._permutation = np.arange(num_records)

  def __len__(self) -> int:
    return self._n * self._epochs

  def _epoch_permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._cached_epoch:
      self._permutation = (np.random.default_rng([self._seed, epoch]).permutation(self._n)
                           if self._shuffle else np.arange(self._n))
      self._cached_epoch = epoch
    return self._permutation

  def __getitem__(self, position):
    if isinstance(position, slice):
      return self.slice(position)
    epoch, offset = divmod(int(position), self._n)
    return epoch, int(self._epoch_permutation(epoch)[offset])

  def __str__(self) -> str:
    return f"EpochShuffledIndices(n={self._n}, epochs={self._epochs}, seed={self._seed})"


class SampleBuilder:
  """(epoch, index) -> a ChatProcessor training sample with `index` and `epoch`, or a packing.Rejected."""

  def __init__(self, records: Sequence[dict], teacher_pool: Sequence[dict], processor: ChatProcessor,
               image_loader: Callable[[dict], Image.Image], config: PipelineConfig):
    self.records = records
    self.teacher_pool = teacher_pool
    self.teacher_ids = [t["id"] for t in teacher_pool]
    self.processor = processor
    self.image_loader = image_loader
    self.config = config

  def __call__(self, epoch_index: tuple[int, int]) -> dict | packing.Rejected:
    epoch, index = epoch_index
    record = self.records[index]
    cfg = self.config
    teacher_indices = sample_teachers(self.teacher_ids, record["id"], seed=cfg.seed, epoch=epoch, index=index,
                                      teacher_ratio=cfg.teacher_ratio, num_teacher_samples=cfg.num_teacher_samples,
                                      is_training=cfg.is_training)
    teachers = [self.teacher_pool[i] for i in teacher_indices]
    try:
      sample = self.processor.build_training_sample(record, teachers, self.image_loader)
    except ImageReadError as e:  # an image gone bad since validation: skip the sample, keep training
      return packing.Rejected(index=index, epoch=epoch, id=str(record["id"]), reason=f"{packing.REJECT_IMAGE}: {e}")
    reason = packing.rejection_reason(sample, cfg.packing)
    if reason is not None:
      return packing.Rejected(index=index, epoch=epoch, id=str(record["id"]), reason=reason)
    sample["index"] = index
    sample["epoch"] = epoch
    sample["teacher_ids"] = [t["id"] for t in teachers]
    return sample


def build_dataset(records: Sequence[dict], processor: ChatProcessor, config: PipelineConfig,
                  vision_config: VisionConfig, *, teacher_pool: Sequence[dict] = (),
                  image_loader: Callable[[dict], Image.Image] | None = None,
                  data_root: str | os.PathLike | None = None) -> grain.IterDataset:
  """The batch dataset; `iter(...)` gives the checkpointable iterator.

  records: a random-access sequence of normalized records (a list from load_records, or
  tfds_builder.RecordDataSource over ArrayRecord shards).
  """
  if config.packing.patch_dim != vision_config.patch_dim:
    raise ValueError(f"packing.patch_dim {config.packing.patch_dim} != vision patch_dim {vision_config.patch_dim}")
  if config.packing.max_caption_tokens != processor.config.max_caption_tokens:
    raise ValueError(f"packing.max_caption_tokens {config.packing.max_caption_tokens} != the ChatProcessor's "
                     f"{processor.config.max_caption_tokens}")
  loader = image_loader if image_loader is not None else ImageLoader(data_root)
  indices = EpochShuffledIndices(len(records), config.num_epochs, config.seed, config.shuffle)
  indices = indices[config.process_index::config.process_count]
  samples = indices.map(SampleBuilder(records, list(teacher_pool), processor, loader, config))
  stream = samples.to_iter_dataset()
  if config.num_workers > 0:
    # Grain's workers read its absl flags; a program not started through absl.app (tests, notebooks)
    # has them unparsed, which grain treats as an error rather than using the defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
  rows = packing.PackedRowsIterDataset(stream, config.packing, vision_config, config.rejects_path)
  return rows.batch(config.batch_size, drop_remainder=config.drop_remainder, batch_fn=packing.collate_rows)


packing_efficiency = packing.packing_efficiency
