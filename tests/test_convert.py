"""Conversion of raw annotations (platform markResult/dataList, COCO, LabelMe) to records: labels,
geometry, EXIF orientation, smart-resize, split and teacher pool; a round trip of the real records."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from bbu_jax.data import convert, geometry, labels, records, validate
from tests.conftest import REPO


def _write_json(path, value):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")


def _feature(kind, coords, label=None, english=None, extra=None):
  properties = {}
  if label is not None:
    properties["contentZh"] = {**(extra or {}), "标签": label}
  if english is not None:
    properties["content"] = {"label": english}
  return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords},
          "properties": properties}


def _read(path):
  return [json.loads(x) for x in open(path, encoding="utf-8").read().splitlines()]


def _convert(tmp_path, **kwargs):
  out = tmp_path / "out"
  kwargs.setdefault("val_ratio", 0.0)
  report = convert.convert(str(tmp_path / "raw"), str(tmp_path / "images"), str(out), progress=False,
                           **kwargs)
  recs = {r["id"]: r for r in records.load_records(out / "train.jsonl")[0]}
  return report, recs, out


def test_platform_markresult_and_datalist(tmp_path):
  (tmp_path / "images").mkdir()
  Image.new("RGB", (200, 100)).save(tmp_path / "images" / "p1.jpeg")
  Image.new("RGB", (120, 80)).save(tmp_path / "images" / "p2.png")
  _write_json(tmp_path / "raw" / "p1.json", {"info": {"width": 200, "height": 100}, "markResult": {
      "type": "FeatureCollection", "features": [
          _feature("ExtentPolygon", [[10.4, 20.6], [50, 20.6], [50, 60], [10.4, 60], [10.4, 20.6]],
                   "连接点（螺丝）/BBU安装螺丝/连接正确"),
          _feature("Square", [[[120, 10], [150, 12], [148, 90], [118, 88], [120, 10]]], "BBU品牌/华为",
                   extra={"这个BBU设备是什么品牌": "华为"}),
          _feature("LineString", [[5, 95], [60, 70], [190, 5]], "线缆/光纤"),
          _feature("ExtentPolygon", [[0, 0], [9, 0], [9, 9], [0, 9], [0, 0]], None,
                   english="标签/匹配"),
          _feature("ExtentPolygon", [[1, 1], [5, 1], [5, 5], [1, 5], [1, 1]], "未知类型/x"),
          _feature("ExtentPolygon", [[1, 1], [5, 1], [5, 5], [1, 5], [1, 1]]),  # no label
      ]}})
  _write_json(tmp_path / "raw" / "p2.json", {"info": {"width": 120, "height": 80}, "dataList": [
      {"coordinates": [[30, 40], [10, 20]], "properties": {"contentZh": {"标签": "挡风板/安装"}}},
      {"coordinates": [[0, 0], [120, 0], [120, 80], [0, 80]],
       "properties": {"contentZh": {"标签": "机柜空间/非满载"}}}]})
  report, recs, out = _convert(tmp_path)
  assert report["formats"] == {"platform": 2} and report["records"] == 2
  p1 = recs["p1"]
  assert p1["images"] == ["images/p1.jpeg"] and (p1["width"], p1["height"]) == (200, 100)
  assert [(o["desc"], o["bbox_2d"], o["geometry"]["kind"]) for o in p1["objects"]] == [
      ("标签贴纸", [0, 0, 9, 9], "bbox"),
      ("线缆", [5, 5, 190, 95], "line"),
      ("bbu基带处理单元/华为", [118, 10, 150, 90], "quad"),
      ("螺丝连接点/BBU安装螺丝", [10, 21, 50, 60], "bbox"),
  ]
  assert p1["objects"][2]["geometry"]["points"] == [120, 10, 150, 12, 148, 90, 118, 88]
  assert [(o["desc"], o["bbox_2d"]) for o in recs["p2"]["objects"]] == [
      ("机柜空间/非满载", [0, 0, 120, 80]), ("挡风板/安装", [10, 20, 30, 40])]
  assert recs["p2"]["objects"][0]["geometry"]["kind"] == "quad"
  assert report["dropped_labels"] == {"未知类型/x": 1}
  rejects = _read(out / "rejects.jsonl")
  assert [(r["what"], r["where"]) for r in rejects] == [("object", "markResult.features[5]")]
  assert "no label" in rejects[0]["reason"]
  assert json.load(open(out / "label_vocab.json", encoding="utf-8"))["标签贴纸"] == 1
  assert validate.validate_file(out / "train.jsonl", out).ok


def test_label_map_and_hierarchy_files(tmp_path):
  (tmp_path / "images").mkdir()
  Image.new("RGB", (50, 50)).save(tmp_path / "images" / "a.jpg")
  _write_json(tmp_path / "raw" / "a.json", {"info": {"width": 50, "height": 50}, "markResult": {
      "features": [_feature("ExtentPolygon", [[1, 1], [9, 9]], "cab/full"),
                   _feature("ExtentPolygon", [[2, 2], [8, 8]], "screw/other")]}})
  _write_json(tmp_path / "map.json", {"cab": "机柜空间", "full": "满载"})
  _write_json(tmp_path / "h.json", [{"object_type": "机柜空间", "property": ["满载"]}])
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "bbu_jax.data.convert", "--input_folder",
                         str(tmp_path / "raw"), "--image_folder", str(tmp_path / "images"),
                         "--output_root", str(out), "--label_map", str(tmp_path / "map.json"),
                         "--hierarchy", str(tmp_path / "h.json"), "--val_ratio", "0", "--no_progress"],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr
  (rec,) = _read(out / "train.jsonl")
  assert [o["desc"] for o in rec["objects"]] == ["机柜空间/满载"]
  report = json.load(open(out / "conversion_report.json", encoding="utf-8"))
  assert report["dropped_labels"] == {"screw/other": 1}


def test_coco_and_labelme(tmp_path):
  (tmp_path / "images").mkdir()
  for name, size in [("c1.jpg", (100, 60)), ("c2.jpg", (80, 80)), ("lm.png", (64, 48))]:
    Image.new("RGB", size).save(tmp_path / "images" / name)
  _write_json(tmp_path / "raw" / "coco.json", {
      "images": [{"id": 1, "file_name": "sub/c1.jpg", "width": 100, "height": 60},
                 {"id": 2, "file_name": "c2.jpg", "width": 80, "height": 80}],
      "categories": [{"id": 7, "name": "标签贴纸"}, {"id": 8, "name": "挡风板/安装"}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20.5, 30]},
                      {"id": 2, "image_id": 2, "category_id": 8, "bbox": [0, 0, 80, 80]},
                      {"id": 3, "image_id": 2, "category_id": 99, "bbox": [0, 0, 8, 8]}]})
  _write_json(tmp_path / "raw" / "lm.json", {"imagePath": "../images/lm.png", "imageWidth": 64,
                                            "imageHeight": 48, "shapes": [
      {"label": "螺丝连接点/地排处螺丝", "shape_type": "rectangle", "points": [[30, 40], [10, 20]]},
      {"label": "标签贴纸", "shape_type": "polygon", "points": [[1, 1], [9, 2], [8, 9], [2, 8]]},
      {"label": "线缆", "shape_type": "linestrip", "points": [[0, 47], [63, 0]]},
      {"label": "标签贴纸", "shape_type": "circle", "points": [[5, 5], [9, 9]]}]})
  report, recs, out = _convert(tmp_path)
  assert report["formats"] == {"coco": 1, "labelme": 1}
  assert [(o["desc"], o["bbox_2d"]) for o in recs["c1"]["objects"]] == [("标签贴纸", [10, 5, 30, 35])]
  assert [(o["desc"], o["bbox_2d"]) for o in recs["c2"]["objects"]] == [("挡风板/安装", [0, 0, 80, 80])]
  assert [(o["desc"], o["bbox_2d"], o["geometry"]["kind"]) for o in recs["lm"]["objects"]] == [
      ("线缆", [0, 0, 63, 47], "line"), ("标签贴纸", [1, 1, 9, 9], "quad"),
      ("螺丝连接点/地排处螺丝", [10, 20, 30, 40], "bbox")]
  reasons = sorted(r["reason"] for r in _read(out / "rejects.jsonl"))
  assert len(reasons) == 2
  assert "unknown image_id or category_id" in reasons[0] and "circle" in reasons[1]


def test_bad_files_and_missing_images_are_rejected(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "raw").mkdir()
  (tmp_path / "raw" / "broken.json").write_text("{nope", encoding="utf-8")
  _write_json(tmp_path / "raw" / "other.json", {"hello": 1})
  _write_json(tmp_path / "raw" / "noimg.json", {"markResult": {"features": []}})
  report, recs, out = _convert(tmp_path)
  assert recs == {} and report["rejects"] == 3
  reasons = {os.path.basename(r["source"]): r["reason"] for r in _read(out / "rejects.jsonl")}
  assert reasons["broken.json"].startswith("unreadable JSON")
  assert reasons["other.json"].startswith("unknown annotation format")
  assert reasons["noimg.json"].startswith("no image named 'noimg'")


def test_exif_rotated_jpeg_is_written_upright(tmp_path):
  (tmp_path / "images").mkdir()
  stored = Image.new("RGB", (60, 40), (0, 0, 255))
  stored.paste((255, 0, 0), (0, 0, 10, 10))  # red in the stored top-left corner
  exif = Image.Exif()
  exif[0x0112] = 6  # display rotated 90 degrees clockwise: stored top-left -> displayed top-right
  for name in ("rot", "rot_declared_stored"):
    stored.save(tmp_path / "images" / f"{name}.jpg", exif=exif, quality=98)
  box = [[25, 5], [35, 5], [35, 50], [25, 50], [25, 5]]  # in the displayed 40x60 frame
  _write_json(tmp_path / "raw" / "rot.json", {"info": {"width": 40, "height": 60}, "markResult": {
      "features": [_feature("ExtentPolygon", box, "标签贴纸")]}})
  _write_json(tmp_path / "raw" / "rot_declared_stored.json", {
      "info": {"width": 60, "height": 40},
      "markResult": {"features": [_feature("ExtentPolygon", box, "标签贴纸")]}})
  report, recs, out = _convert(tmp_path)
  for name in ("rot", "rot_declared_stored"):
    rec = recs[name]
    assert (rec["width"], rec["height"]) == (40, 60)
    assert rec["objects"][0]["bbox_2d"] == [25, 5, 35, 50]
    with Image.open(out / rec["images"][0]) as written:
      assert written.size == (40, 60)
      assert written.getexif().get(0x0112, 1) == 1
      red, _, blue = written.convert("RGB").getpixel((35, 4))
      assert red > 200 and blue < 60
      red, _, blue = written.convert("RGB").getpixel((4, 4))
      assert blue > 200 and red < 60
  assert len(report["warnings"]) == 1
  assert "rot_declared_stored.json" in report["warnings"][0] and "EXIF orientation" in \
      report["warnings"][0]
  assert validate.validate_file(out / "train.jsonl", out).ok


def test_rescale_moves_boxes_with_the_image(tmp_path):
  (tmp_path / "images").mkdir()
  photo = Image.new("RGB", (1440, 1920), (20, 20, 20))
  photo.paste((250, 250, 0), (300, 600, 900, 1500))
  photo.save(tmp_path / "images" / "big.jpg", quality=95)
  _write_json(tmp_path / "raw" / "big.json", {"info": {"width": 1440, "height": 1920}, "markResult": {
      "features": [_feature("ExtentPolygon", [[300, 600], [900, 600], [900, 1500], [300, 1500]],
                            "挡风板/安装"),
                   _feature("LineString", [[0, 0], [1440, 1920]], "线缆")]}})
  report, recs, out = _convert(tmp_path, rescale=True)
  rec = recs["big"]
  assert (rec["width"], rec["height"]) == (532, 728)
  assert rec["images"] == ["ds_rescaled/big.jpg"]
  shield = next(o for o in rec["objects"] if o["desc"] == "挡风板/安装")
  assert shield["bbox_2d"] == geometry.scale_box([300, 600, 900, 1500], (1440, 1920), (532, 728))
  cable = next(o for o in rec["objects"] if o["desc"] == "线缆")
  assert cable["bbox_2d"] == [0, 0, 532, 728]
  with Image.open(out / rec["images"][0]) as resized:
    assert resized.size == (532, 728)
    x1, y1, x2, y2 = shield["bbox_2d"]
    inside = resized.getpixel(((x1 + x2) // 2, (y1 + y2) // 2))
    assert inside[0] > 200 and inside[2] < 60
    for x, y in [(x1 + 2, y1 + 2), (x2 - 3, y2 - 3)]:  # the painted block fills the box to its edges
      assert resized.getpixel((x, y))[0] > 150
    for x, y in [(x1 - 3, y1 - 3), (x2 + 2, y2 + 2)]:
      assert resized.getpixel((x, y))[0] < 80
  assert validate.validate_file(out / "train.jsonl", out).ok


def _toy_records(n):
  recs = []
  for i in range(n):
    count = [2, 9, 20][i % 3]
    objects = []
    for j in range(count):
      x = (j * 37 + i * 11) % 90
      y = (j * 53 + i * 7) % 90
      size = [3, 8, 40][(i + j) % 3]
      objects.append({"bbox_2d": [x, y, min(x + size, 100), min(y + size, 100)],
                      "desc": f"type{(i * j) % 7}/p{j % 2}"})
    recs.append(records.normalize_record({"id": f"r{i}", "images": [f"r{i}.jpg"], "width": 100,
                                          "height": 100, "objects": objects}))
  return recs


def test_teacher_pool_covers_every_feature_and_leaves_train():
  recs = _toy_records(60)
  universe = set().union(*(convert.teacher_features(r) for r in recs[6:]))
  assert {"count:sparse", "count:medium", "count:dense", "size:small", "size:large"} <= universe
  train, val, teachers, coverage = convert.split_records(recs, val_ratio=0.1, seed=3,
                                                         teacher_pool_size=12)
  assert len(val) == 6 and len(teachers) == 12 and len(train) == 42
  ids = [r["id"] for r in train + val + teachers]
  assert len(set(ids)) == 60
  rest_universe = set().union(*(convert.teacher_features(r) for r in train + teachers))
  assert coverage["uncovered"] == [] and coverage["features"] == len(rest_universe)
  assert set().union(*(convert.teacher_features(r) for r in teachers)) == rest_universe
  again = convert.split_records(recs, val_ratio=0.1, seed=3, teacher_pool_size=12)
  assert [r["id"] for r in again[2]] == [r["id"] for r in teachers]
  other = convert.split_records(recs, val_ratio=0.1, seed=4, teacher_pool_size=12)
  assert [r["id"] for r in other[1]] != [r["id"] for r in val]
  # a pool too small to cover everything reports what is missing
  _, _, small, small_coverage = convert.split_records(recs, val_ratio=0.0, seed=0, teacher_pool_size=1)
  assert len(small) == 1 and small_coverage["uncovered"]
  assert small_coverage["covered"] + len(small_coverage["uncovered"]) == small_coverage["features"]


LIMIT = None  # records per file: all of them (about 8 s on 2 cores)


def _as_platform(record):
  features = []
  for obj in record["objects"]:
    kind, points = obj["geometry"]["kind"], obj["geometry"]["points"]
    pairs = [[points[i], points[i + 1]] for i in range(0, len(points), 2)]
    if kind == "bbox":
      x1, y1, x2, y2 = obj["bbox_2d"]
      features.append(_feature("ExtentPolygon", [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]],
                               obj["desc"]))
    elif kind == "quad":
      features.append(_feature("Square", [pairs + [pairs[0]]], obj["desc"]))
    else:
      features.append(_feature("LineString", pairs, obj["desc"]))
  return {"info": {"width": record["width"], "height": record["height"]},
          "markResult": {"type": "FeatureCollection", "features": features}}


def test_real_records_round_trip_through_platform_json(shared_data, tmp_path):
  originals = {}
  (tmp_path / "images").mkdir()
  for name in ("bbu_records.jsonl", "bbu_records_v3.jsonl"):
    for rec in records.load_records(shared_data / name)[0][:LIMIT]:
      stem = f"{name[:-6]}_{os.path.splitext(os.path.basename(rec['id']))[0]}"
      originals[stem] = rec
      Image.new("L", (rec["width"], rec["height"])).save(tmp_path / "images" / f"{stem}.png")
      _write_json(tmp_path / "raw" / f"{stem}.json", _as_platform(rec))
  report, train, out = _convert(tmp_path, hierarchy=None, token_map={}, val_ratio=0.1,
                                teacher_pool_size=12)
  parts = {name: {r["id"]: r for r in records.load_records(out / f"{name}.jsonl")[0]}
           for name in ("val", "teacher_pool")}
  assert report["rejects"] == 0
  assert (len(parts["val"]), len(parts["teacher_pool"])) == (round(0.1 * len(originals)), 12)
  recs = {**train, **parts["val"], **parts["teacher_pool"]}
  assert len(recs) == len(train) + len(parts["val"]) + len(parts["teacher_pool"])  # disjoint
  assert set(recs) == set(originals)
  covered = set().union(*(convert.teacher_features(r) for r in parts["teacher_pool"].values()))
  assert {"count:sparse", "count:medium", "count:dense", "size:small", "size:medium",
          "size:large"} <= covered
  assert report["teacher_coverage"]["covered"] == len(covered)
  for stem, original in originals.items():
    got = recs[stem]
    assert (got["width"], got["height"]) == (original["width"], original["height"])
    assert [(o["bbox_2d"], o["desc"], o["geometry"]) for o in got["objects"]] == \
        [(o["bbox_2d"], o["desc"], o["geometry"]) for o in original["objects"]]


def test_normalize_label_with_the_default_hierarchy():
  h = labels.load_label_hierarchy(None)
  assert labels.normalize_label("连接点（螺丝）/BBU安装螺丝/连接正确", None, h) == "螺丝连接点/BBU安装螺丝"
  assert labels.normalize_label("BBU品牌/华为", None, h) == "bbu基带处理单元/华为"
  assert labels.normalize_label("标签/匹配", None, h) == "标签贴纸"  # a type without properties
  assert labels.normalize_label("挡风板/未安装", None, h) == "挡风板"  # property not allowed: bare type
  assert labels.normalize_label("BBU设备/华为", None, h) is None  # type not in the hierarchy
  assert labels.normalize_label(" 线缆 / 光纤 ", None, None) == "线缆/光纤"
  assert labels.normalize_label("标签/匹配", None, None) == "标签贴纸/匹配"


def test_label_files_load_and_bad_ones_are_named(tmp_path):
  _write_json(tmp_path / "dict.json", {"a": ["x"]})
  _write_json(tmp_path / "list.json", [{"object_type": "a", "property": ["x"]}, {"object_type": "b"}])
  _write_json(tmp_path / "bad.json", {"a": "x"})
  _write_json(tmp_path / "map.json", {"a": 1})
  assert labels.load_label_hierarchy(tmp_path / "dict.json") == {"a": ["x"]}
  assert labels.load_label_hierarchy(tmp_path / "list.json") == {"a": ["x"], "b": []}
  assert labels.load_label_hierarchy("none") is None
  assert labels.load_label_hierarchy(None) == labels.DEFAULT_LABEL_HIERARCHY
  with pytest.raises(ValueError, match="bad.json: a label hierarchy is"):
    labels.load_label_hierarchy(tmp_path / "bad.json")
  with pytest.raises(ValueError, match="map.json: a token map"):
    labels.load_token_map(tmp_path / "map.json")
  assert labels.load_token_map(None)["BBU品牌"] == "bbu基带处理单元"
