"""Sharding rules, and the real train step on 8 simulated CPU devices: the same losses on one device,
zero2 (data=2, fsdp=4) and fsdp (fsdp=8); per-device state that shrinks with the fsdp size; a checkpoint
saved on 8 devices (fsdp=8) restored onto 4 (fsdp=2 x tensor=2) continuing with the same loss.

The meshes run in one subprocess (tests/_sharded_worker.py): the device count is fixed when jax starts,
and pytest's jax already has one CPU device.
"""

import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

from bbu_jax.parallel import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_sharded_worker.py"
STEPS = 3


def run_worker(specs, *, devices: int = 8, extra_env: dict | None = None, timeout: int = 900):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         **(extra_env or {})}
  done = subprocess.run([sys.executable, str(WORKER), json.dumps(specs)], env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=REPO)
  assert done.returncode == 0, done.stderr[-4000:]
  line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
  return json.loads(line[len("RESULT "):])


# --- Rules (no devices needed: a mesh is only its axis sizes here) -----------------------------------


def fake_mesh(data=1, fsdp=1, tensor=1):
  return types.SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": tensor})


def test_zero2_replicates_parameters_over_fsdp_and_shards_their_optimizer_state():
  mesh = fake_mesh(data=2, fsdp=4)
  axes, shape = ("layers", "embed", "heads"), (2, 64, 128)
  assert sharding.logical_to_spec(axes, shape, sharding.ZERO2_PARAM_RULES, mesh) == sharding.P(None, None, None)
  assert sharding.logical_to_spec(axes, shape, sharding.OPTIMIZER_RULES, mesh) == sharding.P(None, "fsdp", None)
  assert sharding.logical_to_spec(axes, shape, sharding.FSDP_PARAM_RULES, mesh) == sharding.P(None, "fsdp", None)


def test_tensor_axis_takes_projection_outputs_and_fsdp_the_embedding():
  mesh = fake_mesh(fsdp=4, tensor=2)
  spec = sharding.logical_to_spec(("embed", "mlp"), (64, 256), sharding.FSDP_PARAM_RULES, mesh)
  assert spec == sharding.P("fsdp", "tensor")


def test_a_dimension_the_axis_does_not_divide_stays_replicated():
  mesh = fake_mesh(fsdp=8)
  assert sharding.logical_to_spec(("embed",), (12,), sharding.FSDP_PARAM_RULES, mesh) == sharding.P(None)
  assert sharding.logical_to_spec(("embed",), (16,), sharding.FSDP_PARAM_RULES, mesh) == sharding.P("fsdp")


def test_batch_takes_both_data_parallel_axes():
  spec = sharding.logical_to_spec(("batch", "length"), (8, 32), sharding.ZERO2_PARAM_RULES, fake_mesh(2, 4))
  assert spec == sharding.P(("data", "fsdp"), None)


def test_mesh_shape_resolves_one_auto_axis_and_refuses_a_wrong_count():
  assert sharding.mesh_shape({"data": -1, "fsdp": 4, "tensor": 1}, 8) == (2, 4, 1)
  with pytest.raises(ValueError, match="needs 16 devices, 8 are present"):
    sharding.mesh_shape({"data": 2, "fsdp": 8, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_param_rules_refuses_an_unknown_mode():
  with pytest.raises(ValueError, match="sharding_mode must be 'zero2' or 'fsdp', got 'ddp'"):
    sharding.param_rules("ddp")


# --- The real train step on 8 simulated devices ----------------------------------------------------


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
  """Same global batch of 8 rows per step on every mesh; the fsdp=8 run also saves after step 2, and a
  4-device (fsdp=2, tensor=2) run restores that checkpoint and takes step 3."""
  checkpoint_dir = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
  specs = [
      {"devices": 1, "steps": STEPS},
      {"mode": "zero2", "data": 2, "fsdp": 4, "steps": STEPS},
      {"mode": "fsdp", "fsdp": 8, "steps": STEPS, "checkpoint_dir": checkpoint_dir, "save_at": 2},
      {"mode": "fsdp", "fsdp": 2, "tensor": 2, "devices": 4, "steps": STEPS, "checkpoint_dir": checkpoint_dir,
       "restore": True},
  ]
  single, zero2, fsdp, restored = run_worker(specs)
  return {"single": single, "zero2": zero2, "fsdp": fsdp, "restored": restored}


@pytest.mark.slow
def test_every_mesh_gives_the_single_device_losses(mesh_runs):
  reference = mesh_runs["single"]["losses"]
  assert len(reference) == STEPS and len(set(reference)) == STEPS  # three different batches
  for name in ("zero2", "fsdp"):
    assert mesh_runs[name]["losses"] == pytest.approx(reference, rel=1e-5), name


@pytest.mark.slow
def test_zero2_keeps_parameters_whole_and_shards_optimizer_state(mesh_runs):
  single, zero2 = mesh_runs["single"], mesh_runs["zero2"]
  assert zero2["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert "fsdp" not in zero2["q_proj_param_spec"]
  assert zero2["q_proj_opt_specs"] and all("fsdp" in spec for spec in zero2["q_proj_opt_specs"])
  assert zero2["param_bytes_per_device"] == single["param_bytes_per_device"]
  # Adam's two moments over fsdp=4; a few small or indivisible leaves stay whole.
  assert zero2["opt_bytes_per_device"] < 0.3 * single["opt_bytes_per_device"]


@pytest.mark.slow
def test_fsdp_state_per_device_shrinks_with_the_fsdp_size(mesh_runs):
  single, fsdp = mesh_runs["single"], mesh_runs["fsdp"]
  assert "fsdp" in fsdp["q_proj_param_spec"]
  assert fsdp["state_bytes_per_device"] < 0.25 * single["state_bytes_per_device"]
  # What XLA compiled: the step's per-device arguments (state + this device's rows of the batch).
  assert fsdp["compiled_argument_bytes"] < 0.25 * single["compiled_argument_bytes"]


@pytest.mark.slow
def test_checkpoint_from_8_devices_restores_onto_4_with_tensor_parallelism_and_continues_identically(mesh_runs):
  restored = mesh_runs["restored"]
  assert restored["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  assert "tensor" in restored["q_proj_param_spec"] and "fsdp" in restored["q_proj_param_spec"]
  assert restored["restored_step"] == 2
  assert restored["losses"] == pytest.approx(mesh_runs["fsdp"]["losses"][2:], rel=1e-5)
