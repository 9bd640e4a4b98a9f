"""Qwen2.5-VL in Flax NNX: config, layers, vision tower, decoder, assembly, and Hugging Face weights.

The public entry points are imported lazily, so `import bbu_jax.models.rope` (used by the data
pipeline) does not pull in the model modules.
"""

import importlib

_EXPORTS = {
    "Qwen25VLConfig": "bbu_jax.models.config",
    "named_config": "bbu_jax.models.config",
    "Qwen25VL": "bbu_jax.models.qwen2_5_vl",
    "PretrainedQwen25VL": "bbu_jax.models.qwen2_5_vl",
    "load_pretrained": "bbu_jax.models.weights",
    "load_model": "bbu_jax.models.weights",
    "save_checkpoint": "bbu_jax.models.weights",
    "save_hf": "bbu_jax.models.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'bbu_jax.models' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)
