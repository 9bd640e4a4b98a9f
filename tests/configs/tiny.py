"""A seconds-scale training config for tests: the demo's pipeline with a much smaller model and data."""

import os

from bbu_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  root = os.environ.get("BBU_TEST_ROOT", "/tmp/bbu_tiny")
  c.run_name = "tiny"
  c.output_dir = f"{root}/runs"
  c.data_root = f"{root}/data"
  c.train_data_path = f"{root}/data/train.jsonl"
  c.val_data_path = f"{root}/data/val.jsonl"
  c.teacher_pool_file = f"{root}/data/teacher_pool.jsonl"
  c.synthetic.enabled = True
  c.synthetic.num_train = 24
  c.synthetic.num_val = 4
  c.synthetic.num_teacher = 4
  c.synthetic.scale = 0.2

  c.model.text_hidden_size = 32
  c.model.text_layers = 2
  c.model.text_heads = 2
  c.model.text_kv_heads = 1
  c.model.text_intermediate_size = 64
  c.model.vision_depth = 2
  c.model.vision_hidden_size = 32
  c.model.vision_heads = 2
  c.model.vision_intermediate_size = 64
  c.model.vision_fullatt_block_indexes = (1,)
  c.tokenizer_vocab_size = 600

  c.max_pixels = 16 * 28 * 28
  c.model_max_length = 512
  c.patch_budget = 256
  c.max_samples_per_row = 4
  c.max_objects = 32
  c.teacher_ratio = 0.5
  c.detection_enabled = True
  c.detection_num_queries = 32
  c.detection_layers = 1
  c.detection_width = 32

  c.num_train_epochs = 2
  c.per_device_train_batch_size = 2
  c.vision_lr = c.merger_lr = c.llm_lr = c.detection_lr = 1e-3
  c.adapter_lr = 0.0
  c.log_steps = 1
  c.save_steps = 1
  c.eval_after_training = False
  c.max_new_tokens = 64
  return c
