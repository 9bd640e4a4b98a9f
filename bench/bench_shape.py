"""The model shapes of the benchmarks (issues 5 and 6), as bbu_jax and transformers configs.

"bench": text hidden 512, 8 layers, MLP 1536, 8 heads, 2 KV heads, vocab 4112; vision: depth 4, hidden 256,
MLP 768, 4 heads, window 112, full attention at block 3; special tokens at the top of the vocabulary.
"3b": Qwen2.5-VL-3B's published sizes (`bbu_jax.models.config.qwen2_5_vl_3b`, vocab 151936, tied
embeddings) with Qwen's own special token ids. `layers` shrinks the depth of both towers (smoke tests).
"""

from __future__ import annotations

import dataclasses

VOCAB = 4112
PAD_ID, EOS_ID = 4090, 4091
VISION_START_ID, VISION_END_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 4092, 4093, 4094, 4095
GRID = (1, 16, 16)  # a 224x224 image: 16x16 patches of 14 pixels, 8x8 = 64 merged tokens
SHAPES = ("bench", "3b")


def hf_config(model_config=None):
  """transformers' Qwen2_5_VLConfig (sdpa attention) of a bbu_jax Qwen25VLConfig; None = the bench shape."""
  import transformers
  if model_config is None:
    text_config = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6, hidden_act="silu",
                       max_position_embeddings=4096,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
                       bos_token_id=PAD_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
    vision_config = dict(depth=4, hidden_size=256, intermediate_size=768, num_heads=4, in_channels=3, patch_size=14,
                         temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[3],
                         out_hidden_size=512, hidden_act="silu")
    ids = dict(image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
               vision_end_token_id=VISION_END_ID)
    tie = False
  else:
    t, v = model_config.text, model_config.vision
    tie = model_config.tie_word_embeddings
    text_config = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                       num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                       num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps, hidden_act=t.hidden_act,
                       max_position_embeddings=t.max_position_embeddings,
                       rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                        "mrope_section": list(t.mrope_section)},
                       bos_token_id=model_config.bos_token_id, eos_token_id=model_config.eos_token_id,
                       pad_token_id=model_config.pad_token_id, tie_word_embeddings=tie)
    vision_config = dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                         num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
                         temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
                         window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                         out_hidden_size=v.out_hidden_size, hidden_act=v.hidden_act,
                         tokens_per_second=v.tokens_per_second)
    ids = dict(image_token_id=model_config.image_token_id, video_token_id=model_config.video_token_id,
               vision_start_token_id=model_config.vision_start_token_id,
               vision_end_token_id=model_config.vision_end_token_id)
  config = transformers.Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=tie,
                                         **ids)
  for c in (config, config.text_config, config.vision_config):
    c._attn_implementation = "sdpa"
  return config


def model_config(shape: str = "bench", layers: int | None = None):
  """bbu_jax's Qwen25VLConfig of a benchmark shape; `layers` caps the text layers and vision blocks."""
  from bbu_jax.models import config as config_lib
  if shape == "bench":
    config = config_lib.Qwen25VLConfig.from_hf_dict(hf_config().to_dict())
  elif shape == "3b":
    config = config_lib.qwen2_5_vl_3b()
  else:
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
  if layers:
    depth = min(layers, config.vision.depth)
    full = tuple(i for i in config.vision.fullatt_block_indexes if i < depth) or (depth - 1,)
    config = dataclasses.replace(
        config, text=dataclasses.replace(config.text, num_hidden_layers=min(layers, config.text.num_hidden_layers)),
        vision=dataclasses.replace(config.vision, depth=depth, fullatt_block_indexes=full))
  return config


def text_token_limit(model_config) -> int:
  """Random text tokens are drawn below every special token id."""
  c = model_config
  return min(c.pad_token_id, c.eos_token_id, c.bos_token_id, c.vision_start_token_id, c.vision_end_token_id,
             c.image_token_id, c.video_token_id)
