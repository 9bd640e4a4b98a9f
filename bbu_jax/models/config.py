"""Model hyper-parameters for Qwen2.5-VL: dataclasses, Hugging Face config.json in and out, named sizes.

Field names follow transformers' Qwen2_5_VL{Vision,Text}Config so that a reader of either codebase
recognises them. `from_hf_dict` accepts both the flat config.json of the published checkpoints and the
nested `text_config` that transformers 5 writes.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  out_hidden_size: int = 2048
  tokens_per_second: int = 2
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  # A bbu_jax extension, off in every published checkpoint: add a fixed 2D sine embedding of each patch's
  # (row, column) to the patch embeddings, so features carry where they are (as Qwen3-VL's learned one
  # does). For models trained from scratch; transformers' Qwen2.5-VL has no place for it (no HF export).
  absolute_positions: bool = False
  # The same kind of extension at the tower's other end: add a fixed 2D sine embedding of each MERGED
  # token's (row, column), at the scale of a fresh token embedding, to the merger's output, i.e. to the
  # language model's image embeddings, where no vision block can wash it out (no HF export either).
  output_positions: bool = False

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch in `pixel_values`: C * T * P * P."""
    return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size * self.spatial_merge_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 11008
  num_hidden_layers: int = 36
  num_attention_heads: int = 16
  num_key_value_heads: int = 2
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 128000
  hidden_act: str = "silu"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  """The whole model. Token ids default to Qwen2.5-VL's published ones."""

  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  tie_word_embeddings: bool = True
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int = 151643
  eos_token_id: int = 151645
  pad_token_id: int = 151643

  # --- Hugging Face config.json ------------------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> "Qwen25VLConfig":
    """Reads a Qwen2.5-VL config.json dict, flat (published checkpoints) or nested (transformers 5)."""
    model_type = d.get("model_type")
    if model_type not in ("qwen2_5_vl", None):
      raise ValueError(f"config.json: model_type is {model_type!r}, expected 'qwen2_5_vl'")
    if "vision_config" not in d:
      raise ValueError("config.json: no 'vision_config': this is not a Qwen2.5-VL config")
    text = dict(d)
    text.update(d.get("text_config") or {})
    vision = d["vision_config"]
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    mrope_section = tuple(rope.get("mrope_section", (16, 24, 24)))
    rope_theta = text.get("rope_theta", rope.get("rope_theta", 1000000.0))
    num_heads = text["num_attention_heads"]
    text_cfg = TextConfig(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=text.get("num_key_value_heads") or num_heads,
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        mrope_section=mrope_section,
        max_position_embeddings=text.get("max_position_embeddings", 128000),
        hidden_act=text.get("hidden_act", "silu"),
    )
    vision_cfg = VisionConfig(
        depth=vision.get("depth", vision.get("num_hidden_layers", 32)),
        hidden_size=vision.get("hidden_size", 1280),
        intermediate_size=vision.get("intermediate_size", 3420),
        num_heads=vision.get("num_heads", vision.get("num_attention_heads", 16)),
        in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
        patch_size=vision.get("patch_size", 14),
        temporal_patch_size=vision.get("temporal_patch_size", 2),
        spatial_merge_size=vision.get("spatial_merge_size", 2),
        window_size=vision.get("window_size", 112),
        fullatt_block_indexes=tuple(vision.get("fullatt_block_indexes", (7, 15, 23, 31))),
        out_hidden_size=vision.get("out_hidden_size", text_cfg.hidden_size),
        tokens_per_second=vision.get("tokens_per_second", 2),
        hidden_act=vision.get("hidden_act", "silu"),
        absolute_positions=bool(vision.get("absolute_positions", False)),
        output_positions=bool(vision.get("output_positions", False)),
    )
    tie = bool(d.get("tie_word_embeddings", False) or (d.get("text_config") or {}).get("tie_word_embeddings", False))
    eos = text.get("eos_token_id", 151645)
    if isinstance(eos, (list, tuple)):
      eos = eos[0]
    pad = text.get("pad_token_id")
    bos = text.get("bos_token_id", 151643)
    return cls(
        vision=vision_cfg,
        text=text_cfg,
        tie_word_embeddings=tie,
        image_token_id=d.get("image_token_id", 151655),
        video_token_id=d.get("video_token_id", 151656),
        vision_start_token_id=d.get("vision_start_token_id", 151652),
        vision_end_token_id=d.get("vision_end_token_id", 151653),
        bos_token_id=bos if bos is not None else 151643,
        eos_token_id=eos if eos is not None else 151645,
        pad_token_id=pad if pad is not None else (bos if bos is not None else 151643),
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """The flat config.json of the published checkpoints (transformers 4 and 5 both load it)."""
    t, v = self.text, self.vision
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "hidden_act": t.hidden_act,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "max_position_embeddings": t.max_position_embeddings,
        "max_window_layers": t.num_hidden_layers,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id,
        "image_token_id": self.image_token_id,
        "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id,
        "vision_end_token_id": self.vision_end_token_id,
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_chans": v.in_channels,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "out_hidden_size": v.out_hidden_size,
            "tokens_per_second": v.tokens_per_second,
            "hidden_act": v.hidden_act,
            # only a bbu_jax checkpoint can say True (weights.save_hf refuses such a model)
            **({"absolute_positions": True} if v.absolute_positions else {}),
            **({"output_positions": True} if v.output_positions else {}),
        },
    }


# --- Named sizes (published hyper-parameters; usable without weights) --------------------------

_VISION_PUBLISHED = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                         window_size=112, fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2)


def qwen2_5_vl_3b() -> Qwen25VLConfig:
  return Qwen25VLConfig(
      vision=VisionConfig(**_VISION_PUBLISHED, out_hidden_size=2048),
      text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                      num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2),
      tie_word_embeddings=True)


def qwen2_5_vl_7b() -> Qwen25VLConfig:
  return Qwen25VLConfig(
      vision=VisionConfig(**_VISION_PUBLISHED, out_hidden_size=3584),
      text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4),
      tie_word_embeddings=False)


def qwen2_5_vl_32b() -> Qwen25VLConfig:
  return Qwen25VLConfig(
      vision=VisionConfig(**_VISION_PUBLISHED, out_hidden_size=5120),
      text=TextConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                      num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8),
      tie_word_embeddings=False)


def qwen2_5_vl_72b() -> Qwen25VLConfig:
  return Qwen25VLConfig(
      vision=VisionConfig(**_VISION_PUBLISHED, out_hidden_size=8192),
      text=TextConfig(vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                      num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
      tie_word_embeddings=False)


def bench_shape() -> Qwen25VLConfig:
  """The benchmark shape named in the issues (vocab 4112 = a small BPE plus Qwen's special tokens)."""
  return Qwen25VLConfig(
      vision=VisionConfig(depth=4, hidden_size=256, intermediate_size=768, num_heads=4, window_size=112,
                          fullatt_block_indexes=(3,), out_hidden_size=512),
      text=TextConfig(vocab_size=4112, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12)),
      tie_word_embeddings=False, image_token_id=4100, video_token_id=4101, vision_start_token_id=4097,
      vision_end_token_id=4098, bos_token_id=4096, eos_token_id=4099, pad_token_id=4096)


NAMED_CONFIGS = {
    "qwen2_5_vl_3b": qwen2_5_vl_3b,
    "qwen2_5_vl_7b": qwen2_5_vl_7b,
    "qwen2_5_vl_32b": qwen2_5_vl_32b,
    "qwen2_5_vl_72b": qwen2_5_vl_72b,
    "bench": bench_shape,
}


def named_config(name: str) -> Qwen25VLConfig:
  try:
    return NAMED_CONFIGS[name]()
  except KeyError:
    raise ValueError(f"unknown model size {name!r}; known: {sorted(NAMED_CONFIGS)}") from None
