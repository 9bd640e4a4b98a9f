"""The Qwen2 decoder of Qwen2.5-VL in Flax NNX: token embedding, stacked and scanned decoder layers, final norm.

Layers are created once with `nnx.vmap` (parameters gain a leading "layers" axis) and run with
`nnx.scan`, so compile time does not grow with depth. Attention is split into projection (q, k, v
with M-RoPE applied) and attending, so a KV cache can sit between the two without touching the rest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bbu_jax.models import layers, rope
from bbu_jax.models.config import TextConfig
from bbu_jax.models.lora import LoraConfig

Array = jax.Array

# Remat policy names accepted in configs (the same names as the vision tower's), mapped to
# jax.checkpoint policies. "none": no rematerialisation; "full": save nothing, recompute everything.
def cast_params(module: nnx.Module, dtype) -> None:
  """Store every floating parameter of `module` in `dtype` (the param dtype; compute dtype is separate)."""
  if dtype is None:
    return
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Param) and jnp.issubdtype(node[...].dtype, jnp.floating):
      node.set_value(node[...].astype(dtype))


class Embedding(nnx.Module):
  """Token embedding table (vocab, embed); `attend` gives tied-embedding logits."""

  def __init__(self, vocab_size: int, features: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.embedding = layers.param(rngs, (vocab_size, features), ("vocab", "embed"), std=0.02)
    self.dtype = dtype

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


def _lora_kwargs(lora: LoraConfig | None, projection: str) -> dict:
  """layers.Linear's adapter arguments for one named projection."""
  if lora is None or not lora.rank_for(projection):
    return {}
  return {"lora_rank": lora.rank_for(projection), "lora_scale": lora.scale}


class Attention(nnx.Module):
  """Grouped-query self-attention with q/k/v bias and no o_proj bias (Qwen2)."""

  def __init__(self, config: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, attention_impl: str = "xla",
               lora: LoraConfig | None = None):
    embed, head_dim = config.hidden_size, config.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, head_dim
    if config.num_attention_heads % config.num_key_value_heads:
      raise ValueError(f"num_attention_heads {config.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads {config.num_key_value_heads}")
    self.q_proj = layers.Linear(embed, self.num_heads * head_dim, axes=("embed", "heads"), use_bias=True,
                                rngs=rngs, dtype=dtype, **_lora_kwargs(lora, "q_proj"))
    self.k_proj = layers.Linear(embed, self.num_kv_heads * head_dim, axes=("embed", "kv_heads"), use_bias=True,
                                rngs=rngs, dtype=dtype, **_lora_kwargs(lora, "k_proj"))
    self.v_proj = layers.Linear(embed, self.num_kv_heads * head_dim, axes=("embed", "kv_heads"), use_bias=True,
                                rngs=rngs, dtype=dtype, **_lora_kwargs(lora, "v_proj"))
    self.o_proj = layers.Linear(self.num_heads * head_dim, embed, axes=("heads", "embed"), use_bias=False,
                                rngs=rngs, dtype=dtype, **_lora_kwargs(lora, "o_proj"))
    self.attention_impl = attention_impl

  def project(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array, Array]:
    """x (B, S, embed) -> q (B, S, heads, hd), k, v (B, S, kv_heads, hd), rotary applied to q and k."""
    b, s, _ = x.shape
    q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
    return layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin), v

  def attend(self, q: Array, k: Array, v: Array, mask: Array) -> Array:
    """q against (possibly cached) k, v under a boolean mask -> (B, S_q, embed)."""
    out = layers.dot_product_attention(q, k, v, mask, implementation=self.attention_impl)
    b, s = out.shape[:2]
    return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))

  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
    return self.attend(*self.project(x, cos, sin), mask)


class MLP(nnx.Module):
  """SwiGLU without biases: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, lora: LoraConfig | None = None):
    if config.hidden_act != "silu":
      raise ValueError(f"text hidden_act {config.hidden_act!r} is not supported (Qwen2.5-VL uses 'silu')")
    embed, mlp = config.hidden_size, config.intermediate_size
    self.gate_proj = layers.Linear(embed, mlp, axes=("embed", "mlp"), use_bias=False, rngs=rngs, dtype=dtype,
                                   **_lora_kwargs(lora, "gate_proj"))
    self.up_proj = layers.Linear(embed, mlp, axes=("embed", "mlp"), use_bias=False, rngs=rngs, dtype=dtype,
                                 **_lora_kwargs(lora, "up_proj"))
    self.down_proj = layers.Linear(mlp, embed, axes=("mlp", "embed"), use_bias=False, rngs=rngs, dtype=dtype,
                                   **_lora_kwargs(lora, "down_proj"))

  def __call__(self, x: Array) -> Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, config: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, attention_impl: str = "xla",
               lora: LoraConfig | None = None):
    eps = config.rms_norm_eps
    self.input_layernorm = layers.RMSNorm(config.hidden_size, eps=eps, axis_name="embed", rngs=rngs)
    self.self_attn = Attention(config, rngs=rngs, dtype=dtype, attention_impl=attention_impl, lora=lora)
    self.post_attention_layernorm = layers.RMSNorm(config.hidden_size, eps=eps, axis_name="embed", rngs=rngs)
    self.mlp = MLP(config, rngs=rngs, dtype=dtype, lora=lora)

  def mlp_block(self, x: Array) -> Array:
    return x + self.mlp(self.post_attention_layernorm(x))

  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
    return self.mlp_block(x)


class TextDecoder(nnx.Module):
  """Qwen2_5_VLTextModel: embed_tokens, `layers` (one stacked DecoderLayer, leading axis = depth), norm.

  `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters; `remat_policy` names a
  policy of layers.REMAT_POLICIES applied to each scanned layer; `attention_impl` is passed to
  layers.dot_product_attention; `lora` puts adapters on the projections it targets.
  """

  def __init__(self, config: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               remat_policy: str = "none", attention_impl: str = "xla", lora: LoraConfig | None = None):
    layers.checkpoint_policy(remat_policy)  # a bad name fails at construction, not at the first step
    self.config = config
    self.dtype = dtype
    self.remat_policy = remat_policy
    self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, rngs=rngs, dtype=dtype)

    @nnx.split_rngs(splits=config.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(layer_rngs):
      return DecoderLayer(config, rngs=layer_rngs, dtype=dtype, attention_impl=attention_impl, lora=lora)

    self.layers = make_layers(rngs)
    self.norm = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, axis_name="embed", rngs=rngs)
    cast_params(self, param_dtype)

  def rotary(self, positions: Array) -> tuple[Array, Array]:
    """positions (3, B, S) -> cos, sin (B, S, head_dim) float32."""
    c = self.config
    return rope.mrope_cos_sin(positions, head_dim=c.head_dim, rope_theta=c.rope_theta, mrope_section=c.mrope_section)

  def run_layers(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
    """All decoder layers over hidden states x (B, S, embed), scanned over the stacked layer axis."""

    def layer_step(layer: DecoderLayer, h: Array) -> Array:
      return layer(h, cos, sin, mask)

    layer_step = layers.maybe_remat(layer_step, self.remat_policy)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def scan_layers(layer: DecoderLayer, h: Array) -> Array:
      return layer_step(layer, h)

    return scan_layers(self.layers, x)

  def __call__(self, inputs_embeds: Array, positions: Array, segment_ids: Array) -> Array:
    """inputs_embeds (B, S, embed), positions (3, B, S), segment_ids (B, S) [0 = padding] -> normed hidden."""
    cos, sin = self.rotary(positions)
    mask = layers.make_attention_mask(segment_ids, segment_ids, causal=True)
    h = self.run_layers(inputs_embeds.astype(self.dtype), cos, sin, mask)
    return self.norm(h)
