"""bbu_jax checkpoint -> Hugging Face Qwen2.5-VL directory that transformers' from_pretrained loads.

  python -m convert_weights.flax_to_hf --checkpoint DIR --out_dir DIR [--dtype bfloat16|float32]
      [--max_shard_size 5GB] [--source_dir DIR]

Tokenizer/processor files and generation_config.json are copied from --source_dir (default: the
checkpoint directory, where hf_to_flax put them).
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="bbu_jax checkpoint directory (hf_to_flax output)")
  parser.add_argument("--out_dir", required=True, help="where to write the Hugging Face directory")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the safetensors")
  parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
  parser.add_argument("--source_dir", default=None, help="tokenizer/processor files to copy (default: --checkpoint)")
  args = parser.parse_args(argv)

  from bbu_jax.models import weights
  try:
    weights.parse_size(args.max_shard_size)
    # Loading in the export dtype keeps host memory at one copy of the exported size.
    model, config = weights.load_model(args.checkpoint, dtype=DTYPES[args.dtype])
  except ValueError as e:
    print(f"flax_to_hf: error: {e}", file=sys.stderr)
    return 1
  out = weights.save_hf(model, config, args.out_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
                        source_dir=args.source_dir or args.checkpoint)
  print(f"flax_to_hf: wrote Hugging Face directory {out} ({args.dtype})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
