"""What a run compiles: the model factory, the abstract train state and its shardings, the jitted init,
train step and eval step. Shared by `bbu_jax.train` (which runs it) and `bbu_jax.aot` (which only compiles it).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bbu_jax.data import packing as packing_lib
from bbu_jax.models import bbu_model, lora, weights
from bbu_jax.models.config import Qwen25VLConfig
from bbu_jax.models.detection_head import DetectionHeadConfig, DetectionLossWeights
from bbu_jax.parallel import sharding
from bbu_jax.training import optimizer as optimizer_lib
from bbu_jax.training import step as step_lib


@dataclasses.dataclass
class Program:
  make_model: Callable[[], bbu_model.BBUModel]
  graphdef: nnx.GraphDef
  abstract_state: step_lib.TrainState
  state_shardings: step_lib.TrainState
  init_state: Callable[..., step_lib.TrainState]  # jitted: (pretrained pure params | None) -> state
  train_step: Callable  # jitted, donates the state: (state, batch) -> (state, metrics)
  eval_step: Callable  # jitted, no gradients: (trainable, frozen, batch) -> loss sums and denominators
  schedules: dict
  loss_weights: step_lib.LossWeights  # how train_step and eval_step weigh the loss terms
  # jitted like train_step, for the first `vision_warmup_steps` steps (vision tower + dense proposals); or None
  warmup_step: Callable | None = None

  def abstract_sharded_state(self) -> step_lib.TrainState:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state,
                        self.state_shardings)

  def param_counts(self) -> tuple[int, int]:
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    return count(self.abstract_state.trainable), count(self.abstract_state.frozen)


def build_program(config, model_config: Qwen25VLConfig, det_config: DetectionHeadConfig | None, mesh,
                  total_steps: int, *, platform: str | None = None) -> Program:
  platform = platform or jax.devices()[0].platform
  compute_dtype = jnp.bfloat16 if config.bf16 else jnp.float32
  remat = config.remat_policy or ("full" if config.gradient_checkpointing else "none")
  attention_impl = "cudnn" if (config.use_flash_attention and platform == "gpu") else "xla"
  lora_config = lora.from_run_config(config)

  def make_model():
    return bbu_model.BBUModel(model_config, detection=det_config, rngs=nnx.Rngs(config.seed), dtype=compute_dtype,
                              param_dtype=jnp.float32, remat_policy=remat, attention_impl=attention_impl,
                              lora=lora_config)

  optimizer, schedules = optimizer_lib.make_optimizer(config, total_steps)
  is_trainable = optimizer_lib.is_trainable(config)
  graphdef, _, _ = step_lib.split_trainable(nnx.eval_shape(make_model), is_trainable)

  def init_state(pretrained: dict | None = None) -> step_lib.TrainState:
    model = make_model()
    # The language/vision weights of model_path; the head and LoRA adapters (absent from `pretrained`,
    # so replace_by_pure_dict leaves them) stay freshly initialized.
    if pretrained is not None:
      params = nnx.state(model, nnx.Param)
      pure = params.to_pure_dict()
      pure.update({k: v for k, v in pretrained.items()})
      nnx.replace_by_pure_dict(params, pure)
      nnx.update(model, params)
    return step_lib.init_train_state(model, optimizer, is_trainable, config.seed)[1]

  abstract_state = jax.eval_shape(init_state)
  param_rules = sharding.param_rules(config.sharding_mode)
  replicated = sharding.NamedSharding(mesh, sharding.P())
  state_shardings = step_lib.TrainState(
      step=replicated,
      trainable=sharding.tree_shardings(abstract_state.trainable, param_rules, mesh),
      frozen=sharding.tree_shardings(abstract_state.frozen, param_rules, mesh),
      opt_state=sharding.tree_shardings(abstract_state.opt_state, sharding.OPTIMIZER_RULES, mesh),
      rng=replicated)

  det_weights = DetectionLossWeights(bbox_weight=config.detection_bbox_weight,
                                     caption_weight=config.detection_caption_weight,
                                     proposal_weight=config.detection_proposal_weight)
  loss_weights = step_lib.LossWeights(teacher_loss_weight=config.teacher_loss_weight,
                                      student_loss_weight=config.student_loss_weight,
                                      detection_bbox_weight=config.detection_bbox_weight,
                                      detection_caption_weight=config.detection_caption_weight,
                                      objectness_weight=det_weights.objectness_weight,
                                      proposal_objectness_weight=config.detection_proposal_weight
                                      * det_weights.objectness_weight,
                                      proposal_box_weight=config.detection_proposal_weight
                                      * config.detection_bbox_weight)
  terms = lambda model, micro, rng: bbu_model.loss_terms(at_current_trace(model), micro, rng, det_weights=det_weights)
  normalizers = None
  if det_config is not None:
    normalizers = lambda batch: bbu_model.global_normalizers(
        batch, eos_token_id=model_config.eos_token_id, merge_size=model_config.vision.spatial_merge_size)
  step_fn = step_lib.make_train_step(graphdef, optimizer, terms, loss_weights, schedules, normalizers,
                                     grad_shardings=state_shardings_for_grads(abstract_state, mesh))
  train_step = jax.jit(step_fn,
                       in_shardings=(state_shardings, None), out_shardings=(state_shardings, None),
                       donate_argnums=(0,))
  warmup_step = None
  if det_config is not None and config.vision_warmup_steps > 0:
    warmup_terms = lambda model, micro, rng: bbu_model.vision_warmup_terms(at_current_trace(model), micro, rng,
                                                                           det_weights=det_weights)
    warmup_step = jax.jit(step_lib.make_train_step(graphdef, optimizer, warmup_terms, loss_weights, schedules,
                                                   normalizers,
                                                   grad_shardings=state_shardings_for_grads(abstract_state, mesh)),
                          in_shardings=(state_shardings, None), out_shardings=(state_shardings, None),
                          donate_argnums=(0,))
  eval_step = jax.jit(step_lib.make_eval_step(graphdef, terms, loss_weights, normalizers),
                      in_shardings=(state_shardings.trainable, state_shardings.frozen, None))
  return Program(make_model=make_model, graphdef=graphdef, abstract_state=abstract_state,
                 state_shardings=state_shardings, init_state=jax.jit(init_state, out_shardings=state_shardings),
                 train_step=train_step, eval_step=eval_step, schedules=schedules, loss_weights=loss_weights,
                 warmup_step=warmup_step)


def state_shardings_for_grads(abstract_state: step_lib.TrainState, mesh):
  """Gradients take the optimizer state's layout (sharded over data-parallel fsdp in both modes)."""
  return sharding.tree_shardings(abstract_state.trainable, sharding.OPTIMIZER_RULES, mesh)


def at_current_trace(model: nnx.Module) -> nnx.Module:
  """The same model rebuilt from its values. The step differentiates only the trainable parameters, so
  frozen ones (a frozen decoder under LoRA, a frozen vision tower) arrive from an outer trace level,
  and the NNX transforms inside the model (the scanned layers) refuse a graph that mixes two levels."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(lambda value: value, state))


def load_pretrained_params(config, model_config: Qwen25VLConfig, program: Program) -> dict:
  """model_path's weights as a pure dict, each tensor placed straight into its training sharding."""
  abstract = weights.abstract_model(model_config)
  param_shardings = nnx.State.merge(program.state_shardings.trainable, program.state_shardings.frozen)
  flat = {tuple(str(k) for k in path): v for path, v in nnx.to_flat_state(param_shardings)}

  def sharding_for(path, _abstract):
    v = flat[tuple(path)]
    return v.get_value() if isinstance(v, nnx.Variable) else v

  if weights.is_bbu_checkpoint(config.model_path):
    return weights.load_checkpoint_params(config.model_path, model_config, abstract, shardings=sharding_for)
  return weights.load_hf_params(config.model_path, model_config, abstract, shardings=sharding_for)


def batch_spec(packing_config: packing_lib.PackingConfig, model_config: Qwen25VLConfig, rows: int,
               accumulation: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract (accumulation, rows, ...) batch as the train step sees it, sharded over data/fsdp."""
  row = packing_lib.empty_row(packing_config, model_config.vision)
  out = {}
  for name, value in row.items():
    value = np.asarray(value)
    dtype = np.int32 if value.dtype == np.int64 else value.dtype
    if name == "positions":  # (3, S) per row -> (acc, 3, rows, S)
      shape, spec = (accumulation, value.shape[0], rows, *value.shape[1:]), (None, None, ("data", "fsdp"))
    else:
      shape, spec = (accumulation, rows, *value.shape), (None, ("data", "fsdp"))
    spec = spec + (None,) * (len(shape) - len(spec))
    out[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.NamedSharding(mesh, sharding.P(*spec)))
  return out
