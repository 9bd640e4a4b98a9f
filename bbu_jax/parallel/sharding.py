"""Device mesh, logical axis names and the rules that map them to mesh axes.

One vocabulary for the whole project. Code names dimensions logically; the config's `sharding_mode`
picks a rule table that maps each logical name to mesh axes of the mesh ("data", "fsdp", "tensor").

Logical axis names used on parameters:
  layers          the stacked-layer axis of scanned blocks (never sharded)
  vocab           token vocabulary (embedding rows, lm_head columns)
  embed           decoder hidden size
  mlp             decoder MLP intermediate size
  heads           decoder query heads * head_dim (q_proj out, o_proj in)
  kv_heads        decoder key/value heads * head_dim (k_proj/v_proj out)
  vision_embed    vision tower hidden size
  vision_mlp      vision MLP intermediate size
  vision_heads    vision q/k/v heads * head_dim (qkv out is 3 * vision_heads)
  patch           flattened patch (C * T * P * P)
  merger_mlp      patch-merger hidden size (vision_embed * merge_unit)
  lora_rank       LoRA rank
  det_embed, det_mlp, queries   detection head
Activations: batch, length, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab.
"""

from __future__ import annotations

import math

import jax
import jax.experimental.mesh_utils
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# (logical name, mesh axes) tables. A logical name missing from a table is replicated.
_TENSOR_RULES = (
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("det_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("batch", ("data", "fsdp")),
)

# zero2: parameters replicated across fsdp (only tensor-parallel); gradients and optimizer state
# are sharded over fsdp by `optimizer_rules`.
ZERO2_PARAM_RULES = _TENSOR_RULES
# fsdp: parameters sharded over fsdp too, on their embedding dimension.
FSDP_PARAM_RULES = _TENSOR_RULES + (
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("merger_mlp", "fsdp"),
    ("det_embed", "fsdp"),
)
# Gradients and optimizer state in both modes.
OPTIMIZER_RULES = FSDP_PARAM_RULES


def param_rules(mode: str):
  if mode == "zero2":
    return ZERO2_PARAM_RULES
  if mode == "fsdp":
    return FSDP_PARAM_RULES
  raise ValueError(f"sharding_mode must be 'zero2' or 'fsdp', got {mode!r}")


# --- Mesh and shardings ----------------------------------------------------------------------------


MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolves a (data, fsdp, tensor) config with at most one -1 (auto) against a device count."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  autos = [i for i, s in enumerate(sizes) if s == -1]
  if len(autos) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if autos:
    if num_devices % fixed:
      raise ValueError(f"mesh: fixed axes {dict(zip(MESH_AXES, sizes))} do not divide {num_devices} devices")
    sizes[autos[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"{num_devices} are present")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # noqa: BLE001 - CPU and odd topologies: a plain reshape is as good as any
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def logical_to_spec(logical_axes, shape, rules, mesh: Mesh) -> P:
  """PartitionSpec for one array: each logical name takes the first rule whose mesh axes are unused
  and divide that dimension; anything else is replicated."""
  table = {}
  for name, axes in rules:
    table.setdefault(name, axes)
  used, spec = set(), []
  for dim, name in zip(shape, logical_axes or (None,) * len(shape)):
    axes = table.get(name)
    if axes is None:
      spec.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if not axes or dim % size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def tree_shardings(tree, rules, mesh: Mesh):
  """NamedShardings for a pytree whose leaves are nnx Variables (logical names in their metadata)
  or plain arrays (replicated)."""

  def one(x):
    if isinstance(x, nnx.Variable):
      value = x.get_value()
      if not hasattr(value, "shape"):  # e.g. optax's MaskedNode: an empty subtree, nothing to place
        return x
      axes = x.get_metadata().get("out_sharding")
      return x.replace(NamedSharding(mesh, logical_to_spec(axes, value.shape, rules, mesh)))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  spec = [None] * ndim
  spec[batch_axis] = ("data", "fsdp")
  return NamedSharding(mesh, P(*spec))
