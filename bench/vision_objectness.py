"""How fast can the demo's vision tower alone learn where objects are? A diagnostic, not a competitor bench.

  JAX_PLATFORMS=cpu python bench/vision_objectness.py [--data_root data/synthetic] [--steps 600]

The tower of configs/exp.py (with its absolute positions) plus one linear readout per merged token is
trained with Adam on "is this token's centre inside an annotated object" (binary cross-entropy), 16
images per step, on the first 350 training images; accuracy is then measured on the next 50 images.
This is the easiest signal the tower could get (direct, dense supervision, no language model), so its
learning speed bounds what the whole demo can do in its step budget. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bbu_jax.data import images as images_lib  # noqa: E402
from bbu_jax.data import records as records_lib  # noqa: E402
from bbu_jax.models import vision as vision_lib  # noqa: E402
from bbu_jax.models.config import VisionConfig  # noqa: E402
from bbu_jax.models.layers import Linear  # noqa: E402

VISION = VisionConfig(depth=2, hidden_size=64, num_heads=2, intermediate_size=192, window_size=112,
                      fullatt_block_indexes=(1,), out_hidden_size=128, absolute_positions=True)
IMAGES = images_lib.ImageProcessorConfig(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
BUDGET = 256  # patches per image (the demo's images have at most 64 merged tokens)


def image_example(record: dict, data_root: pathlib.Path):
  pixels, grid = images_lib.process_image(images_lib.load_image(data_root / record["images"][0]), IMAGES)
  meta = vision_lib.vision_metadata(np.array([grid]), BUDGET, VISION)
  padded = np.zeros((BUDGET, pixels.shape[1]), np.float32)
  padded[:len(pixels)] = pixels
  rows, cols = grid[1] // 2, grid[2] // 2
  r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  cy = (r.reshape(-1) + 0.5) / rows * record["height"]
  cx = (c.reshape(-1) + 0.5) / cols * record["width"]
  boxes = np.array([records_lib.object_box(o) for o in record["objects"]], float).reshape(-1, 4)
  labels = np.zeros(BUDGET // 4, np.float32)
  mask = np.zeros(BUDGET // 4, np.float32)
  labels[:rows * cols] = ((cx[:, None] >= boxes[:, 0]) & (cx[:, None] <= boxes[:, 2])
                          & (cy[:, None] >= boxes[:, 1]) & (cy[:, None] <= boxes[:, 3])).any(1)
  mask[:rows * cols] = 1
  return padded, meta, labels, mask


class Probe(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.tower = vision_lib.VisionTower(VISION, rngs=rngs)
    self.readout = Linear(VISION.out_hidden_size, 1, axes=(None, None), use_bias=True, rngs=rngs,
                          std=VISION.out_hidden_size ** -0.5)

  def __call__(self, pixels, meta):
    return self.readout(self.tower(pixels, meta))[..., 0]


def stack(examples):
  pixels, metas, labels, masks = zip(*examples)
  return (jnp.asarray(np.stack(pixels)), {k: jnp.asarray(np.stack([m[k] for m in metas])) for k in metas[0]},
          jnp.asarray(np.stack(labels)), jnp.asarray(np.stack(masks)))


def accuracy(logits, labels, mask):
  return (((logits > 0) == (labels > 0.5)) * mask).sum() / mask.sum()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_root", default="data/synthetic")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--learning_rate", type=float, default=3e-3)
  args = parser.parse_args(argv)
  data_root = pathlib.Path(args.data_root)
  records = records_lib.load_records(data_root / "train.jsonl")[0][:400]
  if len(records) < 400:
    raise SystemExit(f"{data_root}/train.jsonl: need 400 records, found {len(records)}")
  examples = [image_example(r, data_root) for r in records]
  model = Probe(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(args.learning_rate), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, pixels, meta, labels, mask):
    def loss(model):
      logits = model(pixels, meta)
      return (optax.sigmoid_binary_cross_entropy(logits, labels) * mask).sum() / mask.sum(), logits
    (value, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    optimizer.update(model, grads)
    return value, accuracy(logits, labels, mask)

  held_out = stack(examples[350:])
  rng = np.random.default_rng(0)
  start = time.time()
  curve = {}
  for i in range(1, args.steps + 1):
    value, train_accuracy = step(model, optimizer, *stack([examples[j] for j in rng.choice(350, 16, replace=False)]))
    if i % 100 == 0 or i == args.steps:
      test = float(accuracy(model(*held_out[:2]), *held_out[2:]))
      curve[i] = test
      print(f"step {i}: loss {float(value):.3f}, batch accuracy {float(train_accuracy):.3f}, held-out accuracy "
            f"{test:.3f} ({time.time() - start:.0f} s)", flush=True)
  chance = float(1 - (held_out[2] * held_out[3]).sum() / held_out[3].sum())
  print(f"held-out majority class: {chance:.3f}")
  print(json.dumps({"held_out_accuracy": curve, "majority_class": chance}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
