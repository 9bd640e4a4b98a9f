"""Batched generation for Qwen2.5-VL: a preallocated KV cache, one prefill over the padded batch, and a
`lax.while_loop` decode, all in one jitted program.

Prompts are LEFT-padded to a bucketed length S, so every row's last prompt token sits at slot S - 1 and
every generated token of step i is written at the same cache slot S + i for all rows (one
dynamic_update_slice, no per-row scatter). Padded slots are masked out of attention, so a row decodes
exactly as it would alone. Positions come from the host (M-RoPE of the prompt, `next_position` per row);
the i-th generated token of a row takes position next_position + i on all three axes, which is what
transformers' `rope_deltas` amount to.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bbu_jax.models import layers
from bbu_jax.models.config import Qwen25VLConfig
from bbu_jax.models.qwen2_5_vl import Qwen25VL
from bbu_jax.models.vision import stack_vision_metadata, vision_metadata
from bbu_jax.parallel import sharding

Array = jax.Array

# Logical axis names of the KV cache (layers, batch, length, kv_heads, head_dim): batch goes with the
# data-parallel axes and kv heads with the tensor axis, as the model's activations do.
CACHE_AXES = ("layers", "batch", "length", "act_kv_heads", None)

# Prompt lengths and patch budgets snap to buckets above these floors (see size_bucket), so a run over
# many batches compiles a handful of programs. Powers of two, multiples of the merge unit (4).
MIN_PROMPT_BUCKET = 64
MIN_PATCH_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """What is static in the compiled decode program (hashable: part of the jit cache key).

  temperature 0 is greedy. top_p < 1 keeps the smallest set of tokens whose probability reaches top_p.
  suppress_token_ids never get generated (their logits are -inf before anything else).
  """

  max_new_tokens: int
  eos_token_ids: tuple[int, ...]
  pad_token_id: int
  temperature: float = 0.0
  top_p: float = 1.0
  suppress_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class PromptBatch:
  """Left-padded prompts as numpy arrays (B rows, S = bucketed prompt length, P = patch budget).

  input_ids (B, S) int32; positions (3, B, S) int32 (padding 0); prompt_lengths (B,) int32 real tokens;
  next_positions (B,) int32 (the M-RoPE position of the first generated token); pixel_values
  (B, P, patch_dim) float32 and vision_meta (dict of (B, ...)) or None; row_valid (B,) bool: False for
  rows that only fill the batch up to its fixed size (they get a budget of 0 new tokens).
  """

  input_ids: np.ndarray
  positions: np.ndarray
  prompt_lengths: np.ndarray
  next_positions: np.ndarray
  pixel_values: np.ndarray | None
  vision_meta: dict[str, np.ndarray] | None
  row_valid: np.ndarray

  @property
  def batch_size(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def prompt_bucket(self) -> int:
    return int(self.input_ids.shape[1])


@dataclasses.dataclass
class GenerationOutput:
  """tokens (B, max_new_tokens) int32, pad after each row's end; log_probs (B, max_new_tokens) float32:
  log-probability of each generated token under the model's distribution (after suppression, before
  temperature and top-p), 0 after the end; lengths (B,) int32 generated tokens, EOS included."""

  tokens: np.ndarray
  log_probs: np.ndarray
  lengths: np.ndarray

  def row_tokens(self, row: int) -> np.ndarray:
    return self.tokens[row, :self.lengths[row]]

  def row_log_probs(self, row: int) -> np.ndarray:
    return self.log_probs[row, :self.lengths[row]]


# --- Host side: prompts -> a padded batch -----------------------------------------------------------


def size_bucket(n: int, minimum: int) -> int:
  """A size >= n from few distinct values: `minimum`, then at most four steps per doubling (multiples of
  max(minimum, 2^(bits(n-1) - 3))), so padding wastes under max(minimum, n / 4) and a run compiles a
  handful of shapes. `minimum` must be a power of two (then every bucket is a multiple of it)."""
  if n <= minimum:
    return minimum
  step = max(minimum, 2 ** ((n - 1).bit_length() - 3))
  return -(-n // step) * step


def prompt_bucket(length: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
  """The padded prompt length for a prompt of `length` tokens."""
  return size_bucket(length, minimum)


def make_prompt_batch(prompts: Sequence[dict[str, Any]], config: Qwen25VLConfig, *, batch_size: int | None = None,
                      min_prompt_bucket: int = MIN_PROMPT_BUCKET,
                      min_patch_bucket: int = MIN_PATCH_BUCKET) -> PromptBatch:
  """Stacks prompts (dicts as ChatProcessor.build_inference_prompt returns: input_ids (S_i,),
  positions (3, S_i), next_position, and optionally pixel_values (N_i, patch_dim) + image_grid_thw
  (n_i, 3)) into a left-padded PromptBatch with bucketed length and patch budget.

  With `batch_size`, the batch is filled up to that many rows with copies of the first prompt marked
  invalid, so a short last batch reuses the compiled program.
  """
  if not prompts:
    raise ValueError("make_prompt_batch needs at least one prompt")
  rows = list(prompts)
  if batch_size is not None:
    if len(rows) > batch_size:
      raise ValueError(f"{len(rows)} prompts do not fit batch_size {batch_size}")
  total = batch_size or len(rows)
  row_valid = np.arange(total) < len(rows)
  rows += [rows[0]] * (total - len(rows))
  lengths = np.asarray([len(p["input_ids"]) for p in rows], np.int32)
  if lengths.min() < 1:
    raise ValueError("a prompt has no tokens")
  seq = prompt_bucket(int(lengths.max()), min_prompt_bucket)
  input_ids = np.full((total, seq), config.pad_token_id, np.int32)
  positions = np.zeros((3, total, seq), np.int32)
  for row, prompt in enumerate(rows):
    ids = np.asarray(prompt["input_ids"], np.int32)
    pos = np.asarray(prompt["positions"], np.int32)
    if pos.shape != (3, ids.shape[0]):
      raise ValueError(f"prompt {row} ({prompt.get('id', '?')}): positions have shape {pos.shape}, "
                       f"expected (3, {ids.shape[0]})")
    input_ids[row, seq - ids.shape[0]:] = ids
    positions[:, row, seq - ids.shape[0]:] = pos
  next_positions = np.asarray([int(p["next_position"]) for p in rows], np.int32)

  pixel_values = vision_meta = None
  with_images = [p.get("pixel_values") is not None for p in rows]
  if any(with_images):
    if not all(with_images):
      raise ValueError("either every prompt of a batch has images or none has")
    vc = config.vision
    patch_counts = [int(np.asarray(p["pixel_values"]).shape[0]) for p in rows]
    budget = size_bucket(max(patch_counts), min_patch_bucket)
    pixel_values = np.zeros((total, budget, vc.patch_dim), np.float32)
    metas = []
    for row, prompt in enumerate(rows):
      pixels = np.asarray(prompt["pixel_values"], np.float32)
      if pixels.ndim != 2 or pixels.shape[1] != vc.patch_dim:
        raise ValueError(f"prompt {row} ({prompt.get('id', '?')}): pixel_values shape {pixels.shape}, "
                         f"expected (patches, {vc.patch_dim})")
      pixel_values[row, :pixels.shape[0]] = pixels
      metas.append(vision_metadata(np.asarray(prompt["image_grid_thw"]).reshape(-1, 3), budget, vc))
    vision_meta = stack_vision_metadata(metas)
  return PromptBatch(input_ids=input_ids, positions=positions, prompt_lengths=lengths,
                     next_positions=next_positions, pixel_values=pixel_values, vision_meta=vision_meta,
                     row_valid=row_valid)


# --- Device side: sampling --------------------------------------------------------------------------


def top_p_filter(logits: Array, top_p: float) -> Array:
  """logits (B, V) with every token outside the row's top-p nucleus set to -inf (the top token always stays)."""
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p
  keep = keep.at[:, 0].set(True)
  cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= cutoff, logits, -jnp.inf)


def select_tokens(logits: Array, keys: Array, settings: GenerationSettings) -> tuple[Array, Array]:
  """Next token per row and its log-probability: logits (B, V) float32, keys (B, 2) -> (B,) int32, (B,) float32."""
  logits = jnp.asarray(logits, jnp.float32)
  if settings.suppress_token_ids:
    logits = logits.at[:, jnp.asarray(settings.suppress_token_ids)].set(-jnp.inf)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  if settings.temperature == 0.0:
    tokens = jnp.argmax(logits, axis=-1)
  else:
    scaled = logits / settings.temperature
    if settings.top_p < 1.0:
      scaled = top_p_filter(scaled, settings.top_p)
    tokens = jax.vmap(jax.random.categorical)(keys, scaled)
  tokens = tokens.astype(jnp.int32)
  return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


# --- Device side: prefill and decode ----------------------------------------------------------------


def _constrain(x: Array, axes, mesh, rules) -> Array:
  if mesh is None:
    return x
  spec = sharding.logical_to_spec(axes, x.shape, rules, mesh)
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def prefill(model: Qwen25VL, input_ids: Array, positions: Array, segment_ids: Array, pixel_values, vision_meta
            ) -> tuple[Array, Array, Array]:
  """The prompt through the model once: (last-slot logits (B, V) float32, keys, values (L, B, S, kv, hd))."""
  text = model.language_model
  x = model.embed(input_ids, pixel_values, vision_meta).astype(text.dtype)
  cos, sin = text.rotary(positions)
  mask = layers.make_attention_mask(segment_ids, segment_ids, causal=True)
  layer_def, layer_state = nnx.split(text.layers)

  def one_layer(h, layer_slice):
    layer = nnx.merge(layer_def, layer_slice)
    q, k, v = layer.self_attn.project(layer.input_layernorm(h), cos, sin)
    h = h + layer.self_attn.attend(q, k, v, mask)
    return layer.mlp_block(h), (k, v)

  x, (keys, values) = jax.lax.scan(one_layer, x, layer_state)
  hidden = text.norm(x[:, -1:])
  return model.logits(hidden)[:, 0].astype(jnp.float32), keys, values


def decode_step(model: Qwen25VL, cache_k: Array, cache_v: Array, tokens: Array, positions: Array, slot: Array,
                kv_valid: Array) -> tuple[Array, Array, Array]:
  """One token per row through the model against the cache.

  tokens, positions (B,) int32; slot: the cache index this token is written to (same for all rows);
  kv_valid (B, T) bool: cache slots the token may attend to (its own included).
  Returns (logits (B, V) float32, cache_k, cache_v) with the new keys/values written at `slot`.
  """
  text = model.language_model
  x = text.embed_tokens(tokens[:, None]).astype(text.dtype)
  cos, sin = text.rotary(jnp.broadcast_to(positions[None, :, None], (3,) + positions.shape + (1,)))
  mask = kv_valid[:, None, None, :]
  layer_def, layer_state = nnx.split(text.layers)
  num_layers = cache_k.shape[0]

  def one_layer(carry, xs):
    h, ck, cv = carry
    layer_slice, index = xs
    layer = nnx.merge(layer_def, layer_slice)
    q, k, v = layer.self_attn.project(layer.input_layernorm(h), cos, sin)
    start = (index, 0, slot, 0, 0)
    ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), start)
    cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), start)
    layer_k = jax.lax.dynamic_index_in_dim(ck, index, 0, keepdims=False)
    layer_v = jax.lax.dynamic_index_in_dim(cv, index, 0, keepdims=False)
    h = h + layer.self_attn.attend(q, layer_k, layer_v, mask)
    return (layer.mlp_block(h), ck, cv), None

  (x, cache_k, cache_v), _ = jax.lax.scan(one_layer, (x, cache_k, cache_v),
                                          (layer_state, jnp.arange(num_layers)))
  return model.logits(text.norm(x))[:, 0].astype(jnp.float32), cache_k, cache_v


def generate_tokens(model: Qwen25VL, batch: dict[str, Any], budgets: Array, row_keys: Array,
                    settings: GenerationSettings, *, mesh=None, rules=sharding.ZERO2_PARAM_RULES
                    ) -> tuple[Array, Array, Array]:
  """Prefill + while_loop decode (traceable; `Generator` jits it). Returns tokens, log_probs, lengths.

  batch: input_ids (B, S), positions (3, B, S), prompt_lengths (B,), next_positions (B,), pixel_values,
  vision_meta (see PromptBatch). budgets (B,) int32: new tokens allowed per row (<= max_new_tokens).
  row_keys (B, 2): one PRNG key per row, so a row samples the same tokens in any batch.
  """
  input_ids = batch["input_ids"]
  b, s = input_ids.shape
  max_new = settings.max_new_tokens
  total = s + max_new
  slots = jnp.arange(total)
  first_slot = s - batch["prompt_lengths"]  # left padding: a row's prompt starts here
  segment_ids = (jnp.arange(s)[None, :] >= first_slot[:, None]).astype(jnp.int32)
  logits, keys, values = prefill(model, input_ids, batch["positions"], segment_ids, batch["pixel_values"],
                                 batch["vision_meta"])
  cache_shape = keys.shape[:2] + (total,) + keys.shape[3:]
  cache_k = _constrain(jnp.zeros(cache_shape, keys.dtype).at[:, :, :s].set(keys), CACHE_AXES, mesh, rules)
  cache_v = _constrain(jnp.zeros(cache_shape, values.dtype).at[:, :, :s].set(values), CACHE_AXES, mesh, rules)
  eos = jnp.asarray(settings.eos_token_ids, jnp.int32)
  pad = jnp.int32(settings.pad_token_id)

  def step_keys(step):
    return jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)

  token, log_prob = select_tokens(logits, step_keys(0), settings)
  active = budgets > 0
  tokens = jnp.full((b, max_new), pad, jnp.int32).at[:, 0].set(jnp.where(active, token, pad))
  log_probs = jnp.zeros((b, max_new), jnp.float32).at[:, 0].set(jnp.where(active, log_prob, 0.0))
  lengths = active.astype(jnp.int32)
  done = ~active | jnp.isin(token, eos) | (lengths >= budgets)

  def cond(state):
    step, _, _, _, _, _, done, _ = state
    return (step < max_new) & ~jnp.all(done)

  def body(state):
    step, cache_k, cache_v, tokens, log_probs, lengths, done, last = state
    slot = s + step - 1
    kv_valid = (slots[None, :] >= first_slot[:, None]) & (slots[None, :] <= slot)
    logits, cache_k, cache_v = decode_step(model, cache_k, cache_v, last, batch["next_positions"] + step - 1,
                                           slot, kv_valid)
    token, log_prob = select_tokens(logits, step_keys(step), settings)
    active = ~done
    token = jnp.where(active, token, pad)
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
    log_probs = jax.lax.dynamic_update_slice(log_probs, jnp.where(active, log_prob, 0.0)[:, None], (0, step))
    lengths = lengths + active.astype(jnp.int32)
    done = done | (active & jnp.isin(token, eos)) | (lengths >= budgets)
    return step + 1, cache_k, cache_v, tokens, log_probs, lengths, done, token

  state = (jnp.int32(1), cache_k, cache_v, tokens, log_probs, lengths, done, tokens[:, 0])
  _, _, _, tokens, log_probs, lengths, _, _ = jax.lax.while_loop(cond, body, state)
  return tokens, log_probs, lengths


class Generator:
  """Jitted batched generation for one model: `generate(PromptBatch, GenerationSettings)`.

  The model is split once into graphdef and state; the state is an argument of the compiled program,
  so one compilation serves every batch with the same (B, S, P) and settings. `trace_count` counts
  traces, i.e. compilations, for tests and logs. With `mesh`, the batch axis of inputs and cache is
  sharded over ("data", "fsdp") and kv heads over "tensor" by `rules`.
  """

  def __init__(self, model: Qwen25VL, *, mesh=None, rules=sharding.ZERO2_PARAM_RULES):
    self.config: Qwen25VLConfig = model.config
    self.graphdef, self.state = nnx.split(model)
    self.mesh = mesh
    self.rules = rules
    self.trace_count = 0
    self._compiled = jax.jit(self._generate, static_argnums=(0,))

  def _generate(self, settings, state, batch, budgets, row_keys):
    self.trace_count += 1
    model = nnx.merge(self.graphdef, state)
    return generate_tokens(model, batch, budgets, row_keys, settings, mesh=self.mesh, rules=self.rules)

  def device_batch(self, batch: PromptBatch) -> dict[str, Any]:
    arrays = {
        "input_ids": batch.input_ids, "positions": batch.positions, "prompt_lengths": batch.prompt_lengths,
        "next_positions": batch.next_positions, "pixel_values": batch.pixel_values,
        "vision_meta": batch.vision_meta,
    }
    if self.mesh is None:
      return arrays

    def place(path, x):
      if x is None:
        return None
      batch_axis = 1 if path and getattr(path[0], "key", None) == "positions" else 0
      return jax.device_put(x, sharding.batch_sharding(self.mesh, np.ndim(x), batch_axis))

    return jax.tree_util.tree_map_with_path(place, arrays)

  def generate(self, batch: PromptBatch, settings: GenerationSettings, *, budgets: np.ndarray | None = None,
               seed: int = 0, row_seeds: np.ndarray | None = None) -> GenerationOutput:
    """Generates for every row of `batch`; budgets (B,) new tokens per row (default max_new_tokens for
    valid rows, 0 for filler rows); row_seeds (B,) ints picking each row's sampling stream (default the
    row index)."""
    b = batch.batch_size
    if budgets is None:
      budgets = np.full((b,), settings.max_new_tokens, np.int32)
    budgets = np.where(batch.row_valid, np.minimum(budgets, settings.max_new_tokens), 0).astype(np.int32)
    row_seeds = np.arange(b) if row_seeds is None else np.asarray(row_seeds)
    base = jax.random.PRNGKey(seed)
    row_keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(jnp.asarray(row_seeds, jnp.uint32))
    tokens, log_probs, lengths = self._compiled(settings, self.state, self.device_batch(batch),
                                                jnp.asarray(budgets), row_keys)
    return GenerationOutput(tokens=np.asarray(tokens), log_probs=np.asarray(log_probs),
                            lengths=np.asarray(lengths))
