"""Packing: first-fit and minimum-bin-slack rows, row arrays (targets, masks, slots, vision metadata), and
packed rows giving the same per-sample loss as padded rows with a real (tiny, random) Qwen2.5-VL."""

import json

import numpy as np
import pytest
from PIL import Image

from bbu_jax.data import chat as chat_lib
from bbu_jax.data import images as images_lib
from bbu_jax.data import labels as labels_lib
from bbu_jax.data import packing
from bbu_jax.data import tokenizer as tk
from bbu_jax.models.config import Qwen25VLConfig, TextConfig, VisionConfig

LABELS = labels_lib.synthetic_labels()
VISION = VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, window_size=56,
                      fullatt_block_indexes=(1,), out_hidden_size=48)
# Small images keep the test fast: at most 64 merged tokens per image.
IMAGES = images_lib.ImageProcessorConfig(max_pixels=64 * 28 * 28)


def _record(rid, width, height, n_objects, seed):
  rng = np.random.default_rng(seed)
  objects = []
  for _ in range(n_objects):
    x1, y1 = int(rng.integers(0, width - 2)), int(rng.integers(0, height - 2))
    objects.append({"bbox_2d": [x1, y1, int(rng.integers(x1 + 1, width + 1)), int(rng.integers(y1 + 1, height + 1))],
                    "desc": LABELS[int(rng.integers(len(LABELS)))]})
  objects.sort(key=lambda o: (o["bbox_2d"][1], o["bbox_2d"][0]))
  return {"id": rid, "images": [f"{rid}.png"], "width": width, "height": height, "objects": objects}


def _loader(record):
  rng = np.random.default_rng(int(record["id"][1:]))
  return Image.fromarray(rng.integers(0, 256, (record["height"], record["width"], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor():
  records = [_record(f"r{i}", 300, 200, 5, seed=i) for i in range(50)]
  # A short hierarchy keeps the system prompt, and so the rows, short.
  config = chat_lib.ChatConfig(prompt_language="en", images=IMAGES, max_caption_tokens=8,
                               label_hierarchy={"标签贴纸": [], "挡风板": ["安装"]})
  tok = tk.train_bpe_tokenizer(chat_lib.tokenizer_training_texts(records, config), vocab_size=600)
  return chat_lib.ChatProcessor(tok, config)


def _samples(processor, specs):
  out = []
  for index, (width, height, n_obj, n_teachers) in enumerate(specs):
    record = _record(f"s{index}", width, height, n_obj, seed=100 + index)
    teachers = [_record(f"t{index}{k}", 140, 280, 2, seed=200 + 10 * index + k) for k in range(n_teachers)]
    sample = processor.build_training_sample(record, teachers, _loader)
    sample["index"] = index
    out.append(sample)
  return out


def _config(collator_type, model_max_length, patch_budget, **kw):
  return packing.PackingConfig(model_max_length=model_max_length, patch_budget=patch_budget,
                               patch_dim=VISION.patch_dim, collator_type=collator_type, max_samples_per_row=4,
                               max_objects=8, max_caption_tokens=8, **kw)


def test_first_fit_respects_all_limits():
  config = _config("packed", 100, 40)
  costs = [(60, 8), (50, 4), (40, 4), (30, 32), (10, 4), (10, 4), (5, 4), (5, 4), (5, 4)]
  bins = first_bins = packing.first_fit(costs, config)
  assert sorted(i for b in bins for i in b) == list(range(len(costs)))
  for b in bins:
    assert sum(costs[i][0] for i in b) <= 100 and sum(costs[i][1] for i in b) <= 40 and len(b) <= 4
    assert b == sorted(b)
  assert [b[0] for b in bins] == sorted(b[0] for b in bins)
  # first-fit decreasing: 60 opens a bin, 50 opens one, 40 joins 60 (100), 30 joins 50 (80), ...
  assert [0, 2] in first_bins and 1 in next(b for b in first_bins if 3 in b)
  padded = packing.first_fit(costs, _config("padded", 100, 40))
  assert padded == [[i] for i in range(len(costs))]


def test_minimum_bin_slack_fills_rows_that_first_fit_leaves_short(monkeypatch):
  config = _config("packed", 100, 1000)
  costs = [(50, 4), (40, 4), (30, 4), (30, 4), (30, 4), (20, 4)]
  # first-fit decreasing: 50 + 40, then 30 + 30 + 30, and 20 alone
  assert packing.first_fit(costs, config) == [[0, 1], [2, 3, 4], [5]]
  # each row the largest left plus the fullest subset: 50 + 30 + 20, then 40 + 30 + 30
  assert packing.minimum_bin_slack(costs, config) == [[0, 2, 5], [1, 3, 4]]
  assert packing.pack_rows(costs, config) == [[0, 2, 5], [1, 3, 4]]
  # the slot limit (4 here) binds: 40 + 10 * 6 would fill the row exactly
  assert packing.minimum_bin_slack([(40, 4)] + [(10, 4)] * 6, config) == [[0, 1, 2, 3], [4, 5, 6]]
  # the patch budget binds: 50 + 50 would fill the tokens but takes 16 patches of 12
  costs_p = [(50, 8), (50, 8), (30, 4), (20, 4)]
  assert packing.minimum_bin_slack(costs_p, config) == [[0, 1], [2, 3]]
  assert packing.minimum_bin_slack(costs_p, _config("packed", 100, 12)) == [[0, 2], [1, 3]]
  # the search is bounded: one subset per row takes the largest sample that fits, as first-fit would
  monkeypatch.setattr(packing, "SEARCH_NODES_PER_ROW", 1)
  assert packing.minimum_bin_slack(costs, config) == [[0, 1], [2, 3], [4, 5]]


def test_pack_rows_takes_first_fit_where_it_needs_fewer_rows():
  config = _config("packed", 100, 1000)
  costs = [(t, 4) for t in (32, 60, 39, 37, 11, 41, 29, 45)]
  # minimum bin slack fills 60 + 29 + 11 exactly and is left with 39, 37, 32: four rows
  assert packing.minimum_bin_slack(costs, config) == [[0], [1, 4, 6], [2, 3], [5, 7]]
  # first-fit decreasing: 60 + 39, 45 + 41 + 11, 37 + 32 + 29
  assert packing.first_fit(costs, config) == [[0, 3, 6], [1, 2], [4, 5, 7]]
  assert packing.pack_rows(costs, config) == packing.first_fit(costs, config)
  padded = _config("padded", 100, 1000)
  assert packing.pack_rows(costs, padded) == [[i] for i in range(len(costs))]


def test_pack_rows_respects_all_limits_and_never_needs_more_rows_than_first_fit():
  rng = np.random.default_rng(0)
  fewer = 0
  for _ in range(300):
    config = _config("packed", int(rng.integers(50, 200)), 4 * int(rng.integers(4, 20)))
    n = int(rng.integers(1, 24))
    # samples of up to half a row, as at 2048 tokens, where the order of filling matters most
    costs = [(int(rng.integers(1, config.model_max_length // 2 + 1)),
              4 * int(rng.integers(1, config.patch_budget // 8 + 1))) for _ in range(n)]
    bins = packing.pack_rows(costs, config)
    assert bins == packing.pack_rows(list(costs), config)  # deterministic
    assert sorted(i for b in bins for i in b) == list(range(n))
    for b in bins:
      assert b == sorted(b) and 1 <= len(b) <= config.max_samples_per_row
      assert sum(costs[i][0] for i in b) <= config.model_max_length
      assert sum(costs[i][1] for i in b) <= config.patch_budget
    assert [b[0] for b in bins] == sorted(b[0] for b in bins)
    first_fit_rows = len(packing.first_fit(costs, config))
    assert len(bins) <= first_fit_rows
    fewer += len(bins) < first_fit_rows
  print(f"pack_rows: fewer rows than first_fit in {fewer} of 300 windows")
  assert fewer > 10  # and often fewer


def test_rejection_reasons():
  config = _config("packed", 100, 40)
  sample = {"input_ids": np.zeros(101, np.int32), "pixel_values": np.zeros((4, 1), np.float32),
            "det_boxes": np.zeros((1, 4))}
  assert packing.rejection_reason(sample, config).startswith(packing.REJECT_TOO_LONG)
  sample["input_ids"] = np.zeros(100, np.int32)
  assert packing.rejection_reason(sample, config) is None
  sample["pixel_values"] = np.zeros((44, 1), np.float32)
  assert packing.rejection_reason(sample, config).startswith(packing.REJECT_TOO_MANY_PATCHES)
  sample["pixel_values"] = np.zeros((4, 1), np.float32)
  sample["det_boxes"] = np.zeros((9, 4))
  assert packing.rejection_reason(sample, config).startswith(packing.REJECT_TOO_MANY_OBJECTS)


def test_make_row_layout(processor):
  samples = _samples(processor, [(300, 200, 3, 1), (140, 420, 2, 0)])
  config = _config("packed", 1024, 1024)
  row = packing.make_row(samples, config, VISION)
  t0 = 0
  p0 = 0
  for slot, sample in enumerate(samples):
    n = len(sample["input_ids"])
    seg = slice(t0, t0 + n)
    np.testing.assert_array_equal(row["input_ids"][seg], sample["input_ids"])
    assert (row["segment_ids"][seg] == slot + 1).all() and (row["text_sample_slot"][seg] == slot + 1).all()
    np.testing.assert_array_equal(row["positions"][:, seg], sample["positions"])
    assert row["positions"][:, t0].tolist() == [0, 0, 0]  # restarts per segment
    np.testing.assert_array_equal(row["target_ids"][t0:t0 + n - 1], sample["input_ids"][1:])
    assert row["target_ids"][t0 + n - 1] == 0  # no target across the segment boundary
    np.testing.assert_array_equal(row["student_loss_mask"][t0:t0 + n - 1], sample["student_mask"][1:])
    np.testing.assert_array_equal(row["teacher_loss_mask"][t0:t0 + n - 1], sample["teacher_mask"][1:])
    # the masked targets decode to exactly the answers
    targets = row["target_ids"][seg][row["student_loss_mask"][seg] > 0]
    assert processor.tokenizer.decode(targets, skip_special_tokens=False) == (
        processor.answer_text(_record(f"s{slot}", *[(300, 200, 3), (140, 420, 2)][slot], seed=100 + slot))
        + "<|im_end|>")
    n_patches = sample["pixel_values"].shape[0]
    np.testing.assert_array_equal(row["pixel_values"][p0:p0 + n_patches], sample["pixel_values"])
    merged = slice(p0 // 4, (p0 + n_patches) // 4)
    assert (row["vision_sample_slot"][merged] == slot + 1).all()
    student_merged = int(sample["image_grid_thw"][-1].prod()) // 4
    is_student = row["vision_is_student"][merged]
    assert is_student.sum() == student_merged and is_student[-student_merged:].all()
    n_obj = sample["det_boxes"].shape[0]
    np.testing.assert_array_equal(row["det_boxes"][slot, :n_obj], sample["det_boxes"])
    assert row["det_box_valid"][slot].sum() == n_obj
    assert row["sample_ids"][slot] == sample["index"]
    t0 += n
    p0 += n_patches
  assert (row["segment_ids"][t0:] == 0).all() and (row["input_ids"][t0:] == 0).all()
  assert (row["pixel_values"][p0:] == 0).all() and not row["merged_valid"][p0 // 4:].any()
  assert row["merged_valid"][:p0 // 4].all()
  assert row["sample_ids"][2:].tolist() == [-1, -1]
  batch = packing.collate_rows([row, packing.empty_row(config, VISION)])
  assert batch["positions"].shape == (3, 2, 1024)
  assert packing.packing_efficiency(batch) == pytest.approx(t0 / 2048)


def test_packed_and_padded_rows_give_the_same_per_sample_loss(processor):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from bbu_jax.models.qwen2_5_vl import Qwen25VL

  special = processor.tokenizer.special
  config = Qwen25VLConfig(
      vision=VISION,
      text=TextConfig(vocab_size=processor.tokenizer.vocab_size, hidden_size=48, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                      mrope_section=(2, 2, 2), max_position_embeddings=4096),
      tie_word_embeddings=False, image_token_id=special.image_token_id, video_token_id=special.video_token_id,
      vision_start_token_id=special.vision_start_token_id, vision_end_token_id=special.vision_end_token_id,
      bos_token_id=special.bos_token_id, eos_token_id=special.eos_token_id, pad_token_id=special.pad_token_id)
  model = Qwen25VL(config, rngs=nnx.Rngs(0))
  samples = _samples(processor, [(300, 200, 3, 1), (140, 420, 2, 0), (84, 84, 0, 0), (250, 250, 4, 0)])
  packed_cfg = _config("packed", 768, 512)
  padded_cfg = _config("padded", 768, 512)
  bins = packing.pack_rows([packing.sample_cost(s) for s in samples], packed_cfg)
  assert len(bins) < len(samples)  # something is really packed together
  packed = packing.collate_rows([packing.make_row([samples[i] for i in b], packed_cfg, VISION) for b in bins])
  padded = packing.collate_rows([packing.make_row([s], padded_cfg, VISION) for s in samples])

  @nnx.jit
  def token_losses(model, batch):
    meta = {k: batch[k] for k in ("rope_pos", "window_segment_ids", "image_segment_ids", "merged_valid")}
    logits = model(batch["input_ids"], batch["positions"], batch["segment_ids"], batch["pixel_values"], meta)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, batch["target_ids"][..., None], -1)[..., 0]

  def per_sample(batch):
    ce = np.asarray(token_losses(model, {k: jnp.asarray(v) for k, v in batch.items()}))
    out = {}
    for r in range(ce.shape[0]):
      for slot, sid in enumerate(batch["sample_ids"][r]):
        if sid < 0:
          continue
        in_slot = batch["text_sample_slot"][r] == slot + 1
        for name in ("student_loss_mask", "teacher_loss_mask"):
          mask = batch[name][r] * in_slot
          out[(int(sid), name)] = float((ce[r] * mask).sum() / max(mask.sum(), 1))
    return out

  a, b = per_sample(packed), per_sample(padded)
  assert a.keys() == b.keys() and len(a) == 2 * len(samples)
  for key in a:
    assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
  assert a[(0, "teacher_loss_mask")] > 0  # the teacher answer is scored
