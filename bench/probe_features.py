"""Linear probes on a trained model's merged vision features, against the same architecture freshly
initialized: does training make the features say WHERE objects are?

  JAX_PLATFORMS=cpu python bench/probe_features.py --model runs/exp/model --data_root data/synthetic

For each merged vision token of the first `--num_images` training images: is its centre inside an
annotated object, and which row / column of the merged grid it is. Ridge regressions fitted on 70% of
the tokens, scored on the rest (accuracy for inside/outside, mean absolute error in tokens for row and
column). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bbu_jax.data import images as images_lib  # noqa: E402
from bbu_jax.data import records as records_lib  # noqa: E402
from bbu_jax.models import bbu_model  # noqa: E402
from bbu_jax.models import vision as vision_lib  # noqa: E402


def token_features(model, image_config, data_root: pathlib.Path, records) -> dict[str, np.ndarray]:
  """Merged features, inside-an-object labels and grid rows / columns of every token of `records`."""
  vision_config = model.config.vision
  merge = vision_config.spatial_merge_size
  run = nnx.jit(lambda m, pixels, meta: m.visual(pixels, meta))
  out = {"features": [], "inside": [], "row": [], "col": []}
  for record in records:
    pixels, grid = images_lib.process_image(images_lib.load_image(data_root / record["images"][0]), image_config)
    budget = -(-len(pixels) // 64) * 64
    meta = vision_lib.vision_metadata(np.array([grid]), budget, vision_config)
    padded = np.zeros((1, budget, pixels.shape[1]), np.float32)
    padded[0, :len(pixels)] = pixels
    features = np.asarray(run(model, jnp.asarray(padded), {k: jnp.asarray(v)[None] for k, v in meta.items()}))[0]
    rows, cols = grid[1] // merge, grid[2] // merge
    boxes = np.array([records_lib.object_box(o) for o in record["objects"]], float).reshape(-1, 4)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    cy = (r.reshape(-1) + 0.5) / rows * record["height"]
    cx = (c.reshape(-1) + 0.5) / cols * record["width"]
    inside = ((cx[:, None] >= boxes[:, 0]) & (cx[:, None] <= boxes[:, 2])
              & (cy[:, None] >= boxes[:, 1]) & (cy[:, None] <= boxes[:, 3])).any(1)
    out["features"].append(features[:rows * cols])
    out["inside"].append(inside)
    out["row"].append(r.reshape(-1))
    out["col"].append(c.reshape(-1))
  return {k: np.concatenate(v) for k, v in out.items()}


def _ridge(x: np.ndarray, y: np.ndarray, lam: float = 1e-3) -> np.ndarray:
  a = np.c_[x, np.ones(len(x))]
  return np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ y)


def probes(data: dict[str, np.ndarray]) -> dict[str, float]:
  x = data["features"].astype(np.float64)
  train = np.arange(len(x)) < 0.7 * len(x)
  predict = lambda w: np.c_[x[~train], np.ones((~train).sum())] @ w
  inside = data["inside"].astype(np.float64)
  result = {"inside_accuracy": float(((predict(_ridge(x[train], inside[train])) > 0.5) == data["inside"][~train]).mean()),
            "inside_chance": float(max(inside[~train].mean(), 1 - inside[~train].mean()))}
  for name in ("row", "col"):
    y = data[name].astype(np.float64)
    result[f"{name}_error_tokens"] = float(np.abs(predict(_ridge(x[train], y[train])) - y[~train]).mean())
    result[f"{name}_error_of_mean"] = float(np.abs(y[~train] - y[train].mean()).mean())
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="a bbu_jax model folder (e.g. runs/exp/model)")
  parser.add_argument("--data_root", default="data/synthetic")
  parser.add_argument("--num_images", type=int, default=200)
  parser.add_argument("--min_pixels", type=int, default=4 * 28 * 28)
  parser.add_argument("--max_pixels", type=int, default=64 * 28 * 28)
  args = parser.parse_args(argv)
  data_root = pathlib.Path(args.data_root)
  records = records_lib.load_records(data_root / "train.jsonl")[0][:args.num_images]
  image_config = images_lib.ImageProcessorConfig(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
  trained = bbu_model.load(args.model)
  fresh = bbu_model.BBUModel(trained.config, detection=trained.detection_config, rngs=nnx.Rngs(1))
  results = {}
  for name, model in (("trained", trained), ("initial", fresh)):
    results[name] = probes(token_features(model, image_config, data_root, records))
    r = results[name]
    print(f"{name:8s} features: inside-an-object accuracy {r['inside_accuracy']:.3f} (majority class "
          f"{r['inside_chance']:.3f}); row error {r['row_error_tokens']:.2f} tokens, column error "
          f"{r['col_error_tokens']:.2f} (predicting the mean: {r['row_error_of_mean']:.2f}, "
          f"{r['col_error_of_mean']:.2f})")
  print(json.dumps(results))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
