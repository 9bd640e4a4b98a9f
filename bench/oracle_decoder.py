"""Oracle image features: how fast can the demo's decoder learn to write the boxes when every image
token already says exactly what covers it? An upper bound on the text answers within a step budget.

  JAX_PLATFORMS=cpu python bench/oracle_decoder.py [--steps 1000] [--pool 512] [--config configs/exp.py]

The decoder is bbu_jax's own TextDecoder, built from the config's model fields and learning rate (the
demo's: hidden 128, 2 layers, rope_theta 1e6, lr 3e-3, warm-up + cosine, AdamW). The images are the
`blocks` profile's layouts at the config's sizes (the demo's labels and placement); instead of a vision
tower, each merged image token's input is a learned projection of what covers its 28 x 28 cell (the
fraction of each label and of the background), plus fixed 2D sine positions of its row and column
(`--no_sine` drops them). Image tokens sit at M-RoPE positions (0, row, column), the answer after them
as Qwen2.5-VL places text after an image; no prompt. The answers are the demo's (`format_answer` in the
resized frame, a BPE trained on them). `--pool N` draws every step's batch from N fixed layouts (the
demo trains on 512 images); 0 draws fresh ones.

At each evaluation: greedy answers for `--eval_images` held-out layouts, parsed by the evaluation's
answer parser, then COCO AP@0.5 (pycocotools, one category per label, every detection scored 1) and
recall@0.5. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bbu_jax import config as config_lib  # noqa: E402
from bbu_jax import train as train_lib  # noqa: E402
from bbu_jax.data import answer as answer_lib  # noqa: E402
from bbu_jax.data import chat  # noqa: E402
from bbu_jax.data import images as images_lib  # noqa: E402
from bbu_jax.data import records as records_lib  # noqa: E402
from bbu_jax.data import synthetic  # noqa: E402
from bbu_jax.data.images import ImageProcessorConfig  # noqa: E402
from bbu_jax.data.tokenizer import train_bpe_tokenizer  # noqa: E402
from bbu_jax.models import vision as vision_lib  # noqa: E402
from bbu_jax.models.text import TextDecoder  # noqa: E402

CELL = 28  # pixels of one merged image token
LABELS = synthetic._DEMO_LABELS  # noqa: SLF001 (the demo's labels, in a fixed order)


def draw_layout(rng: np.random.Generator, sizes, size_probs, image_config: ImageProcessorConfig) -> dict:
  """One blocks-profile layout: its grid, oracle cell features and answer (in the resized frame)."""
  width, height = sizes[int(rng.choice(len(sizes), p=size_probs))]
  image, objects = synthetic.generate_sample(rng, width, height, "blocks")
  record = records_lib.normalize_record({"id": "x", "images": ["x.jpg"], "width": width, "height": height,
                                         "objects": objects})
  resized_h, resized_w = image_config.resized_size(height, width)
  rows, cols = resized_h // CELL, resized_w // CELL
  boxes = chat.answer_objects(record, image_config)
  cover = np.zeros((rows, cols, len(LABELS) + 1), np.float32)
  edges_y, edges_x = np.arange(rows + 1) * CELL, np.arange(cols + 1) * CELL
  for obj in boxes:
    x1, y1, x2, y2 = obj["bbox_2d"]
    overlap_y = np.clip(np.minimum(edges_y[1:], y2) - np.maximum(edges_y[:-1], y1), 0, None)
    overlap_x = np.clip(np.minimum(edges_x[1:], x2) - np.maximum(edges_x[:-1], x1), 0, None)
    cover[..., LABELS.index(obj["desc"])] += np.outer(overlap_y, overlap_x) / CELL ** 2
  cover[..., -1] = np.clip(1 - cover[..., :-1].sum(-1), 0, 1)
  return {"rows": rows, "cols": cols, "features": cover.reshape(rows * cols, -1), "objects": boxes,
          "answer": answer_lib.format_answer(boxes), "image": image}


class FrozenTower:
  """The config's vision tower at its random initialization, never trained: merged features per layout."""

  def __init__(self, vision_config, image_config: ImageProcessorConfig, most_tokens: int, seed: int):
    self.tower = vision_lib.VisionTower(vision_config, rngs=nnx.Rngs(seed))
    self.vision_config, self.image_config = vision_config, image_config
    self.budget = most_tokens * vision_config.spatial_merge_size ** 2
    self.run = nnx.jit(lambda tower, pixels, meta: tower(pixels, meta))

  def __call__(self, layouts) -> list[np.ndarray]:
    pixels = np.zeros((len(layouts), self.budget, self.vision_config.patch_dim), np.float32)
    metas = []
    for i, layout in enumerate(layouts):
      values, grid = images_lib.process_image(layout["image"], self.image_config)
      pixels[i, :len(values)] = values
      metas.append(vision_lib.vision_metadata(np.array([grid]), self.budget, self.vision_config))
    meta = {k: jnp.asarray(np.stack([m[k] for m in metas])) for k in metas[0]}
    merged = np.asarray(self.run(self.tower, jnp.asarray(pixels), meta))
    return [merged[i, :layout["rows"] * layout["cols"]] for i, layout in enumerate(layouts)]


class Batch:
  """Layouts packed left-aligned: [image tokens][answer tokens, end token][padding]."""

  def __init__(self, layouts, tokenizer, length: int, answer_room: int, hidden: int, sine: bool,
               tower: FrozenTower | None = None):
    n, eos = len(layouts), tokenizer.special.eos_token_id
    features = tower(layouts) if tower else [layout["features"] for layout in layouts]
    self.ids = np.zeros((n, length), np.int32)
    self.features = np.zeros((n, length, features[0].shape[-1]), np.float32)
    self.sine = np.zeros((n, length, hidden), np.float32)
    self.is_image = np.zeros((n, length), bool)
    self.positions = np.zeros((3, n, length), np.int32)
    self.segments = np.zeros((n, length), np.int32)
    self.loss_mask = np.zeros((n, length), np.float32)  # at position s: predict ids[s + 1]
    self.image_tokens = np.zeros((n,), np.int32)
    for b, layout in enumerate(layouts):
      rows, cols = layout["rows"], layout["cols"]
      k = rows * cols
      grid_r, grid_c = np.divmod(np.arange(k), cols)
      answer = tokenizer.encode(layout["answer"]) + [eos]
      if k + len(answer) > length:
        raise ValueError(f"a layout needs {k + len(answer)} tokens, the batch has {length}")
      self.features[b, :k] = features[b]
      if sine:
        self.sine[b, :k] = vision_lib.absolute_position_embedding(np.stack([grid_r, grid_c], -1), hidden)
      self.is_image[b, :k] = True
      self.positions[1, b, :k], self.positions[2, b, :k] = grid_r, grid_c
      start = max(rows, cols)  # Qwen2.5-VL: text after an image continues at its largest position + 1
      text = np.arange(length - k) + start
      self.positions[:, b, k:] = text[None]
      self.ids[b, k:k + len(answer)] = answer
      used = k + (answer_room if answer_room else len(answer))
      self.segments[b, :min(used, length)] = 1
      self.loss_mask[b, k - 1:k - 1 + len(answer)] = 1.0
      self.image_tokens[b] = k

  def arrays(self) -> dict:
    return {k: jnp.asarray(v) for k, v in vars(self).items()}


class OracleDecoder(nnx.Module):
  """The decoder; image tokens are a learned projection of the cell features, or the frozen tower's
  merged features as they are (what the decoder reads in the model)."""

  def __init__(self, text_config, *, rngs: nnx.Rngs, project: bool = True):
    self.decoder = TextDecoder(text_config, rngs=rngs)
    self.cell = nnx.Linear(len(LABELS) + 1, text_config.hidden_size, rngs=rngs,
                           kernel_init=nnx.initializers.normal(0.02)) if project else None

  def __call__(self, b: dict, ids: jax.Array) -> jax.Array:
    text = self.decoder.embed_tokens(ids)
    image = self.cell(b["features"]) if self.cell is not None else b["features"]
    image = image + b["sine"] * vision_lib.OUTPUT_POSITION_SCALE  # what vision_output_positions adds
    x = jnp.where(b["is_image"][..., None], image, text)
    return self.decoder.embed_tokens.attend(self.decoder(x, b["positions"], b["segments"]))


def loss_fn(model: OracleDecoder, b: dict) -> jax.Array:
  logits = model(b, b["ids"])[:, :-1]
  targets = b["ids"][:, 1:]
  mask = b["loss_mask"][:, :-1]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return (nll * mask).sum() / mask.sum()


@nnx.jit
def train_step(model, optimizer, b):
  loss, grads = nnx.value_and_grad(loss_fn)(model, b)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def write_next(model, b, ids, k):
  """Writes the token after each sample's (k+1)-th answer position (the whole prefix recomputed)."""
  batch = jnp.arange(ids.shape[0])
  at = b["image_tokens"] - 1 + k
  token = jnp.argmax(model(b, ids)[batch, at], -1)
  return ids.at[batch, at + 1].set(token.astype(ids.dtype))


def greedy(model, b: dict, steps: int) -> np.ndarray:
  ids = jnp.zeros_like(b["ids"])
  for k in range(steps):
    ids = write_next(model, b, ids, jnp.int32(k))
  return np.asarray(ids)


def evaluate(model, layouts, tokenizer, length, answer_room, hidden, sine, tower) -> dict:
  b = Batch(layouts, tokenizer, length, answer_room, hidden, sine, tower)
  ids = greedy(model, b.arrays(), answer_room)
  gt = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(LABELS)]}
  dt, hits, total, parse_failures = [], 0, 0, 0
  for i, layout in enumerate(layouts):
    gt["images"].append({"id": i + 1, "width": layout["cols"] * CELL, "height": layout["rows"] * CELL})
    for obj in layout["objects"]:
      x1, y1, x2, y2 = obj["bbox_2d"]
      gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1, "iscrowd": 0,
                                "category_id": LABELS.index(obj["desc"]) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1)})
    written = ids[i, b.image_tokens[i]:b.image_tokens[i] + answer_room].tolist()
    eos = tokenizer.special.eos_token_id
    parsed = answer_lib.parse_answer(tokenizer.decode(written[:written.index(eos)] if eos in written else written))
    parse_failures += parsed.error is not None
    predictions = [o for o in parsed.objects if o["desc"] in LABELS]
    for o in predictions:
      x1, y1, x2, y2 = o["bbox_2d"]
      dt.append({"image_id": i + 1, "category_id": LABELS.index(o["desc"]) + 1, "score": 1.0,
                 "bbox": [x1, y1, x2 - x1, y2 - y1]})
    for g in layout["objects"]:
      total += 1
      hits += any(o["desc"] == g["desc"] and box_iou(o["bbox_2d"], g["bbox_2d"]) >= 0.5 for o in predictions)
  ap = 0.0
  if dt:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints each stage
      ap = coco_ap50(gt, dt)
  return {"ap50": round(ap, 4), "recall50": round(hits / max(total, 1), 4), "parse_failures": parse_failures}


def coco_ap50(gt: dict, dt: list[dict]) -> float:
  """COCO AP at IoU 0.5 (pycocotools), averaged over the labels that have ground truth."""
  coco_gt = COCO()
  coco_gt.dataset = gt
  coco_gt.createIndex()
  ev = COCOeval(coco_gt, coco_gt.loadRes(dt), iouType="bbox")
  ev.params.iouThrs = np.array([0.5])
  ev.evaluate()
  ev.accumulate()
  precision = ev.eval["precision"][0, :, :, 0, -1]  # (recall, label) at all areas, 100 detections
  precision = precision[:, (precision > -1).any(0)]  # labels with ground truth
  return float(np.mean(np.where(precision > -1, precision, 0))) if precision.size else 0.0


def box_iou(a, b) -> float:
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
  return iw * ih / union if union > 0 else 0.0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/exp.py")
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--batch", type=int, default=16, help="images per step (the demo packs about 16)")
  p.add_argument("--pool", type=int, default=0, help="fixed layouts to draw batches from; 0: fresh ones")
  p.add_argument("--lr", type=float, default=None, help="default: the config's llm_lr")
  p.add_argument("--rope_theta", type=float, default=None, help="default: the config's")
  p.add_argument("--layers", type=int, default=None, help="default: the config's text_layers")
  p.add_argument("--no_sine", action="store_true")
  p.add_argument("--number_digits", type=int, default=1)
  p.add_argument("--features", choices=("oracle", "tower"), default="oracle",
                 help="tower: the image tokens are a frozen, randomly initialized vision tower's merged "
                      "features of the rendered blocks image instead of the cells' coverage")
  p.add_argument("--eval_images", type=int, default=64)
  p.add_argument("--evals", type=int, default=4, help="evaluations, evenly spaced, the last at --steps")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  config = config_lib.load_config_file(args.config)
  if args.rope_theta is not None:
    config.model.rope_theta = args.rope_theta
  if args.layers is not None:
    config.model.text_layers = args.layers
  lr = config.llm_lr if args.lr is None else args.lr
  image_config = ImageProcessorConfig(min_pixels=config.min_pixels, max_pixels=config.max_pixels)
  sizes = synthetic.image_size_choices(config.synthetic.scale)
  size_probs = synthetic._SIZE_PROBS  # noqa: SLF001 (the generator's own size frequencies)
  draw = lambda rng: draw_layout(rng, sizes, size_probs, image_config)  # noqa: E731

  pool = [draw(np.random.default_rng([args.seed, 0, i])) for i in range(max(args.pool, 512))]
  held_out = [draw(np.random.default_rng([args.seed, 1, i])) for i in range(args.eval_images)]
  tokenizer = train_bpe_tokenizer([l["answer"] for l in pool], vocab_size=config.tokenizer_vocab_size,
                                  number_digits=args.number_digits)
  model_config = train_lib.build_model_config(config, tokenizer)
  text_config = model_config.text
  hidden = text_config.hidden_size
  longest_answer = max(len(tokenizer.encode(l["answer"])) for l in pool + held_out) + 1
  answer_room = longest_answer + 8
  most_tokens = max(h * w for h, w in (image_config.resized_size(height, width) for width, height in sizes)) // CELL**2
  length = most_tokens + answer_room
  sine = not args.no_sine

  tower = (FrozenTower(model_config.vision, image_config, most_tokens, args.seed + 1)
           if args.features == "tower" else None)
  model = OracleDecoder(text_config, rngs=nnx.Rngs(args.seed), project=tower is None)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, int(config.warmup_ratio * args.steps)), args.steps)
  optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                                               optax.adamw(schedule, weight_decay=config.weight_decay)), wrt=nnx.Param)
  print(f"oracle decoder: hidden {hidden}, {text_config.num_hidden_layers} layers, rope_theta "
        f"{text_config.rope_theta:g}, lr {lr:g}, {args.batch} images per step, "
        f"{'fresh layouts' if not args.pool else f'{args.pool} fixed layouts'}, sine positions {sine}, "
        f"image tokens from {'the cells coverage' if tower is None else 'a frozen random vision tower'}, "
        f"vocab {tokenizer.vocab_size}, sequence {length}", flush=True)

  rng = np.random.default_rng([args.seed, 2])
  eval_at = {round(args.steps * (i + 1) / args.evals) for i in range(args.evals)}
  results, t0, train_time = [], time.perf_counter(), 0.0
  for step in range(1, args.steps + 1):
    if args.pool:
      layouts = [pool[i] for i in rng.integers(0, args.pool, args.batch)]
    else:
      layouts = [draw(rng) for _ in range(args.batch)]
    tic = time.perf_counter()
    batch = Batch(layouts, tokenizer, length, 0, hidden, sine, tower).arrays()
    loss = float(train_step(model, optimizer, batch))
    train_time += time.perf_counter() - tic
    if not math.isfinite(loss):
      raise FloatingPointError(f"step {step}: loss {loss}")
    if step in eval_at:
      figures = evaluate(model, held_out, tokenizer, length, answer_room, hidden, sine, tower)
      results.append({"step": step, "loss": round(loss, 4), **figures})
      print(f"step {step}: answer loss {loss:.3f}, AP@0.5 {figures['ap50']:.3f}, recall@0.5 "
            f"{figures['recall50']:.3f}, {figures['parse_failures']} unparsable of {len(held_out)}; "
            f"{time.perf_counter() - t0:.0f} s", flush=True)
  print(json.dumps({"steps": args.steps, "pool": args.pool, "sine": sine, "features": args.features,
                    "rope_theta": text_config.rope_theta, "layers": text_config.num_hidden_layers, "lr": lr, "train_seconds": round(train_time, 1),
                    "evals": results}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
