"""Runs the real train step of the tiny config on a chosen mesh and prints what the scale tests compare.

Started as a subprocess by tests/test_sharding.py and tests/test_multihost.py, because the mesh needs a
device count (XLA_FLAGS, jax.distributed) fixed before jax starts, and pytest's jax has one device:

  python tests/_sharded_worker.py '{"mode": "zero2", "data": 2, "fsdp": 4, "devices": 8, "steps": 3}'

Every run sees the same deterministic global batch of GLOBAL_ROWS packed rows per step (one image and
text per sample, two samples per row, detection boxes and captions), so losses agree across meshes.
Output: one JSON line after "RESULT ".
"""

import json
import os
import pathlib
import sys
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GLOBAL_ROWS = 8
VOCAB = 96
SPECIAL = types.SimpleNamespace(image_token_id=90, video_token_id=91, vision_start_token_id=92,
                                vision_end_token_id=93, bos_token_id=94, eos_token_id=95, pad_token_id=0)


def tiny_config(spec: dict):
  sys.path.insert(0, os.path.join(REPO, "tests", "configs"))
  import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.tokenizer_vocab_size = VOCAB
  c.model_max_length = 96
  c.patch_budget = 64
  c.max_samples_per_row = 2
  c.max_objects = 4
  c.detection_num_queries = 4
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = spec.get("data", 1), spec.get("fsdp", 1), spec.get("tensor", 1)
  c.sharding_mode = spec.get("mode", "zero2")
  c.gradient_accumulation_steps = spec.get("accumulation", 1)
  c.per_device_train_batch_size = GLOBAL_ROWS // (c.mesh.data * c.mesh.fsdp) // c.gradient_accumulation_steps
  return c


def make_sample(rng: np.random.Generator, index: int, vision_config, max_caption_tokens: int) -> dict:
  """One sample as the pipeline emits it: a 4x4-patch image (4 merged tokens) and random text."""
  grid = np.array([[1, 4, 4]], np.int64)
  merged = int(grid.prod()) // vision_config.merge_unit
  text = rng.integers(1, 90, size=int(rng.integers(10, 30)))
  ids = np.concatenate([[SPECIAL.vision_start_token_id], [SPECIAL.image_token_id] * merged,
                        [SPECIAL.vision_end_token_id], text]).astype(np.int32)
  n = len(ids)
  answer = np.zeros(n, np.float32)
  answer[n // 2:] = 1.0
  is_teacher = index % 3 == 0
  boxes = rng.uniform(0.0, 0.5, size=(2, 4)).astype(np.float32)
  boxes[:, 2:] += 0.4
  captions = np.zeros((2, max_caption_tokens), np.int32)
  captions[:, :3] = rng.integers(1, 90, size=(2, 3))
  captions[:, 3] = SPECIAL.eos_token_id
  return {
      "index": index, "input_ids": ids, "positions": np.tile(np.arange(n, dtype=np.int32), (3, 1)),
      "teacher_mask": answer * is_teacher, "student_mask": answer * (not is_teacher),
      "student_text_mask": np.full(n, not is_teacher),
      "pixel_values": rng.standard_normal((int(grid.prod()), vision_config.patch_dim)).astype(np.float32),
      "image_grid_thw": grid, "image_is_student": np.array([not is_teacher]),
      "det_boxes": boxes if not is_teacher else np.zeros((0, 4), np.float32),
      "det_caption_ids": captions if not is_teacher else np.zeros((0, max_caption_tokens), np.int32),
  }


def global_batch(step: int, packing_config, vision_config) -> dict:
  from bbu_jax.data import packing  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1000 + step)
  rows = []
  for r in range(GLOBAL_ROWS):
    samples = [make_sample(rng, 2 * r + k, vision_config, packing_config.max_caption_tokens) for k in range(2)]
    rows.append(packing.make_row(samples, packing_config, vision_config))
  return packing.collate_rows(rows)


def process_rows(batch: dict) -> dict:
  """This process's contiguous share of the global rows (positions keep rows on axis 1)."""
  import jax  # pylint: disable=import-outside-toplevel
  n, i = jax.process_count(), jax.process_index()
  per = GLOBAL_ROWS // n
  return {k: (v[:, i * per:(i + 1) * per] if k == "positions" else v[i * per:(i + 1) * per])
          for k, v in batch.items()}


def per_device_bytes(abstract_sharded_tree) -> int:
  """Bytes device 0 holds of a tree of sharded ShapeDtypeStructs."""
  import jax  # pylint: disable=import-outside-toplevel
  total = 0
  for leaf in jax.tree.leaves(abstract_sharded_tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total


def main(spec: dict) -> dict:
  if spec.get("processes", 1) > 1:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from bbu_jax.parallel import distributed  # pylint: disable=import-outside-toplevel
    distributed.initialize_distributed()
  import jax  # pylint: disable=import-outside-toplevel
  from bbu_jax import train  # pylint: disable=import-outside-toplevel
  from bbu_jax.data import packing  # pylint: disable=import-outside-toplevel
  from bbu_jax.parallel import sharding  # pylint: disable=import-outside-toplevel
  from bbu_jax.training import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  from bbu_jax.training import program as program_lib  # pylint: disable=import-outside-toplevel

  config = tiny_config(spec)
  model_config = train.build_model_config(config, types.SimpleNamespace(vocab_size=VOCAB, special=SPECIAL))
  det_config = train.detection_config(config, model_config)
  devices = jax.devices()[:spec.get("devices", jax.device_count())]
  mesh = sharding.make_mesh(config.mesh, devices)
  steps = spec.get("steps", 3)
  program = program_lib.build_program(config, model_config, det_config, mesh, total_steps=steps + 2)
  packing_config = packing.PackingConfig(
      model_max_length=config.model_max_length, patch_budget=config.patch_budget,
      patch_dim=model_config.vision.patch_dim, max_samples_per_row=config.max_samples_per_row,
      max_objects=config.max_objects, max_caption_tokens=8, collator_type="packed")

  out = {"mesh": dict(mesh.shape), "processes": jax.process_count()}
  abstract = program.abstract_sharded_state()
  out["param_bytes_per_device"] = per_device_bytes((abstract.trainable, abstract.frozen))
  out["opt_bytes_per_device"] = per_device_bytes(abstract.opt_state)
  out["state_bytes_per_device"] = per_device_bytes(abstract)
  # The layout of one decoder projection and of its Adam moment, to check zero2 against fsdp.
  flat_params = dict(jax.tree_util.tree_flatten_with_path(program.state_shardings.trainable)[0])
  flat_opt = jax.tree_util.tree_flatten_with_path(program.state_shardings.opt_state)[0]
  is_q_proj = lambda path: all(k in jax.tree_util.keystr(path) for k in ("language_model", "q_proj", "kernel"))
  out["q_proj_param_spec"] = str(next(s.spec for p, s in flat_params.items() if is_q_proj(p)))
  out["q_proj_opt_specs"] = sorted({str(s.spec) for p, s in flat_opt if is_q_proj(p)})
  batches = [global_batch(s, packing_config, model_config.vision) for s in range(steps)]
  device_batches = [train._to_device(process_rows(b), config.gradient_accumulation_steps, mesh)  # pylint: disable=protected-access
                    for b in batches]
  compiled = program.train_step.lower(abstract, device_batches[0]).compile()
  memory = compiled.memory_analysis()
  out["compiled_argument_bytes"] = int(memory.argument_size_in_bytes) if memory is not None else None

  checkpoint_dir = spec.get("checkpoint_dir")
  losses = []
  if spec.get("restore"):
    checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir)
    start, state, _, _ = checkpointer.restore(abstract)
    checkpointer.close()
    out["restored_step"] = start
  else:
    state, start = program.init_state(None), 0
  for s in range(start, steps):
    state, metrics = compiled(state, device_batches[s])  # the executable measured above: no second compile
    losses.append(float(jax.device_get(metrics["loss"])))
    if checkpoint_dir and not spec.get("restore") and s + 1 == spec.get("save_at"):
      checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir)
      checkpointer.save(s + 1, state, data_state={}, meta={"step": s + 1}, force=True)
      checkpointer.close()
  out["losses"] = losses
  if spec.get("export_dir"):  # the final export of bbu_jax.train, from wherever the shards are
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from bbu_jax.data.chat import ChatConfig  # pylint: disable=import-outside-toplevel
    model = nnx.merge(program.graphdef, state.trainable, state.frozen)
    train.export_model(model, pathlib.Path(spec["export_dir"]), config, ChatConfig(), source_dir=None)
    out["q_proj_kernel_sharding"] = str(next(
        v.sharding.spec for p, v in jax.tree_util.tree_flatten_with_path(state.trainable)[0] if is_q_proj(p)))
  return out


if __name__ == "__main__":
  # One spec or a list of specs (one process, several meshes: jax starts once).
  specs = json.loads(sys.argv[1])
  results = [main(spec) for spec in (specs if isinstance(specs, list) else [specs])]
  print("RESULT " + json.dumps(results if isinstance(specs, list) else results[0]), flush=True)
