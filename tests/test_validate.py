"""The validator names every problem of a seeded file with its line; training's split_valid refuses or
skips with a written rejects file."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from bbu_jax.data import validate
from tests.conftest import REPO


def _rec(image="img/good.png", width=40, height=30, objects=None, **extra):
  objects = [{"bbox_2d": [1, 2, 20, 25], "desc": "标签贴纸"}] if objects is None else objects
  head = {} if image == "img/good.png" else {"id": f"{image}:{width}:{json.dumps(objects)}"}
  return json.dumps({**head, "images": [image], "width": width, "height": height, "objects": objects,
                     **extra}, ensure_ascii=False)


@pytest.fixture()
def seeded(tmp_path):
  """A file with one problem per line (the expected message fragments keyed by line)."""
  img = tmp_path / "img"
  img.mkdir()
  Image.new("RGB", (40, 30), (90, 90, 90)).save(img / "good.png")
  Image.new("RGB", (40, 30), (90, 90, 90)).save(img / "other.png")
  (img / "garbage.jpg").write_bytes(b"this is not an image")
  full = img / "full.jpg"
  Image.new("RGB", (200, 150), (10, 200, 30)).save(full, quality=95)
  (img / "truncated.jpg").write_bytes(full.read_bytes()[:300])
  Image.new("RGB", (50, 30)).save(img / "wide.png")
  lines = {
      1: (_rec(objects=[{"bbox_2d": [1, 2, 20, 25], "desc": "BBU设备/华为",
                         "geometry": {"type": "Square", "coordinates": [[[1, 2], [20, 2], [20, 25],
                                                                         [1, 25], [1, 2]]]},
                         "square": [1, 2, 3, 4]},
                        {"line": [0, 5, 39, 5], "desc": "电线"}]), None),
      2: ('{"images": ["img/good.png"], "width": 40,', "bad JSON"),
      3: (_rec(image="img/nothere.png"), "missing image"),
      4: (_rec(image="img/garbage.jpg"), "unreadable image"),
      5: (_rec(image="img/wide.png"), "is 50x30 but the record says 40x30"),
      6: (_rec(image="img/other.png", objects=[{"bbox_2d": [1, 2, 41, 25], "desc": "a"}]),
          "outside the 40x30 image"),
      7: (_rec(image="img/other.png", objects=[{"bbox_2d": [20, 2, 20, 25], "desc": "a"}]), "zero width"),
      8: (_rec(image="img/other.png", objects=[{"quad": [1, 9, 5, 9, 7, 9, 2, 9], "desc": "a"}]),
          "zero width or height"),
      9: (_rec(image="img/other.png", objects=[{"bbox_2d": [1, 2, 20, 25], "desc": "  "}]),
          "empty or missing label"),
      10: (_rec(), "duplicate id 'img/good.png' (first at line 1)"),
      11: (_rec(image="img/truncated.jpg", width=200, height=150), "unreadable image"),
      12: (_rec(image="img/other.png", width=-3), "width: must be a positive integer"),
      13: (_rec(image="img/other.png", objects=[{"desc": "a"}]), "no geometry"),
      14: (_rec(image="img/other.png", objects=[{"bbox_2d": [9, 2, 3, 25], "desc": "a"}]), "x2 < x1"),
  }
  warning_line = 15
  text = "\n".join(lines[i][0] for i in sorted(lines))
  text += "\n" + _rec(image="img/other.png", id="x", source="phone", objects=[
      {"bbox_2d": [1, 2, 20, 25], "desc": "标签贴纸", "geometry": {"type": "Circle"}}]) + "\n"
  path = tmp_path / "seeded.jsonl"
  path.write_text(text, encoding="utf-8")
  expected = {line: fragment for line, (_, fragment) in lines.items() if fragment}
  return path, tmp_path, expected, warning_line


def test_every_problem_is_listed_with_its_line(seeded):
  path, root, expected, warning_line = seeded
  report = validate.validate_file(path, root)
  assert report.records == 15
  errors_by_line = {}
  for problem in report.errors:
    errors_by_line.setdefault(problem.line, []).append(str(problem))
  assert sorted(errors_by_line) == sorted(expected)
  for line, fragment in expected.items():
    assert any(fragment in message and message.startswith(f"{path}:{line}: ")
               for message in errors_by_line[line]), (line, errors_by_line[line])
  warnings = [str(p) for p in report.warnings]
  assert any(w.startswith(f"{path}:{warning_line}: warning: unknown top-level key 'source'")
             for w in warnings)
  assert any(w.startswith(f"{path}:1: warning: objects[1]: straight line") for w in warnings)
  assert any(w.startswith(f"{path}:{warning_line}: warning: objects[0].geometry: unknown geometry "
                          "type 'Circle'") for w in warnings)
  assert not any("'id'" in w for w in warnings)  # id is a known key
  assert report.labels["BBU设备/华为"] == 1 and report.labels["标签贴纸"] == 7
  assert not report.ok


def test_no_images_skips_file_checks(seeded):
  path, root, expected, _ = seeded
  report = validate.validate_file(path, root, check_images=False)
  image_lines = {3, 4, 5, 11}
  assert report.bad_lines == set(expected) - image_lines


def test_cli_prints_problems_and_exits_nonzero(seeded):
  path, root, expected, _ = seeded
  proc = subprocess.run([sys.executable, "-m", "bbu_jax.data.validate", "--jsonl_path", str(path),
                         "--image_root", str(root)], capture_output=True, text=True, cwd=REPO,
                        timeout=120)
  assert proc.returncode == 1
  for line in expected:
    assert f"{path}:{line}: " in proc.stdout
  assert f"15 records ({len(expected)} with errors)" in proc.stdout


def test_clean_file_exits_zero(tmp_path):
  Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
  path = tmp_path / "ok.jsonl"
  path.write_text(_rec(image="a.png") + "\n", encoding="utf-8")
  proc = subprocess.run([sys.executable, "-m", "bbu_jax.data.validate", "--jsonl_path", str(path)],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stdout
  assert "0 errors, 0 warnings" in proc.stdout


def test_split_valid_refuses_then_skips_with_rejects(seeded):
  path, root, expected, _ = seeded
  with pytest.raises(validate.InvalidDataError, match=r"errors in 13 of 15 records"):
    validate.split_valid(path, root)
  rejects_path = root / "rejects.jsonl"
  kept, report = validate.split_valid(path, root, skip_invalid=True, rejects_path=rejects_path)
  assert [r["id"] for r in kept] == ["img/good.png", "x"]
  written = [json.loads(x) for x in rejects_path.read_text(encoding="utf-8").splitlines()]
  assert [w["line"] for w in written] == sorted(expected)
  assert written[0]["raw"].startswith('{"images"')  # the bad-JSON line's text is kept
  assert len(kept) + len(written) == report.records


def test_real_records_pass_without_images(shared_data):
  for name in ("bbu_records.jsonl", "bbu_records_v3.jsonl"):
    report = validate.validate_file(shared_data / name, check_images=False)
    assert report.ok, [str(p) for p in report.errors[:5]]
    assert report.records == {"bbu_records.jsonl": 179, "bbu_records_v3.jsonl": 440}[name]
    # the only warnings are the straight cables whose boxes are one pixel thick
    assert all("straight line" in str(w) for w in report.warnings)
