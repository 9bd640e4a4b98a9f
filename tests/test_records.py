"""Record reading and normalization: three geometries, old records with square/line, errors, writing."""

import json

import pytest

from bbu_jax.data import geometry, records
from bbu_jax.data.records import RecordError


def _record(objects, **extra):
  return {"images": ["img/a.jpg"], "width": 100, "height": 80, "objects": objects, **extra}


def test_three_geometries_give_boxes_and_keep_shapes():
  raw = _record([
      {"line": [10, 50, 30, 40, 60, 70], "desc": "光纤/无保护措施"},
      {"quad": [20, 5, 40, 8, 38, 30, 18, 27], "label": "标签/5G"},
      {"bbox_2d": [1.4, 2.6, 9.5, 12.0], "desc": " 螺丝连接点/BBU安装螺丝 "},
  ])
  rec = records.normalize_record(raw)
  assert rec["id"] == "img/a.jpg"
  assert [o["bbox_2d"] for o in rec["objects"]] == [[1, 3, 10, 12], [18, 5, 40, 30], [10, 40, 60, 70]]
  assert [o["geometry"]["kind"] for o in rec["objects"]] == ["bbox", "quad", "line"]
  assert rec["objects"][1]["geometry"]["points"] == [20, 5, 40, 8, 38, 30, 18, 27]
  assert rec["objects"][1]["desc"] == "标签/5G"
  assert rec["objects"][0]["desc"] == "螺丝连接点/BBU安装螺丝"
  assert raw["objects"][0]["desc"] == "光纤/无保护措施"  # input untouched


def test_old_record_bbox_wins_over_square_and_line():
  raw = _record([
      {"bbox_2d": [10, 20, 30, 60], "desc": "BBU设备/华为", "square": [900, 1200, 1000, 1300, 950, 1500,
                                                                     880, 1400],
       "geometry": {"type": "Square", "coordinates": [[[30, 20], [28, 60], [10, 58], [12, 21], [30, 20]]]}},
      {"bbox_2d": [5, 5, 50, 9], "desc": "电线/捆扎整齐", "line": [400, 300, 1900, 320],
       "geometry": {"type": "LineString", "coordinates": [[5.2, 5.1], [49.8, 8.9]]}},
  ], id="rec-7")
  rec = records.normalize_record(raw)
  assert rec["id"] == "rec-7"
  wire, bbu = rec["objects"]
  assert bbu["bbox_2d"] == [10, 20, 30, 60]
  assert bbu["geometry"] == {"kind": "quad", "points": [30, 20, 28, 60, 10, 58, 12, 21]}
  assert wire["bbox_2d"] == [5, 5, 50, 9]
  assert wire["geometry"] == {"kind": "line", "points": [5, 5, 50, 9]}
  assert "square" not in bbu and "line" not in wire


def test_sorted_by_y1_then_x1():
  rec = records.normalize_record(_record([
      {"bbox_2d": [50, 10, 60, 20], "desc": "b"}, {"bbox_2d": [5, 30, 9, 40], "desc": "c"},
      {"bbox_2d": [10, 10, 20, 20], "desc": "a"}]))
  assert [o["desc"] for o in rec["objects"]] == ["a", "b", "c"]


def test_straight_line_gets_one_pixel_but_flat_box_is_an_error():
  rec = records.normalize_record(_record([{"line": [10, 80, 90, 80], "desc": "电线"}]))
  assert rec["objects"][0]["bbox_2d"] == [10, 79, 90, 80]
  with pytest.raises(RecordError, match=r"objects\[0\]\.bbox_2d: box \[10, 5, 10, 9\] has zero"):
    records.normalize_record(_record([{"bbox_2d": [10, 5, 10, 9], "desc": "x"}]))


@pytest.mark.parametrize("raw, field, message", [
    (_record([{"bbox_2d": [10, 5, 120, 9], "desc": "x"}]), "objects[0].bbox_2d", "outside the 100x80"),
    (_record([{"bbox_2d": [10, 5, 20, 9], "desc": ""}]), "objects[0].desc", "empty or missing label"),
    (_record([{"desc": "x"}]), "objects[0]", "no geometry"),
    (_record([{"quad": [1, 2, 3, 4], "desc": "x"}]), "objects[0].quad", "quad needs 8 numbers"),
    (_record([{"bbox_2d": [9, 5, 2, 9], "desc": "x"}]), "objects[0].bbox_2d", "x2 < x1"),
    (_record([], width=0), "width", "positive integer"),
    ({"images": [], "width": 5, "height": 5, "objects": []}, "images", "non-empty list"),
    ({"images": ["a"], "width": 5, "height": 5}, "objects", "list of objects"),
])
def test_bad_fields_are_named(raw, field, message):
  with pytest.raises(RecordError) as info:
    records.normalize_record(raw, source=("f.jsonl", 12))
  assert info.value.field == field
  assert message in info.value.message
  assert str(info.value).startswith(f"f.jsonl:12: {field}: ")


def test_iter_jsonl_reports_bad_lines_with_numbers(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_text('{"a": 1}\n\n{bad\n[1, 2]\n{"b": 2}\n', encoding="utf-8")
  items = list(records.iter_jsonl(path))
  assert [line for line, _ in items] == [1, 3, 4, 5]
  assert items[0][1] == {"a": 1} and items[3][1] == {"b": 2}
  assert isinstance(items[1][1], RecordError) and str(items[1][1]).startswith(f"{path}:3: bad JSON")
  assert isinstance(items[2][1], RecordError) and "got list" in items[2][1].message


def test_load_records_skip_writes_every_reject(tmp_path):
  good = _record([{"bbox_2d": [1, 1, 5, 5], "desc": "a"}])
  lines = [json.dumps(good), "{oops", json.dumps(_record([{"bbox_2d": [1, 1, 500, 5], "desc": "a"}],
                                                       id="other")),
           json.dumps(good)]
  path = tmp_path / "in.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  with pytest.raises(RecordError, match=":2: bad JSON"):
    records.load_records(path)
  rejects_path = tmp_path / "rejects.jsonl"
  recs, rejects = records.load_records(path, on_error="skip", rejects_path=rejects_path)
  assert len(recs) == 1 and recs[0]["id"] == "img/a.jpg"
  assert [(r["line"], r["field"]) for r in rejects] == [(2, None), (3, "objects[0].bbox_2d"), (4, "id")]
  assert "duplicate id" in rejects[2]["error"] and "first at line 1" in rejects[2]["error"]
  written = [json.loads(x) for x in rejects_path.read_text(encoding="utf-8").splitlines()]
  assert written == rejects
  assert written[0]["raw"] == "{oops"


def test_export_then_normalize_round_trips(tmp_path):
  rec = records.normalize_record(_record([
      {"line": [10, 50, 30, 40, 60, 70], "desc": "光纤"}, {"quad": [20, 5, 40, 8, 38, 30, 18, 27],
                                                          "desc": "标签"},
      {"bbox_2d": [1, 3, 10, 12], "desc": "螺丝"}]))
  exported = records.export_record(rec)
  assert [sorted(o) for o in exported["objects"]] == [["bbox_2d", "desc"], ["desc", "quad"],
                                                      ["desc", "line"]]
  path = tmp_path / "out" / "x.jsonl"
  assert records.write_jsonl(path, [exported, exported]) == 2
  assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temp file left behind
  back, _ = records.load_records(path, on_error="skip")
  assert back[0] == rec


def test_write_jsonl_keeps_old_file_when_writing_fails(tmp_path):
  path = tmp_path / "x.jsonl"
  records.write_jsonl(path, [{"a": 1}])

  def broken():
    yield {"b": 2}
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError):
    records.write_jsonl(path, broken())
  assert path.read_text() == '{"a": 1}\n'
  assert list(tmp_path.iterdir()) == [path]


def test_smart_resize_matches_the_real_sizes():
  # 1440x1920 and 1080x1920 phone photos give the old ds_rescaled sizes (height, width).
  assert geometry.smart_resize(1920, 1440) == (728, 532)
  assert geometry.smart_resize(1920, 1080) == (840, 448)
  assert geometry.smart_resize(10, 10) == (56, 56)
  for h, w in [(1920, 1440), (333, 1001), (30, 4000)]:
    rh, rw = geometry.smart_resize(h, w)
    assert rh % 28 == 0 and rw % 28 == 0 and 4 * 28 * 28 <= rh * rw <= 512 * 28 * 28
  assert geometry.scale_box([100, 200, 1440, 1920], (1440, 1920), (532, 728)) == [37, 76, 532, 728]


def test_real_records_normalize_and_keep_boxes(shared_data):
  for name, kinds in [("bbu_records.jsonl", {"bbox", "quad", "line"}),
                      ("bbu_records_v3.jsonl", {"bbox", "quad", "line"})]:
    recs, rejects = records.load_records(shared_data / name, on_error="skip")
    assert rejects == []
    assert {o["geometry"]["kind"] for r in recs for o in r["objects"]} == kinds
    raw_by_id = {}
    for _, raw in records.iter_jsonl(shared_data / name):
      raw_by_id[raw["images"][0]] = raw
    for rec in recs:
      raw = raw_by_id[rec["id"]]
      assert len(rec["objects"]) == len(raw["objects"])
      for obj in rec["objects"]:
        x1, y1, x2, y2 = obj["bbox_2d"]
        assert 0 <= x1 < x2 <= rec["width"] and 0 <= y1 < y2 <= rec["height"]
      ys = [(o["bbox_2d"][1], o["bbox_2d"][0]) for o in rec["objects"]]
      assert ys == sorted(ys)
      if all("bbox_2d" in o for o in raw["objects"]):  # bbox_2d kept exactly, but 1 px for flat lines
        want = sorted(tuple(o["bbox_2d"]) for o in raw["objects"])
        got = sorted(tuple(o["bbox_2d"]) for o in rec["objects"])
        changed = [(a, b) for a, b in zip(want, got) if a != b]
        assert all(a[0] == a[2] or a[1] == a[3] for a, _ in changed), changed
