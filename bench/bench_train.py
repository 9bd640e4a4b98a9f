"""Benchmark of one training step: bbu_jax's real train step against transformers' PyTorch Qwen2.5-VL, same
weights, same batch, in one run on this machine.

  python bench/bench_train.py [--steps 6] [--warmup 2] [--torch_threads 2] [--xla_flags "..."]

The bench shape (issue 6): text hidden 512, 8 layers, MLP 1536, 8 heads, 2 KV heads, vocab 4112; vision
depth 4, hidden 256, MLP 768, 4 heads, window 112, full attention at block 3; one 224x224 image per sample
(256 patches, 64 merged tokens) inside 258 tokens of text; batch 4; AdamW; float32; the LM loss on the
answer tokens (the last ANSWER_TOKENS of each sample); gradients clipped at norm 1 on both sides.

bbu_jax: `training.program.build_program` (the jitted, donated train step of `python -m bbu_jax.train`,
with its optax optimizer), weights loaded from the transformers model's saved directory with
`load_pretrained_params`. transformers: `Qwen2_5_VLForConditionalGeneration` (sdpa attention) with
`labels`, `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW.step()`, in torch.set_num_threads(N).
Both sides are warmed up, then their timed steps ALTERNATE, so a machine shared with other work loads
both alike; the median step time of each side is reported. Compilation (bbu_jax) is timed apart.
The fp32 matmul peak is the best rate of a jitted 2048x2048 jnp.dot measured in the same run; mfu_cpu is
the analytic FLOPs of the step (6 x parameters x tokens, attention, vision tower) per bbu_jax step time
over that peak. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

# XLA CPU flags measured to help this step on a small CPU (see bench/README.md); set before jax starts.
DEFAULT_XLA_FLAGS = ""

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench_shape import GRID, IMAGE_TOKEN_ID, PAD_ID, VISION_END_ID, VISION_START_ID, hf_config  # noqa: E402
SEQ = 258
ANSWER_TOKENS = 96
PREFIX_TOKENS = 24


def make_samples(batch: int, seed: int = 0) -> list[dict]:
  """`batch` samples of SEQ tokens: prompt text, <vision_start> 64 x <image_pad> <vision_end>, text, answer."""
  rng = np.random.default_rng(seed)
  patches = int(np.prod(GRID))
  image_tokens = patches // 4
  suffix = SEQ - PREFIX_TOKENS - image_tokens - 2
  samples = []
  for _ in range(batch):
    ids = np.concatenate([rng.integers(0, PAD_ID, PREFIX_TOKENS), [VISION_START_ID], [IMAGE_TOKEN_ID] * image_tokens,
                          [VISION_END_ID], rng.integers(0, PAD_ID, suffix)]).astype(np.int64)
    answer = np.zeros(SEQ, bool)
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
    positions, _ = get_rope_index(ids, np.asarray([GRID]), image_token_id=IMAGE_TOKEN_ID, spatial_merge_size=2)
    target = np.zeros(SEQ, np.int32)
    target[:-1] = ids[1:]
    student = np.zeros(SEQ, np.float32)
    student[:-1] = s["answer_mask"][1:]
    rows.append({"input_ids": ids.astype(np.int32), "positions": np.asarray(positions, np.int32),
                 "segment_ids": np.ones(SEQ, np.int32), "target_ids": target,
                 "teacher_loss_mask": np.zeros(SEQ, np.float32), "student_loss_mask": student,
                 "pixel_values": s["pixel_values"]})
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  batch["positions"] = batch["positions"].transpose(1, 0, 2)  # (3, B, S)
  meta = stack_vision_metadata([vision_metadata(np.asarray([GRID]), int(np.prod(GRID)), model_config.vision)
                                for _ in samples])
  batch.update(meta)
  return {k: v[None] for k, v in batch.items()}


def hf_batch(samples: list[dict]) -> dict:
  import torch
  ids = torch.as_tensor(np.stack([s["input_ids"] for s in samples]))
  labels = ids.clone()
  labels[~torch.as_tensor(np.stack([s["answer_mask"] for s in samples]))] = -100
  return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
          "pixel_values": torch.as_tensor(np.concatenate([s["pixel_values"] for s in samples])),
          "image_grid_thw": torch.as_tensor(np.asarray([GRID] * len(samples), np.int64)),
          "mm_token_type_ids": (ids == IMAGE_TOKEN_ID).to(torch.int32)}


def train_flops(model_config, batch: int) -> dict[str, float]:
  """Analytic training FLOPs of one step (forward + backward = 3 x forward; a multiply-add is 2 FLOPs).

  Matmul weights count 6 x params x the tokens they see; attention scores and values 3 x 4 x q_len x
  kv_len x width per layer (the full square, as computed, causal or not).
  """
  t, v = model_config.text, model_config.vision
  kv_width = t.num_key_value_heads * t.head_dim
  layer = t.hidden_size * (t.hidden_size + 2 * kv_width) + t.hidden_size * t.hidden_size \
      + 3 * t.hidden_size * t.intermediate_size
  tokens = batch * SEQ
  decoder = 6.0 * t.num_hidden_layers * layer * tokens
  lm_head = 6.0 * t.hidden_size * t.vocab_size * tokens
  text_attention = 12.0 * t.num_hidden_layers * batch * SEQ * SEQ * t.hidden_size
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


def matmul_peak(size: int = 2048, repeats: int = 10) -> tuple[float, float]:
  """Best FLOP/s of a jitted float32 size x size jnp.dot, and of torch.mm (current torch threads)."""
  import jax
  import jax.numpy as jnp
  import torch
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  ta, tb = torch.randn(size, size), torch.randn(size, size)
  torch.mm(ta, tb)
  best_torch = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    torch.mm(ta, tb)
    best_torch = min(best_torch, time.perf_counter() - start)
  flops = 2.0 * size ** 3
  return flops / best, flops / best_torch


def build_bbu(model_dir: str, steps: int):
  """The real program of `python -m bbu_jax.train` for this model, with every group but detection trained."""
  from bbu_jax import config as config_lib
  from bbu_jax.models import weights
  from bbu_jax.parallel import sharding
  from bbu_jax.training import program as program_lib
  config = config_lib.base_config()
  config.model_path = model_dir
  config.vision_lr = config.merger_lr = config.llm_lr = 1e-4
  config.detection_lr = config.adapter_lr = 0.0
  config.weight_decay = 0.01
  config.warmup_ratio = 0.0
  config.per_device_train_batch_size = 4
  config.lock()
  model_config = weights.read_config(model_dir)
  mesh = sharding.make_mesh(config.mesh)
  program = program_lib.build_program(config, model_config, None, mesh, total_steps=steps)
  state = program.init_state(program_lib.load_pretrained_params(config, model_config, program))
  return config, model_config, program, state


def hf_optimizer(model, config):
  """torch.optim.AdamW with our groups' decay rule (no decay on norms and biases) and settings."""
  import torch
  decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "norm" in n or "ln_q" in n)]
  no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "norm" in n or "ln_q" in n]
  return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=config.llm_lr, betas=(config.adam_b1, config.adam_b2))


def load_average() -> float:
  return round(os.getloadavg()[0], 2)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=6, help="timed steps of each side (alternating)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each side after compilation")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--torch_threads", type=int, default=2)
  parser.add_argument("--xla_flags", default=None,
                      help=f"XLA_FLAGS for this run (default: the environment's, else {DEFAULT_XLA_FLAGS!r})")
  parser.add_argument("--skip_hf", action="store_true", help="time bbu_jax only (profiling)")
  args = parser.parse_args(argv)

  if args.xla_flags is not None:
    os.environ["XLA_FLAGS"] = args.xla_flags
  elif "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = DEFAULT_XLA_FLAGS
  import jax
  import torch
  import transformers

  torch.set_num_threads(args.torch_threads)
  torch.manual_seed(0)
  figures: dict = {"batch": args.batch, "seq": SEQ, "tokens_per_step": args.batch * SEQ,
                   "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                   "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__, "torch": torch.__version__,
                   "transformers": transformers.__version__, "load_average_start": load_average()}
  hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config()).float().train()
  total_steps = 1 + args.warmup + args.steps
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    config, model_config, program, state = build_bbu(tmp, total_steps)
  samples = make_samples(args.batch)
  batch = jax.device_put(bbu_batch(samples, model_config))
  hf_inputs = hf_batch(samples)
  optimizer = hf_optimizer(hf, config)

  def hf_step() -> float:
    loss = hf(**hf_inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()

  # --- Compilation, first losses (same weights and batch: they must agree) -----------------------------
  start = time.perf_counter()
  step_fn = program.train_step.lower(state, batch).compile()
  figures["bbu_jax_compile_s"] = round(time.perf_counter() - start, 2)
  state, metrics = step_fn(state, batch)
  bbu_loss = float(metrics["loss"])
  hf_loss = hf_step()
  figures["first_loss_bbu_jax"], figures["first_loss_hf"] = round(bbu_loss, 5), round(hf_loss, 5)
  print(f"compile {figures['bbu_jax_compile_s']}s; first losses: bbu_jax {bbu_loss:.5f}, transformers {hf_loss:.5f}",
        flush=True)
  if not abs(bbu_loss - hf_loss) < 1e-3 * max(1.0, abs(hf_loss)):
    raise SystemExit(f"the two sides disagree on the first loss ({bbu_loss} vs {hf_loss}): not the same step")

  for _ in range(args.warmup):
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    if not args.skip_hf:
      hf_step()

  # --- Timed steps, alternating --------------------------------------------------------------------------
  # CPU seconds (all threads of this process) beside wall seconds: on a loaded machine they show what
  # each side consumed, spin-waiting threads included.
  bbu_times, hf_times, bbu_cpu, hf_cpu = [], [], [], []
  for i in range(args.steps):
    start, cpu = time.perf_counter(), time.process_time()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    bbu_times.append(time.perf_counter() - start)
    bbu_cpu.append(time.process_time() - cpu)
    if not args.skip_hf:
      start, cpu = time.perf_counter(), time.process_time()
      hf_step()
      hf_times.append(time.perf_counter() - start)
      hf_cpu.append(time.process_time() - cpu)
    print(f"step {i}: bbu_jax {bbu_times[-1]:.3f}s" + (f", transformers {hf_times[-1]:.3f}s" if hf_times else "")
          + f" (load {load_average()})", flush=True)
  figures["load_average_end"] = load_average()

  peak_jax, peak_torch = matmul_peak()
  flops = train_flops(model_config, args.batch)
  tokens = args.batch * SEQ
  bbu_s = float(np.median(bbu_times))
  figures.update({
      "bbu_jax_step_s_median": round(bbu_s, 4), "bbu_jax_step_s_min": round(min(bbu_times), 4),
      "bbu_jax_step_cpu_s_median": round(float(np.median(bbu_cpu)), 4),
      "step_gflop": round(flops["total"] / 1e9, 2),
      "step_gflop_parts": {k: round(v / 1e9, 2) for k, v in flops.items() if k != "total"},
      "matmul_peak_gflops_jax": round(peak_jax / 1e9, 1), "matmul_peak_gflops_torch": round(peak_torch / 1e9, 1),
      "bbu_jax_gflops": round(flops["total"] / bbu_s / 1e9, 1),
      "bbu_jax_tokens_per_s": round(tokens / bbu_s, 1),
      "mfu_cpu": round(flops["total"] / bbu_s / peak_jax, 3),
  })
  if hf_times:
    hf_s = float(np.median(hf_times))
    figures.update({
        "hf_step_s_median": round(hf_s, 4), "hf_step_s_min": round(min(hf_times), 4),
        "hf_step_cpu_s_median": round(float(np.median(hf_cpu)), 4),
        "hf_gflops": round(flops["total"] / hf_s / 1e9, 1),
        "hf_tokens_per_s": round(tokens / hf_s, 1),
        "ratio": round(hf_s / bbu_s, 3),
    })
  print(json.dumps(figures))
  keys = ("bbu_jax_tokens_per_s", "hf_tokens_per_s", "ratio", "mfu_cpu")
  print(json.dumps({k: figures.get(k) for k in keys}))
  return figures


if __name__ == "__main__":
  main()
