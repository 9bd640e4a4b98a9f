"""Fine-tune Qwen2.5-VL-7B-Instruct from `model_path`: the 3B recipe (the old pipeline's defaults) with
the parameters sharded, since 7B weights and Adam state do not fit replicated on one chip.

  python -m bbu_jax.train --config configs/qwen2_5_vl_7b.py --config.model_path=/path/Qwen2.5-VL-7B-Instruct \
      --config.train_data_path=data/train.jsonl --config.val_data_path=data/val.jsonl \
      --config.teacher_pool_file=data/teacher_pool.jsonl --config.data_root=data
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_qwen2_5_vl_3b", pathlib.Path(__file__).with_name("qwen2_5_vl_3b.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
  c = _base.get_config()
  c.run_name = "qwen2_5_vl_7b"
  c.model_size = "qwen2_5_vl_7b"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.sharding_mode = "fsdp"
  return c
