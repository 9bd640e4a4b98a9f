"""Benchmark of batched decoding: bbu_jax (one jitted prefill + while_loop, batch 16) against transformers'
`generate`, per sample (the old pipeline's way) and batched (16, left-padded), on the same model.

  python bench/bench_decode.py [--requests 16] [--new_tokens 64] [--repeats 3] [--torch_threads 2]

The bench shape (issue 5): text hidden 512, 8 layers, MLP 1536, 8 heads, 2 KV heads, vocab 4112; vision
depth 4, hidden 256, MLP 768, 4 heads, window 112, full attention at block 3; one 224x224 image per
request (256 patches, 64 image tokens) after a text prefix of 24..56 random tokens. The transformers
model is built at random, saved, and loaded into bbu_jax, so both sides hold the same float32 weights,
prompts and images. EOS is suppressed on every side (transformers' `suppress_tokens`, bbu_jax's
`suppress_token_ids`), so every request generates exactly --new_tokens tokens. Compilation (bbu_jax's
first call) and transformers' first call are excluded from the timings and reported apart. Tokens/s =
generated tokens / wall time of the whole generation (prefill included). The last line is one JSON object.

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

from bench_shape import EOS_ID, GRID, IMAGE_TOKEN_ID, PAD_ID, VISION_END_ID, VISION_START_ID, hf_config  # noqa: E402


def make_requests(n: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  patches = int(np.prod(GRID))
  image_tokens = patches // 4
  requests = []
  for _ in range(n):
    prefix = rng.integers(0, PAD_ID, int(rng.integers(24, 57)))
    suffix = rng.integers(0, PAD_ID, 8)
    ids = np.concatenate([prefix, [VISION_START_ID], [IMAGE_TOKEN_ID] * image_tokens, [VISION_END_ID], suffix])
    requests.append({"input_ids": ids.astype(np.int64),
                     "pixel_values": rng.standard_normal((patches, 3 * 2 * 14 * 14)).astype(np.float32),
                     "image_grid_thw": np.asarray([GRID], np.int64)})
  return requests


def hf_inputs(requests: list[dict]):
  """Left-padded batch in transformers' form."""
  import torch
  seq = max(len(r["input_ids"]) for r in requests)
  ids = np.full((len(requests), seq), PAD_ID, np.int64)
  mask = np.zeros_like(ids)
  for i, r in enumerate(requests):
    ids[i, seq - len(r["input_ids"]):] = r["input_ids"]
    mask[i, seq - len(r["input_ids"]):] = 1
  ids_t = torch.as_tensor(ids)
  return {"input_ids": ids_t, "attention_mask": torch.as_tensor(mask),
          "pixel_values": torch.as_tensor(np.concatenate([r["pixel_values"] for r in requests])),
          "image_grid_thw": torch.as_tensor(np.concatenate([r["image_grid_thw"] for r in requests])),
          "mm_token_type_ids": (ids_t == IMAGE_TOKEN_ID).to(torch.int32)}


def hf_generate(model, requests, new_tokens):
  import torch
  with torch.no_grad():
    out = model.generate(**hf_inputs(requests), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         suppress_tokens=[EOS_ID], eos_token_id=EOS_ID, pad_token_id=PAD_ID)
  return out[:, -new_tokens:].numpy()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--requests", type=int, default=16)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3, help="timed bbu_jax and batched-HF runs (best is kept)")
  parser.add_argument("--torch_threads", type=int, default=2)
  args = parser.parse_args(argv)

  import jax
  import torch
  import transformers
  from bbu_jax.decode.generate import GenerationSettings, Generator, make_prompt_batch
  from bbu_jax.models.rope import get_rope_index
  from bbu_jax.models.weights import load_model

  torch.set_num_threads(args.torch_threads)
  torch.manual_seed(0)
  hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config()).float().eval()
  requests = make_requests(args.requests)
  n_tokens = args.requests * args.new_tokens
  figures: dict = {"requests": args.requests, "new_tokens": args.new_tokens, "torch_threads": torch.get_num_threads(),
                   "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
                   "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average_at_start": os.getloadavg()[0]}

  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    model, config = load_model(tmp)

  # --- bbu_jax: batch of all requests --------------------------------------------------------------
  prompts = []
  for r in requests:
    positions, next_position = get_rope_index(r["input_ids"], r["image_grid_thw"], image_token_id=IMAGE_TOKEN_ID,
                                              spatial_merge_size=2)
    prompts.append({**r, "positions": positions, "next_position": next_position})
  generator = Generator(model)
  settings = GenerationSettings(max_new_tokens=args.new_tokens, eos_token_ids=(EOS_ID,), pad_token_id=PAD_ID,
                                suppress_token_ids=(EOS_ID,))
  batch = make_prompt_batch(prompts, config)
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
  print(f"bbu_jax batch {args.requests}: {min(times):.3f}s, compile {figures['bbu_jax_compile_s']:.1f}s", flush=True)

  # --- transformers per sample ----------------------------------------------------------------------
  start = time.perf_counter()
  hf_generate(hf, requests[:1], args.new_tokens)  # warm-up, excluded
  figures["hf_first_call_s"] = round(time.perf_counter() - start, 3)
  start = time.perf_counter()
  per_sample = [hf_generate(hf, [r], args.new_tokens)[0] for r in requests]
  figures["hf_per_sample_s"] = round(time.perf_counter() - start, 3)
  print(f"transformers per sample: {figures['hf_per_sample_s']:.3f}s", flush=True)

  # --- transformers batched -------------------------------------------------------------------------
  times = []
  for _ in range(max(1, args.repeats - 1)):
    start = time.perf_counter()
    batched = hf_generate(hf, requests, args.new_tokens)
    times.append(time.perf_counter() - start)
  figures["hf_batched_s"] = round(min(times), 3)
  print(f"transformers batched {args.requests}: {figures['hf_batched_s']:.3f}s", flush=True)

  # Same greedy tokens? (random weights make near-ties rare but possible after many steps.)
  per_sample = np.stack(per_sample)
  figures["rows_equal_to_hf_per_sample"] = int(sum(np.array_equal(ours.tokens[i], per_sample[i])
                                                   for i in range(args.requests)))
  figures["rows_equal_to_hf_batched"] = int(sum(np.array_equal(ours.tokens[i], batched[i])
                                                for i in range(args.requests)))
  figures["load_average_at_end"] = os.getloadavg()[0]  # other processes on the machine skew both sides
  figures["bbu_jax_tokens_per_s"] = round(n_tokens / figures["bbu_jax_s"], 1)
  figures["hf_per_sample_tokens_per_s"] = round(n_tokens / figures["hf_per_sample_s"], 1)
  figures["hf_batched_tokens_per_s"] = round(n_tokens / figures["hf_batched_s"], 1)
  figures["ratio_vs_per_sample"] = round(figures["bbu_jax_tokens_per_s"] / figures["hf_per_sample_tokens_per_s"], 2)
  figures["ratio_vs_batched"] = round(figures["bbu_jax_tokens_per_s"] / figures["hf_batched_tokens_per_s"], 2)
  print(json.dumps(figures))
  keys = ("bbu_jax_tokens_per_s", "hf_per_sample_tokens_per_s", "hf_batched_tokens_per_s", "ratio_vs_per_sample",
          "ratio_vs_batched")
  print(json.dumps({k: figures[k] for k in keys}))
  return figures


if __name__ == "__main__":
  main()
