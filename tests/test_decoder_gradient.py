"""detection_decoder_gradient: whether the detection head's losses reach the language model through the
decoder states the head reads and the token embeddings its captions use (scaled by
detection_decoder_gradient_scale). Off, the language model's gradient is its answer loss's alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny_models as tm
from bbu_jax import train as train_lib
from bbu_jax.data import pipeline as pipeline_lib
from bbu_jax.data.chat import ChatProcessor
from bbu_jax.models import bbu_model
from bbu_jax.models.detection_head import DetectionLossWeights

DETECTION_SUMS = ("bbox_l1_sum", "giou_sum", "objectness_sum", "caption_sum")


@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
  root = tmp_path_factory.mktemp("decoder_gradient")
  config = tm.tiny_run_config(root, teacher_ratio=0.0)
  train_lib.prepare_data(config)
  records = train_lib.load_split(config.train_data_path, config, root, "train")
  chat_config = pipeline_lib.chat_config_from(config, train_lib.label_hierarchy(config, records))
  tokenizer = train_lib.build_tokenizer(config, root, records, chat_config)
  model_config = train_lib.build_model_config(config, tokenizer)
  pipeline_config = pipeline_lib.pipeline_config_from(config, model_config.vision, batch_size=2, is_training=False,
                                                      max_caption_tokens=chat_config.max_caption_tokens)
  dataset = pipeline_lib.build_dataset(records[:8], ChatProcessor(tokenizer, chat_config), pipeline_config,
                                       model_config.vision, data_root=config.data_root)
  batch = jax.tree.map(jnp.asarray, next(iter(dataset)))
  return config, model_config, batch


def _gradients(config, model_config, batch, decoder_gradient: bool, scale: float = 1.0):
  config.detection_decoder_gradient = decoder_gradient
  config.detection_decoder_gradient_scale = scale
  model = bbu_model.BBUModel(model_config, detection=train_lib.detection_config(config, model_config),
                             rngs=nnx.Rngs(0))
  weights = DetectionLossWeights()

  def detection_only(model):
    terms = bbu_model.loss_terms(model, batch, None, det_weights=weights)
    return sum(terms[name] for name in DETECTION_SUMS)

  grads = nnx.jit(nnx.grad(detection_only))(model)
  return {"/".join(str(k) for k in path): np.asarray(g.get_value()) for path, g in grads.flat_state()}


def test_head_losses_reach_the_decoder_only_when_asked(pieces):
  config, model_config, batch = pieces
  with_gradient = _gradients(config, model_config, batch, True)
  without = _gradients(config, model_config, batch, False)
  # The decoder (through the states the head reads) and the token embeddings (which the captions use).
  language_model = [name for name in with_gradient if name.startswith(("language_model/layers/",
                                                                        "language_model/embed_tokens/"))]
  assert any(name.startswith("language_model/embed_tokens/") for name in language_model)
  for prefix in ("language_model/layers/", "language_model/embed_tokens/"):
    assert any(np.any(with_gradient[name]) for name in language_model if name.startswith(prefix)), prefix
  assert not any(np.any(without[name]) for name in language_model)
  # The head itself and the vision path it reads still learn from its losses.
  for prefix in ("detection_head/", "visual/"):
    assert any(np.any(g) for name, g in without.items() if name.startswith(prefix)), prefix


def test_decoder_gradient_scale_scales_only_what_reaches_the_decoder(pieces):
  config, model_config, batch = pieces
  full = _gradients(config, model_config, batch, True)
  quarter = _gradients(config, model_config, batch, True, scale=0.25)
  decoder = [name for name in full if name.startswith(("language_model/layers/", "language_model/embed_tokens/"))]
  head = [name for name in full if name.startswith("detection_head/")]
  assert decoder and head
  assert any(np.any(full[name]) for name in decoder)
  for name in decoder:  # the head's losses reach the language model only through the scaled states and embeddings
    # Exact up to float32 summation order (the two programs fuse differently): 1e-6 of the largest entry.
    expected = 0.25 * full[name]
    np.testing.assert_allclose(quarter[name], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(), err_msg=name)
  for name in head:  # the head's own gradient is unchanged
    np.testing.assert_array_equal(quarter[name], full[name], err_msg=name)


def test_decoder_gradient_scale_must_be_positive():
  from bbu_jax.models.detection_head import DetectionHeadConfig
  with pytest.raises(ValueError, match="decoder_gradient_scale"):
    DetectionHeadConfig(hidden_size=64, decoder_gradient_scale=0.0)
