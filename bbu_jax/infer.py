"""Batched inference entry point: records -> prompts (ChatProcessor) -> jitted generation -> responses file.

  python -m bbu_jax.infer --model_path P --input_jsonl F --output_file O --data_root D --batch_size N
      [--teacher_pool_file T --num_teachers K [--teacher_selection random|similar]] [--max_new_tokens M]
      [--temperature 0] [--top_p 1.0] [--seed 0] [--resume] [--this_process_only]

The output is DESIGN.md's responses format: boxes in the image FILE's frame, a score per object from
its tokens' log-probabilities, the raw text, the parse error, the teachers shown, and `head_prediction`
when the checkpoint has a detection head (bbu_jax.models.bbu_model). A row whose image
cannot be read or whose prompt is over --model_max_length comes back with `error` and no prediction;
the rest of the batch completes.

While it runs, each finished batch is appended to a progress file beside the output
(`<output_file>.partial.jsonl`, fsynced per batch); `--resume` continues an interrupted run from it.
Under jax.distributed every process decodes its own contiguous run of batches (its own progress file)
and process 0 writes the one output, in input order.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import logging
import os
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bbu_jax.data import images as images_lib
from bbu_jax.data import records as records_lib
from bbu_jax.data.chat import ChatConfig, ChatProcessor, ImageLoader
from bbu_jax.data.geometry import scale_box
from bbu_jax.data.teachers import sample_teachers
from bbu_jax.data.tokenizer import Tokenizer
from bbu_jax.decode import scoring
from bbu_jax.decode.generate import GenerationSettings, Generator, PromptBatch, make_prompt_batch
from bbu_jax.models.qwen2_5_vl import Qwen25VL, bucket
from bbu_jax.models.vision import stack_vision_metadata, vision_metadata
from bbu_jax.parallel import sharding

TEACHER_SELECTIONS = ("random", "similar")
PROGRESS_FORMAT = "bbu_jax.infer progress 1"

log = logging.getLogger("bbu_jax.infer")


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
  """Everything that shapes the run, written to the responses file's `config`."""

  batch_size: int = 8
  max_new_tokens: int = 1024
  temperature: float = 0.0
  top_p: float = 1.0
  num_teachers: int = 0
  teacher_selection: str = "random"
  seed: int = 0
  model_max_length: int = 8192
  prompt_language: str = "zh"
  min_pixels: int = images_lib.MIN_PIXELS
  max_pixels: int = images_lib.MAX_PIXELS
  dtype: str = "float32"

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if self.num_teachers < 0:
      raise ValueError(f"num_teachers must be >= 0, got {self.num_teachers}")
    if self.teacher_selection not in TEACHER_SELECTIONS:
      raise ValueError(f"teacher_selection must be one of {TEACHER_SELECTIONS}, got {self.teacher_selection!r}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")


# --- Loading ------------------------------------------------------------------------------------------


def load_tokenizer_for(model_path: str | os.PathLike, config) -> Tokenizer:
  """The model directory's tokenizer, checked against the model's special token ids."""
  tokenizer = Tokenizer.from_dir(model_path)
  special = tokenizer.special
  for name in ("image_token_id", "vision_start_token_id"):
    if getattr(special, name) != getattr(config, name):
      raise ValueError(f"{model_path}: tokenizer.json gives {name} {getattr(special, name)} but config.json "
                       f"says {getattr(config, name)}")
  if tokenizer.vocab_size > config.text.vocab_size:
    raise ValueError(f"{model_path}: the tokenizer has {tokenizer.vocab_size} ids, the model's vocabulary "
                     f"only {config.text.vocab_size}")
  return tokenizer


def data_mesh(devices=None):
  """A ("data", "fsdp", "tensor") mesh with every device on "data", or None on one device."""
  devices = jax.devices() if devices is None else devices
  if len(devices) < 2:
    return None
  return jax.sharding.Mesh(np.asarray(devices).reshape(len(devices), 1, 1), sharding.MESH_AXES)


def ground_truth(record: dict) -> list[dict]:
  out = []
  for obj in record["objects"]:
    item = {"bbox_2d": list(obj["bbox_2d"]), "desc": obj["desc"]}
    geometry = obj.get("geometry")
    if geometry and geometry.get("kind") in ("quad", "line"):
      item[geometry["kind"]] = list(geometry["points"])
    out.append(item)
  return out


def load_inference_model(model_path: str | os.PathLike, dtype) -> Qwen25VL:
  """The model of a bbu_jax checkpoint (with its detection head when it was trained with one) or of a
  Hugging Face directory."""
  from bbu_jax.models import bbu_model
  return bbu_model.load(model_path, dtype=dtype)


def detection_head_of(model) -> Any:
  """The model's detection head, or None (plain Qwen2.5-VL, or a checkpoint trained without one)."""
  return getattr(model, "detection_head", None)


def head_memory_masks(batch: PromptBatch, prompts: Sequence[dict], image_token_id: int, vision_start_token_id: int,
                      im_end_token_id: int, merge_unit: int) -> tuple[np.ndarray, np.ndarray]:
  """What the detection head reads per row, as in training (ChatProcessor's student_text_mask and
  image_is_student): the student's user content, from its <|vision_start|> up to the <|im_end|> closing
  the turn, and the merged features of the student's image (the last image of the row).
  Returns text_valid (B, S) and vision_valid (B, P // merge_unit) bool (filler rows: a copy of row 0)."""
  b, s = batch.input_ids.shape
  text_valid = np.zeros((b, s), bool)
  merged = batch.vision_meta["merged_valid"]
  vision_valid = np.zeros(merged.shape, bool)
  for row in range(b):
    prompt = prompts[row if row < len(prompts) else 0]
    ids = np.asarray(prompt["input_ids"])
    start = int(np.flatnonzero(ids == vision_start_token_id)[-1])
    end = int(np.flatnonzero(ids == im_end_token_id)[-1])
    offset = s - len(ids)
    text_valid[row, offset + start:offset + end] = True
    student_tokens = int(np.prod(np.asarray(prompt["image_grid_thw"])[-1])) // merge_unit
    valid_index = np.flatnonzero(merged[row])
    vision_valid[row, valid_index[len(valid_index) - student_tokens:]] = True
  return text_valid, vision_valid


class HeadPredictor:
  """Detection-head predictions for a prompt batch: boxes (normalised cx, cy, w, h in the resized frame),
  objectness probabilities and greedy captions, from one forward pass over the prompts."""

  def __init__(self, model: Qwen25VL):
    self.head = detection_head_of(model)
    if self.head is None:
      raise ValueError("the model has no detection head")
    self.config = model.config
    graphdef, self.state = nnx.split(model)
    eos = model.config.eos_token_id

    def predict(state, batch, text_valid, vision_valid):
      m = nnx.merge(graphdef, state)
      meta = batch["vision_meta"]
      hidden, features = m.encode(batch["input_ids"], batch["positions"], batch["segment_ids"],
                                  batch["pixel_values"], meta)
      places = m.feature_places(meta)
      out = m.detection_head(hidden, text_valid, features, vision_valid, places)
      caption_ids, caption_lengths = m.detection_head.generate_captions(
          out["query_states"], m.language_model.embed_tokens.embedding[...], eos_token_id=eos)
      return out["pred_boxes_cxcywh"], jax.nn.sigmoid(out["objectness_logits"]), caption_ids, caption_lengths

    self._predict = jax.jit(predict)

  def __call__(self, batch: PromptBatch, prompts: Sequence[dict], tokenizer: Tokenizer) -> tuple[np.ndarray, ...]:
    special = tokenizer.special
    text_valid, vision_valid = head_memory_masks(batch, prompts, special.image_token_id,
                                                 special.vision_start_token_id, special.im_end_token_id,
                                                 self.config.vision.merge_unit)
    s = batch.prompt_bucket
    segment_ids = (np.arange(s)[None, :] >= s - batch.prompt_lengths[:, None]).astype(np.int32)
    arrays = {"input_ids": batch.input_ids, "positions": batch.positions, "segment_ids": segment_ids,
              "pixel_values": batch.pixel_values, "vision_meta": batch.vision_meta}
    return tuple(np.asarray(x) for x in self._predict(self.state, arrays, text_valid, vision_valid))


def head_objects(boxes_cxcywh: np.ndarray, scores: np.ndarray, caption_ids: np.ndarray, caption_lengths: np.ndarray,
                 tokenizer: Tokenizer, processor: ChatProcessor, record: dict) -> list[dict]:
  """One row's queries as {"bbox_2d" (file frame), "desc", "score"}, most confident first."""
  file_size = (int(record["width"]), int(record["height"]))
  model_w, model_h = processor.resized_size(*file_size)
  objects = []
  for q in np.argsort(-scores, kind="stable"):
    cx, cy, w, h = (float(v) for v in boxes_cxcywh[q])
    box = [(cx - w / 2) * model_w, (cy - h / 2) * model_h, (cx + w / 2) * model_w, (cy + h / 2) * model_h]
    desc = tokenizer.decode(caption_ids[q, :caption_lengths[q]], skip_special_tokens=True)
    objects.append({"bbox_2d": scale_box(box, (model_w, model_h), file_size), "desc": desc,
                    "score": float(scores[q])})
  return objects


# --- Teachers -----------------------------------------------------------------------------------------


class VisionEmbedder:
  """Pooled vision features of single images: the mean of the merged vision tokens, L2-normalised."""

  def __init__(self, model: Qwen25VL):
    self.config = model.config
    graphdef, state = nnx.split(model.visual)
    self.state = state

    def pooled(state, pixel_values, meta):
      features = nnx.merge(graphdef, state)(pixel_values, meta).astype(jnp.float32)
      valid = meta["merged_valid"][..., None]
      mean = jnp.sum(jnp.where(valid, features, 0.0), axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1)
      return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)

    self._pooled = jax.jit(pooled)

  def __call__(self, processed: Sequence[tuple[np.ndarray, np.ndarray]], batch_size: int) -> np.ndarray:
    """processed: (pixel_values (N, patch_dim), grid_thw (3,)) per image -> (n, hidden) float32."""
    vc = self.config.vision
    out = []
    for start in range(0, len(processed), batch_size):
      chunk = list(processed[start:start + batch_size])
      rows = len(chunk)
      chunk += [chunk[0]] * (batch_size - rows)
      budget = bucket(max(p.shape[0] for p, _ in chunk), minimum=64, multiple=vc.merge_unit)
      pixels = np.zeros((batch_size, budget, vc.patch_dim), np.float32)
      metas = []
      for row, (p, grid) in enumerate(chunk):
        pixels[row, :p.shape[0]] = p
        metas.append(vision_metadata(np.asarray(grid).reshape(1, 3), budget, vc))
      out.append(np.asarray(self._pooled(self.state, pixels, stack_vision_metadata(metas)))[:rows])
    return np.concatenate(out, axis=0) if out else np.zeros((0, self.config.vision.out_hidden_size), np.float32)


def _process(record: dict, loader: Callable[[dict], Any], image_config) -> tuple[np.ndarray, np.ndarray]:
  image = loader(record)
  pixels, grid = images_lib.process_image(image, image_config)
  return pixels, np.asarray(grid).reshape(-1)


def pool_features_path(output_file: str | os.PathLike, model_path, pool_file, image_config) -> pathlib.Path:
  """Where the pool's pooled features are cached: beside the output, keyed by model, pool and resizing."""
  key = json.dumps([str(pathlib.Path(model_path).absolute()), str(pathlib.Path(pool_file).absolute()),
                    os.path.getmtime(pool_file), image_config.min_pixels, image_config.max_pixels])
  digest = hashlib.sha1(key.encode()).hexdigest()[:12]
  output = pathlib.Path(output_file)
  return output.with_name(f"{output.stem}.pool_features.{digest}.npz")


def pool_features(embedder: VisionEmbedder, pool: Sequence[dict], loader, image_config, batch_size: int,
                  cache_path: pathlib.Path) -> np.ndarray:
  """(len(pool), hidden) pooled features, read from `cache_path` when it holds this pool's ids."""
  ids = np.asarray([r["id"] for r in pool])
  if cache_path.exists():
    with np.load(cache_path, allow_pickle=False) as cached:
      if cached["ids"].shape == ids.shape and np.all(cached["ids"] == ids):
        return cached["features"]
  features = embedder([_process(r, loader, image_config) for r in pool], batch_size)
  # Under jax.distributed every process computes the same features: one temporary file each.
  tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp.npz")
  np.savez(tmp, ids=ids, features=features)
  os.replace(tmp, cache_path)
  return features


def most_similar(query: np.ndarray, pool: np.ndarray, pool_ids: Sequence[str], student_id: str, k: int
                 ) -> list[int]:
  """Indices of the k pool entries with the highest cosine similarity (features are normalised), never
  the student itself; ties by pool order."""
  similarity = pool @ query
  order = np.argsort(-similarity, kind="stable")
  return [int(i) for i in order if pool_ids[i] != student_id][:k]


# --- Progress: finished batches on disk, resuming, several processes ------------------------------

# The settings a progress file must share with the run that resumes it (the input and the teacher
# pool by content, so a moved file still matches and an edited one does not).
RESUME_SETTINGS = ("model_path", "model_files", "input_sha256", "teacher_pool_sha256", "num_teachers",
                   "teacher_selection", "max_new_tokens", "temperature", "top_p", "seed", "model_max_length",
                   "prompt_language", "min_pixels", "max_pixels", "dtype")
# Those compared by a digest, and how a refusal names them.
_DIGESTS = {"model_files": "the model's files (their sizes or modification times)",
            "input_sha256": "the input file's content", "teacher_pool_sha256": "the teacher pool file's content"}


def file_sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def model_files_digest(model_path: str | os.PathLike) -> str:
  """A digest of the names, sizes and modification times of the model folder's weights and settings
  (*.json, *.safetensors, params/): a model saved again at the same path (training resumed, say) does not
  pass for the one a progress file was made with. Files this module writes (*.jsonl, *.npz) are not in it."""
  root = pathlib.Path(model_path)
  files = [p for p in root.glob("*") if p.suffix in (".json", ".safetensors")] + list(root.glob("params/**/*"))
  digest = hashlib.sha256()
  for path in sorted(p for p in files if p.is_file()):
    stat = path.stat()
    digest.update(f"{path.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def run_settings(model_path, input_jsonl, teacher_pool_file, config: InferenceConfig) -> dict:
  """What decides a row's answer, as stored in a progress file's header and compared on --resume
  (batch_size is not: it changes which rows share a batch, not what each row gets)."""
  return {"model_path": str(pathlib.Path(model_path).absolute()), "model_files": model_files_digest(model_path),
          "input_jsonl": str(input_jsonl), "input_sha256": file_sha256(input_jsonl),
          "teacher_pool_file": teacher_pool_file,
          "teacher_pool_sha256": file_sha256(teacher_pool_file) if config.num_teachers else None,
          **{k: getattr(config, k) for k in RESUME_SETTINGS if hasattr(config, k)}}


def progress_path(output_file: str | os.PathLike, process_index: int = 0, process_count: int = 1) -> pathlib.Path:
  """`<output_file>.partial.jsonl`, or `<output_file>.partial.<i>-of-<n>.jsonl` for process i of n."""
  output = pathlib.Path(output_file)
  part = "partial" if process_count == 1 else f"partial.{process_index}-of-{process_count}"
  return output.with_name(f"{output.name}.{part}.jsonl")


def foreign_progress_files(output_file: str | os.PathLike, process_count: int) -> list[pathlib.Path]:
  """Progress files of this output written by a run with another number of processes."""
  output = pathlib.Path(output_file)
  ours = {progress_path(output, i, process_count).name for i in range(process_count)}
  return sorted(p for p in output.parent.glob(glob.escape(output.name) + ".partial*.jsonl") if p.name not in ours)


def read_progress(path: pathlib.Path, settings: dict, input_ids: set[str]) -> tuple[dict[str, dict], int]:
  """The samples a progress file holds, by id, and the length in bytes of its good part.

  A last line that is cut short or unreadable (the process died while writing it) is left out, to be
  decoded again; anything else that is wrong refuses the file, naming its line.
  """
  data = path.read_bytes()
  lines = data.split(b"\n")
  torn, lines = lines[-1], lines[:-1]  # text after the last newline was being written when the run died
  good_bytes = 0
  header = None
  done: dict[str, dict] = {}
  for number, line in enumerate(lines, start=1):
    try:
      item = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
      if number == len(lines):
        log.warning("%s:%d: unreadable last line (%s), its row is decoded again", path, number, error)
        break
      raise ValueError(f"{path}:{number}: not a JSON line ({error}); the progress file is damaged, delete "
                       "it to start over") from None
    if number == 1:
      header = item
      if not isinstance(item, dict) or item.get("format") != PROGRESS_FORMAT:
        raise ValueError(f"{path}:1: not a bbu_jax.infer progress file (no header with format "
                         f"{PROGRESS_FORMAT!r}); move it away or delete it")
      stored = item.get("settings", {})
      differ = [f"{_DIGESTS[k]} changed" if k in _DIGESTS else f"{k} was {stored.get(k)!r}, now {settings[k]!r}"
                for k in RESUME_SETTINGS if stored.get(k) != settings[k]]
      if differ:
        raise ValueError(f"{path}:1: written by a run with other settings ({'; '.join(differ)}); resume with "
                         "the same settings, or delete the file to start over")
    else:
      sample_id = item.get("id") if isinstance(item, dict) else None
      if sample_id not in input_ids:
        raise ValueError(f"{path}:{number}: sample id {sample_id!r} is not in the input "
                         f"{settings['input_jsonl']}; the progress file belongs to another run, delete it")
      if sample_id in done:
        raise ValueError(f"{path}:{number}: sample id {sample_id!r} a second time; the progress file is "
                         "damaged, delete it to start over")
      done[sample_id] = item
    good_bytes += len(line) + 1
  if header is None:  # died while writing the header: nothing was done
    return {}, 0
  if torn:
    log.warning("%s: the last line was cut short (%d bytes), its row is decoded again", path, len(torn))
  return done, good_bytes


class ProgressWriter:
  """Appends finished samples to a progress file, one JSON line each, flushed and fsynced per batch so
  that a killed run loses at most the batch in flight."""

  def __init__(self, path: pathlib.Path, header: dict, keep_bytes: int):
    self.path = path
    path.parent.mkdir(parents=True, exist_ok=True)
    if keep_bytes:  # resuming: drop a torn last line before appending after it
      os.truncate(path, keep_bytes)
      self._file = open(path, "ab")
    else:
      self._file = open(path, "wb")
      self._write([header])

  def _write(self, items: Sequence[dict]) -> None:
    self._file.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items).encode("utf-8"))
    self._file.flush()
    os.fsync(self._file.fileno())

  def append(self, samples: Sequence[dict]) -> None:
    self._write(samples)

  def close(self) -> None:
    self._file.close()


def process_batches(num_rows: int, rows_per_batch: int, process_index: int = 0, process_count: int = 1
                    ) -> list[range]:
  """Process `process_index`'s batches: the input cut into consecutive batches of `rows_per_batch` rows,
  and these split into contiguous runs of whole batches, one per process, as even as whole batches allow.
  Every process count thus puts the same rows together in a batch as one process does."""
  num_batches = -(-num_rows // rows_per_batch)
  first = process_index * num_batches // process_count
  last = (process_index + 1) * num_batches // process_count
  return [range(b * rows_per_batch, min((b + 1) * rows_per_batch, num_rows)) for b in range(first, last)]


def agree_to_start(error: Exception | None, process_count: int) -> None:
  """Raises on every process when any one of them cannot start, so that none waits for the others."""
  refused = []
  if process_count > 1:
    from jax.experimental import multihost_utils
    refused = np.flatnonzero(multihost_utils.process_allgather(np.int32(error is not None))).tolist()
  if error is not None:
    raise error
  if refused:
    raise ValueError(f"process(es) {refused} of {process_count} could not start (their own logs say why); "
                     "this one stops too")


def gather_from_processes(payload: dict, process_count: int) -> list[dict]:
  """Every process's JSON `payload`, in process order, on every process (over jax's collectives, so
  the hosts need no shared filesystem)."""
  if process_count == 1:
    return [payload]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(payload, ensure_ascii=False).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  everything = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(everything[i, :sizes[i]].tobytes().decode("utf-8")) for i in range(process_count)]


def barrier(name: str, process_count: int) -> None:
  if process_count > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# --- The run ------------------------------------------------------------------------------------------


def _sample(record: dict, teachers: list[str]) -> dict:
  return {"id": record["id"], "images": list(record["images"]), "width": record["width"],
          "height": record["height"], "ground_truth": ground_truth(record), "prediction": [],
          "raw_response": None, "parse_error": None, "teachers": teachers}


def response_sample(record: dict, teachers: list[str], processor: ChatProcessor, tokens: np.ndarray,
                    log_probs: np.ndarray) -> dict:
  """One sample of the responses file from the generated tokens of its row."""
  text, spans = scoring.token_char_spans(processor.tokenizer, tokens)
  parsed = processor.parse_response(text, record)
  scores = scoring.object_scores(parsed.objects, spans, log_probs)
  sample = _sample(record, teachers)
  sample["raw_response"] = text
  sample["parse_error"] = parsed.error
  sample["prediction"] = [{"bbox_2d": obj["bbox_2d"], "desc": obj["desc"], "score": score}
                          for obj, score in zip(parsed.objects, scores)]
  sample["num_tokens"] = int(len(tokens))
  return sample


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(value, ensure_ascii=False, indent=1), encoding="utf-8")
  os.replace(tmp, path)


def read_chat_config(model_path: str) -> dict:
  """The prompt settings a bbu_jax training run saved beside its model (chat_config.json), or {}."""
  path = pathlib.Path(model_path) / "chat_config.json"
  if not path.is_file():
    return {}
  return json.loads(path.read_text(encoding="utf-8"))


def run_inference(model_path: str, input_jsonl: str, output_file: str, data_root: str | None = None,
                  batch_size: int = 8, teacher_pool_file: str | None = None, num_teachers: int = 0,
                  *, progress: bool = True, resume: bool = False, split_across_processes: bool = True,
                  **options) -> dict:
  """Runs inference over `input_jsonl` and writes the responses file; returns its content.

  `options` are the other InferenceConfig fields (max_new_tokens, temperature, top_p,
  teacher_selection, seed, model_max_length, prompt_language, min_pixels, max_pixels, dtype).
  `resume` continues from the progress file of an interrupted run with the same settings; without it an
  existing progress file is refused. Under jax.distributed the rows are split across the processes
  unless `split_across_processes` is False (then this process decodes them all, alone).
  """
  from tqdm import tqdm

  # ===== Setup: every process checks its part, then all agree to start ============================
  process_index, process_count = ((jax.process_index(), jax.process_count()) if split_across_processes
                                  else (0, 1))
  error = None
  try:
    trained_chat = read_chat_config(model_path)
    for key in ("prompt_language", "min_pixels", "max_pixels"):
      if options.get(key) is None and key in trained_chat:
        options[key] = trained_chat[key]  # the prompts the model was trained with
    options = {k: v for k, v in options.items() if v is not None}
    config = InferenceConfig(batch_size=batch_size, num_teachers=num_teachers if teacher_pool_file else 0,
                             **options)
    if num_teachers and not teacher_pool_file:
      raise ValueError("--num_teachers needs --teacher_pool_file")
    records, rejects = records_lib.load_records(input_jsonl, on_error="skip")

    # Which rows are this process's, and which of them an earlier run finished.
    mesh = data_mesh(jax.local_devices())
    rows_per_batch = config.batch_size
    if mesh is not None:  # every data-parallel device gets the same number of rows
      rows_per_batch = -(-rows_per_batch // mesh.size) * mesh.size
    batches = process_batches(len(records), rows_per_batch, process_index, process_count)
    share = [index for batch in batches for index in batch]
    settings = run_settings(model_path, input_jsonl, teacher_pool_file, config)
    progress_file = progress_path(output_file, process_index, process_count)
    foreign = foreign_progress_files(output_file, process_count)
    if foreign:
      raise ValueError(f"{foreign[0]}: progress of a run with another number of processes than this one's "
                       f"{process_count}; resume with that number, or delete {len(foreign)} such file(s) to "
                       "start over")
    done, keep_bytes = {}, 0
    if progress_file.exists():
      if not resume:
        raise ValueError(f"{progress_file} exists: the progress of an earlier run that did not finish; pass "
                         "--resume to continue it, or delete the file to start over")
      done, keep_bytes = read_progress(progress_file, settings, {r["id"] for r in records})
    todo = [index for index in share if records[index]["id"] not in done]
    who = f"process {process_index} of {process_count}: " if process_count > 1 else ""
    if resume and progress_file.exists():
      log.info("%sresuming from %s: %d of %d rows already done, %d remain", who, progress_file,
               len(share) - len(todo), len(share), len(todo))
    else:
      log.info("%s%s%d rows to decode; finished batches go to %s", who,
               "no progress file to resume from; " if resume else "", len(todo), progress_file)

    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    model = load_inference_model(model_path, dtype)
    model_config = model.config
    head_predictor = HeadPredictor(model) if detection_head_of(model) is not None else None
    tokenizer = load_tokenizer_for(model_path, model_config)
    image_config = images_lib.ImageProcessorConfig(min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    hierarchy = {"label_hierarchy": trained_chat["label_hierarchy"]} if "label_hierarchy" in trained_chat else {}
    processor = ChatProcessor(tokenizer, ChatConfig(prompt_language=config.prompt_language, images=image_config,
                                                    **hierarchy))
    loader = ImageLoader(data_root)
    generator = Generator(model, mesh=mesh)
    if mesh is not None:
      generator.state = jax.device_put(generator.state,
                                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    generation = GenerationSettings(
        max_new_tokens=config.max_new_tokens,
        eos_token_ids=tuple(sorted({tokenizer.special.eos_token_id, model_config.eos_token_id})),
        pad_token_id=model_config.pad_token_id, temperature=config.temperature, top_p=config.top_p)

    pool: list[dict] = []
    pool_ids: list[str] = []
    features = embedder = None
    if config.num_teachers:
      pool, _ = records_lib.load_records(teacher_pool_file, on_error="skip")
      pool_ids = [r["id"] for r in pool]
      if config.teacher_selection == "similar" and todo:
        embedder = VisionEmbedder(model)
        features = pool_features(embedder, pool, loader, image_config, config.batch_size,
                                 pool_features_path(output_file, model_path, teacher_pool_file, image_config))
  except Exception as setup_error:  # pylint: disable=broad-except  (re-raised by agree_to_start)
    error = setup_error
  agree_to_start(error, process_count)

  def choose_teachers(index: int, record: dict) -> list[int]:
    if not config.num_teachers:
      return []
    if features is None:
      return sample_teachers(pool_ids, record["id"], seed=config.seed, epoch=0, index=index, teacher_ratio=1.0,
                             num_teacher_samples=config.num_teachers)
    query = embedder([_process(record, loader, image_config)], 1)[0]
    return most_similar(query, features, pool_ids, record["id"], config.num_teachers)

  # ===== Decode this process's rows, appending each finished batch to the progress file ===========
  header = {"format": PROGRESS_FORMAT, "process": [process_index, process_count], "settings": settings}
  writer = ProgressWriter(progress_file, header, keep_bytes)
  finished: dict[str, dict] = dict(done)
  start_time = time.perf_counter()
  generated_tokens = decoded = 0
  bar = tqdm(total=len(share), initial=len(share) - len(todo), unit="img", disable=not progress,
             desc=f"infer {process_index}/{process_count}" if process_count > 1 else "infer")
  for batch_rows in batches:
    indices = [index for index in batch_rows if records[index]["id"] not in done]
    if not indices:
      continue
    prompts, ready, slots = [], [], {}
    for index in indices:
      record = records[index]
      teacher_ids: list[str] = []
      try:  # similar-teacher selection reads the student's image too
        teachers = [pool[i] for i in choose_teachers(index, record)] if pool else []
        teacher_ids = [t["id"] for t in teachers]
        prompt = processor.build_inference_prompt(record, teachers, image_loader=loader)
      except (ValueError, OSError) as row_error:
        failed = _sample(record, teacher_ids)
        failed["error"] = f"unreadable image: {row_error}"
        slots[index] = failed
        continue
      if len(prompt["input_ids"]) > config.model_max_length:
        failed = _sample(record, teacher_ids)
        failed["error"] = (f"prompt too long: {len(prompt['input_ids'])} tokens > model_max_length "
                           f"{config.model_max_length}")
        slots[index] = failed
        continue
      prompts.append(prompt)
      ready.append((index, record, teacher_ids))
    if prompts:
      batch = make_prompt_batch(prompts, model_config, batch_size=rows_per_batch)
      # A row's sampling stream is its input index: the same answer whichever rows share its batch.
      row_seeds = [index for index, _, _ in ready]
      row_seeds += range(len(records), len(records) + rows_per_batch - len(ready))  # filler rows
      output = generator.generate(batch, generation, seed=config.seed, row_seeds=np.asarray(row_seeds))
      head = head_predictor(batch, prompts, tokenizer) if head_predictor is not None else None
      for row, (index, record, teacher_ids) in enumerate(ready):
        slots[index] = response_sample(record, teacher_ids, processor, output.row_tokens(row),
                                       output.row_log_probs(row))
        if head is not None:
          slots[index]["head_prediction"] = head_objects(*(x[row] for x in head), tokenizer, processor, record)
        generated_tokens += int(output.lengths[row])
    batch_samples = [slots[index] for index in indices]
    writer.append(batch_samples)
    finished.update((s["id"], s) for s in batch_samples)
    decoded += len(indices)
    bar.update(len(indices))
    elapsed = time.perf_counter() - start_time
    bar.set_postfix(img_per_s=f"{decoded / max(elapsed, 1e-9):.2f}",
                    tok_per_s=f"{generated_tokens / max(elapsed, 1e-9):.1f}")
  bar.close()
  writer.close()

  # ===== Gather every process's samples; process 0 writes them in input order ======================
  elapsed = time.perf_counter() - start_time
  parts = gather_from_processes({"samples": list(finished.values()), "generated_tokens": generated_tokens,
                                 "compilations": generator.trace_count, "decoded": decoded,
                                 "resumed": len(share) - len(todo)}, process_count)
  by_id: dict[str, dict] = {}
  for part in parts:
    for sample in part["samples"]:
      by_id.setdefault(sample["id"], sample)
  missing = [r["id"] for r in records if r["id"] not in by_id]
  if missing:
    raise RuntimeError(f"no sample for {len(missing)} input row(s) after decoding, e.g. {missing[:3]}")
  responses = {
      "model_path": str(model_path),
      "mode": "teacher_guided" if config.num_teachers else "standard",
      "config": {**dataclasses.asdict(config), "input_jsonl": str(input_jsonl), "data_root": data_root,
                 "teacher_pool_file": teacher_pool_file, "devices": len(jax.devices()),
                 "processes": process_count, "compilations": max(p["compilations"] for p in parts),
                 "seconds": round(elapsed, 3), "detection_head": head_predictor is not None,
                 "generated_tokens": sum(p["generated_tokens"] for p in parts),
                 "resumed_samples": sum(p["resumed"] for p in parts),
                 "decoded_samples": sum(p["decoded"] for p in parts)},
      "samples": [by_id[r["id"]] for r in records],
  }
  if rejects:
    responses["rejected_records"] = [{"line": r.get("line"), "error": r.get("error")} for r in rejects]
  if process_index == 0:
    write_json_atomic(output_file, responses)
  barrier("bbu_jax.infer: output written", process_count)  # only then is the progress no longer needed
  progress_file.unlink()
  return responses


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m bbu_jax.infer", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model_path", required=True, help="Hugging Face Qwen2.5-VL dir or bbu_jax checkpoint")
  parser.add_argument("--input_jsonl", required=True)
  parser.add_argument("--output_file", required=True)
  parser.add_argument("--data_root", default=None, help="image paths in the records are relative to this")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--teacher_pool_file", default=None)
  parser.add_argument("--num_teachers", type=int, default=0)
  parser.add_argument("--teacher_selection", choices=TEACHER_SELECTIONS, default="random")
  parser.add_argument("--max_new_tokens", type=int, default=1024)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--model_max_length", type=int, default=8192, help="longest prompt accepted, in tokens")
  trained = "default: the model folder's chat_config.json (what training used), else "
  parser.add_argument("--prompt_language", choices=("zh", "en"), default=None, help=trained + "zh")
  parser.add_argument("--min_pixels", type=int, default=None, help=trained + str(images_lib.MIN_PIXELS))
  parser.add_argument("--max_pixels", type=int, default=None, help=trained + str(images_lib.MAX_PIXELS))
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--no_progress", action="store_true")
  parser.add_argument("--resume", action="store_true",
                      help="continue an interrupted run from <output_file>.partial.jsonl (same settings)")
  parser.add_argument("--this_process_only", action="store_true",
                      help="decode every row in this process even under jax.distributed (bbu_jax.train's "
                           "final evaluation runs on process 0 alone)")
  return parser.parse_args(argv)


def _setup_logging() -> None:
  """This module's INFO lines on stderr when nobody configured logging (bbu_jax.train does)."""
  log.setLevel(logging.INFO)
  root = logging.getLogger()
  if not root.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  _setup_logging()
  if not args.this_process_only:
    from bbu_jax.parallel import distributed
    distributed.initialize_distributed()  # one process unless JAX_COORDINATOR_ADDRESS, srun or a TPU pod say more
  options = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "teacher_selection", "seed",
                                            "model_max_length", "prompt_language", "min_pixels", "max_pixels",
                                            "dtype")}
  try:
    responses = run_inference(args.model_path, args.input_jsonl, args.output_file, args.data_root,
                              args.batch_size, args.teacher_pool_file, args.num_teachers,
                              progress=not args.no_progress, resume=args.resume,
                              split_across_processes=not args.this_process_only, **options)
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  if responses["config"]["processes"] > 1 and jax.process_index() != 0:
    return 0  # process 0 wrote the output and says so
  failed = sum(1 for s in responses["samples"] if s.get("error"))
  print(f"{len(responses['samples'])} samples ({failed} failed) in {responses['config']['seconds']}s, "
        f"{responses['config']['compilations']} compilation(s); written to {args.output_file}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
