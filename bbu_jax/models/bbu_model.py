"""The trained model: Qwen2.5-VL plus the optional detection head, its checkpoint, and its training losses.

`BBUModel` is a Qwen25VL whose parameter tree adds `detection_head` at the top level (so optimizer
groups, shardings and the Hugging Face export see the same names as in the plain model). Its
checkpoint is the bbu_jax checkpoint of bbu_jax.models.weights plus `bbu_jax.json`, which records
the head's and the LoRA adapters' configurations.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bbu_jax.models import lora as lora_lib
from bbu_jax.models import weights
from bbu_jax.models.config import Qwen25VLConfig
from bbu_jax.models.detection_head import (DetectionHead, DetectionHeadConfig, DetectionLossWeights,
                                           detection_loss, proposal_loss_sums, proposal_targets)
from bbu_jax.models.qwen2_5_vl import Qwen25VL, scatter_image_features
from bbu_jax.models.vision import merged_token_centers

Array = jax.Array
EXTRAS_FILE = "bbu_jax.json"
VISION_META_KEYS = ("rope_pos", "window_segment_ids", "image_segment_ids", "merged_valid")


class BBUModel(Qwen25VL):

  def __init__(self, config: Qwen25VLConfig, *, detection: DetectionHeadConfig | None = None,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, remat_policy: str = "none",
               attention_impl: str = "xla", lora: lora_lib.LoraConfig | None = None):
    super().__init__(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy,
                     attention_impl=attention_impl, lora=lora)
    self.detection_config = detection
    self.detection_head = DetectionHead(detection, rngs=rngs, dtype=dtype) if detection else None

  def encode(self, input_ids: Array, positions: Array, segment_ids: Array, pixel_values: Array | None = None,
             vision_meta: dict[str, Array] | None = None) -> tuple[Array, Array | None]:
    """(final hidden states, merged vision features or None): the one forward pass that training and
    inference (the LM and the detection head) share."""
    embeds = self.language_model.embed_tokens(input_ids)
    features = None
    if pixel_values is not None:
      features = self.visual(pixel_values.astype(self.dtype), vision_meta)
      embeds = scatter_image_features(embeds, input_ids == self.config.image_token_id, features,
                                      vision_meta["merged_valid"])
    return self.language_model(embeds, positions, segment_ids), features

  def forward_features(self, batch: dict[str, Array]) -> tuple[Array, Array, Array | None]:
    """(logits, final hidden states, merged vision features or None) of a pipeline batch."""
    meta = {k: batch[k] for k in VISION_META_KEYS} if "pixel_values" in batch else None
    hidden, features = self.encode(batch["input_ids"], batch["positions"], batch["segment_ids"],
                                   batch.get("pixel_values"), meta)
    return self.logits(hidden), hidden, features

  def feature_places(self, vision_meta: dict[str, Array]) -> Array:
    """Each merged vision feature's centre (y, x) in [0, 1] of its image: the head's vision positions."""
    return merged_token_centers(vision_meta["rope_pos"], vision_meta["image_segment_ids"],
                                self.config.vision.spatial_merge_size)


# --- Detection head inputs from packed rows ------------------------------------------------------------


def _gather_valid(values: Array, valid: Array, length: int) -> tuple[Array, Array]:
  """Per (row, slot), the first `length` positions where `valid` holds.

  values (B, T, D), valid (B, K, T) -> (B * K, length, D), (B * K, length). Gathers from the
  unrepeated rows, so memory grows with K * length, not K * T.
  """
  b, k, _ = valid.shape
  order = jnp.argsort(~valid, axis=2, stable=True)[:, :, :length]
  gathered = jnp.take_along_axis(values[:, None], order[..., None], axis=2)
  return (gathered.reshape(b * k, length, values.shape[-1]),
          jnp.take_along_axis(valid, order, axis=2).reshape(b * k, length))


def _slot_vision(batch: dict[str, Array], merge_size: int, length: int) -> tuple[Array, Array, Array]:
  """(slot mask (B, K, P) over the row's merged vision tokens, then per sample slot (B*K rows) the
  validity and centre (y, x) of the first `length` of the student's merged vision tokens).
  """
  k = batch["det_box_valid"].shape[1]
  slots = jnp.arange(1, k + 1)[None, :, None]
  vision_valid = batch["vision_is_student"][:, None, :] & (batch["vision_sample_slot"][:, None, :] == slots)
  centres = merged_token_centers(batch["rope_pos"], batch["image_segment_ids"], merge_size)
  places, valid = _gather_valid(centres, vision_valid, length)
  return vision_valid, valid, places


def head_inputs(batch: dict[str, Array], hidden: Array, features: Array, *, merge_size: int,
                memory_tokens: int):
  """Per sample slot (B*K rows): the student's text states and image features the head may read, and
  each feature's centre (y, x) in its image.

  A packed row holds K sample slots; the head sees one sample at a time, so each slot gathers its
  own student tokens (at most `memory_tokens` of each kind; static shapes).
  """
  k = batch["det_box_valid"].shape[1]
  slots = jnp.arange(1, k + 1)[None, :, None]
  text_valid = batch["student_text_mask"][:, None, :] & (batch["text_sample_slot"][:, None, :] == slots)
  vision_slot_valid, _, places = _slot_vision(batch, merge_size, min(memory_tokens, features.shape[1]))
  text, text_valid = _gather_valid(hidden, text_valid, min(memory_tokens, hidden.shape[1]))
  vision, vision_valid = _gather_valid(features, vision_slot_valid, min(memory_tokens, features.shape[1]))
  return text, text_valid, vision, vision_valid, places


def caption_mask(caption_ids: Array, eos_token_id: int) -> Array:
  """1 on the desc tokens and the first eos of each caption (captions are 0-padded after eos)."""
  is_eos = caption_ids == eos_token_id
  before_or_at_eos = jnp.cumsum(is_eos, axis=-1) - is_eos.astype(jnp.int32) == 0
  return before_or_at_eos.astype(jnp.float32)


def scale_gradient(x: Array, scale: float) -> Array:
  """`x` in the forward pass; its cotangent times `scale` in the backward pass."""
  if scale == 1.0:
    return x
  frozen = jax.lax.stop_gradient(x)
  return frozen + scale * (x - frozen)


def detection_targets(batch: dict[str, Array], eos_token_id: int) -> dict[str, Array]:
  b, k, o = batch["det_box_valid"].shape
  ids = batch["det_caption_ids"].reshape(b * k, o, -1)
  return {"boxes_xyxy": batch["det_boxes"].reshape(b * k, o, 4),
          "valid": batch["det_box_valid"].reshape(b * k, o),
          "caption_ids": ids, "caption_mask": caption_mask(ids, eos_token_id)}


def loss_terms(model: BBUModel, batch: dict[str, Array], rng: Array, *, det_weights: DetectionLossWeights,
               memory_tokens: int = 1024) -> dict[str, Array]:
  """Loss sums and counts of one micro-batch (the train step normalizes over the global batch)."""
  del rng  # no dropout
  logits, hidden, features = model.forward_features(batch)
  from bbu_jax.training.step import lm_loss_sums  # the step owns the LM loss definition
  terms = lm_loss_sums(logits, batch)
  if model.detection_head is None or features is None:
    return terms
  # What the head reads of the language model (its decoder's states, its token embeddings for the captions)
  # passes the head's gradient back scaled by decoder_gradient_scale, or not at all.
  det_config = model.detection_config
  to_language_model = (jax.lax.stop_gradient if not det_config.decoder_gradient
                       else lambda x: scale_gradient(x, det_config.decoder_gradient_scale))
  hidden = to_language_model(hidden)
  text, text_valid, vision, vision_valid, places = head_inputs(
      batch, hidden, features, merge_size=model.config.vision.spatial_merge_size, memory_tokens=memory_tokens)
  outputs = model.detection_head(text, text_valid, vision, vision_valid, places)
  targets = detection_targets(batch, model.config.eos_token_id)
  # Empty slots (no sample) must not teach the head "nothing here": drop their objectness loss.
  slot_used = (batch["sample_ids"].reshape(-1) >= 0)
  outputs = dict(outputs, objectness_logits=jnp.where(slot_used[:, None], outputs["objectness_logits"], -30.0))
  det = detection_loss(model.detection_head, outputs, targets,
                       to_language_model(model.language_model.embed_tokens.embedding[...]), det_weights)
  for name in ("bbox_l1_sum", "giou_sum", "objectness_sum", "caption_sum", "proposal_objectness_sum",
               "proposal_box_sum"):
    if name in det:
      terms[name] = det[name]
  return terms


def vision_warmup_terms(model: BBUModel, batch: dict[str, Array], rng: Array, *, det_weights: DetectionLossWeights,
                        memory_tokens: int = 1024) -> dict[str, Array]:
  """Loss sums of a vision warm-up step: the vision tower and the head's dense proposals only (no
  decoder, no queries, no captions), so the tower learns where objects are at a fraction of a full
  step's cost. The language-model sums are zero, so the step's loss is the proposals' alone."""
  del rng
  meta = {k: batch[k] for k in VISION_META_KEYS}
  features = model.visual(batch["pixel_values"].astype(model.dtype), meta)
  length = min(memory_tokens, features.shape[1])
  slot_valid, _, places = _slot_vision(batch, model.config.vision.spatial_merge_size, length)
  vision, vision_valid = _gather_valid(features, slot_valid, length)
  outputs = model.detection_head.proposals(vision, vision_valid, places)
  sums = proposal_loss_sums(outputs, detection_targets(batch, model.config.eos_token_id), det_weights)
  zero = jnp.zeros((), jnp.float32)
  return {"teacher_lm_sum": zero, "teacher_tokens": zero, "student_lm_sum": zero, "student_tokens": zero,
          "proposal_objectness_sum": sums["proposal_objectness_sum"], "proposal_box_sum": sums["proposal_box_sum"]}


def global_normalizers(batch: dict[str, Array], *, eos_token_id: int, merge_size: int,
                       memory_tokens: int = 1024) -> dict[str, Array]:
  """Denominators of the detection losses over the WHOLE batch (all micro-batches), so that gradient
  accumulation equals one large batch: the matched boxes (every real object is matched, since the
  config keeps detection_num_queries >= max_objects), the caption tokens of those objects, and the
  positive dense proposals (`detection_head.proposal_targets`, over the features the head reads)."""
  valid = batch["det_box_valid"]
  matched = valid.sum().astype(jnp.float32)
  tokens = (caption_mask(batch["det_caption_ids"], eos_token_id) * valid[..., None]).sum()
  # The batch may carry a leading micro-batch axis: fold it into the rows.
  rows = {key: batch[key].reshape(-1, *batch[key].shape[valid.ndim - 2:])
          for key in ("det_box_valid", "det_boxes", "vision_is_student", "vision_sample_slot", "rope_pos",
                      "image_segment_ids")}
  length = min(memory_tokens, rows["vision_is_student"].shape[1])
  _, vision_valid, places = _slot_vision(rows, merge_size, length)
  box_valid = rows["det_box_valid"].reshape(-1, rows["det_box_valid"].shape[-1])
  boxes = jnp.where(box_valid[..., None], rows["det_boxes"].reshape(*box_valid.shape, 4), 0.0)
  positive, _ = proposal_targets(places, vision_valid, boxes, box_valid)
  positives = positive.sum().astype(jnp.float32)
  return {"bbox_l1": matched, "giou": matched, "objectness": matched, "caption": tokens,
          "proposal_objectness": positives, "proposal_box": positives}


# --- Checkpoint ------------------------------------------------------------------------------------------


def extras_dict(model: BBUModel) -> dict[str, Any]:
  det, lora = model.detection_config, model.lora_config
  return {"detection_head": dataclasses.asdict(det) if det else None,
          "lora": lora.to_dict() if lora else None}


def save(model: BBUModel, out_dir: str | pathlib.Path, *, source_dir: str | pathlib.Path | None = None) -> pathlib.Path:
  """The bbu_jax checkpoint plus bbu_jax.json. Every process calls it (see weights.save_checkpoint)."""
  out_dir = weights.save_checkpoint(model, model.config, out_dir, source_dir=source_dir)
  if jax.process_index() == 0:
    (out_dir / EXTRAS_FILE).write_text(json.dumps(extras_dict(model), indent=2) + "\n")
  return out_dir


def load(path: str | pathlib.Path, *, dtype=jnp.float32, param_dtype=None, shardings=None,
         remat_policy: str = "none", attention_impl: str = "xla") -> BBUModel | Qwen25VL:
  """A bbu_jax checkpoint with its detection head when it has one; else what weights.load_model reads."""
  path = pathlib.Path(path)
  extras_path = path / EXTRAS_FILE
  if not extras_path.is_file():
    model, _ = weights.load_model(path, dtype=dtype, param_dtype=param_dtype, shardings=shardings,
                                  remat_policy=remat_policy, attention_impl=attention_impl)
    return model
  extras = json.loads(extras_path.read_text())
  det = DetectionHeadConfig(**extras["detection_head"]) if extras.get("detection_head") else None
  lora = lora_lib.LoraConfig.from_dict(extras.get("lora"))
  config = weights.read_config(path)
  param_dtype = dtype if param_dtype is None else param_dtype
  abstract = nnx.eval_shape(lambda: BBUModel(config, detection=det, rngs=nnx.Rngs(0), dtype=dtype,
                                             param_dtype=param_dtype, remat_policy=remat_policy,
                                             attention_impl=attention_impl, lora=lora))
  pure = weights.load_checkpoint_params(path, config, abstract, shardings=shardings)
  graphdef, params = nnx.split(abstract, nnx.Param)
  nnx.replace_by_pure_dict(params, pure)
  return nnx.merge(graphdef, params)
