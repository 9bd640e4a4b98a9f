"""Synthetic data: deterministic per seed, validator-clean, statistics close to the real records' figures;
the shipped real figures are reproducible from ../shared/data."""

import collections
import filecmp
import json
import statistics
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bbu_jax.data import labels, real_stats, records, synthetic, validate
from tests.conftest import REPO

_BACK = {label: real for real, label in synthetic.REAL_TO_SYNTHETIC.items()}


@pytest.fixture(scope="module")
def stats_set(tmp_path_factory):
  """150 small images: enough objects (about 1,500) for frequency comparisons."""
  out = tmp_path_factory.mktemp("synth_stats")
  synthetic.generate(out, num_train=150, num_val=0, num_teacher=0, seed=0, scale=0.25)
  return records.load_records(out / "train.jsonl")[0]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
  for name, seed in [("a", 5), ("b", 5), ("c", 6)]:
    synthetic.generate(tmp_path / name, num_train=3, num_val=1, num_teacher=1, seed=seed, scale=0.25)
  for split in ("train", "val", "teacher_pool"):
    assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
  match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a" / "images", tmp_path / "b" / "images",
                                             sorted(p.name for p in (tmp_path / "a" / "images").iterdir()),
                                             shallow=False)
  assert len(match) == 5 and not mismatch and not errors
  assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_sample_does_not_depend_on_split_sizes(tmp_path):
  synthetic.generate(tmp_path / "small", num_train=2, num_val=1, num_teacher=0, seed=1, scale=0.25)
  synthetic.generate(tmp_path / "big", num_train=4, num_val=2, num_teacher=1, seed=1, scale=0.25)
  small = (tmp_path / "small" / "train.jsonl").read_text(encoding="utf-8").splitlines()
  big = (tmp_path / "big" / "train.jsonl").read_text(encoding="utf-8").splitlines()
  assert big[:2] == small
  assert (tmp_path / "small" / "val.jsonl").read_text() == \
      (tmp_path / "big" / "val.jsonl").read_text().splitlines(keepends=True)[0]


def test_output_is_validator_clean_with_expected_layout(tmp_path):
  summary = synthetic.generate(tmp_path, num_train=6, num_val=2, num_teacher=2, seed=0, scale=0.5)
  assert (summary["train"], summary["val"], summary["teacher_pool"]) == (6, 2, 2)
  ids = set()
  for split, count in (("train", 6), ("val", 2), ("teacher_pool", 2)):
    report = validate.validate_file(tmp_path / f"{split}.jsonl", tmp_path)
    assert report.ok and not report.warnings, [str(p) for p in report.problems]
    assert report.records == count
    for _, raw in records.iter_jsonl(tmp_path / f"{split}.jsonl"):
      ids.add(raw["id"])
      assert raw["width"] % 28 == 0 and raw["height"] % 28 == 0
      for obj in raw["objects"]:  # one geometry per object, as the newest export writes them
        keys = set(obj) - {"desc"}
        assert len(keys) == 1
        kind = keys.pop()
        expected = {"bbu基带处理单元": "quad", "挡风板": "quad", "标签贴纸": "quad", "线缆": "line",
                    "螺丝连接点": "bbox_2d", "机柜空间": "bbox_2d"}[labels.label_type(obj["desc"])]
        assert kind == expected, obj
  assert len(ids) == 10
  vocab = json.loads((tmp_path / "label_vocab.json").read_text(encoding="utf-8"))
  assert sum(vocab.values()) == summary["objects"]


def test_labels_belong_to_the_synthetic_hierarchy(stats_set):
  allowed = set(labels.synthetic_labels())
  assert len(allowed) == 14
  seen = {o["desc"] for r in stats_set for o in r["objects"]}
  assert seen <= allowed
  assert {"bbu基带处理单元/华为", "bbu基带处理单元/中兴", "线缆/光纤", "线缆/电线", "标签贴纸",
          "螺丝连接点/BBU安装螺丝", "机柜空间/非满载"} <= seen
  for label in allowed:  # conversion with the synthetic hierarchy keeps every label as it is
    assert labels.normalize_label(label, {}, labels.SYNTHETIC_LABEL_HIERARCHY) == label


def test_statistics_follow_the_real_figures(stats_set):
  real = real_stats.REAL_STATS
  counts = [len(r["objects"]) for r in stats_set]
  # object count: median within 1.5 of the real median (8); mean within 15%
  assert abs(statistics.median(counts) - real["objects_per_image"]["median"]) <= 1.5
  assert abs(statistics.fmean(counts) / real["objects_per_image"]["mean"] - 1) <= 0.15
  # type mix (cabinet space aside, which the measured exports lack): within 3 points per type
  types = collections.Counter(_BACK[o["desc"]].split("/")[0] for r in stats_set for o in r["objects"]
                              if not o["desc"].startswith("机柜空间"))
  total, real_total = sum(types.values()), sum(real["type_counts"].values())
  for name, count in real["type_counts"].items():
    assert abs(types[name] / total - count / real_total) <= 0.03, name
  # box sizes and positions: per fine type with 40+ objects, medians of relative width and height
  # within 30% of the real ones, centres within 0.1
  figures = collections.defaultdict(list)
  for r in stats_set:
    for o in r["objects"]:
      if o["desc"] in _BACK:
        x1, y1, x2, y2 = o["bbox_2d"]
        figures[_BACK[o["desc"]]].append(((x2 - x1) / r["width"], (y2 - y1) / r["height"],
                                          (x1 + x2) / 2 / r["width"], (y1 + y2) / 2 / r["height"]))
  checked = 0
  for name, values in figures.items():
    if len(values) < 40:
      continue
    checked += 1
    measured = [statistics.median(v[i] for v in values) for i in range(4)]
    want = [real["fine_types"][name][key][3] for key in ("box_w_rel", "box_h_rel", "center_x_rel",
                                                         "center_y_rel")]
    assert 0.7 <= measured[0] / want[0] <= 1.3 and 0.7 <= measured[1] / want[1] <= 1.3, name
    assert abs(measured[2] - want[2]) <= 0.1 and abs(measured[3] - want[3]) <= 0.1, name
  assert checked >= 6


def test_image_sizes_are_the_real_ones_scaled():
  assert synthetic.image_size_choices(1.0) == [
      tuple(int(v) for v in name.split("x")) for name in real_stats.REAL_STATS["image_sizes"]]
  half = synthetic.image_size_choices(0.5)
  assert (280, 364) in half and all(w % 28 == 0 and h % 28 == 0 for w, h in half)


def test_shipped_real_figures_are_reproducible(shared_data):
  pooled = []
  for name in ("bbu_records.jsonl", "bbu_records_v3.jsonl"):
    pooled.extend(records.load_records(shared_data / name)[0])
  assert real_stats.measure(pooled) == real_stats.REAL_STATS


def test_fine_type_and_quantiles():
  assert real_stats.fine_type("BBU设备/显示完整，华为/无需安装") == "BBU设备/华为"
  assert real_stats.fine_type("螺丝、光纤插头/BBU端光纤插头,只显示部分") == "螺丝、光纤插头/BBU端光纤插头"
  assert real_stats.fine_type("标签/5G-AAU2-光纤") == "标签"
  assert real_stats.quantiles([0, 1, 2, 3, 4]) == [0, 0.2, 1, 2, 3, 3.8, 4]


def test_cli_writes_the_requested_sizes(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "bbu_jax.data.synthetic", "--output_root", str(tmp_path),
                         "--num_train", "2", "--num_val", "1", "--num_teacher", "0",
                         "--image_size", "112x84"], capture_output=True, text=True, cwd=REPO,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  raws = [raw for _, raw in records.iter_jsonl(tmp_path / "train.jsonl")]
  assert len(raws) == 2 and all((r["width"], r["height"]) == (112, 84) for r in raws)
  assert (tmp_path / "teacher_pool.jsonl").read_text() == ""
  assert validate.validate_file(tmp_path / "val.jsonl", tmp_path).ok


def test_demo_profile_draws_only_large_equipment(tmp_path):
  summary = synthetic.generate(tmp_path, num_train=12, num_val=0, num_teacher=0, seed=3, scale=0.5, profile="demo")
  assert summary["profile"] == "demo"
  recs = records.load_records(tmp_path / "train.jsonl")[0]
  counts = [len(r["objects"]) for r in recs]
  assert min(counts) >= 1 and max(counts) <= 3
  assert {o["desc"] for r in recs for o in r["objects"]} <= set(synthetic._DEMO_LABELS)
  assert validate.validate_file(tmp_path / "train.jsonl", tmp_path).ok
  # Side by side, each in its own cell: no two boxes overlap by more than the slight tilt, none is small.
  for r in recs:
    boxes = [o["bbox_2d"] for o in r["objects"]]
    for i, a in enumerate(boxes):
      assert (a[2] - a[0]) * (a[3] - a[1]) >= 0.04 * r["width"] * r["height"] / len(boxes), (r["id"], a)
      for b in boxes[i + 1:]:
        inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        assert inter <= 0.05 * min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])), (r["id"], a, b)
  with pytest.raises(ValueError, match="profile"):
    synthetic.generate_sample(None, 56, 56, profile="easy")


def test_blocks_profile_draws_the_demo_layout_as_flat_blocks(tmp_path):
  """The diagnostic profile: the demo's labels and cells, each object a block of its label's colour,
  black everywhere else. JPEG (quality 90, chroma subsampled) moves saturated colours by up to ~15 and
  blurs the edges; the label colours differ by more than 150 in some channel."""
  synthetic.generate(tmp_path, num_train=8, num_val=0, num_teacher=0, seed=5, scale=0.5, profile="blocks")
  recs = records.load_records(tmp_path / "train.jsonl")[0]
  assert validate.validate_file(tmp_path / "train.jsonl", tmp_path).ok
  assert {o["desc"] for r in recs for o in r["objects"]} <= set(synthetic._DEMO_LABELS)
  for r in recs:
    assert 1 <= len(r["objects"]) <= 3
    pixels = np.asarray(Image.open(tmp_path / r["images"][0]).convert("RGB"), np.int32)
    outside = np.ones(pixels.shape[:2], bool)
    for o in r["objects"]:
      x1, y1, x2, y2 = o["bbox_2d"]
      outside[max(0, y1 - 8):y2 + 9, max(0, x1 - 8):x2 + 9] = False  # JPEG rings within its 8x8 blocks
      inner = pixels[y1 + 3:y2 - 2, x1 + 3:x2 - 2].reshape(-1, 3)
      assert np.abs(inner - synthetic._BLOCK_COLOURS[o["desc"]]).max() <= 24, (r["id"], o)
    assert pixels[outside].max() <= 12, r["id"]


def test_a_set_made_with_other_settings_is_named_in_a_warning(tmp_path, caplog):
  """The trainer reuses a generated set; one made by other settings (or older code) is said so."""
  import logging

  from bbu_jax import config as config_lib
  from bbu_jax import train as train_lib

  synthetic.generate(tmp_path, num_train=3, num_val=1, num_teacher=0, seed=0, scale=0.25, profile="demo")
  assert json.loads((tmp_path / synthetic.SETTINGS_FILE).read_text()) == synthetic.generation_settings(
      3, 1, 0, 0, scale=0.25, profile="demo")
  c = config_lib.base_config()
  c.synthetic.enabled = True
  c.data_root, c.train_data_path = str(tmp_path), str(tmp_path / "train.jsonl")
  c.synthetic.num_train, c.synthetic.num_val, c.synthetic.num_teacher = 3, 1, 0
  c.synthetic.scale, c.synthetic.profile, c.seed = 0.25, "demo", 0
  with caplog.at_level(logging.INFO, logger="bbu_jax.train"):
    train_lib.prepare_data(c)
  assert "synthetic data already present" in caplog.text and "other settings" not in caplog.text
  caplog.clear()
  c.synthetic.num_train = 4096
  with caplog.at_level(logging.INFO, logger="bbu_jax.train"):
    train_lib.prepare_data(c)
  assert "other settings than this config's (num_train 3 instead of 4096)" in caplog.text
  (tmp_path / synthetic.SETTINGS_FILE).unlink()  # a set from before the settings file
  with caplog.at_level(logging.INFO, logger="bbu_jax.train"):
    train_lib.prepare_data(c)
  assert "generator_version None instead of" in caplog.text
