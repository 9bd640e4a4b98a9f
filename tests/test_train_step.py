"""Train step mechanics on a toy model with the real group layout: accumulation, frozen groups, rates."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from bbu_jax import config as config_lib
from bbu_jax.models import layers
from bbu_jax.training import optimizer as opt_lib
from bbu_jax.training import step as step_lib

VOCAB, DIM = 17, 8


class _Merger(nnx.Module):
  def __init__(self, rngs):
    self.proj = layers.Linear(DIM, DIM, axes=("vision_embed", "embed"), use_bias=True, rngs=rngs)


class _Visual(nnx.Module):
  def __init__(self, rngs):
    self.proj = layers.Linear(DIM, DIM, axes=("vision_embed", "vision_embed"), use_bias=True, rngs=rngs)
    self.merger = _Merger(rngs)


class _LM(nnx.Module):
  def __init__(self, rngs):
    self.embed = layers.param(rngs, (VOCAB, DIM), ("vocab", "embed"))
    self.norm = layers.RMSNorm(DIM, eps=1e-6, axis_name="embed", rngs=rngs)
    self.out = layers.Linear(DIM, VOCAB, axes=("embed", "vocab"), use_bias=False, rngs=rngs)


class ToyModel(nnx.Module):
  """Same top-level names as Qwen25VL, so parameters fall into the real optimizer groups."""

  def __init__(self, rngs):
    self.visual = _Visual(rngs)
    self.language_model = _LM(rngs)

  def __call__(self, input_ids):
    h = self.language_model.embed[...][input_ids]
    h = h + self.visual.merger.proj(self.visual.proj(h))
    return self.language_model.out(self.language_model.norm(h))


def toy_terms(model, micro, rng):
  return step_lib.lm_loss_sums(model(micro["input_ids"]), micro)


def make_batch(rows, seq, seed):
  rs = np.random.RandomState(seed)
  ids = rs.randint(0, VOCAB, (rows, seq)).astype(np.int32)
  return {
      "input_ids": ids,
      "target_ids": np.roll(ids, -1, axis=1),
      "teacher_loss_mask": (rs.rand(rows, seq) < 0.3).astype(np.float32),
      "student_loss_mask": (rs.rand(rows, seq) < 0.5).astype(np.float32),
  }


def make_config(**lrs):
  c = config_lib.base_config()
  c.warmup_ratio = 0.0
  c.weight_decay = 0.01
  for k, v in lrs.items():
    c[k] = v
  return c


def run_steps(config, batches, accum):
  model = ToyModel(nnx.Rngs(0))
  optimizer, schedules = opt_lib.make_optimizer(config, total_steps=1)
  graphdef, state = step_lib.init_train_state(model, optimizer, opt_lib.is_trainable(config), seed=0)
  train_step = jax.jit(step_lib.make_train_step(graphdef, optimizer, toy_terms, step_lib.LossWeights(),
                                                schedules))
  initial = state
  for b in batches:
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), b)
    state, metrics = train_step(state, micro)
  return initial, state, metrics


def test_gradient_accumulation_equals_large_batch():
  config = make_config(vision_lr=1e-2, merger_lr=1e-2, llm_lr=1e-2)
  batches = [make_batch(8, 6, seed) for seed in range(3)]
  _, big, m_big = run_steps(config, batches, accum=1)
  _, acc, m_acc = run_steps(config, batches, accum=4)
  for a, b in zip(jax.tree.leaves(big.trainable), jax.tree.leaves(acc.trainable)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m_big["loss"], m_acc["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_big["student_lm_loss"], m_acc["student_lm_loss"], rtol=1e-5)


def test_frozen_group_is_bit_identical_and_has_no_optimizer_state():
  config = make_config(vision_lr=0.0, merger_lr=1e-2, llm_lr=1e-2)
  initial, final, _ = run_steps(config, [make_batch(4, 6, 0), make_batch(4, 6, 1)], accum=1)
  frozen_before = nnx.to_flat_state(initial.frozen)
  frozen_after = nnx.to_flat_state(final.frozen)
  vision_paths = [p for p, _ in frozen_after if p[0] == "visual" and p[1] != "merger"]
  assert vision_paths, "the vision group should be frozen"
  before = dict(frozen_before)
  for path, var in frozen_after:
    np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(before[path].get_value()))
  # No optimizer state mentions a frozen parameter: the optimizer only ever saw trainable ones.
  trainable_paths = {opt_lib.path_str(p) for p, _ in nnx.to_flat_state(final.trainable)}
  assert not any(p.startswith("visual/proj") for p in trainable_paths)
  n_opt = sum(x.size for x in jax.tree.leaves(final.opt_state))
  n_trainable = sum(x.size for x in jax.tree.leaves(final.trainable))
  assert n_opt <= 2 * n_trainable + 16  # adam mu + nu (+ counters), nothing for the frozen group


@pytest.mark.parametrize("group,lr_name", [("vision", "vision_lr"), ("merger", "merger_lr"), ("llm", "llm_lr")])
def test_each_group_moves_at_its_own_rate(group, lr_name):
  rates = {"vision_lr": 1e-3, "merger_lr": 3e-3, "llm_lr": 1e-2}
  rates[lr_name] = 5e-2
  config = make_config(**rates)
  config.weight_decay = 0.0
  initial, final, metrics = run_steps(config, [make_batch(4, 6, 0)], accum=1)
  before = {opt_lib.path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(initial.trainable)}
  moved = {}
  for p, v in nnx.to_flat_state(final.trainable):
    name = opt_lib.path_str(p)
    delta = np.abs(np.asarray(v.get_value()) - before[name]).max()
    g = opt_lib.param_group(name)
    moved[g] = max(moved.get(g, 0.0), float(delta))
  # A first Adam step moves each parameter by about its group's learning rate.
  for g, lr in (("vision", rates["vision_lr"]), ("merger", rates["merger_lr"]), ("llm", rates["llm_lr"])):
    assert lr * 0.5 < moved[g] <= lr * 1.01, (g, moved[g], lr)
    np.testing.assert_allclose(float(metrics[f"lr/{g}"]), lr, rtol=1e-6)


def test_param_group_names():
  assert opt_lib.param_group("visual/blocks/attn/qkv/kernel") == "vision"
  assert opt_lib.param_group("visual/merger/mlp_0/kernel") == "merger"
  assert opt_lib.param_group("language_model/layers/mlp/up_proj/kernel") == "llm"
  assert opt_lib.param_group("lm_head/kernel") == "llm"
  assert opt_lib.param_group("detection_head/queries") == "detection"
  assert opt_lib.param_group("language_model/layers/self_attn/q_proj/lora_a") == "adapter"
  with pytest.raises(ValueError, match="no optimizer group"):
    opt_lib.param_group("something_else/w")


@pytest.mark.parametrize("field,value,message", [
    ("llm_lr", -1e-5, "llm_lr"),
    ("teacher_ratio", 1.5, "teacher_ratio"),
    ("collator_type", "bucketed", "collator_type"),
    ("per_device_train_batch_size", 0, "per_device_train_batch_size"),
    ("detection_proposal_weight", -1.0, "detection_proposal_weight"),
    ("vision_warmup_steps", 10, "vision_warmup_steps: .*needs detection_enabled"),
    ("detection_two_stage", True, "detection_two_stage: .*needs detection_proposal_weight > 0"),
    ("detection_caption_max_len", 1, "detection_caption_max_len: must be >= 2"),
    ("detection_encoder_layers", -1, "detection_encoder_layers: must be >= 0"),
    ("tokenizer_number_digits", 0, "tokenizer_number_digits: must be >= 1"),
])
def test_config_refuses_out_of_range_values(field, value, message):
  c = make_config()
  c.synthetic.enabled = True
  c.model.text_hidden_size = 8
  if field == "detection_two_stage":
    c.detection_enabled = True
    c.detection_num_queries = c.max_objects
  c[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_config_refuses_unknown_field_and_indivisible_mesh():
  c = make_config()
  c.lock()
  with pytest.raises(AttributeError, match="llm_lrr"):
    c.llm_lrr = 1.0
  c.synthetic.enabled = True
  c.model.text_hidden_size = 8
  c.mesh.data, c.mesh.fsdp = 3, 1
  with pytest.raises(config_lib.ConfigError, match="mesh"):
    config_lib.validate(c, num_devices=8)


def test_caption_length_reaches_the_targets_and_the_head():
  """detection_caption_max_len sets both the caption targets the pipeline writes and the head's
  caption decoder (its positions, and the longest caption it generates)."""
  from bbu_jax import train as train_lib
  from bbu_jax.data import pipeline as pipeline_lib
  from bbu_jax.models.config import Qwen25VLConfig

  c = make_config()
  c.detection_enabled = True
  c.detection_caption_max_len = 5
  chat_config = pipeline_lib.chat_config_from(c)
  assert chat_config.max_caption_tokens == 5
  head = train_lib.detection_config(c, Qwen25VLConfig())
  assert (head.caption_max_len, head.encoder_layers) == (5, 0)
  c.detection_encoder_layers = 2
  assert train_lib.detection_config(c, Qwen25VLConfig()).encoder_layers == 2


@pytest.mark.parametrize("per_group", [False, True])
def test_per_group_clipping_keeps_a_spike_in_one_group_out_of_the_others(per_group):
  """Two Adam steps where the detection head's second gradient is 1000x larger: with one global norm the
  language model's second update shrinks with it; clipped per group, it is exactly what it is when the
  head's gradient stays small."""
  config = make_config(llm_lr=1e-2, detection_lr=1e-2)
  config.clip_grad_norm_per_group = per_group
  optimizer, _ = opt_lib.make_optimizer(config, total_steps=10)
  rs = np.random.RandomState(0)
  params = {"language_model": {"kernel": jnp.asarray(rs.randn(4, 4), jnp.float32)},
            "detection_head": {"kernel": jnp.asarray(rs.randn(4, 4), jnp.float32)}}
  grads = [jax.tree.map(lambda p: jnp.asarray(rs.randn(*p.shape), jnp.float32), params) for _ in range(2)]

  def llm_updates(spike: float):
    state = optimizer.init(params)
    _, state = optimizer.update(grads[0], state, params)
    second = {**grads[1], "detection_head": {"kernel": grads[1]["detection_head"]["kernel"] * spike}}
    updates, _ = optimizer.update(second, state, params)
    return np.asarray(updates["language_model"]["kernel"])

  calm, spiked = llm_updates(1.0), llm_updates(1000.0)
  if per_group:
    np.testing.assert_array_equal(spiked, calm)
  else:
    # the spike's share of the global norm scales the language model's second gradient down ~1000x
    assert np.abs(spiked - calm).max() > 0.1 * np.abs(calm).max(), "a global norm should carry the spike over"
