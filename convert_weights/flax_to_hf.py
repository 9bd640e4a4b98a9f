"""bbu_jax checkpoint -> Hugging Face Qwen2.5-VL directory that transformers' from_pretrained loads.

  python -m convert_weights.flax_to_hf --checkpoint DIR --out_dir DIR [--dtype bfloat16|float32]
      [--max_shard_size 5GB] [--source_dir DIR]

Tokenizer/processor files and generation_config.json are copied from --source_dir (default: the
checkpoint directory, where hf_to_flax put them). A trained model's LoRA adapters are merged into the
weights they adapt; its detection head has no Hugging Face counterpart and stays in the bbu_jax
checkpoint only.
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

DETECTION_HEAD = "detection_head"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def export_transform(lora_config):
  """The param transform of an export: LoRA merged into its base kernels, the detection head left out."""
  from bbu_jax.models import lora

  def transform(pure: dict) -> dict:
    pure = {name: value for name, value in pure.items() if name != DETECTION_HEAD}
    return lora.merge(pure, lora_config)

  return transform


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="bbu_jax checkpoint directory (hf_to_flax output)")
  parser.add_argument("--out_dir", required=True, help="where to write the Hugging Face directory")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the safetensors")
  parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
  parser.add_argument("--source_dir", default=None, help="tokenizer/processor files to copy (default: --checkpoint)")
  args = parser.parse_args(argv)

  from bbu_jax.models import bbu_model, weights
  try:
    weights.parse_size(args.max_shard_size)
    # Loading in the export dtype keeps host memory at one copy of the exported size (LoRA merges in
    # float32 one kernel at a time).
    model = bbu_model.load(args.checkpoint, dtype=DTYPES[args.dtype])
  except ValueError as e:
    print(f"flax_to_hf: error: {e}", file=sys.stderr)
    return 1
  lora_config = getattr(model, "lora_config", None)
  out = weights.save_hf(model, model.config, args.out_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
                        source_dir=args.source_dir or args.checkpoint, transform_params=export_transform(lora_config))
  notes = [f"LoRA rank {lora_config.rank} merged into {', '.join(lora_config.targets)}"] if lora_config else []
  if getattr(model, "detection_head", None) is not None:
    notes.append("detection head not exported (transformers has no counterpart; it stays in the checkpoint)")
  print(f"flax_to_hf: wrote Hugging Face directory {out} ({args.dtype})" + "".join(f"; {n}" for n in notes))
  return 0


if __name__ == "__main__":
  sys.exit(main())
