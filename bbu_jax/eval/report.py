"""The HTML detection browser (--report_dir): one static page, no server, plus PR-curve PNGs.

Per image: the picture (or a blank canvas of its size) with ground truth and predictions drawn as SVG,
labels and scores, misses and false positives marked by kind; filters by category and error kind in
plain JS; the metrics table; precision-recall curves per category drawn with pillow.
"""

from __future__ import annotations

import html
import json
import os
import pathlib
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bbu_jax.eval.coco import ERROR_KINDS, Evaluation
from bbu_jax.eval.responses import Responses

# Box colours, also read by the browser test from screenshots: keep them saturated and distinct.
COLORS = {
    "gt": "#00b050",        # ground truth that was found
    "missed": "#ff8c00",    # ground truth nobody found
    "tp": "#0050ff",        # prediction that matched
    "fp": "#e00000",        # prediction that is a false positive (any kind)
}
CURVE_COLORS = {"0.5": (0, 80, 255), "0.75": (230, 120, 0)}
TABLE_KEYS = ("mAP", "AP@0.5", "AP@0.75", "mAR")


def _number(value: Any) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return f"{value:.3f}"
  return str(value)


def _safe_name(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


# ----------------------------------------------------------------------------------------------------
# PR curves.

def draw_pr_curve(path: pathlib.Path, title: str, curves: dict[str, np.ndarray], size=(360, 280)) -> None:
  """Precision (y) against recall (x) on COCO's 101 recall points, one line per IoU threshold."""
  width, height = size
  left, right, top, bottom = 44, 12, 26, 34
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  plot_w, plot_h = width - left - right, height - top - bottom
  def xy(recall: float, precision: float) -> tuple[float, float]:
    return left + recall * plot_w, top + (1.0 - precision) * plot_h
  for tick in np.linspace(0, 1, 6):
    x, _ = xy(tick, 0)
    _, y = xy(0, tick)
    draw.line([(x, top), (x, top + plot_h)], fill=(225, 225, 225))
    draw.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
    draw.text((x - 8, top + plot_h + 4), f"{tick:.1f}", fill="black", font=font)
    draw.text((6, y - 6), f"{tick:.1f}", fill="black", font=font)
  draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
  draw.text((left, 6), title, fill="black", font=font)
  draw.text((left + plot_w // 2 - 14, height - 14), "recall", fill="black", font=font)
  legend_x = left + plot_w - 70
  for n, (threshold, curve) in enumerate(sorted(curves.items())):
    recall = np.linspace(0, 1, len(curve))
    points = [xy(r, p) for r, p in zip(recall, curve)]
    color = CURVE_COLORS.get(threshold, (0, 0, 0))
    # The first (lowest) threshold is drawn widest, so that equal curves stay visible.
    draw.line(points, fill=color, width=5 if n == 0 else 2)
    draw.line([(legend_x, top + 10 + 12 * n), (legend_x + 14, top + 10 + 12 * n)], fill=color, width=2)
    draw.text((legend_x + 18, top + 4 + 12 * n), f"IoU {threshold}", fill="black", font=font)
  image.save(path)


# ----------------------------------------------------------------------------------------------------
# The page.

def _image_href(image: str | None, data_root: str | None, report_dir: pathlib.Path) -> str | None:
  if not image or not data_root:
    return None
  path = pathlib.Path(data_root) / image
  if not path.is_file():
    return None
  return pathlib.Path(os.path.relpath(path.resolve(), report_dir.resolve())).as_posix()


def _svg_label(x: float, y: float, text: str, color: str) -> str:
  return (f'<text x="{x + 2:.1f}" y="{max(y - 3, 10):.1f}" fill="{color}" class="lbl">'
          f"{html.escape(text)}</text>")


def _box_svg(box: Sequence[float], color: str, css: str, title: str, dashed: bool = False) -> str:
  x1, y1, x2, y2 = box
  dash = ' stroke-dasharray="6 3"' if dashed else ""
  return (f'<rect class="{css}" x="{x1:.1f}" y="{y1:.1f}" width="{max(x2 - x1, 1):.1f}" '
          f'height="{max(y2 - y1, 1):.1f}" fill="none" stroke="{color}" stroke-width="3"{dash}>'
          f"<title>{html.escape(title)}</title></rect>")


def _geometry_svg(obj: dict[str, Any], color: str) -> str:
  if "quad" in obj:
    points = obj["quad"]
    tag = "polygon"
  elif "line" in obj:
    points = obj["line"]
    tag = "polyline"
  else:
    return ""
  coords = " ".join(f"{points[i]:.1f},{points[i + 1]:.1f}" for i in range(0, len(points) - 1, 2))
  return f'<{tag} class="geom" points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>'


def _card(index: int, responses: Responses, evaluation: Evaluation, gt_rows: np.ndarray, dt_rows: np.ndarray,
          href: str | None) -> str:
  sample = responses.samples[index]
  flat = evaluation.flat
  width, height = sample.width or 1, sample.height or 1
  parts = []
  if href:
    parts.append(f'<image href="{html.escape(href)}" x="0" y="0" width="{width}" height="{height}"/>')
  else:
    parts.append(f'<rect x="0" y="0" width="{width}" height="{height}" fill="#f4f4f4"/>')
  categories, kinds, listing = set(), set(), []
  for row, obj in zip(gt_rows, sample.ground_truth):
    category = flat.class_category[flat.gt_class[row] - 1]
    categories.add(category)
    found = bool(evaluation.gt_matched[row])
    color = COLORS["gt"] if found else COLORS["missed"]
    if not found:
      kinds.add("missed")
    title = f"GT {obj['desc']} [{category}]" + ("" if found else " — MISSED")
    parts.append(_geometry_svg(obj, color))
    parts.append(_box_svg(obj["bbox"], color, "gt" if found else "gt missed", title, dashed=not found))
    listing.append((category, "missed" if not found else "gt", f"GT {obj['desc']}" + ("" if found else " (missed)")))
  for row, obj in zip(dt_rows, sample.prediction):
    class_label = flat.class_labels[flat.dt_class[row] - 1]
    category = flat.class_category[flat.dt_class[row] - 1]
    categories.add(category)
    status = str(evaluation.dt_status[row])
    kinds.add(status)
    color = COLORS["tp"] if status == "tp" else COLORS["fp"]
    score = flat.dt_score[row]
    mapped = "" if class_label == obj["desc"] else f" → {class_label}"
    text = f"{obj['desc']}{mapped} {score:.2f}" + ("" if status == "tp" else f" [{status}]")
    parts.append(_box_svg(obj["bbox"], color, "pred " + status, "PRED " + text))
    parts.append(_svg_label(obj["bbox"][0], obj["bbox"][1], f"{score:.2f}" + ("" if status == "tp" else " " + status),
                            color))
    listing.append((category, status, "PRED " + text))
  items = "".join(f'<li class="k-{html.escape(kind)}" data-category="{html.escape(cat)}">{html.escape(text)}</li>'
                  for cat, kind, text in listing)
  errors = sorted(kinds - {"tp"})
  header = (f"<b>{html.escape(sample.sample_id)}</b> {html.escape(sample.image or '')} "
            f"({width}×{height}) — GT {len(sample.ground_truth)}, predictions {len(sample.prediction)}"
            + (f", errors: {', '.join(errors)}" if errors else "")
            + (f", parse error: {html.escape(sample.parse_error)}" if sample.parse_error else ""))
  display_width = min(width, 480)
  return (f'<div class="card" data-categories="{html.escape(" ".join(sorted(categories)))}" '
          f'data-errors="{html.escape(" ".join(errors) or "none")}">'
          f'<div class="head">{header}</div>'
          f'<svg viewBox="0 0 {width} {height}" width="{display_width}" '
          f'height="{display_width * height / width:.0f}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
          f'<ul class="objects">{items}</ul></div>')


def _metrics_table(result: dict[str, Any], match_key: str) -> str:
  columns = list(TABLE_KEYS) + [f"precision@{match_key}", f"recall@{match_key}", f"f1@{match_key}",
                                "num_gt", "num_pred"] + [f"{kind}" for kind in ERROR_KINDS]
  head = "".join(f"<th>{html.escape(c)}</th>" for c in ["category"] + columns)
  rows = []
  for name, metrics in [("all", result["overall_metrics"])] + list(result["category_metrics"].items()):
    errors = metrics.get(f"errors@{match_key}", {})
    cells = [metrics.get(c) if c not in ERROR_KINDS else errors.get(c) for c in columns]
    rows.append(f'<tr class="metrics-row" data-category="{html.escape(name)}"><td>{html.escape(name)}</td>'
                + "".join(f"<td>{_number(v)}</td>" for v in cells) + "</tr>")
  return f'<table id="metrics-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


_SCRIPT = """
function applyFilters() {
  var category = document.getElementById('category-filter').value;
  var kind = document.getElementById('error-filter').value;
  var shown = 0;
  document.querySelectorAll('.card').forEach(function (card) {
    var cats = card.dataset.categories.split(' ');
    var errs = card.dataset.errors.split(' ');
    var ok = (category === 'all' || cats.indexOf(category) >= 0) &&
             (kind === 'all' || (kind === 'any' ? errs[0] !== 'none' : errs.indexOf(kind) >= 0));
    card.style.display = ok ? '' : 'none';
    if (ok) { shown += 1; }
  });
  document.getElementById('shown-count').textContent = shown;
}
// Filters can be preset from the address: index.html#category=screw&error=missed
var preset = new URLSearchParams(location.hash.slice(1));
if (preset.get('category')) { document.getElementById('category-filter').value = preset.get('category'); }
if (preset.get('error')) { document.getElementById('error-filter').value = preset.get('error'); }
document.getElementById('category-filter').addEventListener('change', applyFilters);
document.getElementById('error-filter').addEventListener('change', applyFilters);
applyFilters();
"""

_STYLE = """
body { font-family: sans-serif; margin: 16px; }
#metrics-table { border-collapse: collapse; margin-bottom: 12px; }
#metrics-table td, #metrics-table th { border: 1px solid #999; padding: 2px 6px; text-align: right; }
#metrics-table td:first-child { text-align: left; }
.curves img { margin: 4px; border: 1px solid #ccc; }
.card { display: inline-block; vertical-align: top; margin: 6px; padding: 6px; border: 1px solid #ccc; width: 490px; }
.card .head { font-size: 12px; margin-bottom: 4px; }
.card ul { font-size: 11px; max-height: 120px; overflow-y: auto; padding-left: 16px; }
.lbl { font-size: 12px; font-weight: bold; }
.k-missed { color: #c06000; } .k-tp { color: #0040c0; } .k-gt { color: #008040; }
.k-localization, .k-classification, .k-duplicate, .k-background { color: #c00000; }
.legend span { display: inline-block; padding: 0 6px; margin-right: 6px; color: white; }
"""


def write_report(report_dir: str | pathlib.Path, responses: Responses, evaluation: Evaluation,
                 result: dict[str, Any], data_root: str | None = None, max_images: int = 1000) -> pathlib.Path:
  """Writes index.html and pr_<category>.png into report_dir; returns the page's path.

  At most `max_images` images are drawn (those with errors first, then in file order), so that the page
  stays usable for large runs; the page says how many it shows.
  """
  report_dir = pathlib.Path(report_dir)
  report_dir.mkdir(parents=True, exist_ok=True)
  flat = evaluation.flat
  match_key = f"{evaluation.match_iou_threshold:g}"

  curve_tags = []
  for name, curves in evaluation.pr_curves.items():
    if not curves:
      continue
    file_name = f"pr_{_safe_name(name)}.png"
    draw_pr_curve(report_dir / file_name, f"{name}: precision vs recall", curves)
    curve_tags.append(f'<img src="{file_name}" alt="PR curve {html.escape(name)}" '
                      f'data-category="{html.escape(name)}">')

  num_samples = len(responses.samples)
  gt_rows = np.split(np.arange(len(flat.gt_sample)), np.searchsorted(flat.gt_sample, np.arange(1, num_samples)))
  dt_rows = np.split(np.arange(len(flat.dt_sample)), np.searchsorted(flat.dt_sample, np.arange(1, num_samples)))
  has_error = [bool((evaluation.dt_status[dt_rows[i]] != "tp").any() or (~evaluation.gt_matched[gt_rows[i]]).any())
               for i in range(num_samples)]
  order = sorted(range(num_samples), key=lambda i: (not has_error[i], i))[:max_images]
  cards = [_card(i, responses, evaluation, gt_rows[i], dt_rows[i],
                 _image_href(responses.samples[i].image, data_root, report_dir)) for i in sorted(order)]

  categories = list(result["category_metrics"])
  category_options = "".join(f'<option value="{html.escape(c)}">{html.escape(c)}</option>' for c in categories)
  error_options = "".join(f'<option value="{k}">{k}</option>' for k in ERROR_KINDS)
  info = result["evaluation_info"]
  metrics_json = json.dumps(result, ensure_ascii=False).replace("</", "<\\/")  # safe inside <script>
  legend = "".join(f'<span style="background:{color}">{name}</span>' for name, color in
                   [("ground truth", COLORS["gt"]), ("missed", COLORS["missed"]), ("true positive", COLORS["tp"]),
                    ("false positive", COLORS["fp"])])
  page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>bbu_jax detections: {html.escape(str(info.get('responses_file')))}</title>
<style>{_STYLE}</style></head><body>
<h1>Detections</h1>
<p id="summary">{html.escape(str(info.get('responses_file')))}: {info['total_samples']} images,
{info['total_gt_objects']} ground-truth objects, {info['total_pred_objects']} predictions;
matches at IoU {match_key}; scores: {html.escape(str(info.get('scores')))};
parse failures: {info['parse_failures']}.</p>
<h2>Metrics</h2>
{_metrics_table(result, match_key)}
<h2>Precision-recall curves</h2>
<div class="curves">{''.join(curve_tags)}</div>
<h2>Images</h2>
<p class="legend">{legend}</p>
<p>Category <select id="category-filter"><option value="all">all</option>{category_options}</select>
Error <select id="error-filter"><option value="all">all</option><option value="any">any error</option>{error_options}</select>
showing <span id="shown-count">{len(cards)}</span> of {len(cards)} drawn images ({num_samples} in the run;
images with errors first).</p>
<div id="cards">{''.join(cards)}</div>
<script>{_SCRIPT}</script>
<script type="application/json" id="metrics-json">{metrics_json}</script>
</body></html>
"""
  path = report_dir / "index.html"
  path.write_text(page, encoding="utf-8")
  return path
