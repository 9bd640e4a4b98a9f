"""Hugging Face Qwen2.5-VL directory -> bbu_jax checkpoint (config.json + orbax params + tokenizer files).

  python -m convert_weights.hf_to_flax --hf_dir DIR --out_dir DIR [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hf_dir", required=True, help="Hugging Face Qwen2.5-VL directory (config.json + safetensors)")
  parser.add_argument("--out_dir", required=True, help="where to write the bbu_jax checkpoint")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored parameter dtype")
  args = parser.parse_args(argv)

  from bbu_jax.models import weights
  try:
    model, config = weights.load_model(args.hf_dir, dtype=DTYPES[args.dtype])
  except ValueError as e:
    print(f"hf_to_flax: error: {e}", file=sys.stderr)
    return 1
  out = weights.save_checkpoint(model, config, args.out_dir, source_dir=args.hf_dir)
  print(f"hf_to_flax: wrote bbu_jax checkpoint {out} ({args.dtype})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
