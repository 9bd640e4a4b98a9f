"""Loading and validating training configs: ml_collections `get_config()` files, big_vision style.

`base_config()` holds every field with its default; a config file starts from it and changes what it
needs. Configs are locked, so a misspelled override (`--config.llm_lrr=...`) is refused by name.
`validate(config)` refuses out-of-range values at start, one clear message per bad field.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # --- Run -----------------------------------------------------------------------------------
  c.run_name = "run"
  c.output_dir = "runs"
  c.seed = 0
  c.resume = True  # resume automatically when the run folder has checkpoints

  # --- Data (the old pipeline's names) ---------------------------------------------------------
  c.train_data_path = ""
  c.val_data_path = ""
  c.teacher_pool_file = ""
  c.data_root = ""
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.enabled = False  # generate the synthetic dataset into data_root when it is missing
  c.synthetic.num_train = 0
  c.synthetic.num_val = 0
  c.synthetic.num_teacher = 0
  c.synthetic.scale = 1.0
  # "real" (the real records' figures), "demo" (large equipment only) or "blocks" (the demo's layout as
  # flat coloured blocks on black: what configs/exp.py learns within its budget, README "The demo")
  c.synthetic.profile = "real"
  c.skip_invalid_records = False  # refuse files with problems unless told to skip them
  c.model_max_length = 2048
  c.collator_type = "packed"  # "packed" | "padded"
  c.teacher_ratio = 0.0
  c.num_teacher_samples = 1
  c.teacher_loss_weight = 0.3
  c.student_loss_weight = 1.0
  c.prompt_language = "zh"
  c.label_hierarchy = "default"  # the system prompt's hierarchy: "default", "data" (training labels) or a JSON file
  c.min_pixels = 4 * 28 * 28
  c.max_pixels = 512 * 28 * 28
  c.patch_budget = 0  # patches per row; 0 = derived from max_pixels and num_teacher_samples
  c.max_samples_per_row = 4
  c.max_objects = 64
  c.num_data_workers = 0

  # --- Model ---------------------------------------------------------------------------------
  c.model_path = ""  # Hugging Face Qwen2.5-VL directory or bbu_jax checkpoint; "" = from scratch
  c.model_size = ""  # named size for from-scratch/abstract runs (bbu_jax.models.config.NAMED_CONFIGS)
  c.model = ml_collections.ConfigDict()  # explicit tiny architecture for from-scratch runs
  c.model.text_hidden_size = 0
  c.model.text_layers = 0
  c.model.text_heads = 0
  c.model.text_kv_heads = 0
  c.model.text_intermediate_size = 0
  c.model.vision_depth = 0
  c.model.vision_hidden_size = 0
  c.model.vision_heads = 0
  c.model.vision_intermediate_size = 0
  c.model.vision_window_size = 112
  c.model.vision_fullatt_block_indexes = (0,)
  c.model.vision_absolute_positions = False  # bbu_jax extension: fixed 2D sine positions on the patches
  c.model.vision_output_positions = False  # bbu_jax extension: the same on the merged tokens the decoder reads
  c.model.rope_theta = 1000000.0  # the decoder's rotary base (Qwen2.5's 1e6)
  c.model.mrope_section = ()  # (t, h, w) frequency pairs; () = Qwen's 16/24/24 of 64 scaled to the head
  c.tokenizer_vocab_size = 4096  # for the demo's own BPE tokenizer
  c.tokenizer_number_digits = 1  # the demo's BPE: up to this many digits per token (1: Qwen's, one digit)

  c.detection_enabled = False
  c.detection_num_queries = 100
  c.detection_bbox_weight = 10.0
  c.detection_caption_weight = 1.0
  # The head's dense proposals (one objectness and box per vision feature, FCOS-style targets): a loss
  # on every feature. Off (0) by default; configs/exp.py turns it on with the head's encoder and
  # two-stage queries (README, "The demo: what it learns and what not yet").
  c.detection_proposal_weight = 0.0
  # The first N steps train only the vision tower and the head's dense proposals (no decoder, no queries,
  # no captions: a fraction of a full step's cost), so that the vision features know where objects are
  # before the language model and the queries start reading them. Needs the head; 0 = off.
  c.vision_warmup_steps = 0
  # Two-stage queries: each image's queries start from its most confident dense proposals' boxes instead
  # of learned anchors (DetectionHeadConfig.two_stage). Needs detection_proposal_weight > 0.
  c.detection_two_stage = False
  c.detection_layers = 2
  c.detection_caption_max_len = 32  # caption tokens (desc + eos) trained and generated per object
  c.detection_encoder_layers = 0  # self-attention over the vision features inside the head (DETR's encoder)
  # The head's losses also train the language model whose states and token embeddings it reads, with
  # their gradient there scaled by detection_decoder_gradient_scale (the head's own is unscaled).
  c.detection_decoder_gradient = True
  c.detection_decoder_gradient_scale = 1.0
  c.detection_width = 256

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # 0 = no adapters
  c.lora.alpha = 16.0
  c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj")

  # --- Optimization --------------------------------------------------------------------------
  c.num_train_epochs = 1
  c.max_steps = 0  # > 0 overrides the number of steps derived from epochs
  c.per_device_train_batch_size = 1
  c.gradient_accumulation_steps = 1
  c.vision_lr = 0.0
  c.merger_lr = 1e-5
  c.llm_lr = 1e-5
  c.detection_lr = 1e-4
  c.adapter_lr = 1e-4
  c.warmup_ratio = 0.03
  c.weight_decay = 0.0
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.max_grad_norm = 1.0
  c.clip_grad_norm_per_group = False  # clip each optimizer group's gradients by their own norm

  # --- Precision, memory, kernels ----------------------------------------------------------------
  c.bf16 = False
  c.gradient_checkpointing = False
  # An explicit remat policy (bbu_jax.models.layers.REMAT_POLICIES) overrides gradient_checkpointing's
  # "full"/"none"; "dots_with_no_batch_dims_saveable" measured 8% faster than "none" on CPU (bench/README.md).
  c.remat_policy = ""
  c.use_flash_attention = False

  # --- Scale ---------------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.sharding_mode = "zero2"  # "zero2" | "fsdp"

  # --- Logging, checkpoints, evaluation --------------------------------------------------------
  c.log_steps = 10
  c.save_steps = 100
  c.save_total_limit = 3
  # Validation loss on val_data_path (no teachers, no shuffling) every eval_steps steps and at the end;
  # 0 = at the end only. It ranks checkpoints: the best one by val_loss is kept beside the newest.
  c.eval_steps = 0
  c.eval_max_batches = 0  # batches of the validation split per evaluation; 0 = the whole split
  c.load_best_model_at_end = False  # export the best checkpoint by val_loss instead of the last
  c.eval_after_training = True
  c.eval_batch_size = 8
  c.max_new_tokens = 512
  return c


def load_config_file(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """Imports a config file and calls its `get_config(arg)` (or `get_config()`)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise ConfigError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"_bbu_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config()")
  config = module.get_config(arg) if arg is not None else module.get_config()
  config.lock()
  return config


def validate(c: ml_collections.ConfigDict, *, num_devices: int | None = None, num_processes: int = 1) -> None:
  """Refuses values that cannot work, naming the field. Called once at the start of a run."""

  def fail(field, why):
    raise ConfigError(f"config field {field}: {why}")

  for name in ("vision_lr", "merger_lr", "llm_lr", "detection_lr", "adapter_lr", "weight_decay",
               "warmup_ratio", "max_grad_norm"):
    if c[name] < 0:
      fail(name, f"must be >= 0, got {c[name]}")
  if not 0.0 <= c.warmup_ratio <= 1.0:
    fail("warmup_ratio", f"must be in [0, 1], got {c.warmup_ratio}")
  if not 0.0 <= c.teacher_ratio <= 1.0:
    fail("teacher_ratio", f"must be in [0, 1], got {c.teacher_ratio}")
  if c.num_teacher_samples < 0:
    fail("num_teacher_samples", f"must be >= 0, got {c.num_teacher_samples}")
  if c.teacher_ratio > 0 and c.num_teacher_samples == 0:
    fail("num_teacher_samples", "must be >= 1 when teacher_ratio > 0")
  if c.teacher_ratio > 0 and not c.teacher_pool_file and not c.synthetic.enabled:
    fail("teacher_pool_file", "is empty but teacher_ratio > 0")
  if c.collator_type not in ("packed", "padded"):
    fail("collator_type", f"must be 'packed' or 'padded', got {c.collator_type!r}")
  if c.sharding_mode not in ("zero2", "fsdp"):
    fail("sharding_mode", f"must be 'zero2' or 'fsdp', got {c.sharding_mode!r}")
  if c.prompt_language not in ("zh", "en"):
    fail("prompt_language", f"must be 'zh' or 'en', got {c.prompt_language!r}")
  for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "model_max_length",
               "num_train_epochs", "log_steps", "save_steps", "save_total_limit"):
    if c[name] < 1:
      fail(name, f"must be >= 1, got {c[name]}")
  for name in ("eval_steps", "eval_max_batches"):
    if c[name] < 0:
      fail(name, f"must be >= 0, got {c[name]}")
  if c.load_best_model_at_end:
    if not c.val_data_path:
      fail("load_best_model_at_end", "needs val_data_path: the best checkpoint is the one with the lowest val_loss")
    if c.eval_steps == 0:
      fail("load_best_model_at_end", "needs eval_steps > 0: with 0 only the last checkpoint has a val_loss")
    if c.save_steps % c.eval_steps:
      fail("save_steps", f"must be a multiple of eval_steps ({c.eval_steps}) when load_best_model_at_end, so "
           f"that every checkpoint has a val_loss, got {c.save_steps}")
  if c.max_steps < 0:
    fail("max_steps", f"must be >= 0, got {c.max_steps}")
  if c.teacher_loss_weight < 0 or c.student_loss_weight < 0:
    fail("teacher_loss_weight" if c.teacher_loss_weight < 0 else "student_loss_weight", "must be >= 0")
  if c.min_pixels <= 0 or c.max_pixels < c.min_pixels:
    fail("max_pixels", f"must be >= min_pixels > 0, got min {c.min_pixels}, max {c.max_pixels}")
  if c.detection_enabled and c.detection_num_queries < c.max_objects:
    fail("detection_num_queries", f"must be >= max_objects ({c.max_objects}) so that every object can be "
         f"matched to a query, got {c.detection_num_queries}")
  if c.tokenizer_number_digits < 1:
    fail("tokenizer_number_digits", f"must be >= 1, got {c.tokenizer_number_digits}")
  if c.detection_caption_max_len < 2:
    fail("detection_caption_max_len", f"must be >= 2 (one token + eos), got {c.detection_caption_max_len}")
  if c.detection_encoder_layers < 0:
    fail("detection_encoder_layers", f"must be >= 0, got {c.detection_encoder_layers}")
  if not c.detection_decoder_gradient_scale > 0:
    fail("detection_decoder_gradient_scale", f"must be > 0 (detection_decoder_gradient false turns the gradient "
         f"off), got {c.detection_decoder_gradient_scale}")
  if c.detection_proposal_weight < 0:
    fail("detection_proposal_weight", f"must be >= 0, got {c.detection_proposal_weight}")
  if c.vision_warmup_steps < 0:
    fail("vision_warmup_steps", f"must be >= 0, got {c.vision_warmup_steps}")
  if c.detection_enabled and c.detection_two_stage and c.detection_proposal_weight <= 0:
    fail("detection_two_stage", "starts the queries from the dense proposals: it needs detection_proposal_weight > 0 "
         "so that the proposals learn")
  if c.vision_warmup_steps and not (c.detection_enabled and c.detection_proposal_weight > 0):
    fail("vision_warmup_steps", "trains the vision tower on the detection head's dense proposals: it needs "
         "detection_enabled and detection_proposal_weight > 0")
  if c.remat_policy:
    from bbu_jax.models.layers import REMAT_POLICIES
    if c.remat_policy not in REMAT_POLICIES:
      fail("remat_policy", f"must be one of {sorted(REMAT_POLICIES)} or empty, got {c.remat_policy!r}")
  if c.lora.rank < 0:
    fail("lora.rank", f"must be >= 0, got {c.lora.rank}")
  if not c.model_path and not c.model_size and c.model.text_hidden_size > 0:
    if c.model.rope_theta <= 0:
      fail("model.rope_theta", f"must be > 0, got {c.model.rope_theta}")
    pairs = c.model.text_hidden_size // max(c.model.text_heads, 1) // 2
    if c.model.mrope_section and (len(c.model.mrope_section) != 3 or sum(c.model.mrope_section) != pairs):
      fail("model.mrope_section", f"must be 3 sizes (t, h, w) summing to head_dim / 2 = {pairs}, got "
           f"{tuple(c.model.mrope_section)}")
  if not c.model_path and not c.model_size and c.model.text_hidden_size <= 0:
    fail("model_path", "is empty and neither model_size nor model.text_hidden_size describes a model")
  if not c.synthetic.enabled:
    if not c.train_data_path:
      fail("train_data_path", "is empty (and synthetic.enabled is False)")
    if not pathlib.Path(c.train_data_path).exists() and not str(c.train_data_path).startswith("gs://"):
      fail("train_data_path", f"{c.train_data_path} does not exist")
  for axis in ("data", "fsdp", "tensor"):
    size = c.mesh[axis]
    if size == 0 or size < -1:
      fail(f"mesh.{axis}", f"must be -1 (auto) or >= 1, got {size}")
  if num_devices is not None:
    fixed = 1
    autos = [a for a in ("data", "fsdp", "tensor") if c.mesh[a] == -1]
    for a in ("data", "fsdp", "tensor"):
      if c.mesh[a] != -1:
        fixed *= c.mesh[a]
    if len(autos) > 1:
      fail("mesh", f"at most one axis may be -1, got {autos}")
    if num_devices % fixed or (not autos and fixed != num_devices):
      fail("mesh", f"data*fsdp*tensor = {fixed} does not divide across the {num_devices} devices")
    sizes = {a: num_devices // fixed if c.mesh[a] == -1 else c.mesh[a] for a in ("data", "fsdp", "tensor")}
    global_rows = c.per_device_train_batch_size * sizes["data"] * sizes["fsdp"]
    if global_rows % num_processes:
      fail("per_device_train_batch_size", f"the global batch of {global_rows} rows (per_device_train_batch_size "
           f"{c.per_device_train_batch_size} x data {sizes['data']} x fsdp {sizes['fsdp']}) does not divide "
           f"across {num_processes} processes")
