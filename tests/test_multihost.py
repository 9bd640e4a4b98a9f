"""Two processes on loopback (jax.distributed, gloo CPU collectives) train the tiny model with the same
losses as one process with the same global batch.

Both runs use tests/_sharded_worker.py: the real train step of the tiny config on a (data=2) mesh, fed
the same deterministic global batch of 8 rows per step. Each of the two processes owns one CPU device
and passes its own 4 contiguous rows (jax.make_array_from_process_local_data, as bbu_jax.train does),
so the global arrays equal the single process's. The batch is generated, not read through the data
pipeline: the pipeline gives each process a different shard of samples (which is the point of it), so
two processes and one process would not see the same rows, and the comparison would say nothing.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import _loopback
from bbu_jax.models import bbu_model
from test_sharding import WORKER, run_worker

STEPS = 3


def run_processes(spec: dict) -> list[dict]:
  """`spec` in two worker processes joined by jax.distributed over loopback; their RESULT dicts."""
  results = []
  for done in _loopback.wait_all(_loopback.start_processes([str(WORKER), json.dumps(spec)]), timeout=900):
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    results.append(json.loads(line[len("RESULT "):]))
  return results


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch():
  results = run_processes({"mode": "zero2", "data": 2, "steps": STEPS, "processes": 2})
  assert [r["processes"] for r in results] == [2, 2]
  assert results[0]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
  # Every process sees the same global loss.
  assert results[0]["losses"] == results[1]["losses"]

  single = run_worker({"mode": "zero2", "data": 2, "steps": STEPS}, devices=2)
  assert single["processes"] == 1
  assert len(set(single["losses"])) == STEPS
  assert results[0]["losses"] == pytest.approx(single["losses"], rel=1e-5)


@pytest.mark.slow
def test_fsdp_across_two_processes_exports_the_model_one_process_exports(tmp_path):
  """The final export with parameters sharded ACROSS processes (fsdp=2, one device each): every process
  writes its shards, and the folder loads in one process to the same parameters as a single process's
  export of the same training."""
  results = run_processes({"mode": "fsdp", "fsdp": 2, "steps": 2, "processes": 2,
                           "export_dir": str(tmp_path / "two")})
  assert "fsdp" in results[0]["q_proj_kernel_sharding"]  # really split across the two processes
  single = run_worker({"mode": "fsdp", "fsdp": 2, "steps": 2, "export_dir": str(tmp_path / "one")}, devices=2)
  assert results[0]["losses"] == pytest.approx(single["losses"], rel=1e-5)
  for name in ("config.json", "bbu_jax.json", "chat_config.json"):
    assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
  two = nnx.state(bbu_model.load(tmp_path / "two"), nnx.Param).to_pure_dict()
  one = nnx.state(bbu_model.load(tmp_path / "one"), nnx.Param).to_pure_dict()
  leaves_two, leaves_one = jax.tree.leaves(two), jax.tree.leaves(one)
  assert len(leaves_two) == len(leaves_one) > 20
  for a, b in zip(leaves_two, leaves_one):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
