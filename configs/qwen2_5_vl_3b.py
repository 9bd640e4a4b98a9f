"""Fine-tune Qwen2.5-VL-3B-Instruct from `model_path` with the old pipeline's defaults.

  python -m bbu_jax.train --config configs/qwen2_5_vl_3b.py --config.model_path=/path/Qwen2.5-VL-3B-Instruct \
      --config.train_data_path=data/train.jsonl --config.val_data_path=data/val.jsonl \
      --config.teacher_pool_file=data/teacher_pool.jsonl --config.data_root=data
"""

from bbu_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.run_name = "qwen2_5_vl_3b"
  c.model_size = "qwen2_5_vl_3b"  # shapes for ahead-of-time compilation when no model_path is given
  c.model_path = ""
  c.num_train_epochs = 20
  c.per_device_train_batch_size = 2
  c.gradient_accumulation_steps = 4
  c.vision_lr = 1e-6
  c.merger_lr = 5e-6
  c.llm_lr = 2e-6
  c.detection_lr = 1e-4
  c.adapter_lr = 1e-3
  c.warmup_ratio = 0.03
  c.weight_decay = 0.01
  c.teacher_ratio = 0.7
  c.num_teacher_samples = 1
  c.collator_type = "packed"
  c.model_max_length = 12000
  c.detection_enabled = True
  c.detection_num_queries = 100
  c.detection_bbox_weight = 10.0
  c.detection_caption_weight = 1.0
  c.bf16 = True
  c.gradient_checkpointing = True
  c.use_flash_attention = True
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.sharding_mode = "zero2"
  c.save_steps = 500
  return c
