"""The benchmark shape of issues 5 and 6 as a transformers config, shared by the benchmarks.

Text: hidden 512, 8 layers, MLP 1536, 8 heads, 2 KV heads, vocab 4112; vision: depth 4, hidden 256,
MLP 768, 4 heads, window 112, full attention at block 3; special tokens at the top of the vocabulary.
"""

VOCAB = 4112
PAD_ID, EOS_ID = 4090, 4091
VISION_START_ID, VISION_END_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 4092, 4093, 4094, 4095
GRID = (1, 16, 16)  # a 224x224 image: 16x16 patches of 14 pixels, 8x8 = 64 merged tokens


def hf_config():
  import transformers
  config = transformers.Qwen2_5_VLConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6, hidden_act="silu",
                       max_position_embeddings=4096,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
                       bos_token_id=PAD_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False),
      vision_config=dict(depth=4, hidden_size=256, intermediate_size=768, num_heads=4, in_channels=3, patch_size=14,
                         temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[3],
                         out_hidden_size=512, hidden_act="silu"),
      image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
      vision_end_token_id=VISION_END_ID, tie_word_embeddings=False)
  for c in (config, config.text_config, config.vision_config):
    c._attn_implementation = "sdpa"
  return config
