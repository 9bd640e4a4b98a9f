"""Benchmark of one training step: bbu_jax's real train step against transformers' PyTorch Qwen2.5-VL, same
batch, in one run on this machine.

  python bench/bench_train.py [--shape bench|3b] [--dtype float32|bfloat16] [--steps 6] [--warmup 2]
                              [--batch 4] [--seq 258] [--layers N] [--torch_threads 2] [--xla_flags "..."]
                              [--skip_hf] [--remat POLICY] [--profile DIR]

Shapes (bench_shape.py): "bench" (issue 6: text hidden 512, 8 layers, MLP 1536, 8 heads, 2 KV heads, vocab
4112; vision depth 4, hidden 256, MLP 768, 4 heads, window 112, full attention at block 3) and "3b"
(Qwen2.5-VL-3B's published sizes, vocab 151936); `--layers N` caps the depth of both towers (smoke tests).
One 224x224 image per sample (256 patches, 64 merged tokens) inside --seq tokens of text; batch --batch;
AdamW; the LM loss on the answer tokens (the last ANSWER_TOKENS of each sample); gradients clipped at norm
1 on both sides.

dtype: float32, or bfloat16 = mixed precision: float32 master weights and optimizer state, bfloat16
compute (bbu_jax: the run config's `bf16`, the model's compute dtype; transformers: float32 parameters
under torch.autocast(bfloat16)). Attention: transformers sdpa; bbu_jax its attention function's choice,
cuDNN flash attention (`use_flash_attention`) on a GPU in bfloat16 when a probe of it at the step's shapes
compiles and agrees with the XLA path, else XLA.

bbu_jax: `training.program.build_program` (the jitted, donated train step of `python -m bbu_jax.train`,
with its optax optimizer). transformers: `Qwen2_5_VLForConditionalGeneration` with `labels`,
`loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW.step()` (fused=True on CUDA). Weights: at the
bench shape both sides hold the same weights (transformers' model is saved and loaded with
`load_pretrained_params`), and the run stops (CPU) or warns (GPU) if their first-step losses differ; at
3B each side initializes its own random weights (no 15 GB hand-over through disk), so the losses are
printed but not compared.

Order: on a CPU both sides are built, warmed up, and their timed steps ALTERNATE, so that a machine shared
with other work loads both alike. On a GPU (torch on CUDA or jax on a GPU) they run one after the other,
transformers first, its memory freed (3B float32 master weights + AdamW are ~60 GB a side) before bbu_jax
builds. The median step time of each side is reported; bbu_jax's compilation is timed apart.

MFU: analytic FLOPs of the step (6 x parameters x tokens for every matmul, attention squares, vision tower
and merger) / step time / peak. CPU: the peak is the best rate of a jitted float32 2048x2048 jnp.dot in the
same run (`mfu_cpu`). GPU: the best rate of a jitted 8192x8192 jnp.dot in the compute dtype in the same run
(`mfu`, `hf_mfu`), and the datasheet dense bf16 peak of an H100/H200 SXM, 989 TFLOP/s (`mfu_datasheet`,
`hf_mfu_datasheet`). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import sys
import tempfile
import time

# XLA CPU flags measured to help this step on a small CPU (see bench/README.md); set before jax starts.
DEFAULT_XLA_FLAGS = ""
# GPU memory: jax allocates as it goes (transformers runs first in the same process and must get its
# memory back) and may then take most of the card; torch's allocator fragments less with expandable segments.
GPU_ENVIRONMENT = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95",
                   "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
# Dense bf16 tensor-core peak of the datasheets (SXM boards), FLOP/s.
DATASHEET_BF16_PEAK = {"H100": 989e12, "H200": 989e12}

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import bench_shape  # noqa: E402
from bench_shape import GRID  # noqa: E402

SEQ = 258
ANSWER_TOKENS = 96
PREFIX_TOKENS = 24
START = time.perf_counter()


def log(message: str) -> None:
  print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


def make_samples(batch: int, model_config, seq: int = SEQ, seed: int = 0) -> list[dict]:
  """`batch` samples of `seq` tokens: prompt text, <vision_start> 64 x <image_pad> <vision_end>, text, answer."""
  rng = np.random.default_rng(seed)
  patches = int(np.prod(GRID))
  image_tokens = patches // 4
  suffix = seq - PREFIX_TOKENS - image_tokens - 2
  if suffix < ANSWER_TOKENS:
    raise ValueError(f"--seq {seq} is too short: it needs at least {PREFIX_TOKENS + image_tokens + 2 + ANSWER_TOKENS}")
  c = model_config
  text_limit = bench_shape.text_token_limit(c)
  samples = []
  for _ in range(batch):
    ids = np.concatenate([rng.integers(0, text_limit, PREFIX_TOKENS), [c.vision_start_token_id],
                          [c.image_token_id] * image_tokens, [c.vision_end_token_id],
                          rng.integers(0, text_limit, suffix)]).astype(np.int64)
    answer = np.zeros(seq, bool)
    answer[-ANSWER_TOKENS:] = True
    samples.append({"input_ids": ids, "answer_mask": answer,
                    "pixel_values": rng.standard_normal((patches, 3 * 2 * 14 * 14)).astype(np.float32)})
  return samples


def bbu_batch(samples: list[dict], model_config) -> dict:
  """The train step's batch, (accumulation=1, rows, ...), as bbu_jax.data.packing lays it out."""
  from bbu_jax.models.rope import get_rope_index
  from bbu_jax.models.vision import stack_vision_metadata, vision_metadata
  rows = []
  for s in samples:
    ids = s["input_ids"]
    seq = len(ids)
    positions, _ = get_rope_index(ids, np.asarray([GRID]), image_token_id=model_config.image_token_id,
                                  spatial_merge_size=2)
    target = np.zeros(seq, np.int32)
    target[:-1] = ids[1:]
    student = np.zeros(seq, np.float32)
    student[:-1] = s["answer_mask"][1:]
    rows.append({"input_ids": ids.astype(np.int32), "positions": np.asarray(positions, np.int32),
                 "segment_ids": np.ones(seq, np.int32), "target_ids": target,
                 "teacher_loss_mask": np.zeros(seq, np.float32), "student_loss_mask": student,
                 "pixel_values": s["pixel_values"]})
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  batch["positions"] = batch["positions"].transpose(1, 0, 2)  # (3, B, S)
  meta = stack_vision_metadata([vision_metadata(np.asarray([GRID]), int(np.prod(GRID)), model_config.vision)
                                for _ in samples])
  batch.update(meta)
  return {k: v[None] for k, v in batch.items()}


def hf_batch(samples: list[dict], model_config, device) -> dict:
  import torch
  ids = torch.as_tensor(np.stack([s["input_ids"] for s in samples]))
  labels = ids.clone()
  labels[~torch.as_tensor(np.stack([s["answer_mask"] for s in samples]))] = -100
  batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
           "pixel_values": torch.as_tensor(np.concatenate([s["pixel_values"] for s in samples])),
           "image_grid_thw": torch.as_tensor(np.asarray([GRID] * len(samples), np.int64)),
           "mm_token_type_ids": (ids == model_config.image_token_id).to(torch.int32)}
  return {k: v.to(device) for k, v in batch.items()}


def train_flops(model_config, batch: int, seq: int = SEQ) -> dict[str, float]:
  """Analytic training FLOPs of one step (forward + backward = 3 x forward; a multiply-add is 2 FLOPs).

  Matmul weights count 6 x params x the tokens they see; attention scores and values 3 x 4 x q_len x
  kv_len x width per layer (the full square, as computed, causal or not).
  """
  t, v = model_config.text, model_config.vision
  kv_width = t.num_key_value_heads * t.head_dim
  layer = t.hidden_size * (t.hidden_size + 2 * kv_width) + t.hidden_size * t.hidden_size \
      + 3 * t.hidden_size * t.intermediate_size
  tokens = batch * seq
  decoder = 6.0 * t.num_hidden_layers * layer * tokens
  lm_head = 6.0 * t.hidden_size * t.vocab_size * tokens
  text_attention = 12.0 * t.num_hidden_layers * batch * seq * seq * t.hidden_size
  patches = int(np.prod(GRID))
  block = 4 * v.hidden_size * v.hidden_size + 3 * v.hidden_size * v.intermediate_size
  merged = v.hidden_size * v.merge_unit
  vision_weights = 6.0 * batch * (patches * (v.patch_dim * v.hidden_size + v.depth * block)
                                  + patches // v.merge_unit * (merged * merged + merged * v.out_hidden_size))
  window = (v.window_size // v.patch_size) ** 2  # patches per window
  full_blocks = len(v.fullatt_block_indexes)
  vision_attention = 12.0 * batch * v.hidden_size * (full_blocks * patches * patches
                                                      + (v.depth - full_blocks) * patches * window)
  parts = {"decoder": decoder, "lm_head": lm_head, "text_attention": text_attention, "vision": vision_weights,
           "vision_attention": vision_attention}
  parts["total"] = sum(parts.values())
  return parts


def jax_matmul_peak(size: int, dtype: str, calls: int = 1, repeats: int = 10) -> float:
  """Best FLOP/s of a jitted size x size jnp.dot (`calls` back-to-back dots per timing)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    outs = [dot(a, b) for _ in range(calls)]
    jax.block_until_ready(outs)
    best = min(best, (time.perf_counter() - start) / calls)
  return 2.0 * size ** 3 / best


def torch_matmul_peak(device, size: int, dtype: str, calls: int = 1, repeats: int = 10) -> float:
  """Best FLOP/s of torch.mm (current torch threads on a CPU)."""
  import torch
  ta = torch.randn(size, size, device=device).to(getattr(torch, dtype))
  tb = torch.randn(size, size, device=device).to(getattr(torch, dtype))
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  torch.mm(ta, tb)
  sync()
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      torch.mm(ta, tb)
    sync()
    best = min(best, (time.perf_counter() - start) / calls)
  return 2.0 * size ** 3 / best


def cudnn_attention_check(model_config, batch: int, seq: int) -> str:
  """"" if cuDNN attention (layers.dot_product_attention, bfloat16) compiles, runs forward and backward at
  this step's text and vision shapes and masks, and agrees with the XLA path; else why not."""
  import jax
  import jax.numpy as jnp
  from bbu_jax.models import layers
  from bbu_jax.models.vision import vision_metadata
  t, v = model_config.text, model_config.vision
  patches = int(np.prod(GRID))
  text_mask = layers.make_attention_mask(jnp.ones((batch, seq), jnp.int32), jnp.ones((batch, seq), jnp.int32),
                                         causal=True)
  windows = jnp.asarray(np.stack([vision_metadata(np.asarray([GRID]), patches, v)["window_segment_ids"]] * batch))
  vision_mask = layers.make_attention_mask(windows, windows, causal=False)
  cases = [("text", seq, t.num_attention_heads, t.num_key_value_heads, t.head_dim, text_mask),
           ("vision", patches, v.num_heads, v.num_heads, v.head_dim, vision_mask)]
  for name, length, heads, kv_heads, head_dim, mask in cases:
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), jnp.bfloat16)
    val = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), jnp.bfloat16)

    def loss(q, k, val, mask, implementation):
      out = layers.dot_product_attention(q, k, val, mask, implementation=implementation)
      return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(head_dim, dtype=jnp.float32)))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=4)
    try:
      fused = jax.block_until_ready(grad(q, k, val, mask, "cudnn"))
    except Exception as e:  # noqa: BLE001 - any failure means: use the XLA path, and say why
      return f"{name} attention: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    reference = grad(q, k, val, mask, "xla")
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(reference)):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      scale = max(float(np.max(np.abs(b))), 1e-6)
      if not np.all(np.isfinite(a)) or float(np.max(np.abs(a - b))) > 0.05 * scale:
        return f"{name} attention: cuDNN differs from XLA (max error {float(np.max(np.abs(a - b))):.3g}, scale {scale:.3g})"
  return ""


# --- the two sides ---------------------------------------------------------------------------------------


def build_hf(hf_config, device, save_to: str | None):
  """transformers' model in float32 on `device`, saved to `save_to` (before any step) when given."""
  import torch
  import transformers
  with torch.device(device):
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config)
  hf = hf.float().train()
  if save_to:
    hf.save_pretrained(save_to)
  return hf


def hf_optimizer(model, config, fused: bool):
  """torch.optim.AdamW with our groups' decay rule (no decay on norms and biases) and settings."""
  import torch
  decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "norm" in n or "ln_q" in n)]
  no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "norm" in n or "ln_q" in n]
  kwargs = {"fused": True} if fused else {}
  return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=config.llm_lr, betas=(config.adam_b1, config.adam_b2), **kwargs)


def hf_step_fn(hf, inputs, config, device, bf16: bool):
  """One transformers training step -> loss (synchronized: the step has finished when it returns)."""
  import torch
  optimizer = hf_optimizer(hf, config, fused=device.type == "cuda")

  def step() -> float:
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
      loss = hf(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    if device.type == "cuda":
      torch.cuda.synchronize()
    return value

  return step


def run_config(batch: int, bf16: bool, flash: bool, model_dir: str = "", remat: str = ""):
  """The run config of `python -m bbu_jax.train` for this benchmark: every group but detection trained."""
  from bbu_jax import config as config_lib
  config = config_lib.base_config()
  config.model_path = model_dir
  config.vision_lr = config.merger_lr = config.llm_lr = 1e-4
  config.detection_lr = config.adapter_lr = 0.0
  config.weight_decay = 0.01
  config.warmup_ratio = 0.0
  config.per_device_train_batch_size = batch
  config.bf16 = bf16
  config.use_flash_attention = flash
  config.remat_policy = remat
  config.lock()
  return config


def build_bbu(config, model_config, steps: int):
  """The real program of `python -m bbu_jax.train` and its state: weights from config.model_path, else random."""
  from bbu_jax.parallel import sharding
  from bbu_jax.training import program as program_lib
  mesh = sharding.make_mesh(config.mesh)
  program = program_lib.build_program(config, model_config, None, mesh, total_steps=steps)
  if config.model_path:
    state = program.init_state(program_lib.load_pretrained_params(config, model_config, program))
  else:
    state = program.init_state()
  return program, state


def bbu_step_fn(program, state, batch):
  """(compile seconds, step) where step() runs one donated train step, waits for it and returns its loss."""
  import jax
  start = time.perf_counter()
  compiled = program.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready((holder["state"], metrics))
    return metrics["loss"]

  return compile_s, step


def timed(step) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of one call."""
  start, cpu = time.perf_counter(), time.process_time()
  step()
  return time.perf_counter() - start, time.process_time() - cpu


def load_average() -> float:
  return round(os.getloadavg()[0], 2)


def matmul_shape(accelerator: bool, compute_dtype: str) -> tuple[int, str, int, int]:
  """(size, dtype, calls, repeats) of the peak matmul: 8192^3 in the compute dtype on a GPU (10 dots per
  timing, so launch gaps do not count), 2048^3 float32 on a CPU."""
  return (8192, compute_dtype, 10, 5) if accelerator else (2048, "float32", 1, 10)


def datasheet_peak(device_name: str) -> float | None:
  if "PCIe" in device_name or "NVL" in device_name:
    return None
  return next((peak for name, peak in DATASHEET_BF16_PEAK.items() if name in device_name), None)


def side_figures(figures: dict, prefix: str, times: list[tuple[float, float]], flops: float, tokens: int) -> float:
  """Adds one side's step figures (median and best wall seconds, median CPU seconds, GFLOP/s, tokens/s)
  from its (wall, cpu) step times under `prefix`; returns the median wall seconds."""
  median = float(np.median([w for w, _ in times]))
  figures.update({
      f"{prefix}_step_s_median": round(median, 4), f"{prefix}_step_s_min": round(min(w for w, _ in times), 4),
      f"{prefix}_step_cpu_s_median": round(float(np.median([c for _, c in times])), 4),
      f"{prefix}_gflops": round(flops / median / 1e9, 1),
      f"{prefix}_tokens_per_s": round(tokens / median, 1),
  })
  return median


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", choices=bench_shape.SHAPES, default="bench")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="bfloat16: float32 master weights and optimizer state, bfloat16 compute")
  parser.add_argument("--steps", type=int, default=6, help="timed steps of each side")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each side after the first")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=SEQ, help="tokens per sample (one 64-token image included)")
  parser.add_argument("--layers", type=int, default=None, help="cap the text layers and vision blocks (smoke tests)")
  parser.add_argument("--torch_threads", type=int, default=2)
  parser.add_argument("--xla_flags", default=None,
                      help=f"XLA_FLAGS for this run (default: the environment's, else {DEFAULT_XLA_FLAGS!r})")
  parser.add_argument("--order", choices=("auto", "alternating", "sequential"), default="auto",
                      help="auto: sequential where a GPU is used, alternating on a CPU")
  parser.add_argument("--skip_hf", action="store_true", help="time bbu_jax only (profiling)")
  parser.add_argument("--remat", default="",
                      help="bbu_jax's remat policy, a name of bbu_jax.models.layers.REMAT_POLICIES (the run config's "
                           "remat_policy; default: none)")
  parser.add_argument("--profile", default="",
                      help="a folder: after the timed steps, trace 2 more bbu_jax steps there with jax.profiler "
                           "(a Perfetto trace; bench/trace_summary.py reads it). Sequential order only")
  args = parser.parse_args(argv)

  if args.xla_flags is not None:
    os.environ["XLA_FLAGS"] = args.xla_flags
  elif "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = DEFAULT_XLA_FLAGS
  for key, value in GPU_ENVIRONMENT.items():
    os.environ.setdefault(key, value)
  import jax
  import torch
  import transformers

  torch.set_num_threads(args.torch_threads)
  torch.manual_seed(0)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  backend = jax.default_backend()  # starts jax's client now, before torch holds GPU memory
  gpu = device.type == "cuda" or backend == "gpu"
  sequential = args.order == "sequential" or (args.order == "auto" and gpu)
  bf16 = args.dtype == "bfloat16"
  compute_dtype = "bfloat16" if bf16 else "float32"
  if backend == "gpu" and not bf16:
    jax.config.update("jax_default_matmul_precision", "highest")  # float32 means float32, not TF32
  model_config = bench_shape.model_config(args.shape, args.layers)
  shared_weights = args.shape == "bench"
  tokens = args.batch * args.seq
  jax_device = jax.devices()[0]
  figures: dict = {"shape": args.shape, "dtype": args.dtype, "layers": args.layers, "batch": args.batch,
                   "seq": args.seq, "tokens_per_step": tokens, "order": "sequential" if sequential else "alternating",
                   "weights": "shared" if shared_weights else "independent random",
                   "jax_backend": backend, "jax_device": jax_device.device_kind,
                   "torch_device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                   "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__, "torch": torch.__version__,
                   "transformers": transformers.__version__, "load_average_start": load_average()}
  log(f"{args.shape} shape, {args.dtype}, batch {args.batch} x {args.seq}; jax on {backend} ({jax_device.device_kind}), "
      f"torch on {figures['torch_device']}; {figures['order']}")
  total_steps = 1 + args.warmup + args.steps
  samples = make_samples(args.batch, model_config, args.seq)
  hf_config = bench_shape.hf_config(None if args.shape == "bench" and not args.layers else model_config)
  flops = train_flops(model_config, args.batch, args.seq)
  tmp = tempfile.TemporaryDirectory()
  model_dir = tmp.name if shared_weights else ""

  flash = False
  if backend == "gpu" and bf16:
    reason = cudnn_attention_check(model_config, args.batch, args.seq)
    flash = not reason
    log("cuDNN attention: " + ("used" if flash else f"not used ({reason})"))
    if reason:
      figures["cudnn_attention_problem"] = reason
  figures["bbu_jax_attention"] = "cudnn" if flash else "xla"
  config = run_config(args.batch, bf16, flash, model_dir, args.remat)
  figures["remat"] = args.remat or "none"

  if not sequential:
    # --- CPU: both sides built, then alternating ------------------------------------------------------
    log("building transformers' model")
    hf = build_hf(hf_config, device, model_dir)
    log("building bbu_jax's program and state")
    program, state = build_bbu(config, model_config, total_steps)
    batch = jax.device_put(bbu_batch(samples, model_config))
    hf_step = hf_step_fn(hf, hf_batch(samples, model_config, device), config, device, bf16)
    compile_s, bbu_step = bbu_step_fn(program, state, batch)
    del state
    figures["bbu_jax_compile_s"] = round(compile_s, 2)
    bbu_loss, hf_loss = float(bbu_step()), hf_step()
    figures["first_loss_bbu_jax"], figures["first_loss_hf"] = round(bbu_loss, 5), round(hf_loss, 5)
    log(f"compile {figures['bbu_jax_compile_s']}s; first losses: bbu_jax {bbu_loss:.5f}, transformers {hf_loss:.5f}")
    if shared_weights and not losses_agree(bbu_loss, hf_loss, bf16):
      raise SystemExit(f"the two sides disagree on the first loss ({bbu_loss} vs {hf_loss}): not the same step")
    for _ in range(args.warmup):
      bbu_step()
      if not args.skip_hf:
        hf_step()
    # CPU seconds (all threads of this process) beside wall seconds: on a loaded machine they show what
    # each side consumed, spin-waiting threads included.
    bbu_times, hf_times = [], []
    for i in range(args.steps):
      bbu_times.append(timed(bbu_step))
      if not args.skip_hf:
        hf_times.append(timed(hf_step))
      log(f"step {i}: bbu_jax {bbu_times[-1][0]:.3f}s" + (f", transformers {hf_times[-1][0]:.3f}s" if hf_times else "")
          + f" (load {load_average()})")
    peak_jax = jax_matmul_peak(*matmul_shape(backend == "gpu", compute_dtype))
    peak_torch = torch_matmul_peak(device, *matmul_shape(device.type == "cuda", compute_dtype))
  else:
    # --- GPU: transformers, its memory freed, then bbu_jax ---------------------------------------------
    # A side that fails (out of memory, say) is reported in the JSON; the other side still runs.
    hf_times, peak_torch, bbu_times = [], None, []
    if not args.skip_hf or shared_weights:
      try:
        hf_times, peak_torch, hf_loss = run_hf_alone(args, hf_config, samples, model_config, config, device, bf16,
                                                      model_dir, compute_dtype)
        figures["first_loss_hf"] = round(hf_loss, 5)
      except Exception as e:  # noqa: BLE001
        figures["hf_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"transformers failed: {figures['hf_error']}")
      if device.type == "cuda":
        figures["hf_peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        gc.collect()
        torch.cuda.empty_cache()
        log(f"transformers freed: torch holds {torch.cuda.memory_allocated() / 2**30:.2f} GiB, "
            f"reserves {torch.cuda.memory_reserved() / 2**30:.2f} GiB")
    if args.skip_hf:
      hf_times = []
    if hf_times:  # so far, in case bbu_jax's side does not finish in the time it is given
      hf_s = float(np.median([w for w, _ in hf_times]))
      print(json.dumps({"shape": args.shape, "dtype": args.dtype, "partial": "transformers only",
                        "hf_step_s_median": round(hf_s, 4), "hf_tokens_per_s": round(tokens / hf_s, 1)}), flush=True)
    (bbu_times, compile_s, bbu_loss), error = try_bbu_alone(args, config, model_config, samples, total_steps)
    if error and flash and not any(word in error for word in ("RESOURCE_EXHAUSTED", "out of memory")):
      # The probe passed but the whole step did not: once more with XLA attention.
      figures["bbu_jax_attention"] = "xla"
      figures["cudnn_attention_problem"] = "the step failed with it: " + error
      gc.collect()
      config = run_config(args.batch, bf16, False, model_dir, args.remat)
      (bbu_times, compile_s, bbu_loss), error = try_bbu_alone(args, config, model_config, samples, total_steps)
    if error:
      figures["bbu_jax_error"] = error
    else:
      figures["bbu_jax_compile_s"] = round(compile_s, 2)
      figures["first_loss_bbu_jax"] = round(bbu_loss, 5)
    stats = jax_device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      figures["bbu_jax_peak_memory_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
    gc.collect()
    peak_jax = jax_matmul_peak(*matmul_shape(backend == "gpu", compute_dtype))
    if shared_weights and "first_loss_hf" in figures and "first_loss_bbu_jax" in figures:
      figures["first_losses_agree"] = losses_agree(figures["first_loss_bbu_jax"], figures["first_loss_hf"], bf16)
      if not figures["first_losses_agree"]:
        log(f"WARNING: the two sides disagree on the first loss ({figures['first_loss_bbu_jax']} vs "
            f"{figures['first_loss_hf']})")
  tmp.cleanup()
  figures["load_average_end"] = load_average()

  jax_gpu = backend == "gpu"
  peak_key = "matmul_peak_gflops" if not jax_gpu else "matmul_peak_tflops"
  unit = 1e9 if not jax_gpu else 1e12
  figures.update({
      "step_gflop": round(flops["total"] / 1e9, 2),
      "step_gflop_parts": {k: round(v / 1e9, 2) for k, v in flops.items() if k != "total"},
      "matmul_peak_dtype": matmul_shape(jax_gpu, compute_dtype)[1],
      f"{peak_key}_jax": round(peak_jax / unit, 1),
  })
  datasheet = datasheet_peak(figures["torch_device"] if device.type == "cuda" else jax_device.device_kind)
  if datasheet and jax_gpu:
    figures["datasheet_bf16_peak_tflops"] = round(datasheet / 1e12, 1)
  if bbu_times:
    bbu_s = side_figures(figures, "bbu_jax", bbu_times, flops["total"], tokens)
    if jax_gpu:
      figures["mfu"] = round(flops["total"] / bbu_s / peak_jax, 3)
      if datasheet:
        figures["mfu_datasheet"] = round(flops["total"] / bbu_s / datasheet, 3)
    else:
      figures["mfu_cpu"] = round(flops["total"] / bbu_s / peak_jax, 3)
  if peak_torch is not None:
    figures[f"{peak_key}_torch"] = round(peak_torch / unit, 1)
  if hf_times:
    hf_s = side_figures(figures, "hf", hf_times, flops["total"], tokens)
    if bbu_times:
      figures["ratio"] = round(hf_s / bbu_s, 3)
    if jax_gpu:
      figures["hf_mfu"] = round(flops["total"] / hf_s / peak_jax, 3)
      if datasheet:
        figures["hf_mfu_datasheet"] = round(flops["total"] / hf_s / datasheet, 3)
  print(json.dumps(figures))
  keys = (("shape", "dtype", "bbu_jax_tokens_per_s", "hf_tokens_per_s", "ratio", "mfu", "mfu_datasheet", "hf_mfu")
          if jax_gpu else ("bbu_jax_tokens_per_s", "hf_tokens_per_s", "ratio", "mfu_cpu"))
  print(json.dumps({k: figures.get(k) for k in keys}))
  return figures


def losses_agree(bbu_loss: float, hf_loss: float, bf16: bool) -> bool:
  """Same weights and batch: float32 losses agree to 1e-3, bfloat16 compute (two different roundings) to 2e-2."""
  return abs(bbu_loss - hf_loss) < (2e-2 if bf16 else 1e-3) * max(1.0, abs(hf_loss))


def run_bbu_alone(args, config, model_config, samples, total_steps):
  """bbu_jax's side on its own (GPU order): build, compile, first step, warm-up, timed steps.
  Returns (timings, compile seconds, first loss)."""
  import jax
  log("building bbu_jax's program and state" + (" (weights from transformers)" if config.model_path
                                                  else " (random weights)"))
  program, state = build_bbu(config, model_config, total_steps)
  batch = jax.device_put(bbu_batch(samples, model_config))
  log("compiling bbu_jax's train step")
  compile_s, step = bbu_step_fn(program, state, batch)
  del state
  first = float(step())
  log(f"bbu_jax: compile {compile_s:.1f}s, first loss {first:.5f}")
  for _ in range(args.warmup):
    step()
  times = []
  for i in range(args.steps):
    times.append(timed(step))
    log(f"bbu_jax step {i}: {times[-1][0]:.4f}s")
  if args.profile:
    log(f"tracing 2 bbu_jax steps into {args.profile}")
    try:
      with jax.profiler.trace(args.profile, create_perfetto_trace=True):
        for _ in range(2):
          step()
    except Exception as e:  # noqa: BLE001 - the timed steps above still count
      log(f"tracing failed: {type(e).__name__}: {str(e)[:300]}")
  return times, compile_s, first


def try_bbu_alone(*args) -> tuple[tuple[list, float, float], str]:
  """run_bbu_alone's result and "", or empty results and the error (the side's memory is garbage then)."""
  try:
    return run_bbu_alone(*args), ""
  except Exception as e:  # noqa: BLE001 - reported in the JSON; transformers' figures still count
    error = f"{type(e).__name__}: {str(e)[:300]}"
    log(f"bbu_jax failed: {error}")
    return ([], 0.0, 0.0), error


def run_hf_alone(args, hf_config, samples, model_config, config, device, bf16, model_dir, compute_dtype):
  """transformers' side on its own (GPU order): build, first step, warm-up, timed steps, matmul peak.
  Returns (timings, torch matmul peak, first loss); every tensor it made is garbage when it returns."""
  log("building transformers' model on " + str(device) + (" and saving it for bbu_jax" if model_dir else ""))
  hf = build_hf(hf_config, device, model_dir)
  step = hf_step_fn(hf, hf_batch(samples, model_config, device), config, device, bf16)
  first = step()
  log(f"transformers: first loss {first:.5f}")
  times = []
  if not args.skip_hf:
    for _ in range(args.warmup):
      step()
    for i in range(args.steps):
      times.append(timed(step))
      log(f"transformers step {i}: {times[-1][0]:.4f}s")
  peak = torch_matmul_peak(device, *matmul_shape(device.type == "cuda", compute_dtype))
  return times, peak, first


if __name__ == "__main__":
  main()
