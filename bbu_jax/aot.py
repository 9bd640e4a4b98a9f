"""Compile before you rent: the real train step compiled for a TPU topology on a CPU-only machine.

  python -m bbu_jax.aot --config configs/qwen2_5_vl_3b.py --topology v5e:4x4 --topology v6e:2x4 [--batch_search]

No weights are read: the state and the batch are abstract (shapes, dtypes, shardings), libtpu compiles
the step for the topology's chips, and XLA's memory analysis says what one chip holds. FLOPs come from
an analytic count (XLA's cost analysis counts a scanned layer once), the step time from a stated MFU.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
from typing import Sequence

# The topology is only described, never opened: several processes may load libtpu at once, and one
# holding its lock file (any jax process on this machine without JAX_PLATFORMS=cpu) must not stop us.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402

from bbu_jax import config as config_lib  # noqa: E402
from bbu_jax.data import pipeline as pipeline_lib  # noqa: E402
from bbu_jax.models.config import Qwen25VLConfig  # noqa: E402
from bbu_jax.parallel import sharding  # noqa: E402
from bbu_jax.training import program as program_lib  # noqa: E402

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int
  peak_bf16_flops: float


# Keyed by jax's device_kind. HBM and bf16 peak per chip from Cloud TPU's published specifications.
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12),
}


def chip_for(device_kind: str) -> Chip:
  if device_kind not in CHIPS:
    raise ValueError(f"unknown TPU device kind {device_kind!r}; known: {', '.join(CHIPS)}")
  return CHIPS[device_kind]


# --- Analytic FLOPs ---------------------------------------------------------------------------------


def decoder_flops_per_row(model_config: Qwen25VLConfig, seq_len: int) -> dict[str, float]:
  """Forward FLOPs of one packed row of `seq_len` tokens: projections, attention, LM head.

  Attention counts the full seq_len x seq_len scores and values, as the XLA attention computes them
  (the causal and segment masks do not skip work).
  """
  t = model_config.text
  d, hd, heads, kv = t.hidden_size, t.head_dim, t.num_attention_heads, t.num_key_value_heads
  projections = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * t.intermediate_size
  return {
      "decoder": 2.0 * projections * t.num_hidden_layers * seq_len,
      "decoder_attention": 4.0 * seq_len * seq_len * heads * hd * t.num_hidden_layers,
      "lm_head": 2.0 * d * t.vocab_size * seq_len,
  }


def vision_flops_per_row(model_config: Qwen25VLConfig, patches: int) -> dict[str, float]:
  """Forward FLOPs of the vision tower over one row's patch budget (dense attention, every block)."""
  v = model_config.vision
  h = v.hidden_size
  merged_width = h * v.merge_unit
  per_block = 4 * h * h + 3 * h * v.intermediate_size  # qkv + proj, gated MLP
  return {
      "vision": 2.0 * patches * (v.patch_dim * h + per_block * v.depth)
                + 2.0 * (patches // v.merge_unit) * (merged_width * merged_width + merged_width * v.out_hidden_size),
      "vision_attention": 4.0 * patches * patches * h * v.depth,
  }


def train_flops_per_step(model_config: Qwen25VLConfig, *, rows: int, seq_len: int, patches: int,
                         head_params: int, head_tokens_per_row: int) -> dict[str, float]:
  """Model FLOPs of one training step over `rows` packed rows: 3 x forward (forward, and backward's
  two matmuls per forward one). Recomputation under remat is not counted, as MFU conventionally does.
  The detection head counts 2 FLOPs per parameter per query slot (it is small next to the decoder).
  """
  forward = {**decoder_flops_per_row(model_config, seq_len), **vision_flops_per_row(model_config, patches),
             "detection_head": 2.0 * head_params * head_tokens_per_row}
  return {name: 3.0 * rows * value for name, value in forward.items()}


# --- Compilation -----------------------------------------------------------------------------------


def shape_model_config(config) -> Qwen25VLConfig:
  """The model's shapes: a named size, or the config's small from-scratch model (its tokenizer's
  vocabulary taken as tokenizer_vocab_size; only shapes matter here)."""
  from bbu_jax import train  # pylint: disable=import-outside-toplevel
  if config.model_size or config.model_path:
    return train.build_model_config(config, None)
  vocab = config.tokenizer_vocab_size
  special = types.SimpleNamespace(image_token_id=vocab - 6, video_token_id=vocab - 5, vision_start_token_id=vocab - 4,
                                  vision_end_token_id=vocab - 3, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                  pad_token_id=0)
  return train.build_model_config(config, types.SimpleNamespace(vocab_size=vocab, special=special))


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def hbm_oom_temporaries(message: str) -> int | None:
  """Bytes of temporaries in the TPU compiler's out-of-memory error (it stops compiling and reports
  "the total memory required for HLO temporaries (493.99G) exceeds available HBM"); None if it is
  another error."""
  match = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)", message)
  if "RESOURCE_EXHAUSTED" not in message or match is None:
    return None
  return int(float(match.group(1)) * _UNITS[match.group(2)])


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    total += int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass
class Report:
  topology: str
  chips: int
  chip: Chip
  mesh: dict
  per_device_batch: int
  accumulation: int
  param_bytes: int
  optimizer_bytes: int
  batch_bytes: int
  temp_bytes: int
  total_bytes: int
  flops: dict
  mfu: float

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.chip.hbm_bytes

  @property
  def step_seconds(self) -> float:
    return sum(self.flops.values()) / (self.chips * self.chip.peak_bf16_flops * self.mfu)

  def lines(self) -> list[str]:
    g = lambda b: f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2**20:.1f} MiB"
    total_flops = sum(self.flops.values())
    parts = ", ".join(f"{k} {v / total_flops:.0%}" for k, v in self.flops.items() if v / total_flops >= 0.005)
    return [
        f"{self.topology}: {self.chips} x {self.chip.name} ({g(self.chip.hbm_bytes)} HBM each), mesh {self.mesh}, "
        f"{self.per_device_batch} rows per device x {self.accumulation} accumulation",
        f"  per chip: parameters {g(self.param_bytes)}, optimizer {g(self.optimizer_bytes)}, batch "
        f"{g(self.batch_bytes)}, activations/temporaries {g(self.temp_bytes)}, total {g(self.total_bytes)} of "
        f"{g(self.chip.hbm_bytes)}: {'fits' if self.fits else 'does not fit'}",
        f"  FLOPs per step {total_flops:.3e} ({parts}); at MFU {self.mfu:.2f}: {self.step_seconds:.2f} s per step",
    ]


class Compiler:
  """One topology: the program is built once; the step is lowered for any per-device batch."""

  def __init__(self, config, topology: str, mfu: float):
    from bbu_jax import train  # pylint: disable=import-outside-toplevel
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    self.config, self.topology, self.mfu = config, topology, mfu
    try:
      description = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as error:  # noqa: BLE001 - libtpu's own message says what is wrong with the name
      raise ValueError(f"--topology {topology!r}: libtpu cannot describe it ({type(error).__name__}: {error})") from None
    self.devices = description.devices
    self.chip = chip_for(self.devices[0].device_kind)
    without_data = config.copy_and_resolve_references()
    with without_data.unlocked():
      without_data.synthetic.enabled = True  # nothing is read: the data fields need not name files
    config_lib.validate(without_data, num_devices=len(self.devices))
    self.mesh = sharding.make_mesh(config.mesh, self.devices)
    self.model_config = shape_model_config(config)
    det_config = train.detection_config(config, self.model_config)
    self.program = program_lib.build_program(config, self.model_config, det_config, self.mesh, total_steps=1000,
                                             platform="tpu")
    self.state = self.program.abstract_sharded_state()
    # The rows the training pipeline would pack (patch budget derived from max_pixels as it does).
    self.packing_config = pipeline_lib.pipeline_config_from(config, self.model_config.vision, batch_size=1).packing
    trainable = dict(jax.tree_util.tree_flatten_with_path(self.program.abstract_state.trainable)[0])
    frozen = dict(jax.tree_util.tree_flatten_with_path(self.program.abstract_state.frozen)[0])
    self.head_params = sum(int(np.prod(v.shape)) for tree in (trainable, frozen) for p, v in tree.items()
                           if "detection" in jax.tree_util.keystr(p))
    self.head_tokens_per_row = (config.detection_num_queries * self.packing_config.samples_per_row
                                if det_config is not None else 0)

  def compile(self, per_device_batch: int) -> Report:
    accumulation = self.config.gradient_accumulation_steps
    data_parallel = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    rows = per_device_batch * data_parallel
    batch = program_lib.batch_spec(self.packing_config, self.model_config, rows, accumulation, self.mesh)
    param_bytes = per_device_bytes((self.state.trainable, self.state.frozen))
    optimizer_bytes, batch_bytes = per_device_bytes(self.state.opt_state), per_device_bytes(batch)
    try:
      memory = self.program.train_step.lower(self.state, batch).compile().memory_analysis()
      temp = int(memory.temp_size_in_bytes)
      # The state is donated: its outputs reuse the argument buffers (alias), so count them once.
      total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
               + temp + memory.generated_code_size_in_bytes)
    except jax.errors.JaxRuntimeError as error:
      temp = hbm_oom_temporaries(str(error))
      if temp is None:
        raise
      total = param_bytes + optimizer_bytes + batch_bytes + temp  # the compiler stopped: its own figure
    flops = train_flops_per_step(self.model_config, rows=rows * accumulation, seq_len=self.config.model_max_length,
                                 patches=self.packing_config.patch_budget, head_params=self.head_params,
                                 head_tokens_per_row=self.head_tokens_per_row)
    return Report(topology=self.topology, chips=len(self.devices), chip=self.chip, mesh=dict(self.mesh.shape),
                  per_device_batch=per_device_batch, accumulation=accumulation,
                  param_bytes=param_bytes, optimizer_bytes=optimizer_bytes, batch_bytes=batch_bytes,
                  temp_bytes=temp, total_bytes=int(total), flops=flops, mfu=self.mfu)


def largest_fitting_batch(try_batch, limit: int = 256) -> tuple[int, dict]:
  """Largest per-device batch b in [1, limit] with try_batch(b).fits (doubling, then bisection).

  Returns (0, reports) when even one row does not fit; `reports` maps each tried batch to its report.
  """
  reports = {}

  def fits(b):
    reports[b] = try_batch(b)
    return reports[b].fits

  if not fits(1):
    return 0, reports
  good, bad = 1, None
  while bad is None and good < limit:
    candidate = min(good * 2, limit)
    if fits(candidate):
      good = candidate
    else:
      bad = candidate
  if bad is None:
    return good, reports
  while bad - good > 1:
    middle = (good + bad) // 2
    if fits(middle):
      good = middle
    else:
      bad = middle
  return good, reports


def main(argv: Sequence[str] | None = None) -> int:
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "a config file with get_config()", lock_config=True)
  flags.DEFINE_multi_string("topology", None, "TPU topology, e.g. v5e:4x4, v5p:2x2x1, v6e:2x4 (repeatable)")
  flags.DEFINE_float("mfu", 0.4, "model FLOPs utilization assumed for the step time")
  flags.DEFINE_bool("batch_search", False, "also find the largest per-device batch that fits")

  def run(_):
    config = flags.FLAGS.config
    if config is None:
      raise config_lib.ConfigError("--config is required, e.g. --config configs/qwen2_5_vl_3b.py")
    if not flags.FLAGS.topology:
      raise config_lib.ConfigError("--topology is required, e.g. --topology v5e:4x4")
    if not 0 < flags.FLAGS.mfu <= 1:
      raise config_lib.ConfigError(f"--mfu must be in (0, 1], got {flags.FLAGS.mfu}")
    for topology in flags.FLAGS.topology:
      compiler = Compiler(config, topology, flags.FLAGS.mfu)
      print("\n".join(compiler.compile(config.per_device_train_batch_size).lines()), flush=True)
      if flags.FLAGS.batch_search:
        best, reports = largest_fitting_batch(compiler.compile)
        if best == 0:
          print(f"  batch search: not even 1 row per device fits ({reports[1].total_bytes / GiB:.2f} GiB)")
        else:
          report = reports[best]
          print(f"  batch search: largest per-device batch that fits is {best} ({report.total_bytes / GiB:.2f} "
                f"GiB; {report.step_seconds:.2f} s per step at MFU {report.mfu:.2f}); tried "
                + ", ".join(f"{b}:{'fits' if r.fits else 'no'}" for b, r in sorted(reports.items())), flush=True)

  app.run(run, argv=list(sys.argv if argv is None else [sys.argv[0], *argv]))
  return 0


if __name__ == "__main__":
  main()
