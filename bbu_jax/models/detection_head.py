"""DETR-style detection head on Qwen2.5-VL: learned queries read the decoder's last hidden states and
the vision features and predict, per query, a box, an objectness logit and a free-text caption (the
object's `desc`); plus its set-prediction loss (Hungarian matching inside jit). Each query owns a
learned anchor box, as in DAB-DETR: the anchor places the query's attention, and the layers refine it
into the predicted box.

Boxes: the head predicts `pred_boxes_cxcywh` (sigmoid, normalized to the student image); targets give
`boxes_xyxy` normalized the same way (bbox_2d / [W, H, W, H] in the model's resized frame).
The caption decoder owns no vocabulary: it reads and predicts tokens through the language model's
token embedding matrix, passed in at call time.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bbu_jax.models.layers import Linear, RMSNorm, dot_product_attention, make_attention_mask, param
from bbu_jax.training import hungarian, losses

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DetectionHeadConfig:
  """Sizes of the head. `hidden_size` is the language model's (text hidden states, merged vision
  features and token embeddings all have it); `width` is the head's own."""
  hidden_size: int
  num_queries: int = 100
  width: int = 256
  num_layers: int = 3
  num_heads: int = 8
  mlp_dim: int = 1024
  adapter_dim: int = 64
  caption_max_len: int = 32
  caption_layers: int = 2
  rms_norm_eps: float = 1e-6
  objectness_prior: float = 0.01  # initial P(object) of every query, as focal-loss detectors do
  # Two-stage query selection (Deformable DETR's two-stage, DINO's mixed queries): each image's queries
  # start from the boxes of its `num_queries` most confident dense proposals instead of learned anchors;
  # their content embeddings stay learned. Needs the proposals trained (detection_proposal_weight > 0).
  two_stage: bool = False
  # Self-attention layers over the vision memory (with its places) before the proposals and the queries
  # read it, as DETR's encoder: a feature learns its object's extent from its neighbours.
  encoder_layers: int = 0
  # Whether the head's losses also train the language model through what the head reads of it: the
  # decoder's states and the token embeddings of the captions. Off, the language model learns from its
  # answer loss alone and the head reads it as it is.
  decoder_gradient: bool = True
  # With decoder_gradient, the factor on the gradient the head's losses send into the language model (the
  # head's own gradient is unchanged): below 1 they shape its states without outweighing the answer loss.
  decoder_gradient_scale: float = 1.0

  def __post_init__(self):
    for name in ("hidden_size", "num_queries", "width", "num_layers", "num_heads", "mlp_dim",
                 "adapter_dim", "caption_max_len", "caption_layers"):
      if getattr(self, name) < 1:
        raise ValueError(f"DetectionHeadConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.encoder_layers < 0:
      raise ValueError(f"DetectionHeadConfig.encoder_layers must be >= 0, got {self.encoder_layers}")
    if self.width % self.num_heads:
      raise ValueError(f"DetectionHeadConfig.width {self.width} must be a multiple of num_heads "
                       f"{self.num_heads}")
    if not self.decoder_gradient_scale > 0:
      raise ValueError(f"DetectionHeadConfig.decoder_gradient_scale must be > 0 (turn decoder_gradient off "
                       f"instead), got {self.decoder_gradient_scale}")
    if not 0 < self.objectness_prior < 1:
      raise ValueError(f"DetectionHeadConfig.objectness_prior must be in (0, 1), got "
                       f"{self.objectness_prior}")


@dataclasses.dataclass(frozen=True)
class DetectionLossWeights:
  """Loss and matching-cost weights. bbox_weight is `detection_bbox_weight` (on L1 and GIoU),
  caption_weight is `detection_caption_weight`; the match_* weights build the Hungarian cost."""
  bbox_weight: float = 5.0
  caption_weight: float = 1.0
  objectness_weight: float = 2.0
  proposal_weight: float = 1.0  # the dense proposals' terms: objectness_weight x focal + bbox_weight x box
  match_objectness_weight: float = 2.0
  match_l1_weight: float = 5.0
  match_giou_weight: float = 2.0
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0


def _dense(n_in: int, n_out: int, axes: tuple[str | None, str | None], *, rngs: nnx.Rngs, dtype,
           bias: bool = True) -> Linear:
  """The head's dense layers start with fan-in scaled (LeCun normal) kernels, as DETR's xavier init
  does, not with the language model's fixed 0.02: at the head's small widths 0.02 shrinks every layer's
  output several fold, and the image features barely reach the boxes at the start of training."""
  return Linear(n_in, n_out, axes=axes, use_bias=bias, rngs=rngs, dtype=dtype, std=n_in ** -0.5)


class ResidualAdapter(nnx.Module):
  """x + up(gelu(down(norm(x)))): a bottleneck that lets detection reshape features it borrows from
  the language model without changing them for the LM itself."""

  def __init__(self, dim: int, bottleneck: int, *, eps: float, rngs: nnx.Rngs, dtype=jnp.float32):
    self.norm = RMSNorm(dim, eps=eps, axis_name="embed", rngs=rngs)
    self.down = _dense(dim, bottleneck, ("embed", "det_mlp"), rngs=rngs, dtype=dtype)
    self.up = _dense(bottleneck, dim, ("det_mlp", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    return x + self.up(jax.nn.gelu(self.down(self.norm(x))))


class Attention(nnx.Module):
  """Multi-head attention of `x` over `memory` (itself for self-attention) through the project's one
  attention function.

  `query_pos` and `key_pos` are added to the queries and keys AFTER their projections, and never to
  the values, as Conditional DETR keeps place apart from content: through the random content
  projections a query's and a key's places would meet only once training had aligned them; added
  after, their dot product is part of the attention logit from the first step.
  """

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.num_heads = num_heads
    self.q_proj = _dense(width, width, ("det_embed", "det_mlp"), rngs=rngs, dtype=dtype)
    self.k_proj = _dense(width, width, ("det_embed", "det_mlp"), rngs=rngs, dtype=dtype)
    self.v_proj = _dense(width, width, ("det_embed", "det_mlp"), rngs=rngs, dtype=dtype)
    self.o_proj = _dense(width, width, ("det_mlp", "det_embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x: Array, memory: Array, mask: Array, *, query_pos: Array | None = None,
               key_pos: Array | None = None) -> Array:
    heads = lambda y: y.reshape(*y.shape[:-1], self.num_heads, -1)
    q, k = self.q_proj(x), self.k_proj(memory)
    q = q if query_pos is None else q + query_pos.astype(q.dtype)
    k = k if key_pos is None else k + key_pos.astype(k.dtype)
    out = dot_product_attention(heads(q), heads(k), heads(self.v_proj(memory)), mask)
    return self.o_proj(out.reshape(*x.shape[:-1], -1))


class MLP(nnx.Module):

  def __init__(self, width: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.fc1 = _dense(width, mlp_dim, ("det_embed", "det_mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = _dense(mlp_dim, width, ("det_mlp", "det_embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    return self.fc2(jax.nn.gelu(self.fc1(x)))


class QueryDecoderLayer(nnx.Module):
  """Pre-norm: queries attend to each other (to avoid duplicates), then to the features. `query_pos`
  (each query's box centre, embedded) joins both attentions' queries and the self-attention's keys, so
  queries with near boxes compete; `memory_pos` (each memory token's place, zero for text) joins the
  cross-attention's keys, so a query reads the features near its box first."""

  def __init__(self, cfg: DetectionHeadConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    norm = lambda: RMSNorm(cfg.width, eps=cfg.rms_norm_eps, axis_name="det_embed", rngs=rngs)
    self.self_norm, self.cross_norm, self.mlp_norm = norm(), norm(), norm()
    self.self_attn = Attention(cfg.width, cfg.num_heads, rngs=rngs, dtype=dtype)
    self.cross_attn = Attention(cfg.width, cfg.num_heads, rngs=rngs, dtype=dtype)
    self.mlp = MLP(cfg.width, cfg.mlp_dim, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array, query_pos: Array, memory: Array, memory_pos: Array,
               memory_mask: Array) -> Array:
    y = self.self_norm(x)
    x = x + self.self_attn(y, y, None, query_pos=query_pos, key_pos=query_pos)
    x = x + self.cross_attn(self.cross_norm(x), memory, memory_mask, query_pos=query_pos, key_pos=memory_pos)
    return x + self.mlp(self.mlp_norm(x))


class EncoderLayer(nnx.Module):
  """Pre-norm self-attention over the vision memory (each token's place joins its query and key, as in
  QueryDecoderLayer), then an MLP."""

  def __init__(self, cfg: DetectionHeadConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.self_norm = RMSNorm(cfg.width, eps=cfg.rms_norm_eps, axis_name="det_embed", rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.width, eps=cfg.rms_norm_eps, axis_name="det_embed", rngs=rngs)
    self.self_attn = Attention(cfg.width, cfg.num_heads, rngs=rngs, dtype=dtype)
    self.mlp = MLP(cfg.width, cfg.mlp_dim, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array, pos: Array, mask: Array) -> Array:
    y = self.self_norm(x)
    x = x + self.self_attn(y, y, mask, query_pos=pos, key_pos=pos)
    return x + self.mlp(self.mlp_norm(x))


class CaptionDecoderLayer(nnx.Module):
  """Pre-norm causal self-attention + MLP over the caption tokens."""

  def __init__(self, cfg: DetectionHeadConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.self_norm = RMSNorm(cfg.width, eps=cfg.rms_norm_eps, axis_name="det_embed", rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.width, eps=cfg.rms_norm_eps, axis_name="det_embed", rngs=rngs)
    self.self_attn = Attention(cfg.width, cfg.num_heads, rngs=rngs, dtype=dtype)
    self.mlp = MLP(cfg.width, cfg.mlp_dim, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array, causal_mask: Array) -> Array:
    y = self.self_norm(x)
    x = x + self.self_attn(y, y, causal_mask)
    return x + self.mlp(self.mlp_norm(x))


def sine_position_embedding(positions: Array, dim: int, temperature: float = 10000.0) -> Array:
  """DETR's sine embedding of normalized (y, x) positions (..., 2) in [0, 1]: (..., dim) float32, half
  for y and half for x, each half sin/cos pairs over dim // 4 geometric frequencies."""
  if dim % 4:
    raise ValueError(f"sine_position_embedding: dim {dim} must be a multiple of 4")
  freqs = temperature ** (jnp.arange(dim // 4, dtype=jnp.float32) / (dim // 4))
  angles = positions.astype(jnp.float32)[..., None] * (2 * jnp.pi) / freqs  # (..., 2, dim // 4)
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape[:-1], dim)


def inverse_sigmoid(p: Array, eps: float = 1e-5) -> Array:
  """logit(p), with p clipped into [eps, 1 - eps] so an anchor on the image's edge stays finite."""
  p = jnp.clip(p, eps, 1 - eps)
  return jnp.log(p) - jnp.log1p(-p)


PROPOSAL_SIZE_LOGIT = -2.0  # an untrained proposal is a box of 12% of the image around its feature


def proposal_targets(places_yx: Array, valid: Array, boxes_xyxy: Array, box_valid: Array) -> tuple[Array, Array]:
  """(positive (B, L) bool, assigned target (B, L) int32) of the dense proposals.

  A vision feature is positive when its centre lies inside a real target box (the smallest such box
  is its target, as FCOS assigns), and so is the one feature nearest each target's centre, so that an
  object smaller than a feature still has one. places_yx (B, L, 2) in [0, 1], valid (B, L) bool,
  boxes_xyxy (B, T, 4) normalized, box_valid (B, T) bool.
  """
  cy, cx = places_yx[..., 0][..., None], places_yx[..., 1][..., None]  # (B, L, 1)
  x1, y1, x2, y2 = (boxes_xyxy[:, None, :, i] for i in range(4))  # (B, 1, T)
  pair_valid = valid[:, :, None] & box_valid[:, None, :]
  inside = (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)
  distance = (cx - (x1 + x2) / 2) ** 2 + (cy - (y1 + y2) / 2) ** 2
  nearest = jnp.argmin(jnp.where(pair_valid, distance, jnp.inf), axis=1)  # (B, T): the feature nearest each centre
  is_nearest = jnp.arange(places_yx.shape[1])[None, :, None] == nearest[:, None, :]
  candidate = pair_valid & (inside | is_nearest)
  area = (x2 - x1) * (y2 - y1)
  assigned = jnp.argmin(jnp.where(candidate, area, jnp.inf), axis=2).astype(jnp.int32)
  return candidate.any(axis=2), assigned


def grid_anchors(num_queries: int) -> np.ndarray:
  """(num_queries, 4) cxcywh anchors: the first num_queries cell centres, row by row, of a
  ceil(sqrt(Q)) x ceil(sqrt(Q)) grid over the image, each one cell wide and high (at most half the
  image, so that a lone query's size logits do not start on sigmoid's flat end)."""
  side = math.ceil(math.sqrt(num_queries))
  index = np.arange(num_queries)
  size = np.full(num_queries, min(1.0 / side, 0.5))
  return np.stack([(index % side + 0.5) / side, (index // side + 0.5) / side, size, size],
                  -1).astype(np.float32)


class DetectionHead(nnx.Module):
  """`head(text_hidden, text_valid, vision_features, vision_valid, vision_positions)` -> dict with
  `pred_boxes_cxcywh` (B, Q, 4), `objectness_logits` (B, Q) (float32) and `query_states` (B, Q, width),
  which `caption_logits` (training) and `generate_captions` (inference) turn into captions.

  text_hidden (B, S, D): the decoder's last hidden states; text_valid (B, S) bool: the tokens the head
  may read (e.g. the student's prompt and image tokens); vision_features (B, P, D) merged vision
  features; vision_valid (B, P) bool; vision_positions (B, P, 2) each feature's centre (y, x) in [0, 1]
  of its image (`vision.merged_token_centers`). Invalid positions are never read, whatever they hold.
  One row is one sample: packed rows are split into samples by the caller.

  The vision tower has relative (rotary) positions only, so its features do not say WHERE in the image
  they are; as in DETR, a sine embedding of each feature's position (through a learned projection) is
  added to the vision memory, so attention can find objects by place and the attended values carry it.

  Anchors (Anchor DETR, DAB-DETR): plain DETR converges slowly because each query must learn from
  nothing where to look and where its boxes go. Here each query owns a learned anchor centre
  `query_reference` ((cx, cy) logits), spread over the image on a grid at the start, with a fixed
  size of one grid cell. The query's position in attention is its box centre through the vision
  features' own sine embedding and projection: two places' sine embeddings have their largest dot
  product where the places meet, so a query attends near its box from the first step.
  Each layer refines the box (DAB-DETR without its per-layer losses): box = sigmoid(logit(previous
  box) + delta), delta from the shared box MLP, whose last layer starts near zero (untrained queries
  predict their anchors), and the next layer looks at the refined box's centre. The previous box is
  a stop_gradient, in the box as in where the next layer looks: the loss trains the last layer's
  delta (and through the shared MLP every layer's), and the anchors learn only from where they make
  the first layer look. On bench_detection_head.py's `multi` toy, anchors that the box loss also
  moved, or layers whose deltas summed with gradients, cut held-out AP@0.5 after 500 steps from about
  0.43 to 0.24 (4 seeds).
  """

  def __init__(self, cfg: DetectionHeadConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.cfg = cfg
    self.dtype = dtype
    d, w = cfg.hidden_size, cfg.width
    eps = cfg.rms_norm_eps
    dense = lambda n_in, n_out, axes, bias=True: _dense(n_in, n_out, axes, rngs=rngs, dtype=dtype, bias=bias)
    norm = lambda: RMSNorm(w, eps=eps, axis_name="det_embed", rngs=rngs)
    self.text_adapter = ResidualAdapter(d, cfg.adapter_dim, eps=eps, rngs=rngs, dtype=dtype)
    self.vision_adapter = ResidualAdapter(d, cfg.adapter_dim, eps=eps, rngs=rngs, dtype=dtype)
    self.text_proj = dense(d, w, ("embed", "det_embed"))
    self.vision_proj = dense(d, w, ("embed", "det_embed"))
    if w % 4:
      raise ValueError(f"DetectionHeadConfig.width {w} must be a multiple of 4 (sine position embedding)")
    self.vision_position_proj = dense(w, w, ("det_embed", "det_embed"))
    self.memory_norm = norm()
    self.encoder = nnx.List([EncoderLayer(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.encoder_layers)])
    self.encoder_norm = norm() if cfg.encoder_layers else None
    self.query_embed = param(rngs, (cfg.num_queries, w), ("queries", "det_embed"), std=1.0)
    if not cfg.two_stage:  # two-stage queries take their boxes from the proposals
      self.query_reference = param(rngs, (cfg.num_queries, 2), ("queries", None), init="zeros")
      self.query_reference[...] = inverse_sigmoid(jnp.asarray(grid_anchors(cfg.num_queries)[:, :2]))
    self.layers = nnx.List([QueryDecoderLayer(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_layers)])
    self.query_norm = norm()
    self.box_hidden = dense(w, w, ("det_embed", "det_mlp"))
    # Small, not zero (as DAB-DETR has): a zero kernel would give box_hidden no gradient at first.
    self.box_out = Linear(w, 4, axes=("det_mlp", None), use_bias=True, rngs=rngs, dtype=dtype,
                          std=1e-3 * w ** -0.5)
    self.objectness = dense(w, 1, ("det_embed", None))
    prior_logit = jnp.log(cfg.objectness_prior / (1 - cfg.objectness_prior))
    self.objectness.bias[...] = jnp.full((1,), prior_logit, jnp.float32)
    # Dense proposals: per vision feature an objectness logit and a box (see `proposal_targets`).
    self.proposal_hidden = dense(w, w, ("det_embed", "det_mlp"))
    self.proposal_out = Linear(w, 5, axes=("det_mlp", None), use_bias=True, rngs=rngs, dtype=dtype,
                               std=1e-3 * w ** -0.5)
    self.proposal_out.bias[...] = jnp.array([prior_logit, 0.0, 0.0, PROPOSAL_SIZE_LOGIT, PROPOSAL_SIZE_LOGIT],
                                            jnp.float32)
    # Caption decoder.
    self.caption_token_proj = dense(d, w, ("embed", "det_embed"), bias=False)
    self.caption_condition = dense(w, w, ("det_embed", "det_embed"))
    self.caption_start = param(rngs, (w,), ("det_embed",))
    self.caption_positions = param(rngs, (cfg.caption_max_len, w), (None, "det_embed"))
    self.caption_layers = nnx.List([CaptionDecoderLayer(cfg, rngs=rngs, dtype=dtype)
                                    for _ in range(cfg.caption_layers)])
    self.caption_norm = norm()
    self.caption_out = dense(w, d, ("det_embed", "embed"), bias=False)

  def __call__(self, text_hidden: Array, text_valid: Array, vision_features: Array,
               vision_valid: Array, vision_positions: Array) -> dict[str, Array]:
    b = text_hidden.shape[0]
    d = self.cfg.hidden_size
    for name, features, valid in (("text_hidden", text_hidden, text_valid),
                                  ("vision_features", vision_features, vision_valid)):
      if features.ndim != 3 or features.shape[0] != b or features.shape[2] != d:
        raise ValueError(f"DetectionHead: {name} must be (batch={b}, length, hidden_size={d}), got "
                         f"{features.shape}")
      if valid.shape != features.shape[:2]:
        raise ValueError(f"DetectionHead: the valid mask of {name} must be {features.shape[:2]}, got "
                         f"{valid.shape}")
    if vision_positions.shape != (*vision_features.shape[:2], 2):
      raise ValueError(f"DetectionHead: vision_positions must be {(*vision_features.shape[:2], 2)}, got "
                       f"{vision_positions.shape}")
    # Zero what may not be read, so that even NaN padding cannot reach the outputs through 0 * NaN.
    text = jnp.where(text_valid[..., None], text_hidden, 0).astype(self.dtype)
    vision_memory, place = self._vision_memory(vision_features, vision_valid, vision_positions)
    # memory_norm is per token: normalizing the two parts apart equals normalizing their concatenation.
    memory = jnp.concatenate([self.memory_norm(self.text_proj(self.text_adapter(text))), vision_memory], axis=1)
    memory_pos = jnp.concatenate([jnp.zeros((b, text.shape[1], place.shape[-1]), place.dtype), place], axis=1)
    memory_valid = jnp.concatenate([text_valid, vision_valid], axis=1).astype(jnp.int32)
    memory_mask = make_attention_mask(jnp.ones((b, self.cfg.num_queries), jnp.int32), memory_valid,
                                      causal=False)
    x = jnp.broadcast_to(self.query_embed[...].astype(self.dtype), (b, *self.query_embed[...].shape))
    proposals, proposal_box_logits = self._proposals(vision_memory, vision_valid, vision_positions)
    box_logits = self._initial_boxes(proposals["proposal_logits"], proposal_box_logits, b)
    for i, layer in enumerate(self.layers):
      # The first layer looks at the anchors WITH their gradient: that is how the anchors learn.
      look_at = box_logits if i == 0 else jax.lax.stop_gradient(box_logits)
      query_pos = self._place_embedding(jax.nn.sigmoid(look_at[..., 1::-1]))  # centre as (y, x)
      x = layer(x, query_pos, memory, memory_pos, memory_mask)
      states = self.query_norm(x)
      box_logits = (jax.lax.stop_gradient(box_logits)
                    + self.box_out(jax.nn.gelu(self.box_hidden(states))).astype(jnp.float32))
    x = states
    return {
        "pred_boxes_cxcywh": jax.nn.sigmoid(box_logits),
        "objectness_logits": self.objectness(x)[..., 0].astype(jnp.float32),
        "query_states": x,
        **proposals,
    }

  def _initial_boxes(self, proposal_logits: Array, proposal_box_logits: Array, batch: int) -> Array:
    """(B, Q, 4) cxcywh logits the queries start from: the learned anchors with a fixed size, or with
    `two_stage` the boxes of the Q most confident proposals of each image (no gradient through the
    choice or the boxes: the proposals learn from their own loss, as in DINO)."""
    q = self.cfg.num_queries
    if not self.cfg.two_stage:
      anchor_size = jnp.full((q, 2), inverse_sigmoid(grid_anchors(q)[0, 2]), jnp.float32)
      return jnp.broadcast_to(jnp.concatenate([self.query_reference[...], anchor_size], -1), (batch, q, 4))
    if proposal_logits.shape[1] < q:
      raise ValueError(f"DetectionHead: two-stage selection needs at least num_queries={q} vision features "
                       f"per sample, got {proposal_logits.shape[1]}")
    _, chosen = jax.lax.top_k(jax.lax.stop_gradient(proposal_logits), q)
    return jax.lax.stop_gradient(jnp.take_along_axis(proposal_box_logits, chosen[..., None], axis=1))

  def _vision_memory(self, vision_features: Array, vision_valid: Array, vision_positions: Array
                     ) -> tuple[Array, Array]:
    """The vision part of the queries' memory (features through their adapter and projection, plus
    their place embedding, normalized) and the place embedding itself."""
    vision = jnp.where(vision_valid[..., None], vision_features, 0).astype(self.dtype)
    place = self._place_embedding(jnp.where(vision_valid[..., None], vision_positions, 0))
    memory = self.memory_norm(self.vision_proj(self.vision_adapter(vision)) + place)
    if self.cfg.encoder_layers:
      valid = vision_valid.astype(jnp.int32)
      mask = make_attention_mask(valid, valid, causal=False)
      for layer in self.encoder:
        memory = layer(memory, place, mask)
      memory = self.encoder_norm(memory)
    return memory, place

  def _proposals(self, vision_memory: Array, vision_valid: Array, vision_positions: Array
                 ) -> tuple[dict[str, Array], Array]:
    """Dense proposals on the vision memory (the features and their places, as the queries read them),
    and their box logits (cxcywh before the sigmoid: where two-stage queries start)."""
    dense_out = self.proposal_out(jax.nn.gelu(self.proposal_hidden(vision_memory))).astype(jnp.float32)
    centre_xy = jnp.where(vision_valid[..., None], vision_positions[..., ::-1], 0.5).astype(jnp.float32)
    box_logits = jnp.concatenate([inverse_sigmoid(centre_xy) + dense_out[..., 1:3], dense_out[..., 3:5]], -1)
    return {
        "proposal_boxes_cxcywh": jax.nn.sigmoid(box_logits),
        "proposal_logits": jnp.where(vision_valid, dense_out[..., 0], -30.0),
        "proposal_places": jnp.where(vision_valid[..., None], vision_positions, -1.0).astype(jnp.float32),
        "proposal_valid": vision_valid,
    }, box_logits

  def proposals(self, vision_features: Array, vision_valid: Array, vision_positions: Array) -> dict[str, Array]:
    """The dense proposals alone (what `__call__` returns under proposal_*), from the vision features
    only: the queries, the text and the caption decoder are not run (the vision warm-up's loss)."""
    vision_memory, _ = self._vision_memory(vision_features, vision_valid, vision_positions)
    return self._proposals(vision_memory, vision_valid, vision_positions)[0]

  def _place_embedding(self, yx: Array) -> Array:
    """(..., 2) places (y, x) in [0, 1] -> (..., width): the one position embedding of vision features
    and of query boxes, so that attention can compare the two by dot product."""
    return self.vision_position_proj(sine_position_embedding(yx, self.cfg.width).astype(self.dtype))

  def caption_logits(self, query_states: Array, caption_ids: Array, token_embeddings: Array) -> Array:
    """Teacher-forced next-token logits (..., L, vocab) in float32.

    query_states (..., width); caption_ids (..., L) int, L <= caption_max_len: the caption tokens (desc
    then eos). Position t sees the query and caption_ids[:t] and predicts caption_ids[t]. The logits
    are tied to token_embeddings (vocab, hidden_size); gradients reach it unless the caller stops them.
    """
    length = caption_ids.shape[-1]
    if length > self.cfg.caption_max_len:
      raise ValueError(f"DetectionHead: captions of {length} tokens exceed caption_max_len "
                       f"{self.cfg.caption_max_len}")
    if caption_ids.shape[:-1] != query_states.shape[:-1]:
      raise ValueError(f"DetectionHead: caption_ids {caption_ids.shape} must be query_states' leading "
                       f"shape {query_states.shape[:-1]} + (length,)")
    if token_embeddings.ndim != 2 or token_embeddings.shape[1] != self.cfg.hidden_size:
      raise ValueError(f"DetectionHead: token_embeddings must be (vocab, {self.cfg.hidden_size}), got "
                       f"{token_embeddings.shape}")
    lead = caption_ids.shape[:-1]
    ids = caption_ids.reshape(-1, length)
    states = query_states.reshape(-1, query_states.shape[-1]).astype(self.dtype)
    # Out-of-range ids cannot be reported inside jit; clipping keeps them from filling NaN rows.
    previous = jnp.take(token_embeddings, ids[:, :-1], axis=0, mode="clip").astype(self.dtype)
    start = jnp.broadcast_to(self.caption_start[...].astype(self.dtype), (ids.shape[0], 1, self.cfg.width))
    x = jnp.concatenate([start, self.caption_token_proj(previous)], axis=1)
    # The query conditions every position, not only the first, so long captions keep their object.
    positions = self.caption_positions[...][:length].astype(self.dtype)
    x = x + self.caption_condition(states)[:, None, :] + positions
    segments = jnp.ones(ids.shape, jnp.int32)
    causal_mask = make_attention_mask(segments, segments, causal=True)
    for layer in self.caption_layers:
      x = layer(x, causal_mask)
    hidden = self.caption_out(self.caption_norm(x)).astype(jnp.float32)
    logits = jnp.einsum("nld,vd->nlv", hidden, token_embeddings.astype(jnp.float32))
    return logits.reshape(*lead, length, -1)

  def generate_captions(self, query_states: Array, token_embeddings: Array, *,
                        eos_token_id: int | Array, max_len: int | None = None) -> tuple[Array, Array]:
    """Greedy captions: (ids (..., max_len) int32, lengths (...) int32).

    ids[..., :lengths] is the caption without eos; later slots hold eos. Stops early once every
    caption has written eos. Each step re-runs the (small) decoder on the whole buffer: positions
    after t cannot affect t (causal), so this equals teacher forcing on the decoder's own output.
    """
    max_len = self.cfg.caption_max_len if max_len is None else max_len
    if not 1 <= max_len <= self.cfg.caption_max_len:
      raise ValueError(f"DetectionHead: max_len must be in [1, {self.cfg.caption_max_len}], got {max_len}")
    lead = query_states.shape[:-1]
    states = query_states.reshape(-1, query_states.shape[-1])
    n = states.shape[0]

    def step(carry):
      t, ids, finished, lengths = carry
      logits = self.caption_logits(states, ids, token_embeddings)
      next_id = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), axis=-1)
      next_id = jnp.where(finished, eos_token_id, next_id).astype(jnp.int32)
      ids = jax.lax.dynamic_update_index_in_dim(ids, next_id, t, axis=1)
      lengths = lengths + (~finished & (next_id != eos_token_id)).astype(jnp.int32)
      return t + 1, ids, finished | (next_id == eos_token_id), lengths

    def keep_going(carry):
      t, _, finished, _ = carry
      return (t < max_len) & ~jnp.all(finished)

    start = (jnp.array(0, jnp.int32), jnp.full((n, max_len), eos_token_id, jnp.int32),
             jnp.zeros((n,), bool), jnp.zeros((n,), jnp.int32))
    _, ids, _, lengths = jax.lax.while_loop(keep_going, step, start)
    return ids.reshape(*lead, max_len), lengths.reshape(lead)


def _check_targets(outputs: dict[str, Array], targets: dict[str, Array]) -> None:
  b, q = outputs["objectness_logits"].shape
  boxes = targets["boxes_xyxy"]
  if boxes.ndim != 3 or boxes.shape[0] != b or boxes.shape[2] != 4:
    raise ValueError(f"detection targets: boxes_xyxy must be (batch={b}, max_objects, 4), got {boxes.shape}")
  t = boxes.shape[1]
  if targets["valid"].shape != (b, t):
    raise ValueError(f"detection targets: valid must be {(b, t)}, got {targets['valid'].shape}")
  if "caption_ids" in targets:
    ids, mask = targets["caption_ids"], targets["caption_mask"]
    if ids.ndim != 3 or ids.shape[:2] != (b, t) or mask.shape != ids.shape:
      raise ValueError(f"detection targets: caption_ids {ids.shape} and caption_mask {mask.shape} must "
                       f"both be ({b}, {t}, caption_length)")


def _real_target_boxes(targets: dict[str, Array]) -> Array:
  # Padded targets may hold anything (NaN included); zeros keep them out of values AND gradients.
  return jnp.where(targets["valid"][..., None], targets["boxes_xyxy"], 0).astype(jnp.float32)


def match_queries(outputs: dict[str, Array], targets: dict[str, Array],
                  weights: DetectionLossWeights) -> Array:
  """Exact Hungarian matching per sample: (B, Q) int32 index of each query's target, -1 = none.

  Padded targets (valid False) are never matched. No gradient flows through the matching.
  """
  _check_targets(outputs, targets)
  cost_fn = lambda boxes, logits, target_boxes: losses.matching_cost(
      boxes, logits, target_boxes, objectness_weight=weights.match_objectness_weight,
      l1_weight=weights.match_l1_weight, giou_weight=weights.match_giou_weight,
      focal_alpha=weights.focal_alpha, focal_gamma=weights.focal_gamma)
  cost = jax.vmap(cost_fn)(outputs["pred_boxes_cxcywh"], outputs["objectness_logits"],
                           _real_target_boxes(targets))
  cost = jax.lax.stop_gradient(cost)
  return jax.vmap(lambda c, valid: hungarian.linear_sum_assignment(c, valid_cols=valid))(
      cost, targets["valid"])


def proposal_loss_sums(outputs: dict[str, Array], targets: dict[str, Array], weights: DetectionLossWeights
                       ) -> dict[str, Array]:
  """The dense proposals' loss sums (focal objectness over every valid feature, L1 + 1 - GIoU over the
  positive ones) and their positive count (`proposal_targets`)."""
  positive, assigned = proposal_targets(outputs["proposal_places"], outputs["proposal_valid"],
                                        _real_target_boxes(targets), targets["valid"])
  assigned_xyxy = jnp.take_along_axis(_real_target_boxes(targets), assigned[..., None], axis=1)
  proposals = outputs["proposal_boxes_cxcywh"]
  box_cost = (losses.l1_box_distance(proposals, losses.box_xyxy_to_cxcywh(assigned_xyxy))
              + 1.0 - losses.generalized_box_iou(losses.box_cxcywh_to_xyxy(proposals), assigned_xyxy))
  focal = losses.sigmoid_focal_loss(outputs["proposal_logits"], positive, alpha=weights.focal_alpha,
                                    gamma=weights.focal_gamma)
  return {"proposal_objectness_sum": jnp.where(outputs["proposal_valid"], focal, 0.0).sum(),
          "proposal_box_sum": jnp.where(positive, box_cost, 0.0).sum(),
          "num_proposal_positives": positive.sum()}


def detection_loss(head: DetectionHead, outputs: dict[str, Array], targets: dict[str, Array],
                   token_embeddings: Array, weights: DetectionLossWeights) -> dict[str, Array]:
  """Set-prediction losses of one batch.

  targets: `boxes_xyxy` (B, T, 4) normalized to the student image, `valid` (B, T) bool (objects are
  padded to T per sample), `caption_ids` (B, T, L) int32 (desc tokens, then eos, then anything) and
  `caption_mask` (B, T, L) (1 on desc and eos tokens). Returns scalars: `bbox_l1_loss` and
  `giou_loss` (per matched box), `objectness_loss` (focal, summed over all queries per matched box,
  matched = 1), `caption_loss` (per caption token of matched objects), `detection_loss` (the weighted
  total), `num_matched`. Box losses are normalized by the batch's matched count, as DETR does.
  The `*_sum` entries and `caption_token_count` are the un-normalized numerators and the caption
  denominator, so gradient accumulation or cross-host averaging can normalize over the large batch.
  """
  col_for_row = match_queries(outputs, targets, weights)
  matched = col_for_row >= 0
  num_matched = matched.sum()
  normalizer = jnp.maximum(num_matched, 1).astype(jnp.float32)
  target_index = jnp.maximum(col_for_row, 0)
  matched_target_xyxy = jnp.take_along_axis(_real_target_boxes(targets), target_index[..., None], axis=1)
  pred = outputs["pred_boxes_cxcywh"]
  l1 = losses.l1_box_distance(pred, losses.box_xyxy_to_cxcywh(matched_target_xyxy))
  giou = losses.generalized_box_iou(losses.box_cxcywh_to_xyxy(pred), matched_target_xyxy)
  sums = {
      "bbox_l1_sum": jnp.where(matched, l1, 0.0).sum(),
      "giou_sum": jnp.where(matched, 1.0 - giou, 0.0).sum(),
      "objectness_sum": losses.sigmoid_focal_loss(outputs["objectness_logits"], matched,
                                                  alpha=weights.focal_alpha,
                                                  gamma=weights.focal_gamma).sum(),
  }
  bbox_l1_loss = sums["bbox_l1_sum"] / normalizer
  giou_loss = sums["giou_sum"] / normalizer
  objectness_loss = sums["objectness_sum"] / normalizer
  result = {"bbox_l1_loss": bbox_l1_loss, "giou_loss": giou_loss, "objectness_loss": objectness_loss,
            **sums}
  total = weights.bbox_weight * (bbox_l1_loss + giou_loss) + weights.objectness_weight * objectness_loss

  if "caption_ids" in targets:
    # Caption only the matched queries, one per target, so the decoder runs on T, not Q, sequences.
    num_targets = targets["boxes_xyxy"].shape[1]
    query_for_target = jax.vmap(lambda a: hungarian.row_for_col(a, num_targets))(col_for_row)
    states = jnp.take_along_axis(outputs["query_states"], jnp.maximum(query_for_target, 0)[..., None],
                                 axis=1)
    token_weights = targets["caption_mask"].astype(jnp.float32) * (query_for_target >= 0)[..., None]
    caption_ids = jnp.where(token_weights > 0, targets["caption_ids"], 0)
    logits = head.caption_logits(states, caption_ids, token_embeddings)
    caption_sum, caption_count = losses.weighted_token_cross_entropy(logits, caption_ids, token_weights)
    result["caption_sum"], result["caption_token_count"] = caption_sum, caption_count
    result["caption_loss"] = caption_sum / jnp.maximum(caption_count, 1.0)
    total = total + weights.caption_weight * result["caption_loss"]
  if "proposal_logits" in outputs:
    result.update(proposal_loss_sums(outputs, targets, weights))
    positives = jnp.maximum(result["num_proposal_positives"], 1).astype(jnp.float32)
    result["proposal_objectness_loss"] = result["proposal_objectness_sum"] / positives
    result["proposal_box_loss"] = result["proposal_box_sum"] / positives
    total = total + weights.proposal_weight * (weights.objectness_weight * result["proposal_objectness_loss"]
                                               + weights.bbox_weight * result["proposal_box_loss"])
  result["detection_loss"] = total
  result["num_matched"] = num_matched
  return result
