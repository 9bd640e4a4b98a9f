"""Device mesh, logical axis names and the rules that map them to mesh axes.

One vocabulary for the whole project. Code names dimensions logically; the config's `sharding_mode`
picks a rule table that maps each logical name to mesh axes of the mesh ("data", "fsdp", "tensor").

Logical axis names used on parameters:
  layers          the stacked-layer axis of scanned blocks (never sharded)
  vocab           token vocabulary (embedding rows, lm_head columns)
  embed           decoder hidden size
  mlp             decoder MLP intermediate size
  heads           decoder query heads * head_dim (q_proj out, o_proj in)
  kv_heads        decoder key/value heads * head_dim (k_proj/v_proj out)
  vision_embed    vision tower hidden size
  vision_mlp      vision MLP intermediate size
  vision_heads    vision q/k/v heads * head_dim (qkv out is 3 * vision_heads)
  patch           flattened patch (C * T * P * P)
  merger_mlp      patch-merger hidden size (vision_embed * merge_unit)
  lora_rank       LoRA rank
  det_embed, det_mlp, queries   detection head
Activations: batch, length, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab.
"""

from __future__ import annotations

# (logical name, mesh axes) tables. A logical name missing from a table is replicated.
_TENSOR_RULES = (
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("det_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("batch", ("data", "fsdp")),
)

# zero2: parameters replicated across fsdp (only tensor-parallel); gradients and optimizer state
# are sharded over fsdp by `optimizer_rules`.
ZERO2_PARAM_RULES = _TENSOR_RULES
# fsdp: parameters sharded over fsdp too, on their embedding dimension.
FSDP_PARAM_RULES = _TENSOR_RULES + (
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("merger_mlp", "fsdp"),
    ("det_embed", "fsdp"),
)
# Gradients and optimizer state in both modes.
OPTIMIZER_RULES = FSDP_PARAM_RULES


def param_rules(mode: str):
  if mode == "zero2":
    return ZERO2_PARAM_RULES
  if mode == "fsdp":
    return FSDP_PARAM_RULES
  raise ValueError(f"sharding_mode must be 'zero2' or 'fsdp', got {mode!r}")
