"""Training: `python -m bbu_jax.train --config configs/exp.py [--config.FIELD=VALUE ...]`.

One top-down run, big_vision style: setup, data, model, optimizer and shardings, restore, the loop
(with the validation loss every `eval_steps` and a stop on the first non-finite loss), the export of the
last or the best checkpoint, and the final evaluation. Helpers live in their modules; this file reads as
the story of a run.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import signal
import sys
import time
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from bbu_jax import config as config_lib
from bbu_jax.data import packing as packing_lib
from bbu_jax.data import pipeline as pipeline_lib
from bbu_jax.data import labels, synthetic, validate
from bbu_jax.data.chat import ChatConfig, ChatProcessor, tokenizer_training_texts
from bbu_jax.data.tokenizer import Tokenizer, load_or_train_tokenizer
from bbu_jax.models import bbu_model, weights
from bbu_jax.models.config import Qwen25VLConfig, TextConfig, VisionConfig, named_config
from bbu_jax.models.detection_head import DetectionHeadConfig
from bbu_jax.parallel import distributed, sharding
from bbu_jax.training import checkpoint as checkpoint_lib
from bbu_jax.training import metrics as metrics_lib
from bbu_jax.training import optimizer as optimizer_lib
from bbu_jax.training import program as program_lib
from bbu_jax.training import step as step_lib

log = logging.getLogger("bbu_jax.train")


class NonFiniteLossError(RuntimeError):
  """A step's loss or gradient norm is NaN or Inf; the message names the step and the batch's samples."""


# --- Pieces of setup -----------------------------------------------------------------------------------


def prepare_data(config) -> None:
  """Generates the synthetic dataset into data_root when the config asks for it and it is missing."""
  if not config.synthetic.enabled:
    return
  if pathlib.Path(config.train_data_path).exists():
    wanted = synthetic.generation_settings(config.synthetic.num_train, config.synthetic.num_val,
                                           config.synthetic.num_teacher, config.seed, scale=config.synthetic.scale,
                                           profile=config.synthetic.profile)
    settings_path = pathlib.Path(config.data_root) / synthetic.SETTINGS_FILE
    found = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    differ = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
    if differ:
      log.warning("synthetic data at %s was made with other settings than this config's (%s); it is used as it "
                  "is: delete the folder to generate the config's set", config.data_root,
                  ", ".join(f"{k} {old} instead of {new}" for k, (old, new) in differ.items()))
    else:
      log.info("synthetic data already present at %s", config.data_root)
    return
  if jax.process_index() == 0:
    log.info("generating the synthetic dataset into %s (%d train, %d val, %d teacher images)", config.data_root,
             config.synthetic.num_train, config.synthetic.num_val, config.synthetic.num_teacher)
    synthetic.generate(config.data_root, config.synthetic.num_train, config.synthetic.num_val,
                       config.synthetic.num_teacher, seed=config.seed, scale=config.synthetic.scale,
                       profile=config.synthetic.profile, progress=True)
  _barrier("synthetic data")


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def load_split(path: str, config, run_dir: pathlib.Path, name: str) -> list[dict]:
  """Validated records of one file; problems refuse the run unless skip_invalid_records."""
  if not path:
    return []
  records, report = validate.split_valid(path, config.data_root or None, skip_invalid=config.skip_invalid_records,
                                         rejects_path=run_dir / f"rejected_{name}.jsonl")
  log.info("%s: %d records, %d objects from %s%s", name, len(records), sum(len(r["objects"]) for r in records),
           path, f" ({len(report.bad_lines)} rejected, see rejected_{name}.jsonl)" if report.bad_lines else "")
  return records


def label_hierarchy(config, records: Sequence[dict]) -> dict[str, list[str]] | None:
  """The hierarchy the system prompt names: the default one, the training data's own labels, or a file."""
  if config.label_hierarchy == "default":
    return None
  if config.label_hierarchy == "data":
    hierarchy: dict[str, set[str]] = {}
    for record in records:
      for obj in record["objects"]:
        object_type, _, rest = obj["desc"].partition("/")
        hierarchy.setdefault(object_type, set())
        if rest:
          hierarchy[object_type].add(rest)
    return {k: sorted(v) for k, v in sorted(hierarchy.items())}
  return labels.load_label_hierarchy(config.label_hierarchy)


def build_tokenizer(config, run_dir: pathlib.Path, records: Sequence[dict], chat_config: ChatConfig) -> Tokenizer:
  """The model's tokenizer, or (from scratch) a BPE trained once and kept in the run folder."""
  if config.model_path:
    return load_or_train_tokenizer(config.model_path)
  saved = run_dir / "tokenizer"
  if (saved / "tokenizer.json").exists():
    return Tokenizer.from_dir(saved)
  tokenizer = load_or_train_tokenizer(None, tokenizer_training_texts(records, chat_config),
                                      vocab_size=config.tokenizer_vocab_size,
                                      number_digits=config.tokenizer_number_digits)
  if jax.process_index() == 0:
    tokenizer.save(saved, model_max_length=config.model_max_length)
  log.info("trained a %d-token byte-level BPE on the training answers; saved to %s", tokenizer.vocab_size, saved)
  return tokenizer


def build_model_config(config, tokenizer: Tokenizer) -> Qwen25VLConfig:
  if config.model_path:
    return weights.read_config(config.model_path)
  if config.model_size:
    return named_config(config.model_size)
  m = config.model
  special = tokenizer.special
  head_dim = m.text_hidden_size // m.text_heads
  quarter = head_dim // 2
  mrope = (quarter - 2 * (quarter * 3 // 8), quarter * 3 // 8, quarter * 3 // 8)  # 16/24/24 of 64, scaled
  mrope = tuple(m.mrope_section) or mrope
  return Qwen25VLConfig(
      vision=VisionConfig(depth=m.vision_depth, hidden_size=m.vision_hidden_size, num_heads=m.vision_heads,
                          intermediate_size=m.vision_intermediate_size, window_size=m.vision_window_size,
                          fullatt_block_indexes=tuple(m.vision_fullatt_block_indexes),
                          out_hidden_size=m.text_hidden_size,
                          absolute_positions=bool(m.vision_absolute_positions),
                          output_positions=bool(m.vision_output_positions)),
      text=TextConfig(vocab_size=tokenizer.vocab_size, hidden_size=m.text_hidden_size,
                      intermediate_size=m.text_intermediate_size, num_hidden_layers=m.text_layers,
                      num_attention_heads=m.text_heads, num_key_value_heads=m.text_kv_heads, mrope_section=mrope,
                      rope_theta=float(m.rope_theta)),
      tie_word_embeddings=True, image_token_id=special.image_token_id, video_token_id=special.video_token_id,
      vision_start_token_id=special.vision_start_token_id, vision_end_token_id=special.vision_end_token_id,
      bos_token_id=special.bos_token_id, eos_token_id=special.eos_token_id, pad_token_id=special.pad_token_id)


def detection_config(config, model_config: Qwen25VLConfig) -> DetectionHeadConfig | None:
  if not config.detection_enabled:
    return None
  width = config.detection_width
  return DetectionHeadConfig(hidden_size=model_config.text.hidden_size, num_queries=config.detection_num_queries,
                             width=width, num_layers=config.detection_layers, num_heads=max(1, width // 64),
                             mlp_dim=4 * width, adapter_dim=max(16, model_config.text.hidden_size // 8),
                             caption_max_len=config.detection_caption_max_len, two_stage=config.detection_two_stage,
                             encoder_layers=config.detection_encoder_layers,
                             decoder_gradient=config.detection_decoder_gradient,
                             decoder_gradient_scale=config.detection_decoder_gradient_scale)


def estimate_rows_per_epoch(records: Sequence[dict], processor: ChatProcessor, tokenizer: Tokenizer,
                            packing_config: packing_lib.PackingConfig, seed: int) -> int:
  """Rows one epoch packs into, from token and patch counts (no image is read)."""
  costs = []
  for record in records:
    tokens = len(tokenizer.encode(processor.training_text(record)))
    width, height = record["width"], record["height"]
    patches = processor.config.images.num_image_tokens(height, width) * 4
    costs.append((tokens, patches))
  order = np.random.default_rng(seed).permutation(len(costs))
  rows = 0
  window = packing_config.packing_window
  for start in range(0, len(order), window):
    chunk = [costs[i] for i in order[start:start + window]]
    rows += len(packing_lib.pack_rows(chunk, packing_config))
  return rows


# --- The run -----------------------------------------------------------------------------------------


def train(config) -> dict:
  """Runs training (and the final evaluation) for a locked config; returns the final metrics."""
  # ===== Setup ===============================================================================
  distributed.initialize_distributed()
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  run_dir = pathlib.Path(config.output_dir) / config.run_name
  is_main = jax.process_index() == 0
  if is_main:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  _setup_logging(run_dir if is_main else None)
  mesh = sharding.make_mesh(config.mesh)
  log.info("run %s: %d devices (%s), mesh %s, %s sharding, %d processes", run_dir, jax.device_count(),
           jax.devices()[0].platform, dict(mesh.shape), config.sharding_mode, jax.process_count())

  # ===== Data ================================================================================
  prepare_data(config)
  train_records = load_split(config.train_data_path, config, run_dir, "train")
  val_records = load_split(config.val_data_path, config, run_dir, "val")  # a bad file is refused now, not at the end
  teacher_pool = load_split(config.teacher_pool_file, config, run_dir, "teacher_pool") if config.teacher_ratio > 0 else []
  chat_config = pipeline_lib.chat_config_from(config, label_hierarchy(config, train_records))
  tokenizer = build_tokenizer(config, run_dir, train_records + teacher_pool, chat_config)
  processor = ChatProcessor(tokenizer, chat_config)
  model_config = build_model_config(config, tokenizer)
  det_config = detection_config(config, model_config)

  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  global_rows = config.per_device_train_batch_size * data_parallel
  host_rows = global_rows // jax.process_count() * config.gradient_accumulation_steps
  # One source of the packing shapes for training and ahead-of-time compilation (bbu_jax.aot).
  pipeline_config = pipeline_lib.pipeline_config_from(
      config, model_config.vision, batch_size=host_rows, num_epochs=config.num_train_epochs,
      process_index=jax.process_index(), process_count=jax.process_count(),
      rejects_path=str(run_dir / f"rejected_samples_{jax.process_index()}.jsonl"),
      max_caption_tokens=chat_config.max_caption_tokens)
  packing_config = pipeline_config.packing
  pipeline_lib.check_samples_can_fit(train_records, processor, packing_config)
  dataset = pipeline_lib.build_dataset(train_records, processor, pipeline_config, model_config.vision,
                                       teacher_pool=teacher_pool, data_root=config.data_root or None)
  rows_per_epoch = estimate_rows_per_epoch(train_records, processor, tokenizer, packing_config, config.seed)
  # Validation: the same ChatProcessor and packing, one pass in file order, no teachers, the last batch
  # padded with empty rows; one micro-batch of the training rows per eval step.
  val_pipeline_config = pipeline_lib.pipeline_config_from(
      config, model_config.vision, batch_size=global_rows // jax.process_count(), is_training=False,
      num_epochs=1, process_index=jax.process_index(), process_count=jax.process_count(),
      rejects_path=str(run_dir / f"rejected_val_samples_{jax.process_index()}.jsonl"),
      max_caption_tokens=chat_config.max_caption_tokens)
  val_dataset = (pipeline_lib.build_dataset(val_records, processor, val_pipeline_config, model_config.vision,
                                            data_root=config.data_root or None) if val_records else None)
  val_empty_batch = packing_lib.collate_rows(
      [packing_lib.empty_row(val_pipeline_config.packing, model_config.vision)] * val_pipeline_config.batch_size)
  steps_per_epoch = max(1, rows_per_epoch // (global_rows * config.gradient_accumulation_steps))
  total_steps = config.max_steps or steps_per_epoch * config.num_train_epochs
  log.info("data: about %d packed rows per epoch -> %d steps per epoch, %d steps in all (%d rows x %d "
           "accumulation per step, %d tokens per row)", rows_per_epoch, steps_per_epoch, total_steps, global_rows,
           config.gradient_accumulation_steps, config.model_max_length)

  # ===== Model, optimizer, shardings ============================================================
  program = program_lib.build_program(config, model_config, det_config, mesh, total_steps)
  n_trainable, n_frozen = program.param_counts()
  log.info("model: %.2fM trainable and %.2fM frozen parameters; groups trained: %s", n_trainable / 1e6,
           n_frozen / 1e6, ", ".join(f"{g} (lr {lr:g})" for g, lr in optimizer_lib.group_learning_rates(config).items()
                                    if lr > 0))
  graphdef, train_step = program.graphdef, program.train_step

  # ===== Restore or initialize ================================================================
  checkpointer = checkpoint_lib.Checkpointer(run_dir / "checkpoints", keep_last=config.save_total_limit)
  iterator = iter(dataset)
  if config.resume and checkpointer.latest_step() is not None:
    start_step, state, data_state, meta = checkpointer.restore(program.abstract_sharded_state())
    iterator.set_state(data_state)
    log.info("resumed from checkpoint %d in %s", start_step, checkpointer.directory)
  else:
    pretrained = program_lib.load_pretrained_params(config, model_config, program) if config.model_path else None
    state = program.init_state(pretrained)
    del pretrained
    start_step = 0
    log.info("initialized %s", f"from {config.model_path}" if config.model_path else "from scratch")

  # ===== Train ================================================================================
  writer = metrics_lib.MetricsWriter(run_dir, enabled=is_main)
  progress = metrics_lib.ProgressLine(total_steps, start_step=start_step, enabled=is_main)
  stop = {"signal": None}

  def on_sigterm(signum, frame):
    del frame
    stop["signal"] = signum
    log.warning("received signal %d: saving a checkpoint and stopping", signum)

  previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
  flops_per_token = _flops_per_token(model_config)
  step = start_step
  window_tokens, window_t0, last_metrics, last_val = 0, time.perf_counter(), {}, {}
  # Steps whose loss has not been looked at yet: (step, loss, grad norm, batch sample ids). Reading a
  # loss waits for its step, so they are read in one go before anything uses the state (a log line, an
  # evaluation, a checkpoint): the run stays asynchronous and never saves a state after a bad step.
  unchecked: list[tuple[int, jax.Array, jax.Array, np.ndarray]] = []

  def validate_and_log(state) -> dict:
    """The validation loss of `state`, logged; {"step": step, "val_loss": ..., ...} ({"step"} alone if none)."""
    t0 = time.perf_counter()
    val = validation_loss(program, state, val_dataset, empty_batch=val_empty_batch, mesh=mesh,
                          max_batches=config.eval_max_batches)
    if val is None:
      log.warning("step %d: no validation loss: every sample of %s was rejected (see rejected_val_samples_*.jsonl)",
                  step, config.val_data_path)
      return {"step": step}
    writer.write(step, val, prefix="val")
    log.info("step %d: %s", step, describe_validation(val, seconds=time.perf_counter() - t0,
                                                      best=_best_val_loss(checkpointer)))
    return {**val, "step": step}

  try:
    while step < total_steps:
      try:
        host_batch = next(iterator)
      except StopIteration:
        log.info("the data is exhausted after %d steps (%d epochs)", step, config.num_train_epochs)
        break
      sample_ids = host_batch["sample_ids"]
      host_batch["sample_ids"] = sample_ids.astype(np.int32)
      tokens = int(np.sum(host_batch["segment_ids"] > 0))
      batch = _to_device(host_batch, config.gradient_accumulation_steps, mesh)
      if step < config.vision_warmup_steps:
        if step == start_step:
          log.info("steps %d to %d: vision warm-up (the vision tower and the head's dense proposals only)",
                   step + 1, config.vision_warmup_steps)
        state, metrics = program.warmup_step(state, batch)
      else:
        if step == config.vision_warmup_steps and step > 0:
          log.info("vision warm-up done after %d steps: training the whole model", step)
        state, metrics = train_step(state, batch)
      step += 1
      window_tokens += tokens
      unchecked.append((step, metrics["loss"], metrics["grad_norm"], sample_ids))
      due_log = step % config.log_steps == 0 or step == total_steps or step == start_step + 1
      due_eval = val_dataset is not None and (
          (config.eval_steps and step % config.eval_steps == 0) or step == total_steps)
      due_save = step % config.save_steps == 0 or stop["signal"] is not None
      if due_log or due_eval or due_save:
        check_finite(unchecked, train_records, checkpointer)
      if due_log:
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - window_t0
        metrics["tokens_per_s"] = window_tokens * jax.process_count() / max(elapsed, 1e-9)
        metrics["packing_efficiency"] = packing_lib.packing_efficiency(host_batch)
        metrics["mfu"] = metrics["tokens_per_s"] * flops_per_token / _peak_flops(jax.device_count())
        metrics["rejected_samples"] = len(packing_lib.read_rejects(pipeline_config.rejects_path))  # this host's
        writer.write(step, metrics)
        warming_up = step <= config.vision_warmup_steps
        progress.report(step, metrics, keys=("loss", "proposal_objectness_loss", "proposal_box_loss") if warming_up
                        else ("loss", "student_lm_loss"))
        window_tokens, window_t0, last_metrics = 0, time.perf_counter(), metrics
      if due_eval and stop["signal"] is None:  # a preempted run saves at once and evaluates after resuming
        last_val = validate_and_log(state)
        window_t0 = time.perf_counter()  # the evaluation's time is not the training's tokens/s
      if due_save:
        checkpointer.save(step, state, data_state=iterator.get_state(), meta={"step": step},
                          metrics=_checkpoint_metrics(last_val, step))
      if stop["signal"] is not None:
        break
    check_finite(unchecked, train_records, checkpointer)
    if val_dataset is not None and stop["signal"] is None and last_val.get("step") != step:
      last_val = validate_and_log(state)  # the data ran out before total_steps
    if checkpointer.latest_step() != step:
      checkpointer.save(step, state, data_state=iterator.get_state(), meta={"step": step},
                        metrics=_checkpoint_metrics(last_val, step), force=True)
    checkpointer.wait()
    export_step = step
    if config.load_best_model_at_end and stop["signal"] is None:
      export_step, state = best_state(checkpointer, program, state, step)
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    checkpointer.close()
    writer.close()
  if stop["signal"] is not None:
    log.info("stopped by signal at step %d; the same command resumes", step)
    return {"step": step, "stopped": True, **{k: float(v) for k, v in last_metrics.items()}}

  # ===== Export and evaluate ===================================================================
  model_dir = run_dir / "model"
  model = nnx.merge(graphdef, state.trainable, state.frozen)
  export_model(model, model_dir, config, chat_config, source_dir=config.model_path or (run_dir / "tokenizer"))
  log.info("saved the trained model of step %d (bbu_jax checkpoint with tokenizer) to %s", export_step, model_dir)
  result = {"step": step, "exported_step": export_step, **{k: float(v) for k, v in last_metrics.items()},
            **{k: float(v) for k, v in last_val.items() if k != "step"}}
  if config.eval_after_training and config.val_data_path and is_main:
    result["eval"] = evaluate_after_training(config, model_dir, run_dir)
  return result


def export_model(model, model_dir: pathlib.Path, config, chat_config: ChatConfig, *, source_dir) -> None:
  """The trained model folder. Every process calls this: under FSDP across processes each holds only
  its shards of the parameters, and orbax writes them from where they are (no gather onto one host);
  process 0 alone writes the files beside them."""
  bbu_model.save(model, model_dir, source_dir=source_dir)
  if jax.process_index() == 0:
    # What the prompts were built with: inference must build the very same ones.
    (model_dir / "chat_config.json").write_text(json.dumps(
        {"prompt_language": chat_config.prompt_language, "min_pixels": config.min_pixels,
         "max_pixels": config.max_pixels, "label_hierarchy": dict(chat_config.label_hierarchy),
         "model_max_length": config.model_max_length}, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def check_finite(unchecked: list, records: Sequence[dict], checkpointer: checkpoint_lib.Checkpointer) -> None:
  """Reads the losses and gradient norms of the steps not yet checked; raises NonFiniteLossError at the
  first NaN or Inf, naming the step and its batch's samples, before anything saves the state it made."""
  values = jax.device_get([(loss, grad_norm) for _, loss, grad_norm, _ in unchecked])
  for (step, _, _, sample_ids), (loss, grad_norm) in zip(unchecked, values):
    loss, grad_norm = float(loss), float(grad_norm)
    if math.isfinite(loss) and math.isfinite(grad_norm):
      continue
    indices = sorted({int(i) for i in np.asarray(sample_ids).reshape(-1) if i >= 0})
    ids = [str(records[i]["id"]) for i in indices]
    what = f"the loss is {loss}" + ("" if not math.isfinite(loss) else f" but the gradient norm is {grad_norm}")
    latest = checkpointer.latest_step()
    raise NonFiniteLossError(
        f"{what} at step {step}; the batch's samples (record ids) are {', '.join(ids)} (indices {indices} of "
        f"the training records, this process's rows); training stopped without saving that state: "
        + (f"the last good checkpoint is step {latest} in {checkpointer.directory}" if latest is not None
           else "no checkpoint was saved before it"))
  unchecked.clear()


def validation_loss(program: program_lib.Program, state, dataset, *, empty_batch: dict, mesh,
                    max_batches: int = 0) -> dict | None:
  """The loss terms of the validation split (or its first `max_batches` batches) under `state`, as
  `val_*` metrics, with the split's sums and denominators added up over all batches first; None when no
  sample made it into a batch. `empty_batch`: a batch of empty rows (no tokens, no loss, no objects),
  which completes the last batch so that every batch has one shape (one compilation). Every process
  runs the same number of eval steps (one that has run out feeds empty rows), since each step is one
  collective program."""
  iterator = iter(dataset)
  terms_sum: dict[str, float] = {}
  normalizers_sum: dict[str, float] = {}
  batches, samples = 0, 0
  while not max_batches or batches < max_batches:
    host_batch = next(iterator, None)
    if not _any_process(host_batch is not None):
      break
    host_batch = empty_batch if host_batch is None else _pad_rows(host_batch, empty_batch)
    samples += int(np.sum(host_batch["sample_ids"] >= 0))
    host_batch["sample_ids"] = host_batch["sample_ids"].astype(np.int32)
    out = jax.device_get(program.eval_step(state.trainable, state.frozen, _to_device(host_batch, 1, mesh)))
    for name, value in out["terms"].items():
      terms_sum[name] = terms_sum.get(name, 0.0) + float(value)
    for name, value in out["normalizers"].items():
      normalizers_sum[name] = normalizers_sum.get(name, 0.0) + float(value)
    batches += 1
  samples = _sum_processes(samples)
  if samples == 0:
    return None
  losses = step_lib.loss_breakdown(terms_sum, step_lib.clamp_normalizers(normalizers_sum), program.loss_weights)
  losses.pop("teacher_lm_loss")  # validation has no teachers
  return {**{f"val_{k}": float(v) for k, v in losses.items()}, "val_samples": samples, "val_batches": batches}


def describe_validation(val: dict, *, seconds: float | None = None, best: tuple[int, float] | None = None) -> str:
  """One line in words: `validation loss 2.3456 (language model 1.2345 on the student answers; detection:
  box L1 0.1234, GIoU 0.3456, objectness 0.5678, caption 1.7890) on 32 samples in 8 batches, 1.2 s; the
  best checkpoint so far is step 40 with 2.1000`."""
  parts = [f"language model {val['val_lm_loss']:.4f} on the student answers"]
  names = (("bbox_l1", "box L1"), ("giou", "GIoU"), ("objectness", "objectness"), ("caption", "caption"),
           ("proposal_objectness", "proposal objectness"), ("proposal_box", "proposal box"))
  detection = [f"{label} {val[f'val_{name}_loss']:.4f}" for name, label in names if f"val_{name}_loss" in val]
  if detection:
    parts.append("detection: " + ", ".join(detection))
  text = (f"validation loss {val['val_loss']:.4f} ({'; '.join(parts)}) on {val['val_samples']} samples in "
          f"{val['val_batches']} batches")
  if seconds is not None:
    text += f", {seconds:.1f} s"
  if best is not None:
    text += f"; the best checkpoint so far is step {best[0]} with {best[1]:.4f}"
  return text


def best_state(checkpointer: checkpoint_lib.Checkpointer, program: program_lib.Program, state, step: int):
  """(step, state) of the checkpoint with the lowest validation loss; the last ones when that is the last
  step or no checkpoint has a validation loss."""
  best = checkpointer.best_step()
  if best is None:
    log.warning("load_best_model_at_end: no checkpoint has a validation loss; exporting the last (step %d)", step)
    return step, state
  if best == step:
    log.info("load_best_model_at_end: the last checkpoint (step %d) has the lowest validation loss", step)
    return step, state
  best_step, best_state_, _, _ = checkpointer.restore(program.abstract_sharded_state(), step=best)
  log.info("load_best_model_at_end: exporting checkpoint %d, whose validation loss %.4f is the lowest (the last "
           "step, %d, had %s)", best_step, checkpointer.metrics(best_step)["val_loss"], step,
           _format_val_loss(checkpointer.metrics(step)))
  return best_step, best_state_


def evaluate_after_training(config, model_dir: pathlib.Path, run_dir: pathlib.Path) -> dict:
  """Inference on the validation split, then metrics from the text answers and from the head, through
  the same command-line entry points a user runs (`bbu_jax.infer`, `bbu_jax.evaluate`)."""
  from bbu_jax import evaluate as evaluate_lib
  from bbu_jax import infer as infer_lib
  eval_dir = run_dir / "eval"
  eval_dir.mkdir(parents=True, exist_ok=True)
  responses = eval_dir / "responses.json"
  stale = infer_lib.progress_path(responses)
  if stale.exists():  # an evaluation killed half-way, of a model saved again since: start it over
    log.info("removing %s, the progress of an earlier evaluation that did not finish", stale)
    stale.unlink()
  log.info("inference on %s with the trained model", config.val_data_path)
  status = infer_lib.main(["--model_path", str(model_dir), "--input_jsonl", config.val_data_path,
                           "--output_file", str(responses), "--data_root", config.data_root or ".",
                           "--batch_size", str(config.eval_batch_size), "--max_new_tokens", str(config.max_new_tokens),
                           "--this_process_only"])  # only process 0 gets here: it must not wait for the others
  if status:
    raise RuntimeError(f"inference on {config.val_data_path} failed with status {status}")
  out = {}
  for source in ["lm"] + (["head"] if config.detection_enabled else []):
    metrics_file = eval_dir / f"metrics_{source}.json"
    status = evaluate_lib.main(["--responses_file", str(responses), "--output_file", str(metrics_file),
                                "--source", source])
    if status:
      raise RuntimeError(f"evaluation of {responses} ({source}) failed with status {status}")
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    print(f"evaluation ({'text answers' if source == 'lm' else 'detection head'}), {metrics_file}: "
          + json.dumps(metrics["overall_metrics"], ensure_ascii=False), flush=True)
    out[source] = metrics["overall_metrics"]
  return out


# --- Small helpers -------------------------------------------------------------------------------


def _checkpoint_metrics(val: dict, step: int) -> dict | None:
  """{"val_loss": ...} for a checkpoint when the validation at this very step gave a finite one."""
  if val.get("step") == step and math.isfinite(val.get("val_loss", math.nan)):
    return {"val_loss": val["val_loss"]}
  return None


def _best_val_loss(checkpointer: checkpoint_lib.Checkpointer) -> tuple[int, float] | None:
  best = checkpointer.best_step()
  return None if best is None else (best, checkpointer.metrics(best)["val_loss"])


def _format_val_loss(metrics: dict | None) -> str:
  return "no validation loss" if not metrics else f"{metrics['val_loss']:.4f}"


def _pad_rows(host_batch: dict, empty: dict) -> dict:
  """`host_batch` completed to the rows of `empty` with its empty rows (no tokens, no loss, no objects)."""
  rows = empty["input_ids"].shape[0]
  missing = rows - host_batch["input_ids"].shape[0]
  if missing == 0:
    return host_batch
  out = {}
  for name, value in host_batch.items():
    axis = 1 if name == "positions" else 0
    filler = empty[name][:, :missing] if axis == 1 else empty[name][:missing]
    out[name] = np.concatenate([value, filler.astype(value.dtype)], axis=axis)
  return out


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _sum_processes(value: int) -> int:
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(np.sum(multihost_utils.process_allgather(np.asarray(value))))


def _to_device(host_batch: dict, accumulation: int, mesh) -> dict:
  """Host rows -> (accumulation, rows, ...) global arrays, rows sharded over the data-parallel axes.

  `positions` is (3, rows, S) in the pipeline and (accumulation, 3, rows, S) on device.
  """
  out = {}
  for name, value in host_batch.items():
    value = np.asarray(value)
    if name == "positions":
      value = np.swapaxes(value, 0, 1)
    value = value.reshape(accumulation, value.shape[0] // accumulation, *value.shape[1:])
    spec = [None, ("data", "fsdp")] + [None] * (value.ndim - 2)
    if name == "positions":
      value = np.swapaxes(value, 1, 2)
      spec[1], spec[2] = None, ("data", "fsdp")
    batch_axis = 2 if name == "positions" else 1
    global_shape = list(value.shape)
    global_shape[batch_axis] *= jax.process_count()
    named = sharding.NamedSharding(mesh, sharding.P(*spec))
    out[name] = jax.make_array_from_process_local_data(named, value, tuple(global_shape))
  return out


def _flops_per_token(c: Qwen25VLConfig) -> float:
  """Training FLOPs per text token of the decoder (6 x parameters + attention), for MFU."""
  t = c.text
  params = t.num_hidden_layers * (t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
                                  + t.num_attention_heads * t.head_dim * t.hidden_size
                                  + 3 * t.hidden_size * t.intermediate_size) + t.vocab_size * t.hidden_size
  return 6.0 * params


_PEAK_FLOPS = {"tpu v5 lite": 197e12, "tpu v5p": 459e12, "tpu v6 lite": 918e12, "h100": 989e12, "h200": 989e12,
               "a100": 312e12}


def _peak_flops(num_devices: int) -> float:
  """bf16 peak of the whole job; CPUs get a nominal 100 GFLOP/s per device so the figure stays defined."""
  kind = jax.devices()[0].device_kind.lower()
  for name, peak in _PEAK_FLOPS.items():
    if name in kind:
      return peak * num_devices
  return 1e11 * num_devices


def _setup_logging(run_dir: pathlib.Path | None) -> None:
  root = logging.getLogger()
  if getattr(root, "_bbu_configured", False):
    return
  root.setLevel(logging.INFO)
  for handler in list(root.handlers):  # absl's handler would print every line a second time
    root.removeHandler(handler)
  fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
  console = logging.StreamHandler(sys.stderr)
  console.setFormatter(fmt)
  root.addHandler(console)
  if run_dir is not None:
    file_handler = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    file_handler.setFormatter(fmt)
    root.addHandler(file_handler)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  root._bbu_configured = True


def main(argv: Sequence[str] | None = None) -> int:
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "a config file with get_config()", lock_config=True)

  def parse_flags(args):
    try:
      return flags.FLAGS(args)
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no field of the locked config
      text = str(e.args[0] if e.args else e)
      hint = "; " + text[text.find("Did you mean"):].rstrip("'\"") if "Did you mean" in text else ""
      fields = ", ".join(_unknown_overrides(args)) or "a --config.FIELD override"
      sys.exit(f"bbu_jax.train: config error: config field {fields}: no such field{hint}")

  def run(_):
    config = flags.FLAGS.config
    try:
      if config is None:
        raise config_lib.ConfigError("--config is required, e.g. --config configs/exp.py")
      result = train(config)
    except config_lib.ConfigError as e:
      sys.exit(f"bbu_jax.train: config error: {e}")  # one line, no traceback: the message names the field
    except NonFiniteLossError as e:
      log.error("stopped: %s", e)
      sys.exit(f"bbu_jax.train: {e}")  # exit status 1; the last good checkpoint is left as it was
    if result.get("stopped"):
      sys.exit(128 + signal.SIGTERM)  # supervisors read a non-zero exit as "not finished: run again"

  app.run(run, argv=list(sys.argv if argv is None else [sys.argv[0], *argv]), flags_parser=parse_flags)
  return 0


def _unknown_overrides(args: Sequence[str]) -> list[str]:
  """The `--config.FIELD=...` names of the command line that the config file does not define."""
  path = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
  if path is None:
    return []
  config = config_lib.load_config_file(*path.split(":", 1))
  unknown = []
  for arg in args:
    if arg.startswith("--config."):
      field = arg[len("--config."):].split("=", 1)[0]
      node = config
      for part in field.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
          unknown.append(field)
          break
        node = node[part]
  return unknown


if __name__ == "__main__":
  main()
