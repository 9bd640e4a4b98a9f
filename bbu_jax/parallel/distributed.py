"""Multi-host start-up: one `initialize_distributed()` for TPU VMs, GPU clusters (SLURM or plain ssh)
and a single process, and `is_main_process()` so that only process 0 writes logs and files.

Where the settings come from, first found wins for each of the three:
  coordinator address  argument, JAX_COORDINATOR_ADDRESS, first host of the SLURM node list
                       (SLURM_STEP_NODELIST, SLURM_JOB_NODELIST or SLURM_NODELIST) + JAX_COORDINATOR_PORT
  process count        argument, JAX_NUM_PROCESSES, SLURM_NTASKS
  process id           argument, JAX_PROCESS_ID, SLURM_PROCID
With none of them: on a Cloud TPU VM, jax finds everything itself (`jax.distributed.initialize()`);
anywhere else this is one process and nothing is initialized.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Mapping

import jax

DEFAULT_COORDINATOR_PORT = 12355

_SLURM_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  """What `initialize_distributed` did: `mode` is "single", "tpu" (jax auto-detection) or "explicit"."""
  mode: str
  coordinator_address: str | None = None
  num_processes: int = 1
  process_id: int = 0


def _split_top_level(text: str) -> list[str]:
  """Splits on commas that are not inside [...]: "a[1,3],b" -> ["a[1,3]", "b"]."""
  parts, depth, start = [], 0, 0
  for index, char in enumerate(text):
    if char == "[":
      depth += 1
    elif char == "]":
      depth -= 1
      if depth < 0:
        raise ValueError(f"SLURM node list {text!r}: ']' without '['")
    elif char == "," and depth == 0:
      parts.append(text[start:index])
      start = index + 1
  if depth != 0:
    raise ValueError(f"SLURM node list {text!r}: '[' without ']'")
  parts.append(text[start:])
  return parts


def _expand_range_group(group: str, nodelist: str) -> list[str]:
  """"01-03,07" -> ["01", "02", "03", "07"], keeping zero padding as SLURM does."""
  values = []
  for item in group.split(","):
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
    if not match:
      raise ValueError(f"SLURM node list {nodelist!r}: bad range {item!r} in [{group}]")
    first, last = match.group(1), match.group(2) or match.group(1)
    if int(last) < int(first):
      raise ValueError(f"SLURM node list {nodelist!r}: range {item!r} runs backwards")
    width = len(first)
    values.extend(str(number).zfill(width) for number in range(int(first), int(last) + 1))
  return values


def expand_slurm_nodelist(nodelist: str) -> list[str]:
  """SLURM's compressed host list to host names: "gpu[01-03],gpu07" -> gpu01 gpu02 gpu03 gpu07.

  Several bracket groups in one name ("rack[1-2]-node[1-2]") expand as a product, in SLURM's order.
  """
  if not nodelist or not nodelist.strip():
    raise ValueError("SLURM node list is empty")
  hosts: list[str] = []
  for part in _split_top_level(nodelist.strip()):
    if not part:
      raise ValueError(f"SLURM node list {nodelist!r}: empty host name")
    names = [""]
    for piece in re.split(r"(\[[^\]]*\])", part):
      if piece.startswith("["):
        names = [name + value for name in names for value in _expand_range_group(piece[1:-1], nodelist)]
      elif piece:
        names = [name + piece for name in names]
    hosts.extend(names)
  return hosts


def first_slurm_host(nodelist: str) -> str:
  """The host that runs process 0 under srun, where the coordinator listens."""
  return expand_slurm_nodelist(nodelist)[0]


def _int_setting(value: int | str | None, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def resolve_settings(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *,
                     environ: Mapping[str, str] | None = None) -> DistributedSettings | None:
  """The explicit multi-process settings from arguments and environment; None when there are none.

  Pure (reads only `environ`), so every source and precedence rule is tested without starting jax.
  """
  env = os.environ if environ is None else environ
  slurm = "SLURM_PROCID" in env and "SLURM_NTASKS" in env
  slurm_nodelist = next((env[name] for name in _SLURM_NODELIST_VARS if env.get(name)), None)

  sources = {}  # field -> where its value came from, for the error message
  address = coordinator_address
  sources["coordinator address"] = "argument"
  if not address and env.get("JAX_COORDINATOR_ADDRESS"):
    address, sources["coordinator address"] = env["JAX_COORDINATOR_ADDRESS"], "JAX_COORDINATOR_ADDRESS"
  if not address and slurm and slurm_nodelist:
    port = _int_setting(env.get("JAX_COORDINATOR_PORT"), "JAX_COORDINATOR_PORT") or DEFAULT_COORDINATOR_PORT
    address = f"{first_slurm_host(slurm_nodelist)}:{port}"
    sources["coordinator address"] = "SLURM node list"

  count = _int_setting(num_processes, "num_processes")
  sources["process count"] = "argument"
  if count is None and env.get("JAX_NUM_PROCESSES"):
    count = _int_setting(env["JAX_NUM_PROCESSES"], "JAX_NUM_PROCESSES")
    sources["process count"] = "JAX_NUM_PROCESSES"
  if count is None and slurm:
    count, sources["process count"] = _int_setting(env["SLURM_NTASKS"], "SLURM_NTASKS"), "SLURM_NTASKS"

  index = _int_setting(process_id, "process_id")
  sources["process id"] = "argument"
  if index is None and env.get("JAX_PROCESS_ID"):
    index, sources["process id"] = _int_setting(env["JAX_PROCESS_ID"], "JAX_PROCESS_ID"), "JAX_PROCESS_ID"
  if index is None and slurm:
    index, sources["process id"] = _int_setting(env["SLURM_PROCID"], "SLURM_PROCID"), "SLURM_PROCID"

  values = {"coordinator address": address, "process count": count, "process id": index}
  if all(value is None for value in values.values()):
    return None
  if count == 1 and index in (None, 0):
    return DistributedSettings(mode="single")
  missing = [name for name, value in values.items() if value is None]
  if missing:
    given = ", ".join(f"{name} from {sources[name]}" for name, value in values.items() if value is not None)
    raise ValueError(
        f"multi-process run is missing its {' and '.join(missing)} (given: {given}); set "
        "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under srun")
  if ":" not in address:
    raise ValueError(f"coordinator address {address!r} (from {sources['coordinator address']}) "
                     "must be host:port")
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"process id {index} (from {sources['process id']}) must be in [0, {count}) "
                     f"for a process count of {count} (from {sources['process count']})")
  return DistributedSettings(mode="explicit", coordinator_address=address, num_processes=count,
                             process_id=index)


def on_cloud_tpu_vm() -> bool:
  """True where TPU chips are attached through PCI: a Cloud TPU VM.

  jax's own check (private, but it knows each new chip's PCI id); jax runs it at import to set up libtpu.
  """
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    num_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except (ImportError, AttributeError) as error:
    # A TPU pod still runs without jax.distributed (libtpu links the hosts), minus its extras.
    logging.warning("cannot tell whether this is a Cloud TPU VM (%s); not calling jax.distributed", error)
    return False
  return num_chips > 0


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> DistributedSettings:
  """Joins this process to the others of the run; call once, before anything touches a device.

  Calling it again after jax.distributed is up returns the settings in force and does nothing.
  """
  if jax.distributed.is_initialized():
    return DistributedSettings(mode="already", num_processes=jax.process_count(),
                               process_id=jax.process_index())
  settings = resolve_settings(coordinator_address, num_processes, process_id)
  if settings is None:
    if on_cloud_tpu_vm():
      jax.distributed.initialize()
      settings = DistributedSettings(mode="tpu", num_processes=jax.process_count(),
                                     process_id=jax.process_index())
    else:
      settings = DistributedSettings(mode="single")
  elif settings.mode == "explicit":
    # "deactivate": with the three values given, jax's own cluster detection must not also run, since
    # under srun it would pin each process to the GPU numbered SLURM_LOCALID (one GPU per host here).
    jax.distributed.initialize(coordinator_address=settings.coordinator_address,
                               num_processes=settings.num_processes, process_id=settings.process_id,
                               cluster_detection_method="deactivate")
  logging.info("distributed: %s", settings)
  return settings


def is_main_process() -> bool:
  """True on process 0, the one that writes logs, metrics and reports."""
  return jax.process_index() == 0
