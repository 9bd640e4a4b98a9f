"""The HTML detection browser rendered in headless Chromium: boxes drawn where they are, table and filters work."""

import contextlib
import io
import json
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from bbu_jax import evaluate
from bbu_jax.eval import report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if pathlib.Path("/usr/bin/chromium").exists() else None)
BACKDROP = (255, 0, 255)  # the test picture: plain magenta, so the drawn image can be found on screen
IMAGE_SIZE = (400, 300)
SCREW = "螺丝连接点/BBU安装螺丝"
BBU = "BBU设备/华为"
LABEL = "标签/5G-BBU-接地线"
GT_FOUND = [20, 20, 120, 70]
TP_BOX = [24, 24, 116, 66]
GT_MISSED = [250, 200, 350, 280]
FP_BOX = [250, 20, 380, 120]


def hex_rgb(color):
  return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))


def chromium(args, tmp_path, timeout=180):
  if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install -y chromium); .ci/run installs it")
  flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'chrome-profile'}"]
  return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("browser")
  data_root = tmp_path / "data"
  (data_root / "images").mkdir(parents=True)
  Image.new("RGB", IMAGE_SIZE, BACKDROP).save(data_root / "images" / "a.png")
  samples = [
      {"id": "with-picture", "images": ["images/a.png"], "width": IMAGE_SIZE[0], "height": IMAGE_SIZE[1],
       "ground_truth": [{"bbox_2d": GT_FOUND, "desc": SCREW}, {"bbox_2d": GT_MISSED, "desc": BBU}],
       "prediction": [{"bbox_2d": TP_BOX, "desc": SCREW, "score": 0.9},
                      {"bbox_2d": FP_BOX, "desc": LABEL, "score": 0.4}]},
      {"id": "no-picture", "images": ["images/missing.png"], "width": 300, "height": 200,
       "ground_truth": [{"quad": [30, 20, 120, 30, 110, 90, 20, 80], "desc": LABEL},
                        {"line": [10, 150, 100, 160, 200, 120], "desc": "光纤/有保护措施"}],
       "prediction": [{"bbox_2d": [20, 20, 120, 90], "desc": LABEL, "score": 0.8}]},
  ]
  responses = tmp_path / "responses.json"
  responses.write_text(json.dumps({"samples": samples}, ensure_ascii=False), encoding="utf-8")
  with contextlib.redirect_stdout(io.StringIO()):
    assert evaluate.main(["--responses_file", str(responses), "--output_file", str(tmp_path / "metrics.json"),
                          "--report_dir", str(tmp_path / "report"), "--data_root", str(data_root)]) == 0
  return tmp_path


def test_report_files(rendered):
  page = (rendered / "report" / "index.html").read_text(encoding="utf-8")
  assert 'href="../data/images/a.png"' in page  # the picture, relative to the page
  assert "missing.png" in page and page.count("<image ") == 1  # the second image is a blank canvas
  assert "<polygon" in page and "<polyline" in page  # quad and line geometry drawn
  metrics = json.loads((rendered / "metrics.json").read_text(encoding="utf-8"))
  for name in ["all", *metrics["category_metrics"]]:
    curve = rendered / "report" / f"pr_{name}.png"
    if name in ("all", "screw", "label"):
      assert curve.exists(), name
  # The curve of "all" has the IoU 0.5 colour in its plot.
  pixels = np.asarray(Image.open(rendered / "report" / "pr_all.png").convert("RGB"))
  assert (np.abs(pixels.astype(int) - report.CURVE_COLORS["0.5"]).sum(-1) < 30).sum() > 50


def test_screenshot_shows_boxes_where_they_are(rendered):
  screenshot = rendered / "shot.png"
  result = chromium([f"--screenshot={screenshot}", "--window-size=1400,2400",
                     (rendered / "report" / "index.html").as_uri()], rendered)
  assert screenshot.exists(), result.stderr[-2000:]
  pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)

  def near(color, tolerance=40):
    return np.abs(pixels - np.asarray(color)).sum(-1) < tolerance

  backdrop = near(BACKDROP)
  ys, xs = np.nonzero(backdrop)
  assert len(ys) > 10_000, "the test picture is not on the page"
  top, left = ys.min(), xs.min()
  scale = (xs.max() - left + 1) / IMAGE_SIZE[0]
  assert scale == pytest.approx(1.0, abs=0.02)  # drawn at its own size (width 400 <= 480)

  def sample_edges(box):
    """Screen pixels along the four edges of a box (inset by 0, stroke centred on the edge)."""
    x1, y1, x2, y2 = (v * scale for v in box)
    points = [(x, y) for x in np.linspace(x1 + 6, x2 - 6, 12) for y in (y1, y2)]
    points += [(x, y) for y in np.linspace(y1 + 6, y2 - 6, 8) for x in (x1, x2)]
    return [(int(round(top + y)), int(round(left + x))) for x, y in points]

  for box, color in [(GT_FOUND, report.COLORS["gt"]), (TP_BOX, report.COLORS["tp"]),
                     (GT_MISSED, report.COLORS["missed"]), (FP_BOX, report.COLORS["fp"])]:
    mask = near(hex_rgb(color), tolerance=60)
    hits = 0
    for y, x in sample_edges(box):
      hits += bool(mask[y - 1:y + 2, x - 1:x + 2].any())
    # A dashed outline (missed) shows on most sample points, a solid one on all of them.
    assert hits >= 0.6 * len(sample_edges(box)), (color, hits)
    # And nowhere in the middle of the box.
    x1, y1, x2, y2 = box
    cy, cx = int(top + (y1 + y2) / 2 * scale), int(left + (x1 + x2) / 2 * scale)
    assert not mask[cy - 3:cy + 4, cx - 3:cx + 4].any()
  # The blank canvas of the image without a file is drawn too.
  assert near(hex_rgb("#f4f4f4"), tolerance=6).sum() > 200 * 100


def test_dom_has_metrics_table_and_filters(rendered):
  index = rendered / "report" / "index.html"
  metrics = json.loads((rendered / "metrics.json").read_text(encoding="utf-8"))
  dom = chromium(["--dump-dom", index.as_uri()], rendered).stdout
  rows = re.findall(r'<tr class="metrics-row" data-category="([^"]+)"><td>[^<]*</td><td>([^<]*)</td>', dom)
  assert [name for name, _ in rows] == ["all", *metrics["category_metrics"]]
  assert dict(rows)["all"] == f'{metrics["overall_metrics"]["mAP"]:.3f}'
  assert re.search(r'<span id="shown-count">2</span>', dom)  # the script ran
  filtered = chromium(["--dump-dom", index.as_uri() + "#error=background"], rendered).stdout
  assert re.search(r'<span id="shown-count">1</span>', filtered)
  hidden = re.findall(r'<div class="card"[^>]*style="display: none;"', filtered)
  assert len(hidden) == 1
  by_category = chromium(["--dump-dom", index.as_uri() + "#category=cable"], rendered).stdout
  assert re.search(r'<span id="shown-count">1</span>', by_category)
