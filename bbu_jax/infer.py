"""Batched inference entry point: records -> prompts (ChatProcessor) -> jitted generation -> responses file.

  python -m bbu_jax.infer --model_path P --input_jsonl F --output_file O --data_root D --batch_size N
      [--teacher_pool_file T --num_teachers K [--teacher_selection random|similar]] [--max_new_tokens M]
      [--temperature 0] [--top_p 1.0] [--seed 0]

The output is DESIGN.md's responses format: boxes in the image FILE's frame, a score per object from
its tokens' log-probabilities, the raw text, the parse error, the teachers shown, and `head_prediction`
when the checkpoint has a detection head (bbu_jax.models.bbu_model). A row whose image
cannot be read or whose prompt is over --model_max_length comes back with `error` and no prediction;
the rest of the batch completes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
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
from bbu_jax.models.qwen2_5_vl import Qwen25VL, bucket, scatter_image_features
from bbu_jax.models.vision import merged_token_centers, stack_vision_metadata, vision_metadata
from bbu_jax.parallel import sharding

TEACHER_SELECTIONS = ("random", "similar")


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
      embeds = m.language_model.embed_tokens(batch["input_ids"])
      features = m.visual(batch["pixel_values"].astype(m.dtype), batch["vision_meta"])
      embeds = scatter_image_features(embeds, batch["input_ids"] == m.config.image_token_id, features,
                                      batch["vision_meta"]["merged_valid"])
      hidden = m.language_model(embeds, batch["positions"], batch["segment_ids"])
      meta = batch["vision_meta"]
      places = merged_token_centers(meta["rope_pos"], meta["image_segment_ids"],
                                    m.config.vision.spatial_merge_size)
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
  tmp = cache_path.with_name(cache_path.name + ".tmp.npz")
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
                  *, progress: bool = True, **options) -> dict:
  """Runs inference over `input_jsonl` and writes the responses file; returns its content.

  `options` are the other InferenceConfig fields (max_new_tokens, temperature, top_p,
  teacher_selection, seed, model_max_length, prompt_language, min_pixels, max_pixels, dtype).
  """
  from tqdm import tqdm

  trained_chat = read_chat_config(model_path)
  for key in ("prompt_language", "min_pixels", "max_pixels"):
    if options.get(key) is None and key in trained_chat:
      options[key] = trained_chat[key]  # the prompts the model was trained with
  options = {k: v for k, v in options.items() if v is not None}
  config = InferenceConfig(batch_size=batch_size, num_teachers=num_teachers if teacher_pool_file else 0,
                           **options)
  if num_teachers and not teacher_pool_file:
    raise ValueError("--num_teachers needs --teacher_pool_file")
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
  records, rejects = records_lib.load_records(input_jsonl, on_error="skip")

  mesh = data_mesh()
  rows_per_batch = config.batch_size
  if mesh is not None:  # every data-parallel device gets the same number of rows
    rows_per_batch = -(-rows_per_batch // mesh.size) * mesh.size
  generator = Generator(model, mesh=mesh)
  if mesh is not None:
    generator.state = jax.device_put(generator.state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  settings = GenerationSettings(max_new_tokens=config.max_new_tokens,
                                eos_token_ids=tuple(sorted({tokenizer.special.eos_token_id, model_config.eos_token_id})),
                                pad_token_id=model_config.pad_token_id, temperature=config.temperature,
                                top_p=config.top_p)

  pool: list[dict] = []
  pool_ids: list[str] = []
  features = embedder = None
  if config.num_teachers:
    pool, _ = records_lib.load_records(teacher_pool_file, on_error="skip")
    pool_ids = [r["id"] for r in pool]
    if config.teacher_selection == "similar":
      embedder = VisionEmbedder(model)
      features = pool_features(embedder, pool, loader, image_config, config.batch_size,
                               pool_features_path(output_file, model_path, teacher_pool_file, image_config))

  def choose_teachers(index: int, record: dict) -> list[int]:
    if not config.num_teachers:
      return []
    if features is None:
      return sample_teachers(pool_ids, record["id"], seed=config.seed, epoch=0, index=index, teacher_ratio=1.0,
                             num_teacher_samples=config.num_teachers)
    query = embedder([_process(record, loader, image_config)], 1)[0]
    return most_similar(query, features, pool_ids, record["id"], config.num_teachers)

  samples: list[dict] = []
  start_time = time.perf_counter()
  generated_tokens = 0
  bar = tqdm(total=len(records), unit="img", disable=not progress, desc="infer")
  for batch_start in range(0, len(records), rows_per_batch):
    chunk = records[batch_start:batch_start + rows_per_batch]
    prompts, ready, slots = [], [], [None] * len(chunk)
    for offset, record in enumerate(chunk):
      teacher_ids: list[str] = []
      try:  # similar-teacher selection reads the student's image too
        teachers = [pool[i] for i in choose_teachers(batch_start + offset, record)] if pool else []
        teacher_ids = [t["id"] for t in teachers]
        prompt = processor.build_inference_prompt(record, teachers, image_loader=loader)
      except (ValueError, OSError) as error:
        failed = _sample(record, teacher_ids)
        failed["error"] = f"unreadable image: {error}"
        slots[offset] = failed
        continue
      if len(prompt["input_ids"]) > config.model_max_length:
        failed = _sample(record, teacher_ids)
        failed["error"] = (f"prompt too long: {len(prompt['input_ids'])} tokens > model_max_length "
                           f"{config.model_max_length}")
        slots[offset] = failed
        continue
      prompts.append(prompt)
      ready.append((offset, record, teacher_ids))
    if prompts:
      batch = make_prompt_batch(prompts, model_config, batch_size=rows_per_batch)
      output = generator.generate(batch, settings, seed=config.seed,
                                  row_seeds=np.arange(batch_start, batch_start + rows_per_batch))
      head = head_predictor(batch, prompts, tokenizer) if head_predictor is not None else None
      for row, (offset, record, teacher_ids) in enumerate(ready):
        slots[offset] = response_sample(record, teacher_ids, processor, output.row_tokens(row),
                                        output.row_log_probs(row))
        if head is not None:
          slots[offset]["head_prediction"] = head_objects(*(x[row] for x in head), tokenizer, processor, record)
        generated_tokens += int(output.lengths[row])
    samples.extend(slots)
    bar.update(len(chunk))
    elapsed = time.perf_counter() - start_time
    bar.set_postfix(img_per_s=f"{(batch_start + len(chunk)) / max(elapsed, 1e-9):.2f}",
                    tok_per_s=f"{generated_tokens / max(elapsed, 1e-9):.1f}")
  bar.close()

  elapsed = time.perf_counter() - start_time
  responses = {
      "model_path": str(model_path),
      "mode": "teacher_guided" if config.num_teachers else "standard",
      "config": {**dataclasses.asdict(config), "input_jsonl": str(input_jsonl), "data_root": data_root,
                 "teacher_pool_file": teacher_pool_file, "devices": len(jax.devices()),
                 "compilations": generator.trace_count, "seconds": round(elapsed, 3),
                 "detection_head": head_predictor is not None,
                 "generated_tokens": generated_tokens},
      "samples": samples,
  }
  if rejects:
    responses["rejected_records"] = [{"line": r.get("line"), "error": r.get("error")} for r in rejects]
  write_json_atomic(output_file, responses)
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
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  options = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "teacher_selection", "seed",
                                            "model_max_length", "prompt_language", "min_pixels", "max_pixels",
                                            "dtype")}
  try:
    responses = run_inference(args.model_path, args.input_jsonl, args.output_file, args.data_root,
                              args.batch_size, args.teacher_pool_file, args.num_teachers,
                              progress=not args.no_progress, **options)
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  failed = sum(1 for s in responses["samples"] if s.get("error"))
  print(f"{len(responses['samples'])} samples ({failed} failed) in {responses['config']['seconds']}s, "
        f"{responses['config']['compilations']} compilation(s); written to {args.output_file}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
