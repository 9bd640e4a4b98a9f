"""Tests for the evaluation job: COCOeval parity, known answers, label matching, categories, bad input."""

import collections
import contextlib
import importlib.machinery
import io
import json
import pathlib
import subprocess
import sys
import tempfile
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bbu_jax import evaluate
from bbu_jax.eval import coco
from bbu_jax.eval.categories import Categorizer, load_rules
from bbu_jax.eval.matching import CharSimilarity, LabelMatcher, normalize_label
from bbu_jax.eval.responses import read_responses

ONE = pytest.approx(1.0, abs=1e-12)  # a mean of ten 1.0s in float64
LABELS = ["BBU设备/华为", "BBU设备/中兴", "螺丝连接点/BBU安装螺丝", "标签/5G-BBU-接地线", "光纤/有保护措施,蛇形管",
          "挡风板/华为,显示完整"]


def write_responses(path, samples):
  path.write_text(json.dumps({"model_path": "m", "mode": "standard", "config": {}, "samples": samples},
                             ensure_ascii=False), encoding="utf-8")
  return path


def sample(index, ground_truth, prediction, **extra):
  return dict({"id": f"s{index}", "images": [f"img{index}.jpg"], "width": 200, "height": 200,
               "ground_truth": ground_truth, "prediction": prediction, "raw_response": "",
               "parse_error": None, "teachers": []}, **extra)


def run(tmp_path, samples, *flags, name="responses.json"):
  responses = write_responses(tmp_path / name, samples)
  output = tmp_path / (name + ".metrics.json")
  with contextlib.redirect_stdout(io.StringIO()):
    assert evaluate.main(["--responses_file", str(responses), "--output_file", str(output), *flags]) == 0
  return json.loads(output.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------
# Independent references: COCOeval called directly, and a plain greedy matcher.

def direct_cocoeval(samples, cat_filter=None):
  """COCOeval with default params on the samples' boxes (exact labels as categories)."""
  labels = sorted({o["desc"] for s in samples for o in s["ground_truth"]}
                  | {o["desc"] for s in samples for o in s["prediction"]})
  cat = {label: i + 1 for i, label in enumerate(labels)}
  images, anns, dets = [], [], []
  for i, s in enumerate(samples):
    images.append({"id": i + 1})
    for o in s["ground_truth"]:
      x1, y1, x2, y2 = o["bbox_2d"]
      anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat[o["desc"]],
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    n = len(s["prediction"])
    for rank, o in enumerate(s["prediction"]):
      x1, y1, x2, y2 = o["bbox_2d"]
      dets.append({"image_id": i + 1, "category_id": cat[o["desc"]], "bbox": [x1, y1, x2 - x1, y2 - y1],
                   "score": o.get("score", 1.0 - rank / n)})
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in cat.values()]}
    gt.createIndex()
    dt = gt.loadRes(dets)
    ev = COCOeval(gt, dt, "bbox")
    if cat_filter is not None:
      ev.params.catIds = [cat[label] for label in labels if cat_filter(label)]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return {"mAP": ev.stats[0], "AP@0.5": ev.stats[1], "AP@0.75": ev.stats[2], "mAR": ev.stats[8]}


def iou(a, b):
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def greedy_tp(samples, threshold):
  """TP count: per image, predictions by score, each takes the best unmatched same-label gt >= threshold."""
  tp = 0
  for s in samples:
    n = len(s["prediction"])
    order = sorted(range(n), key=lambda d: -s["prediction"][d].get("score", 1.0 - d / n))
    taken = set()
    for d in order:
      pred = s["prediction"][d]
      best, best_iou = None, min(threshold, 1 - 1e-10)
      for g, truth in enumerate(s["ground_truth"]):
        if g in taken or truth["desc"] != pred["desc"]:
          continue
        value = iou(pred["bbox_2d"], truth["bbox_2d"])
        if value >= best_iou:
          best, best_iou = g, value
      if best is not None:
        taken.add(best)
        tp += 1
  return tp


def random_samples(rng, num_images, labels, with_scores=True):
  samples = []
  for i in range(num_images):
    gts, preds = [], []
    for _ in range(rng.integers(0, 8)):
      x, y = rng.uniform(0, 150, 2)
      w, h = rng.uniform(4, 50, 2)
      gts.append({"bbox_2d": [round(x), round(y), round(x + w), round(y + h)], "desc": str(rng.choice(labels))})
    for truth in gts:
      if rng.random() < 0.8:
        box = [v + rng.normal(0, rng.choice([1.0, 4.0, 10.0])) for v in truth["bbox_2d"]]
        box = [round(min(box[0], box[2]), 1), round(min(box[1], box[3]), 1),
               round(max(box[0], box[2]), 1), round(max(box[1], box[3]), 1)]
        label = truth["desc"] if rng.random() < 0.85 else str(rng.choice(labels))
        preds.append({"bbox_2d": box, "desc": label})
    for _ in range(rng.integers(0, 3)):
      x, y = rng.uniform(0, 150, 2)
      preds.append({"bbox_2d": [round(x), round(y), round(x) + 20, round(y) + 20], "desc": str(rng.choice(labels))})
    preds = [preds[j] for j in rng.permutation(len(preds))]
    if with_scores:
      for p in preds:
        p["score"] = round(float(rng.uniform(0, 1)), 3)
    samples.append(sample(i, gts, preds))
  return samples


# ----------------------------------------------------------------------------------------------------
# Parity with COCOeval.

@pytest.mark.parametrize("seed,with_scores", [(0, True), (1, True), (2, False)])
def test_random_cases_equal_direct_cocoeval(tmp_path, seed, with_scores):
  rng = np.random.default_rng(seed)
  # Labels far apart (exact matching), so classes are the labels themselves.
  labels = ["BBU设备/华为", "BBU设备/中兴", "螺丝连接点/BBU安装螺丝", "标签/5G-BBU-接地线", "挡风板/中兴"]
  samples = random_samples(rng, 60, labels, with_scores)
  metrics = run(tmp_path, samples)
  expected = direct_cocoeval(samples)
  for key, value in expected.items():
    assert metrics["overall_metrics"][key] == pytest.approx(value, abs=1e-12), key
  assert 0.0 < metrics["overall_metrics"]["mAP"] < 1.0
  assert metrics["evaluation_info"]["scores"] == ("responses" if with_scores else
                                                  "prediction order (pseudo-scores 1 - rank/count per image)")
  for threshold in (0.5, 0.75):
    tp = greedy_tp(samples, threshold)
    num_pred = sum(len(s["prediction"]) for s in samples)
    num_gt = sum(len(s["ground_truth"]) for s in samples)
    assert metrics["overall_metrics"][f"tp@{threshold:g}"] == tp
    assert metrics["overall_metrics"][f"precision@{threshold:g}"] == pytest.approx(tp / num_pred)
    assert metrics["overall_metrics"][f"recall@{threshold:g}"] == pytest.approx(tp / num_gt)
  # Per category: COCOeval restricted to that category's labels.
  categorizer = Categorizer()
  for name, values in metrics["category_metrics"].items():
    expected = direct_cocoeval(samples, cat_filter=lambda label, name=name: categorizer(label) == name)
    for key in ("mAP", "AP@0.5", "AP@0.75", "mAR"):
      assert values[key] == pytest.approx(expected[key], abs=1e-12), (name, key)
  assert set(metrics["category_metrics"]) == {"bbu", "screw", "label", "shield"}


def test_sparse_evaluate_equals_dense_evaluate():
  rng = np.random.default_rng(5)
  samples = random_samples(rng, 30, LABELS)
  flat_samples = read_samples(samples)
  matcher = LabelMatcher({o["desc"] for s in flat_samples for o in s.ground_truth})
  flat, _ = coco.flatten(flat_samples, matcher, Categorizer())
  coco_gt, coco_dt = coco.build_coco(flat, len(flat_samples))
  with contextlib.redirect_stdout(io.StringIO()):
    dense = COCOeval(coco_gt, coco_dt, "bbox")
    dense.evaluate()
    dense.accumulate()
    dense.summarize()
  for workers in (1, 2):
    sparse = coco.run_cocoeval(coco_gt, coco_dt, workers=workers)
    np.testing.assert_array_equal(sparse.eval["precision"], dense.eval["precision"][:, :, :, :1])
    np.testing.assert_array_equal(sparse.eval["recall"], dense.eval["recall"][:, :, :1])
    assert coco.summarize_classes(sparse, None)["mAP"] == dense.stats[0]


def read_samples(samples):
  with tempfile.TemporaryDirectory() as tmp:
    return read_responses(write_responses(pathlib.Path(tmp) / "r.json", samples)).samples


# ----------------------------------------------------------------------------------------------------
# Hand-made cases with known answers.

def test_perfect_predictions(tmp_path):
  gts = [{"bbox_2d": [10, 10, 50, 60], "desc": LABELS[0]}, {"bbox_2d": [100, 20, 120, 40], "desc": LABELS[2]}]
  metrics = run(tmp_path, [sample(0, gts, [dict(g, score=0.9) for g in gts])])
  overall = metrics["overall_metrics"]
  for key in ("mAP", "AP@0.5", "AP@0.75", "mAR", "precision@0.5", "recall@0.5", "f1@0.75"):
    assert overall[key] == ONE, key
  assert overall["errors@0.5"] == {"localization": 0, "classification": 0, "duplicate": 0, "background": 0,
                                   "missed": 0}


def test_one_hit_one_false_positive_known_ap(tmp_path):
  gts = [{"bbox_2d": [10, 10, 50, 60], "desc": LABELS[0]}, {"bbox_2d": [100, 100, 150, 150], "desc": LABELS[0]}]
  preds = [{"bbox_2d": [10, 10, 50, 60], "desc": LABELS[0], "score": 0.9},
           {"bbox_2d": [160, 0, 190, 30], "desc": LABELS[0], "score": 0.8}]
  overall = run(tmp_path, [sample(0, gts, preds)])["overall_metrics"]
  # Precision 1 up to recall 0.5, nothing beyond: 51 of COCO's 101 recall points.
  assert overall["AP@0.5"] == pytest.approx(51 / 101)
  assert overall["mAP"] == pytest.approx(51 / 101)
  assert overall["mAR"] == pytest.approx(0.5)
  assert (overall["precision@0.5"], overall["recall@0.5"], overall["f1@0.5"]) == (0.5, 0.5, 0.5)
  assert overall["errors@0.5"]["background"] == 1 and overall["errors@0.5"]["missed"] == 1


def test_error_breakdown_kinds(tmp_path):
  gts = [{"bbox_2d": [0, 0, 40, 40], "desc": LABELS[0]},      # found, then found again (duplicate)
         {"bbox_2d": [100, 0, 140, 40], "desc": LABELS[2]},   # boxed with another known label
         {"bbox_2d": [0, 100, 40, 140], "desc": LABELS[3]},   # boxed badly
         {"bbox_2d": [100, 100, 140, 140], "desc": LABELS[4]}]  # missed
  preds = [{"bbox_2d": [0, 0, 40, 40], "desc": LABELS[0], "score": 0.9},
           {"bbox_2d": [1, 1, 40, 40], "desc": LABELS[0], "score": 0.8},
           {"bbox_2d": [100, 0, 140, 40], "desc": LABELS[3], "score": 0.7},
           {"bbox_2d": [0, 100, 20, 115], "desc": LABELS[3], "score": 0.6},
           {"bbox_2d": [170, 170, 190, 190], "desc": LABELS[0], "score": 0.5}]
  metrics = run(tmp_path, [sample(0, gts, preds)], "--report_dir", str(tmp_path / "report"))
  assert metrics["overall_metrics"]["errors@0.5"] == {"localization": 1, "classification": 1, "duplicate": 1,
                                                      "background": 1, "missed": 3}
  # Missed at 0.5: the classification, localization and plain misses (only the first gt is matched).
  assert metrics["overall_metrics"]["tp@0.5"] == 1 and metrics["overall_metrics"]["fn@0.5"] == 3
  assert metrics["category_metrics"]["label"]["errors@0.5"]["localization"] == 1
  assert metrics["category_metrics"]["label"]["errors@0.5"]["classification"] == 1
  assert metrics["category_metrics"]["cable"]["errors@0.5"]["missed"] == 1


def test_iou_threshold_off_the_coco_grid(tmp_path):
  rng = np.random.default_rng(3)
  samples = random_samples(rng, 30, LABELS[:3])
  metrics = run(tmp_path, samples, "--iou_threshold", "0.3")
  overall = metrics["overall_metrics"]
  assert overall["tp@0.3"] == greedy_tp(samples, 0.3)
  assert overall["tp@0.3"] >= overall["tp@0.5"] >= overall["tp@0.75"]
  errors = overall["errors@0.3"]
  assert sum(errors[k] for k in errors if k != "missed") == overall["fp@0.3"]
  assert errors["missed"] == overall["fn@0.3"]
  assert metrics["evaluation_info"]["match_iou_threshold"] == 0.3


# ----------------------------------------------------------------------------------------------------
# Semantic label matching.

def test_char_similarity_required_cases():
  similarity = CharSimilarity()
  matcher = LabelMatcher(["BBU设备/华为", "螺丝连接点/BBU安装螺丝"], threshold=0.7, similarity=similarity)
  label, best = matcher.match("BBU设备/中兴")
  assert label == "BBU设备/中兴" and best < 0.7
  assert similarity("BBU设备/华为", "BBU设备/中兴") == 0.0
  assert matcher.match("螺丝连接点 / BBU 安装螺丝") == ("螺丝连接点/BBU安装螺丝", 1.0)
  assert matcher.match("BBU设备/Huawei")[0] == "BBU设备/华为"
  assert similarity("BBU设备/华为", "BBU设备/ZTE") == 0.0
  assert similarity("螺丝、光纤插头/BBU安装螺丝,显示完整,符合要求", "螺丝、光纤插头/BBU安装螺丝,显示完整,不符合要求") == 0.0
  assert similarity("标签/NR900-RRU1-光纤", "标签/NR900-RRU2-光纤") == 0.0
  assert similarity("标签/5G-AAU1光纤", "标签/5G-AAU1-光纤") == 1.0
  assert similarity("光纤/有保护措施，弯曲半径合理", "光纤/有保护措施,弯曲半径合理") == 1.0
  near = similarity("BBU设备/华为,显示完整", "BBU设备/华为")
  assert 0.7 <= near < 1.0 and near == similarity("BBU设备/华为", "BBU设备/华为,显示完整")
  assert normalize_label(" ＢＢＵ设备 / 华为 ") == "bbu设备华为"


def test_matching_threshold_decides_true_or_false_positive(tmp_path):
  gts = [{"bbox_2d": [10, 10, 50, 60], "desc": "BBU设备/华为"}]
  variant = run(tmp_path, [sample(0, gts, [{"bbox_2d": [10, 10, 50, 60], "desc": "BBU设备 / 华为,显示完整",
                                            "score": 0.9}])], name="a.json")
  assert variant["overall_metrics"]["mAP"] == ONE
  strict = run(tmp_path, [sample(0, gts, [{"bbox_2d": [10, 10, 50, 60], "desc": "BBU设备 / 华为,显示完整",
                                           "score": 0.9}])], "--semantic_threshold", "0.95", name="b.json")
  assert strict["overall_metrics"]["mAP"] == 0.0
  assert strict["overall_metrics"]["errors@0.5"]["classification"] == 1
  assert strict["evaluation_info"]["unmatched_pred_labels"] == 1
  brand = run(tmp_path, [sample(0, gts, [{"bbox_2d": [10, 10, 50, 60], "desc": "BBU设备/中兴", "score": 0.9}])],
              name="c.json")
  assert brand["overall_metrics"]["mAP"] == 0.0 and brand["overall_metrics"]["fp@0.5"] == 1


def tiny_bert_dir(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  chars = sorted(set("".join(LABELS) + "BBUZTEHuawei设备中兴华为爱立信"))
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars
  model_dir = tmp_path / "tiny_bert"
  model_dir.mkdir()
  (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
  tokenizer = transformers.BertTokenizer(str(model_dir / "vocab.txt"), do_lower_case=False)
  tokenizer.save_pretrained(str(model_dir))
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
  transformers.BertModel(config).save_pretrained(str(model_dir))
  return model_dir


def test_embedding_similarity_code_path(tmp_path):
  from bbu_jax.eval.matching import EmbeddingSimilarity
  model_dir = tiny_bert_dir(tmp_path)
  similarity = EmbeddingSimilarity(str(model_dir))
  a, b = "螺丝连接点/BBU安装螺丝", "标签/5G-BBU-接地线"
  assert similarity(a, a) == 1.0
  assert similarity("BBU设备/华为", "BBU设备/中兴") == 0.0  # the exclusive-value rule still applies
  value = similarity(a, b)
  assert 0.0 <= value <= 1.0 and value == pytest.approx(similarity(b, a), abs=1e-6)
  gts = [{"bbox_2d": [10, 10, 50, 60], "desc": a}]
  metrics = run(tmp_path, [sample(0, gts, [dict(gts[0], score=0.5)])], "--embedding_model", str(model_dir))
  assert metrics["evaluation_info"]["label_similarity"] == f"embedding:{model_dir}"
  assert metrics["overall_metrics"]["mAP"] == ONE


# ----------------------------------------------------------------------------------------------------
# Categories.

def test_categories_of_label_shapes():
  categorize = Categorizer()
  cases = {"螺丝、光纤插头/BBU安装螺丝,显示完整,符合要求": "screw", "螺丝、光纤插头/BBU端光纤插头,显示完整": "connection",
           "螺丝、光纤插头/地排处接地螺丝,显示完整": "grounding", "螺丝连接点/BBU安装螺丝": "screw",
           "螺丝连接点/BBU尾纤和ODF连接点": "connection", "BBU设备/华为,这个BBU设备按要求配备了挡风板": "bbu",
           "bbu基带处理单元/华为": "bbu", "挡风板/安装": "shield", "机柜空间/非满载": "cabinet", "标签贴纸": "label",
           "标签/5G-BBU-接地线": "label", "线缆/x": "cable", "光纤/有保护措施": "cable", "电线/捆扎整齐": "cable",
           "接地/黄绿线": "grounding", "BBU device/Huawei": "bbu", "cabinet": "cabinet", "mystery": "other"}
  assert {label: categorize(label) for label in cases} == cases


def test_real_labels_all_fall_in_named_categories(shared_data):
  categorize = Categorizer()
  seen = set()
  for name in ("bbu_records.jsonl", "bbu_records_v3.jsonl"):
    for line in (shared_data / name).read_text(encoding="utf-8").splitlines():
      for obj in json.loads(line)["objects"]:
        seen.add(categorize(obj["desc"]))
  assert "other" not in seen
  assert {"bbu", "screw", "connection", "grounding", "label", "cable", "shield"} <= seen


def test_category_rules_file(tmp_path):
  rules = tmp_path / "rules.json"
  rules.write_text(json.dumps({"hardware": ["bbu", "螺丝"], "paper": ["标签"]}, ensure_ascii=False))
  gts = [{"bbox_2d": [10, 10, 50, 60], "desc": LABELS[0]}, {"bbox_2d": [60, 60, 90, 90], "desc": LABELS[3]},
         {"bbox_2d": [100, 100, 120, 120], "desc": LABELS[4]}]
  metrics = run(tmp_path, [sample(0, gts, [dict(gts[0], score=0.5)])], "--category_rules", str(rules))
  assert set(metrics["category_metrics"]) == {"hardware", "paper", "other"}
  assert metrics["category_metrics"]["hardware"]["mAP"] == ONE
  assert metrics["category_metrics"]["paper"]["mAP"] == 0.0
  bad = tmp_path / "bad.json"
  bad.write_text('{"x": "not a list"}')
  with pytest.raises(ValueError, match="bad.json"):
    load_rules(bad)


# ----------------------------------------------------------------------------------------------------
# Malformed input, formats, output shape.

def test_malformed_input_is_counted_not_fatal(tmp_path):
  good = {"bbox_2d": [10, 10, 50, 60], "desc": LABELS[0]}
  samples = [
      sample(0, [good], [dict(good, score=0.9)]),
      sample(1, [good], [], parse_error="truncated"),                                  # parse failure, empty
      {"id": "s2", "images": ["x.jpg"], "width": 200, "height": 200, "ground_truth": [good],
       "raw_response": '```json\n[{"bbox_2d": [10, 10, 50, 60], "label": "BBU设备/华为"}, {"bbox_2d": [1,'},
      {"id": "s3", "images": ["y.jpg"], "prediction": [dict(good, score=0.4)]},           # no gt, no size
      sample(4, [{"bbox_2d": [50, 60, 10, 10], "desc": LABELS[0]}],                     # x2 < x1
             [{"bbox_2d": [10, 10, 50], "desc": LABELS[0], "score": 0.3},               # bad boxes
              {"line": [0, 5, 20, 5, 40, 5], "desc": LABELS[4], "score": 0.2},          # zero area
              {"bbox_2d": ["a", 1, 2, 3], "desc": LABELS[0]},
              {"bbox_2d": [10, 10, 50, 60]},                                            # no label
              {"bbox_2d": [10, 10, 50, 60], "desc": LABELS[0], "score": "high"}]),     # no usable score
      "not a sample",
      sample(6, [], []),                                                                 # nothing at all
  ]
  metrics = run(tmp_path, samples)
  info = metrics["evaluation_info"]
  assert info["total_samples"] == 6
  assert info["parse_failures"] == 2
  assert info["parse_errors"] == {"truncated": 2}
  assert info["input_problems"] == {
      "unreadable_samples": 1, "missing_ground_truth": 1, "missing_size": 1, "inverted_boxes": 1,
      "invalid_pred_objects": 3, "empty_predictions": 2, "images_without_ground_truth": 2,
      "predictions_without_score": 2, "zero_area_boxes": 1}
  assert info["total_gt_objects"] == 4 and info["total_pred_objects"] == 5
  # Scoreless predictions exist, so all are ranked by their order.
  assert info["scores"].startswith("prediction order")
  overall = metrics["overall_metrics"]
  assert overall["tp@0.5"] == 3 and overall["fn@0.5"] == 1 and overall["fp@0.5"] == 2


def test_unreadable_file_is_one_clear_error(tmp_path, capsys):
  bad = tmp_path / "bad.json"
  bad.write_text("this is not json")
  assert evaluate.main(["--responses_file", str(bad), "--output_file", str(tmp_path / "m.json")]) == 2
  assert "bad.json" in capsys.readouterr().err


def test_old_pipeline_format_matches_ours(tmp_path):
  rng = np.random.default_rng(11)
  samples = random_samples(rng, 20, LABELS[:4], with_scores=False)
  old = []
  for s in samples:
    answer = json.dumps([{"bbox_2d": o["bbox_2d"], "label": o["desc"]} for o in s["prediction"]], ensure_ascii=False)
    old.append({"image": s["images"][0], "height": 200, "width": 200,
                "ground_truth": json.dumps([{"bbox_2d": o["bbox_2d"], "label": o["desc"]} for o in s["ground_truth"]],
                                           ensure_ascii=False),
                "pred_result": f"```json\n{answer}\n```"})
  old.append({"image": "broken.jpg", "height": 200, "width": 200, "ground_truth": "[]", "pred_result": "sorry"})
  old_file = tmp_path / "old.json"
  old_file.write_text(json.dumps(old, ensure_ascii=False), encoding="utf-8")
  output = tmp_path / "old.metrics.json"
  with contextlib.redirect_stdout(io.StringIO()):
    assert evaluate.main(["--responses_file", str(old_file), "--output_file", str(output)]) == 0
  old_metrics = json.loads(output.read_text(encoding="utf-8"))
  ours = run(tmp_path, samples)
  for key in ("mAP", "AP@0.5", "AP@0.75", "mAR", "tp@0.5"):
    assert old_metrics["overall_metrics"][key] == ours["overall_metrics"][key]
  assert old_metrics["evaluation_info"]["file_format"] == "old_pipeline"
  assert old_metrics["evaluation_info"]["parse_failures"] == 1
  assert old_metrics["evaluation_info"]["parse_errors"] == {"no json": 1}
  assert ours["overall_metrics"]["mAP"] == pytest.approx(direct_cocoeval(samples)["mAP"], abs=1e-12)


def test_head_source(tmp_path):
  gts = [{"bbox_2d": [10, 10, 50, 60], "desc": LABELS[0]}]
  samples = [sample(0, gts, [], head_prediction=[dict(gts[0], score=0.7)])]
  assert run(tmp_path, samples, "--source", "head", name="h.json")["overall_metrics"]["mAP"] == ONE
  assert run(tmp_path, samples, "--source", "lm", name="l.json")["overall_metrics"]["mAP"] == 0.0


def test_output_shape(tmp_path):
  metrics = run(tmp_path, random_samples(np.random.default_rng(4), 10, LABELS))
  assert list(metrics) == ["evaluation_info", "overall_metrics", "category_metrics"]
  info = metrics["evaluation_info"]
  for key in ("responses_file", "total_samples", "total_gt_objects", "total_pred_objects", "iou_thresholds",
              "semantic_threshold", "parse_failures"):
    assert key in info
  assert info["iou_thresholds"] == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
  for metrics_of in [metrics["overall_metrics"], *metrics["category_metrics"].values()]:
    for key in ("mAP", "AP@0.5", "AP@0.75", "mAR", "precision@0.5", "recall@0.75", "f1@0.5", "errors@0.5"):
      assert key in metrics_of


def test_empty_and_no_ground_truth(tmp_path):
  nothing = run(tmp_path, [sample(0, [], [])], name="n.json")
  assert nothing["overall_metrics"]["mAP"] is None and nothing["category_metrics"] == {}
  only_preds = run(tmp_path, [sample(0, [], [{"bbox_2d": [1, 1, 5, 5], "desc": "标签", "score": 0.2}])],
                   name="p.json")
  assert only_preds["overall_metrics"]["mAP"] is None
  assert only_preds["overall_metrics"]["precision@0.5"] == 0.0
  assert only_preds["overall_metrics"]["errors@0.5"]["background"] == 1


def test_compare_table(tmp_path):
  gts = [{"bbox_2d": [10, 10, 50, 60], "desc": LABELS[0]}, {"bbox_2d": [100, 100, 150, 150], "desc": LABELS[2]}]
  run(tmp_path, [sample(0, gts, [dict(gts[0], score=0.9)])], name="a.json")
  run(tmp_path, [sample(0, gts, [dict(g, score=0.9) for g in gts])], name="b.json")
  result = subprocess.run([sys.executable, "-m", "bbu_jax.evaluate", "--compare",
                           str(tmp_path / "a.json.metrics.json"), str(tmp_path / "b.json.metrics.json")],
                          capture_output=True, text=True, check=True, timeout=120,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
  rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
  assert rows["mAP"] == ["0.5000", "1.0000", "+0.5000"]
  assert rows["recall@0.5"] == ["0.5000", "1.0000", "+0.5000"]
  assert rows["screw/mAP"] == ["0.0000", "1.0000", "+1.0000"]
  assert rows["bbu/mAP"] == ["1.0000", "1.0000", "+0.0000"]


def test_inference_mode_without_and_with_infer_module(tmp_path, monkeypatch):
  args = ["--model_path", "m", "--input_jsonl", "in.jsonl", "--data_root", str(tmp_path),
          "--output_file", str(tmp_path / "m.json"), "--max_new_tokens", "7"]
  monkeypatch.setattr(evaluate.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(SystemExit, match="inference is not available"):
    evaluate.main(args)
  monkeypatch.undo()
  gts = [{"bbox_2d": [10, 10, 50, 60], "desc": LABELS[0]}]
  calls = []
  def main(argv):
    calls.append(argv)
    output = pathlib.Path(argv[argv.index("--output_file") + 1])
    write_responses(output, [sample(0, gts, [dict(gts[0], score=0.5)]), sample(1, gts, [], error="unreadable image")])
    return 0
  fake = types.ModuleType("bbu_jax.infer")
  fake.__spec__ = importlib.machinery.ModuleSpec("bbu_jax.infer", None)
  fake.main = main
  monkeypatch.setitem(sys.modules, "bbu_jax.infer", fake)
  with contextlib.redirect_stdout(io.StringIO()):
    assert evaluate.main(args) == 0
  argv = calls[0]
  assert argv[argv.index("--model_path") + 1] == "m" and argv[argv.index("--input_jsonl") + 1] == "in.jsonl"
  assert argv[-2:] == ["--max_new_tokens", "7"]  # passed through to bbu_jax.infer
  assert argv[argv.index("--output_file") + 1] == str(tmp_path / "m.responses.json")
  metrics = json.loads((tmp_path / "m.json").read_text())
  assert metrics["overall_metrics"]["recall@0.5"] == 0.5
  assert metrics["evaluation_info"]["input_problems"]["inference_errors"] == 1
  fake.main = lambda argv: 2
  with pytest.raises(SystemExit, match="inference failed"):
    evaluate.main(args)
  with pytest.raises(SystemExit):  # unknown flags outside inference mode
    evaluate.main(["--responses_file", "r.json", "--output_file", "m.json", "--max_new_tokens", "7"])


def test_real_records_as_perfect_predictions(tmp_path, shared_data):
  lines = (shared_data / "bbu_records_v3.jsonl").read_text(encoding="utf-8").splitlines()[:40]
  samples = []
  for index, line in enumerate(lines):
    record = json.loads(line)
    truth = record["objects"]
    prediction = [{"bbox_2d": coco_box, "desc": obj["desc"], "score": 1.0 - k / len(truth)}
                  for k, (obj, coco_box) in enumerate((o, _box(o)) for o in truth)]
    samples.append({"id": str(index), "images": record["images"], "width": record["width"],
                    "height": record["height"], "ground_truth": truth, "prediction": prediction})
  metrics = run(tmp_path, samples)
  assert metrics["overall_metrics"]["mAP"] == ONE
  assert metrics["evaluation_info"]["input_problems"] == {}
  assert {"bbu", "screw", "label", "cable"} <= set(metrics["category_metrics"])
  assert all(m["mAP"] == ONE for m in metrics["category_metrics"].values())


def _box(obj):
  from bbu_jax.data.answer import object_box
  return object_box(obj)


_JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from(LABELS + ["", " ", "[{", '[{"bbox_2d": [1, 2, 3, 4], "label": "x"}]']))
_JSON = st.recursive(_JSON_LEAF, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                         st.dictionaries(st.sampled_from(
                                                             ["bbox_2d", "desc", "label", "score", "quad", "line"]),
                                                             inner, max_size=4)), max_leaves=12)
_OBJECT = st.one_of(
    st.fixed_dictionaries({"bbox_2d": st.lists(st.one_of(st.integers(-10, 210), st.floats(-10, 210)), min_size=3,
                                                max_size=5),
                           "desc": st.sampled_from(LABELS)},
                          optional={"score": st.one_of(st.floats(0, 1), st.none(), st.text(max_size=2))}),
    _JSON)
_SAMPLE = st.one_of(
    st.fixed_dictionaries({}, optional={"id": st.one_of(st.text(max_size=3), st.integers()),
                                        "width": _JSON_LEAF, "height": _JSON_LEAF,
                                        "ground_truth": st.one_of(st.lists(_OBJECT, max_size=4), _JSON),
                                        "prediction": st.one_of(st.lists(_OBJECT, max_size=4), _JSON),
                                        "head_prediction": st.lists(_OBJECT, max_size=3),
                                        "raw_response": st.one_of(st.text(max_size=30), _JSON),
                                        "parse_error": _JSON_LEAF}),
    _JSON)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(samples=st.lists(_SAMPLE, max_size=5), old_format=st.booleans(), source=st.sampled_from(["lm", "head"]))
def test_any_responses_content_evaluates_without_crashing(tmp_path_factory, samples, old_format, source):
  tmp = tmp_path_factory.mktemp("fuzz")
  path = tmp / "r.json"
  if old_format:
    samples = [dict(s, pred_result=s.get("raw_response")) if isinstance(s, dict) else s for s in samples]
    path.write_text(json.dumps(samples), encoding="utf-8")
  else:
    path.write_text(json.dumps({"samples": samples}), encoding="utf-8")
  responses = read_responses(path, source=source)
  matcher = evaluate.build_matcher(responses, 0.7)
  result = coco.evaluate_samples(responses.samples, matcher, Categorizer())
  assert result.overall["num_gt"] == sum(len(s.ground_truth) for s in responses.samples)
  assert result.overall["num_pred"] == sum(len(s.prediction) for s in responses.samples)
  assert len(responses.samples) + responses.problems["unreadable_samples"] == len(samples)
  for metric in ("mAP", "AP@0.5", "mAR"):
    assert result.overall[metric] is None or 0.0 <= result.overall[metric] <= 1.0


def test_ground_truth_spelling_variants_are_one_class(tmp_path):
  variant = "螺丝连接点 / BBU 安装螺丝"
  gts = [{"bbox_2d": [10, 10, 50, 60], "desc": LABELS[2]}, {"bbox_2d": [100, 100, 150, 150], "desc": LABELS[2]},
         {"bbox_2d": [60, 10, 90, 40], "desc": variant}]
  preds = [{"bbox_2d": [10, 10, 50, 60], "desc": variant, "score": 0.9},
           {"bbox_2d": [100, 100, 150, 150], "desc": LABELS[2], "score": 0.8},
           {"bbox_2d": [60, 10, 90, 40], "desc": LABELS[2], "score": 0.7}]
  metrics = run(tmp_path, [sample(0, gts, preds)])
  assert metrics["overall_metrics"]["mAP"] == ONE
  assert metrics["evaluation_info"]["gt_label_vocabulary"] == 1
  assert metrics["evaluation_info"]["gt_label_spellings_merged"] == 1
  matcher = LabelMatcher(collections.Counter({LABELS[2]: 2, variant: 1}))
  assert matcher.vocabulary == [LABELS[2]] and matcher.canonical(variant) == LABELS[2]
