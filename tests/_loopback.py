"""Several real processes of one jax.distributed run on loopback, as the multi-host tests start them."""

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(args: list[str], *, count: int = 2, env: dict | None = None) -> list[subprocess.Popen]:
  """`python args...` as processes 0..count-1 of one jax.distributed run (coordinator on a free loopback
  port, gloo CPU collectives, one CPU device each)."""
  port = free_port()
  procs = []
  for process_id in range(count):
    process_env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                   "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}),
                   "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(count),
                   "JAX_PROCESS_ID": str(process_id), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    procs.append(subprocess.Popen([sys.executable, *args], env=process_env, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[subprocess.CompletedProcess]:
  """Each process's outcome; one still running after `timeout` seconds is killed."""
  results = []
  for proc in procs:
    try:
      stdout, stderr = proc.communicate(timeout=timeout)
    finally:
      if proc.poll() is None:
        proc.kill()
    results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
  return results
