"""Benchmark of batched decoding: bbu_jax (one jitted prefill + while_loop, batch 16) against transformers'
`generate`, per sample (the old pipeline's way) and batched (16, left-padded), on the same model shape.

  python bench/bench_decode.py [--shape bench|3b] [--dtype float32|bfloat16] [--requests 16] [--new_tokens 64]
                               [--repeats 3] [--layers N] [--torch_threads 2]

Shapes (bench_shape.py): "bench" (issue 5: text hidden 512, 8 layers, MLP 1536, 8 heads, 2 KV heads, vocab
4112; vision depth 4, hidden 256, MLP 768, 4 heads, window 112, full attention at block 3) and "3b"
(Qwen2.5-VL-3B's published sizes, vocab 151936); `--layers N` caps the depth of both towers (smoke tests).
One 224x224 image per request (256 patches, 64 image tokens) after a text prefix of 24..56 random tokens.
At the bench shape the transformers model is built at random, saved, and loaded into bbu_jax, so both sides
hold the same weights, prompts and images, and the generated tokens are compared; at 3B each side
initializes its own random weights (no 7-15 GB hand-over through disk) and tokens are not compared.
--dtype sets the weights' and the computation's dtype on both sides (bfloat16: transformers' model
`.to(torch.bfloat16)`, bbu_jax loaded with dtype bfloat16). Devices: torch on CUDA when it has one, jax on
its default backend; attention: transformers sdpa, bbu_jax its XLA attention.

EOS is suppressed on every side (transformers' `suppress_tokens`, bbu_jax's `suppress_token_ids`), so every
request generates exactly --new_tokens tokens. Compilation (bbu_jax's first call) and transformers' first
call are excluded from the timings and reported apart. Tokens/s = generated tokens / wall time of the whole
generation (prefill included; the results are on the host when the clock stops). The last line is one JSON
object.

Threads: torch uses --torch_threads (2 = this machine's cores); XLA's CPU client uses all cores unless
XLA_FLAGS=--xla_cpu_multi_thread_eigen=false (then compare with --torch_threads 1). The load average is
recorded: on a shared machine, oversubscribed torch threads slow transformers far more than XLA.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import bench_shape  # noqa: E402
from bench_shape import GRID  # noqa: E402

START = time.perf_counter()


def log(message: str) -> None:
  print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


def make_requests(n: int, model_config, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  patches = int(np.prod(GRID))
  image_tokens = patches // 4
  c = model_config
  text_limit = bench_shape.text_token_limit(c)
  requests = []
  for _ in range(n):
    prefix = rng.integers(0, text_limit, int(rng.integers(24, 57)))
    suffix = rng.integers(0, text_limit, 8)
    ids = np.concatenate([prefix, [c.vision_start_token_id], [c.image_token_id] * image_tokens,
                          [c.vision_end_token_id], suffix])
    requests.append({"input_ids": ids.astype(np.int64),
                     "pixel_values": rng.standard_normal((patches, 3 * 2 * 14 * 14)).astype(np.float32),
                     "image_grid_thw": np.asarray([GRID], np.int64)})
  return requests


def hf_inputs(requests: list[dict], model_config, device):
  """Left-padded batch in transformers' form, on `device`."""
  import torch
  seq = max(len(r["input_ids"]) for r in requests)
  ids = np.full((len(requests), seq), model_config.pad_token_id, np.int64)
  mask = np.zeros_like(ids)
  for i, r in enumerate(requests):
    ids[i, seq - len(r["input_ids"]):] = r["input_ids"]
    mask[i, seq - len(r["input_ids"]):] = 1
  ids_t = torch.as_tensor(ids)
  inputs = {"input_ids": ids_t, "attention_mask": torch.as_tensor(mask),
            "pixel_values": torch.as_tensor(np.concatenate([r["pixel_values"] for r in requests])),
            "image_grid_thw": torch.as_tensor(np.concatenate([r["image_grid_thw"] for r in requests])),
            "mm_token_type_ids": (ids_t == model_config.image_token_id).to(torch.int32)}
  return {k: v.to(device) for k, v in inputs.items()}


def hf_generate(model, requests, new_tokens, model_config, device):
  import torch
  eos, pad = model_config.eos_token_id, model_config.pad_token_id
  with torch.no_grad():
    out = model.generate(**hf_inputs(requests, model_config, device), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, suppress_tokens=[eos], eos_token_id=eos,
                         pad_token_id=pad)
  return out[:, -new_tokens:].cpu().numpy()


def random_model(model_config, dtype):
  """A Qwen25VL with random weights in `dtype`, initialized by one jitted program on the default device."""
  import jax
  from flax import nnx
  from bbu_jax.models import weights
  from bbu_jax.models.qwen2_5_vl import Qwen25VL
  graphdef, _ = nnx.split(weights.abstract_model(model_config, dtype=dtype))
  state = jax.jit(lambda: nnx.state(Qwen25VL(model_config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)))()
  return nnx.merge(graphdef, state)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", choices=bench_shape.SHAPES, default="bench")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--requests", type=int, default=16)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3, help="timed bbu_jax and batched-HF runs (best is kept)")
  parser.add_argument("--layers", type=int, default=None, help="cap the text layers and vision blocks (smoke tests)")
  parser.add_argument("--torch_threads", type=int, default=2)
  parser.add_argument("--skip_hf", action="store_true", help="time bbu_jax only (random weights at every shape)")
  args = parser.parse_args(argv)

  # On a GPU both sides hold their models at once: jax takes GPU memory as it needs it, not 75% up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax
  import jax.numpy as jnp
  import torch
  import transformers
  from bbu_jax.decode.generate import GenerationSettings, Generator, make_prompt_batch
  from bbu_jax.models.rope import get_rope_index
  from bbu_jax.models.weights import load_model

  torch.set_num_threads(args.torch_threads)
  torch.manual_seed(0)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  backend = jax.default_backend()
  bf16 = args.dtype == "bfloat16"
  model_config = bench_shape.model_config(args.shape, args.layers)
  shared_weights = args.shape == "bench" and not args.skip_hf
  requests = make_requests(args.requests, model_config)
  n_tokens = args.requests * args.new_tokens
  figures: dict = {"shape": args.shape, "dtype": args.dtype, "layers": args.layers, "requests": args.requests,
                   "new_tokens": args.new_tokens, "weights": "shared" if shared_weights else "independent random",
                   "jax_backend": backend, "jax_device": jax.devices()[0].device_kind,
                   "torch_device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                   "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average_at_start": os.getloadavg()[0]}
  log(f"{args.shape} shape, {args.dtype}; jax on {backend}, torch on {figures['torch_device']}")

  hf = None
  if not args.skip_hf:
    log("building transformers' model")
    with torch.device(device):
      hf = transformers.Qwen2_5_VLForConditionalGeneration(
          bench_shape.hf_config(None if args.shape == "bench" and not args.layers else model_config))
    hf = hf.to(torch.bfloat16 if bf16 else torch.float32).eval()
    if device.type == "cuda":
      torch.cuda.empty_cache()  # the float32 copy's memory, for jax
  jax_dtype = jnp.bfloat16 if bf16 else jnp.float32
  log("building bbu_jax's model" + (" (weights from transformers)" if shared_weights else " (random weights)"))
  if shared_weights:
    with tempfile.TemporaryDirectory() as tmp:
      hf.save_pretrained(tmp)
      model, _ = load_model(tmp, dtype=jax_dtype)
  else:
    model = random_model(model_config, jax_dtype)

  # --- bbu_jax: batch of all requests --------------------------------------------------------------
  prompts = []
  for r in requests:
    positions, next_position = get_rope_index(r["input_ids"], r["image_grid_thw"],
                                              image_token_id=model_config.image_token_id, spatial_merge_size=2)
    prompts.append({**r, "positions": positions, "next_position": next_position})
  generator = Generator(model)
  eos = model_config.eos_token_id
  settings = GenerationSettings(max_new_tokens=args.new_tokens, eos_token_ids=(eos,),
                                pad_token_id=model_config.pad_token_id, suppress_token_ids=(eos,))
  batch = make_prompt_batch(prompts, model_config)
  log("compiling and running bbu_jax's generation")
  start = time.perf_counter()
  ours = generator.generate(batch, settings)
  figures["bbu_jax_first_call_s"] = round(time.perf_counter() - start, 3)
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    ours = generator.generate(batch, settings)
    times.append(time.perf_counter() - start)
  figures["bbu_jax_s"] = round(min(times), 3)
  figures["bbu_jax_compile_s"] = round(figures["bbu_jax_first_call_s"] - min(times), 3)
  assert np.all(ours.lengths == args.new_tokens), ours.lengths
  log(f"bbu_jax batch {args.requests}: {min(times):.3f}s, compile {figures['bbu_jax_compile_s']:.1f}s")
  figures["bbu_jax_tokens_per_s"] = round(n_tokens / figures["bbu_jax_s"], 1)
  partial = {"shape": args.shape, "dtype": args.dtype, "partial": "so far",
             "bbu_jax_tokens_per_s": figures["bbu_jax_tokens_per_s"]}

  if hf is not None:
    print(json.dumps(partial), flush=True)  # in case transformers' side does not finish in the time it is given
    # --- transformers per sample --------------------------------------------------------------------
    start = time.perf_counter()
    hf_generate(hf, requests[:1], args.new_tokens, model_config, device)  # warm-up, excluded
    figures["hf_first_call_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    per_sample = [hf_generate(hf, [r], args.new_tokens, model_config, device)[0] for r in requests]
    figures["hf_per_sample_s"] = round(time.perf_counter() - start, 3)
    log(f"transformers per sample: {figures['hf_per_sample_s']:.3f}s")
    partial["hf_per_sample_tokens_per_s"] = round(n_tokens / figures["hf_per_sample_s"], 1)
    print(json.dumps(partial), flush=True)

    # --- transformers batched -----------------------------------------------------------------------
    times = []
    for _ in range(max(1, args.repeats - 1)):
      start = time.perf_counter()
      batched = hf_generate(hf, requests, args.new_tokens, model_config, device)
      times.append(time.perf_counter() - start)
    figures["hf_batched_s"] = round(min(times), 3)
    log(f"transformers batched {args.requests}: {figures['hf_batched_s']:.3f}s")

    if shared_weights:
      # Same greedy tokens? (random weights make near-ties rare but possible after many steps; bfloat16
      # roundings differ between the two sides, so rows may part there.)
      per_sample = np.stack(per_sample)
      figures["rows_equal_to_hf_per_sample"] = int(sum(np.array_equal(ours.tokens[i], per_sample[i])
                                                       for i in range(args.requests)))
      figures["rows_equal_to_hf_batched"] = int(sum(np.array_equal(ours.tokens[i], batched[i])
                                                    for i in range(args.requests)))
    figures["hf_per_sample_tokens_per_s"] = round(n_tokens / figures["hf_per_sample_s"], 1)
    figures["hf_batched_tokens_per_s"] = round(n_tokens / figures["hf_batched_s"], 1)
    figures["ratio_vs_per_sample"] = round(figures["bbu_jax_tokens_per_s"] / figures["hf_per_sample_tokens_per_s"], 2)
    figures["ratio_vs_batched"] = round(figures["bbu_jax_tokens_per_s"] / figures["hf_batched_tokens_per_s"], 2)
  figures["load_average_at_end"] = os.getloadavg()[0]  # other processes on the machine skew both sides
  print(json.dumps(figures))
  keys = ("bbu_jax_tokens_per_s", "hf_per_sample_tokens_per_s", "hf_batched_tokens_per_s", "ratio_vs_per_sample",
          "ratio_vs_batched")
  if backend == "gpu" or device.type == "cuda":
    keys = ("shape", "dtype") + keys
  print(json.dumps({k: figures.get(k) for k in keys}))
  return figures


if __name__ == "__main__":
  main()
