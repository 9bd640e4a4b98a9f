"""Model config: named sizes, and config.json in both layouts (flat published, nested transformers 5)."""

import json

import pytest

from bbu_jax.models import config as cfg


def test_named_sizes_match_published_table():
  c3, c7 = cfg.qwen2_5_vl_3b(), cfg.qwen2_5_vl_7b()
  assert (c3.text.num_hidden_layers, c3.text.hidden_size, c3.text.num_key_value_heads) == (36, 2048, 2)
  assert c3.tie_word_embeddings and not c7.tie_word_embeddings
  assert (c7.text.hidden_size, c7.text.intermediate_size, c7.text.vocab_size) == (3584, 18944, 152064)
  for c in (c3, c7, cfg.qwen2_5_vl_32b(), cfg.qwen2_5_vl_72b()):
    assert sum(c.text.mrope_section) * 2 == c.text.head_dim == 128
    assert c.vision.out_hidden_size == c.text.hidden_size
  with pytest.raises(ValueError, match="unknown model size"):
    cfg.named_config("qwen2_5_vl_1b")


def test_hf_dict_round_trip_flat_and_nested():
  transformers = pytest.importorskip("transformers")
  c = cfg.qwen2_5_vl_7b()
  flat = c.to_hf_dict()
  assert cfg.Qwen25VLConfig.from_hf_dict(json.loads(json.dumps(flat))) == c
  # transformers 5 writes text fields under text_config.
  nested = transformers.Qwen2_5_VLConfig(**flat).to_dict()
  assert "text_config" in nested
  assert cfg.Qwen25VLConfig.from_hf_dict(nested) == c


def test_not_a_qwen_config_is_refused():
  with pytest.raises(ValueError, match="model_type"):
    cfg.Qwen25VLConfig.from_hf_dict({"model_type": "llama", "hidden_size": 8})
  with pytest.raises(ValueError, match="vision_config"):
    cfg.Qwen25VLConfig.from_hf_dict({"model_type": "qwen2_5_vl", "hidden_size": 8})
