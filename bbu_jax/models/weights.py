"""Hugging Face <-> bbu_jax weights: tensor names, streamed loading, the bbu_jax checkpoint, safetensors export.

Loading validates the whole checkpoint (config, shard files, every tensor name and shape) from the
safetensors headers before building anything, then fills one parameter at a time from tensors read one
by one, so host memory holds the model plus one parameter buffer, never a second copy of the weights.
Export writes the published key layout (`model.*`, `visual.*`, `lm_head.*`) that transformers 4 and 5
both load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import re
import shutil
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from bbu_jax.models import vision as vision_lib
from bbu_jax.models.config import Qwen25VLConfig
from bbu_jax.models.qwen2_5_vl import PretrainedQwen25VL, Qwen25VL

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PARAMS_DIR = "params"  # the orbax item inside a bbu_jax checkpoint directory
# Tokenizer and processor files an export copies from a source directory when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "processor_config.json", "chat_template.json", "chat_template.jinja")

# --- Tensor names ---------------------------------------------------------------------------------

# HF suffix inside `model.layers.{i}.` -> (our path inside language_model.layers, kind).
_TEXT_LAYER_PARAMS = {
    "self_attn.q_proj.weight": (("self_attn", "q_proj", "kernel"), "linear"),
    "self_attn.q_proj.bias": (("self_attn", "q_proj", "bias"), "same"),
    "self_attn.k_proj.weight": (("self_attn", "k_proj", "kernel"), "linear"),
    "self_attn.k_proj.bias": (("self_attn", "k_proj", "bias"), "same"),
    "self_attn.v_proj.weight": (("self_attn", "v_proj", "kernel"), "linear"),
    "self_attn.v_proj.bias": (("self_attn", "v_proj", "bias"), "same"),
    "self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"), "linear"),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), "linear"),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), "linear"),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), "linear"),
    "input_layernorm.weight": (("input_layernorm", "scale"), "same"),
    "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), "same"),
}
_TEXT_TOP_PARAMS = {
    "model.embed_tokens.weight": (("language_model", "embed_tokens", "embedding"), "same"),
    "model.norm.weight": (("language_model", "norm", "scale"), "same"),
    "lm_head.weight": (("lm_head", "kernel"), "linear"),
}
_TEXT_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some older exports carry; never parameters.
_IGNORED_KEY = re.compile(r".*rotary_emb\.inv_freq$")


def canonical_key(key: str) -> str:
  """A tensor name in the published layout: transformers 5's `model.language_model.*` -> `model.*`,
  `model.visual.*` -> `visual.*`; published names are returned unchanged."""
  if key.startswith("model.language_model."):
    return "model." + key[len("model.language_model."):]
  if key.startswith("model.visual."):
    return key[len("model."):]
  return key


def text_torch_shapes(config: Qwen25VLConfig) -> dict[str, tuple[int, ...]]:
  """Every decoder tensor (published names) with its torch shape; lm_head only when embeddings are untied."""
  t = config.text
  q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
  d, inner = t.hidden_size, t.intermediate_size
  layer = {
      "self_attn.q_proj.weight": (q, d), "self_attn.q_proj.bias": (q,),
      "self_attn.k_proj.weight": (kv, d), "self_attn.k_proj.bias": (kv,),
      "self_attn.v_proj.weight": (kv, d), "self_attn.v_proj.bias": (kv,),
      "self_attn.o_proj.weight": (d, q),
      "mlp.gate_proj.weight": (inner, d), "mlp.up_proj.weight": (inner, d), "mlp.down_proj.weight": (d, inner),
      "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
  }
  shapes = {"model.embed_tokens.weight": (t.vocab_size, d)}
  for i in range(t.num_hidden_layers):
    shapes.update({f"model.layers.{i}.{suffix}": shape for suffix, shape in layer.items()})
  shapes["model.norm.weight"] = (d,)
  if not config.tie_word_embeddings:
    shapes["lm_head.weight"] = (t.vocab_size, d)
  return shapes


def hf_torch_shapes(config: Qwen25VLConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor of the whole model in the published layout, with its torch shape."""
  shapes = text_torch_shapes(config)
  shapes.update({"visual." + k: v for k, v in vision_lib.vision_torch_shapes(config.vision).items()})
  return shapes


def _to_ours(kind: str, array: np.ndarray) -> np.ndarray:
  return array.T if kind == "linear" else array


def _text_destination(key: str) -> tuple[tuple[str, ...], int | None, str]:
  if key in _TEXT_TOP_PARAMS:
    path, kind = _TEXT_TOP_PARAMS[key]
    return path, None, kind
  layer, suffix = _TEXT_LAYER_KEY.fullmatch(key).groups()
  path, kind = _TEXT_LAYER_PARAMS[suffix]
  return ("language_model", "layers") + path, int(layer), kind


def param_from_hf(key: str, array: np.ndarray, config: Qwen25VLConfig) -> tuple[tuple[str, ...], int | None, np.ndarray]:
  """One HF tensor (published name, checked shape) -> (our param path, stacked layer or None, our layout)."""
  if key.startswith("visual."):
    path, layer, ours = vision_lib.vision_param_from_torch(key[len("visual."):], array, config.vision)
    return ("visual",) + tuple(path), layer, ours
  path, layer, kind = _text_destination(key)
  return path, layer, _to_ours(kind, array)


def params_to_hf(pure: Mapping, config: Qwen25VLConfig) -> Iterator[tuple[str, np.ndarray]]:
  """Our param pure dict -> (published HF name, torch-layout numpy array), one tensor at a time."""
  layers_by_path = {path: (suffix, kind) for suffix, (path, kind) in _TEXT_LAYER_PARAMS.items()}
  top_by_path = {path: (key, kind) for key, (path, kind) in _TEXT_TOP_PARAMS.items()}
  for path, value in _leaves(pure):
    array = np.asarray(value)
    if path[0] == "visual":
      for key, torch_array in vision_lib.vision_param_to_torch(path[1:], array, config.vision):
        yield "visual." + key, torch_array
    elif path[:2] == ("language_model", "layers"):
      suffix, kind = layers_by_path[path[2:]]
      for i in range(array.shape[0]):
        yield f"model.layers.{i}.{suffix}", np.ascontiguousarray(_to_ours(kind, array[i]))
    elif path in top_by_path:
      key, kind = top_by_path[path]
      yield key, np.ascontiguousarray(_to_ours(kind, array))
    else:
      raise ValueError(f"param {'/'.join(path)} has no Hugging Face counterpart")


def _leaves(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  for name, child in tree.items():
    path = prefix + (str(name),)
    if isinstance(child, Mapping):
      yield from _leaves(child, path)
    elif child is not None:
      yield path, child.get_value() if isinstance(child, nnx.Variable) else child


# --- Reading a Hugging Face directory ----------------------------------------------------------------


def read_config(directory: str | pathlib.Path) -> Qwen25VLConfig:
  """The Qwen25VLConfig of a checkpoint directory's config.json; ValueError naming the file otherwise."""
  directory = pathlib.Path(directory)
  config_file = directory / "config.json"
  if not directory.is_dir():
    raise ValueError(f"{directory}: not a directory")
  if not config_file.is_file():
    raise ValueError(f"{config_file}: missing; {directory} is not a Hugging Face Qwen2.5-VL checkpoint")
  try:
    raw = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_file}: not valid JSON ({e})") from None
  try:
    return Qwen25VLConfig.from_hf_dict(raw)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{config_file}: not a Qwen2.5-VL config: {e}") from None


@dataclasses.dataclass(frozen=True)
class TensorSource:
  file: pathlib.Path
  name: str  # the name inside the file (either layout)
  shape: tuple[int, ...]


def scan_hf_checkpoint(directory: str | pathlib.Path, config: Qwen25VLConfig) -> dict[str, TensorSource]:
  """Published name -> where to read it, after checking every file, name and shape from headers alone.

  Raises ONE ValueError listing the problems (missing shard file, missing tensor, unexpected tensor,
  wrong shape), each naming its file and tensor. Reads no tensor data.
  """
  directory = pathlib.Path(directory)
  problems: list[str] = []
  index_file = directory / INDEX_FILE
  if index_file.is_file():
    try:
      weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index_file}: unreadable index ({type(e).__name__}: {e})") from None
    files: dict[str, list[str]] = {}
    for name, file_name in weight_map.items():
      files.setdefault(file_name, []).append(name)
  elif (directory / SINGLE_FILE).is_file():
    files = {SINGLE_FILE: None}
  else:
    raise ValueError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE}: no safetensors weights to load")

  found: dict[str, TensorSource] = {}
  in_missing_shards: set[str] = set()
  for file_name, indexed_names in files.items():
    path = directory / file_name
    if not path.is_file():
      in_missing_shards.update(canonical_key(name) for name in indexed_names)
      problems.append(f"{path}: shard file missing (named in {INDEX_FILE} for tensor {indexed_names[0]!r}"
                      f"{f' and {len(indexed_names) - 1} more' if len(indexed_names) > 1 else ''})")
      continue
    try:
      with safe_open(str(path), framework="numpy") as f:
        header = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable header is reported with its file
      problems.append(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})")
      continue
    for name in indexed_names or ():
      if name not in header:
        problems.append(f"{path}: tensor {name!r} is named in {INDEX_FILE} but absent from the file")
    for name, shape in header.items():
      if indexed_names is not None and name not in weight_map:
        continue  # stray tensors an index does not point at are not part of the checkpoint
      if indexed_names is not None and weight_map[name] != file_name:
        continue
      key = canonical_key(name)
      if key in found:
        problems.append(f"{path}: tensor {name!r} duplicates {found[key].name!r} in {found[key].file}")
        continue
      found[key] = TensorSource(path, name, shape)

  expected = hf_torch_shapes(config)
  for key, source in found.items():
    if _IGNORED_KEY.match(key):
      continue
    if key not in expected:
      if key == "lm_head.weight" and config.tie_word_embeddings:
        continue  # a tied checkpoint may still store the (identical) head
      problems.append(f"{source.file}: unexpected tensor {source.name!r} (not part of this Qwen2.5-VL config)")
    elif source.shape != expected[key]:
      problems.append(f"{source.file}: tensor {source.name!r} has shape {source.shape}, expected "
                      f"{expected[key]} from config.json")
  listing = index_file if index_file.is_file() else directory / SINGLE_FILE
  for key in expected:
    if key not in found and key not in in_missing_shards:
      problems.append(f"{listing}: tensor {key!r} is missing from the checkpoint")
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ValueError(f"{directory}: cannot load this checkpoint ({len(problems)} problem(s)):\n  {shown}{more}")
  return {key: found[key] for key in expected}


# --- Building the model abstractly and filling it ------------------------------------------------------


def abstract_model(config: Qwen25VLConfig, *, dtype=jnp.float32, param_dtype=None, remat_policy: str = "none",
                   attention_impl: str = "xla") -> Qwen25VL:
  """The model with ShapeDtypeStruct parameters (no memory), carrying logical axis names."""
  param_dtype = dtype if param_dtype is None else param_dtype
  return nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                         remat_policy=remat_policy, attention_impl=attention_impl))


ShardingSpec = Callable[[tuple[str, ...], jax.ShapeDtypeStruct], jax.sharding.Sharding] | Mapping | None


def _sharding_for(shardings: ShardingSpec, path: tuple[str, ...], abstract: jax.ShapeDtypeStruct):
  """The target sharding of one param: from a callable, an nnx.State of shardings (e.g.
  bbu_jax.parallel.sharding.tree_shardings of the abstract params) or a nested dict of them."""
  if shardings is None:
    return None
  if callable(shardings) and not isinstance(shardings, Mapping):
    return shardings(path, abstract)
  node = shardings
  for name in path:
    node = node[name]
  return node.get_value() if isinstance(node, nnx.Variable) else node


def _place(buffer: np.ndarray, sharding) -> jax.Array:
  """The host buffer as a jax.Array with `sharding`; each process supplies only its own shards, so
  this also works across hosts."""
  if sharding is None:
    return jnp.asarray(buffer)
  return jax.make_array_from_callback(buffer.shape, sharding, lambda index: buffer[index])


def _param_state(model: nnx.Module) -> nnx.State:
  """The model's parameters; loading fills nothing else, so other state is refused."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  del graphdef
  if jax.tree.leaves(rest):
    raise ValueError(f"model holds non-parameter state that loading cannot fill: {rest}")
  return params


def load_hf_params(directory: str | pathlib.Path, config: Qwen25VLConfig, abstract: Qwen25VL, *,
                   shardings: ShardingSpec = None) -> dict:
  """Reads a validated HF directory into a pure dict of arrays shaped and typed like `abstract`'s params.

  Each parameter is assembled in one numpy buffer (stacked layers slice by slice), placed with its
  sharding (`shardings`: a callable (path, ShapeDtypeStruct) -> Sharding, an nnx.State of shardings
  or a nested dict of them), and the buffer dropped before the next.
  """
  sources = scan_hf_checkpoint(directory, config)
  # Group tensors by destination without reading them: the mapping only needs names and shapes.
  plan: dict[tuple[str, ...], list[tuple[int | None, str, str]]] = {}
  for key in sources:
    if key.startswith("visual."):
      dummy = np.broadcast_to(np.zeros((), np.float32), sources[key].shape)
      path, layer, _ = vision_lib.vision_param_from_torch(key[len("visual."):], dummy, config.vision)
      path, kind = ("visual",) + tuple(path), "vision"
    else:
      path, layer, kind = _text_destination(key)
    plan.setdefault(path, []).append((layer, key, kind))

  abstract_leaves = dict(_leaves(_param_state(abstract).to_pure_dict()))
  if set(plan) != set(abstract_leaves):
    raise ValueError(f"internal: HF tensors map to {sorted(set(plan) ^ set(abstract_leaves))} that the model "
                     "lacks or that no tensor fills")
  pure: dict = {}
  with contextlib.ExitStack() as stack:
    handles: dict[pathlib.Path, Any] = {}

    def read(source: TensorSource) -> np.ndarray:
      if source.file not in handles:
        handles[source.file] = stack.enter_context(safe_open(str(source.file), framework="numpy"))
      return handles[source.file].get_tensor(source.name)

    for path, entries in plan.items():
      target = abstract_leaves[path]
      buffer = np.empty(target.shape, dtype=np.dtype(target.dtype))
      for layer, key, kind in entries:
        array = read(sources[key])
        if kind == "vision":
          ours = vision_lib.vision_param_from_torch(key[len("visual."):], array, config.vision)[2]
        else:
          ours = _to_ours(kind, array)
        if layer is None:
          buffer[...] = ours
        else:
          buffer[layer] = ours
        del array, ours
      node = pure
      for name in path[:-1]:
        node = node.setdefault(name, {})
      node[path[-1]] = _place(buffer, _sharding_for(shardings, path, target))
      del buffer
  return pure


def _merge(abstract: Qwen25VL, pure: Mapping) -> Qwen25VL:
  graphdef, params = nnx.split(abstract, nnx.Param)
  nnx.replace_by_pure_dict(params, pure)
  return nnx.merge(graphdef, params)


# --- The bbu_jax checkpoint: config.json + an orbax tree of the param state ------------------------------


def is_bbu_checkpoint(directory: str | pathlib.Path) -> bool:
  return (pathlib.Path(directory) / PARAMS_DIR).is_dir()


def save_checkpoint(model_or_params, config: Qwen25VLConfig, out_dir: str | pathlib.Path, *,
                    source_dir: str | pathlib.Path | None = None) -> pathlib.Path:
  """Writes the bbu_jax checkpoint: `out_dir/config.json` (HF style) and `out_dir/params` (orbax).

  Tokenizer/processor files and generation_config.json of `source_dir` are copied beside them, so
  the directory is self-contained and an export from it carries them on.

  Under jax.distributed EVERY process must call this (parameters sharded across processes are written
  by the processes that hold them; orbax coordinates them); process 0 alone writes the other files.
  """
  import orbax.checkpoint as ocp
  out_dir = pathlib.Path(out_dir).absolute()
  out_dir.mkdir(parents=True, exist_ok=True)
  pure = _pure_params(model_or_params)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(out_dir / PARAMS_DIR, pure, force=True)
  if jax.process_index() != 0:
    return out_dir
  (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
  if source_dir is not None:
    copy_tokenizer_files(source_dir, out_dir)
    if (pathlib.Path(source_dir) / "generation_config.json").is_file():
      shutil.copyfile(pathlib.Path(source_dir) / "generation_config.json", out_dir / "generation_config.json")
  return out_dir


def load_checkpoint_params(directory: str | pathlib.Path, config: Qwen25VLConfig, abstract: Qwen25VL, *,
                           shardings: ShardingSpec = None) -> dict:
  """Restores `directory/params` into abstract's shapes and dtypes (cast on restore), checked first."""
  import orbax.checkpoint as ocp
  params_dir = pathlib.Path(directory).absolute() / PARAMS_DIR
  expected = dict(_leaves(_param_state(abstract).to_pure_dict()))
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      stored_tree = checkpointer.metadata(params_dir).item_metadata.tree
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets one message with its path
      raise ValueError(f"{params_dir}: not a readable bbu_jax checkpoint ({type(e).__name__}: {e})") from None
    stored = {path: meta for path, meta in _leaves(stored_tree)}
    problems = [f"{params_dir}: param {'/'.join(p)} is missing" for p in expected if p not in stored]
    problems += [f"{params_dir}: unexpected param {'/'.join(p)}" for p in stored if p not in expected]
    problems += [f"{params_dir}: param {'/'.join(p)} has shape {tuple(stored[p].shape)}, expected "
                 f"{tuple(expected[p].shape)} from config.json"
                 for p in expected if p in stored and tuple(stored[p].shape) != tuple(expected[p].shape)]
    if problems:
      raise ValueError(f"{directory}: cannot load this checkpoint:\n  " + "\n  ".join(problems[:20]))
    target: dict = {}
    for path, leaf in expected.items():
      node = target
      for name in path[:-1]:
        node = node.setdefault(name, {})
      sharding = _sharding_for(shardings, path, leaf) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
      node[path[-1]] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return checkpointer.restore(params_dir, target)


# --- Public entry points -----------------------------------------------------------------------------


def load_model(path: str | pathlib.Path, *, dtype=jnp.float32, param_dtype=None, shardings: ShardingSpec = None,
               remat_policy: str = "none", attention_impl: str = "xla") -> tuple[Qwen25VL, Qwen25VLConfig]:
  """(Qwen25VL module, config) from a Hugging Face directory or a bbu_jax checkpoint directory.

  `dtype` is the compute dtype and, unless `param_dtype` says otherwise, the storage dtype.
  """
  path = pathlib.Path(path)
  if (path / "bbu_jax.json").is_file():  # a trained model: its detection head and LoRA come along
    from bbu_jax.models import bbu_model  # bbu_model builds on this module
    model = bbu_model.load(path, dtype=dtype, param_dtype=param_dtype, shardings=shardings,
                           remat_policy=remat_policy, attention_impl=attention_impl)
    return model, model.config
  config = read_config(path)
  abstract = abstract_model(config, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy,
                            attention_impl=attention_impl)
  if is_bbu_checkpoint(path):
    pure = load_checkpoint_params(path, config, abstract, shardings=shardings)
  else:
    pure = load_hf_params(path, config, abstract, shardings=shardings)
  return _merge(abstract, pure), config


def load_pretrained(path: str | pathlib.Path, dtype=jnp.float32, *, param_dtype=None, shardings: ShardingSpec = None,
                    remat_policy: str = "none", attention_impl: str = "xla") -> PretrainedQwen25VL:
  """The DESIGN.md contract: a callable model(input_ids, attention_mask=None, pixel_values=None,
  image_grid_thw=None) -> logits (B, S, vocab), from an HF Qwen2.5-VL directory or a bbu_jax checkpoint."""
  model, config = load_model(path, dtype=dtype, param_dtype=param_dtype, shardings=shardings,
                             remat_policy=remat_policy, attention_impl=attention_impl)
  return PretrainedQwen25VL(model, config)


# --- Export -------------------------------------------------------------------------------------------

_EXPORT_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def _pure_params(model_or_params) -> dict:
  if isinstance(model_or_params, PretrainedQwen25VL):
    model_or_params = model_or_params.model
  if isinstance(model_or_params, nnx.Module):
    # Only parameters are exported; other state (RNG streams, caches) has no HF counterpart.
    return nnx.state(model_or_params, nnx.Param).to_pure_dict()
  if isinstance(model_or_params, nnx.State):
    return model_or_params.to_pure_dict()
  if isinstance(model_or_params, Mapping):
    return dict(model_or_params)
  raise TypeError(f"expected a Qwen25VL model, its param State or pure dict, got {type(model_or_params).__name__}")


def parse_size(size: int | str) -> int:
  """Bytes from an int or a string such as "5GB", "500MB", "2GiB"."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
  if not match:
    raise ValueError(f"max_shard_size {size!r} is not a size such as '5GB' or '500MB'")
  number, unit = float(match.group(1)), match.group(2).rstrip("B")
  factor = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
  return int(number * factor)


def copy_tokenizer_files(source_dir: str | pathlib.Path, out_dir: str | pathlib.Path) -> list[str]:
  """Copies the tokenizer/processor files present in source_dir; returns their names."""
  source_dir, out_dir = pathlib.Path(source_dir), pathlib.Path(out_dir)
  copied = []
  for name in TOKENIZER_FILES:
    if (source_dir / name).is_file() and (source_dir / name).resolve() != (out_dir / name).resolve():
      shutil.copyfile(source_dir / name, out_dir / name)
      copied.append(name)
  return copied


def _generation_config(config: Qwen25VLConfig) -> dict:
  return {
      "bos_token_id": config.bos_token_id,
      "pad_token_id": config.pad_token_id,
      "eos_token_id": sorted({config.eos_token_id, config.bos_token_id}),
  }


def save_hf(model_or_params, config: Qwen25VLConfig, out_dir: str | pathlib.Path, *, dtype: str = "bfloat16",
            max_shard_size: int | str = "5GB", source_dir: str | pathlib.Path | None = None,
            transform_params: Callable[[dict], dict] | None = None) -> pathlib.Path:
  """Writes a Hugging Face Qwen2.5-VL directory transformers loads with from_pretrained.

  Sharded safetensors in the published key layout with model.safetensors.index.json, config.json,
  generation_config.json (copied from `source_dir` when it has one), and the tokenizer/processor
  files of `source_dir`. `transform_params` maps the param pure dict before export (e.g. merging
  LoRA adapters into their base weights). Tensors are converted one at a time, one shard in memory.
  """
  if dtype not in _EXPORT_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(_EXPORT_DTYPES)}, got {dtype!r}")
  extensions = [name for name in ("absolute_positions", "output_positions") if getattr(config.vision, name)]
  if extensions:
    raise ValueError(f"this model's vision tower adds absolute position embeddings (vision {', '.join(extensions)}, "
                     "a bbu_jax extension); transformers' Qwen2.5-VL has no place for them, so it cannot be "
                     "exported to Hugging Face format: keep it as a bbu_jax checkpoint")
  np_dtype = np.dtype(_EXPORT_DTYPES[dtype])
  limit = parse_size(max_shard_size)
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  for stale in list(out_dir.glob("model*.safetensors")) + [out_dir / INDEX_FILE]:
    stale.unlink(missing_ok=True)
  pure = _pure_params(model_or_params)
  if transform_params is not None:
    pure = transform_params(pure)

  # Plan shards from shapes alone, then materialize one shard at a time.
  expected = hf_torch_shapes(config)
  shards: list[list[str]] = [[]]
  shard_bytes = 0
  for key, shape in expected.items():
    size = int(np.prod(shape)) * np_dtype.itemsize
    if shards[-1] and shard_bytes + size > limit:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(key)
    shard_bytes += size
  file_of = {key: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
             for i, keys in enumerate(shards) for key in keys}

  shard_sizes = {file_of[keys[0]]: len(keys) for keys in shards}
  pending: dict[str, dict[str, np.ndarray]] = {}
  produced: set[str] = set()
  total = 0
  for key, array in params_to_hf(pure, config):
    if key not in file_of:
      raise ValueError(f"export produced tensor {key!r} that config.json does not describe")
    if tuple(array.shape) != expected[key]:
      raise ValueError(f"export: tensor {key!r} has shape {tuple(array.shape)}, expected {expected[key]}")
    produced.add(key)
    file_name = file_of[key]
    pending.setdefault(file_name, {})[key] = np.ascontiguousarray(array.astype(np_dtype))
    total += pending[file_name][key].nbytes
    if len(pending[file_name]) == shard_sizes[file_name]:
      save_file(pending.pop(file_name), str(out_dir / file_name), metadata={"format": "pt"})
  missing = sorted(set(expected) - produced)
  if missing:
    raise ValueError(f"export: the params lack tensor {missing[0]!r} ({len(missing)} missing)")
  (out_dir / INDEX_FILE).write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": file_of}, indent=2) + "\n")

  hf_config = config.to_hf_dict()
  hf_config["torch_dtype"] = dtype
  (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  source_generation = pathlib.Path(source_dir) / "generation_config.json" if source_dir is not None else None
  if source_generation is not None and source_generation.is_file():
    shutil.copyfile(source_generation, out_dir / "generation_config.json")
  else:
    (out_dir / "generation_config.json").write_text(json.dumps(_generation_config(config), indent=2) + "\n")
  if source_dir is not None:
    copy_tokenizer_files(source_dir, out_dir)
  return out_dir
