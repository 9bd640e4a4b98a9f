"""Evaluation entry point: responses file -> COCO metrics JSON (+ HTML browser); or compare two runs.

  python -m bbu_jax.evaluate --responses_file R --output_file M [--iou_threshold 0.5]
      [--semantic_threshold 0.7] [--source lm|head] [--report_dir DIR] [--data_root D]
      [--category_rules F] [--embedding_model DIR]
  python -m bbu_jax.evaluate --compare A.json B.json
  python -m bbu_jax.evaluate --model_path P --input_jsonl F --data_root D --output_file M [infer flags]
      (inference first, into M's stem + .responses.json, then the metrics)
"""

from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import json
import pathlib
import sys
import time
from typing import Any, Sequence

from bbu_jax.eval import coco
from bbu_jax.eval.categories import Categorizer, load_rules
from bbu_jax.eval.matching import CharSimilarity, EmbeddingSimilarity, LabelMatcher
from bbu_jax.eval.responses import Responses, read_responses


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m bbu_jax.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--responses_file", help="responses JSON (bbu_jax or the old pipeline's format)")
  parser.add_argument("--output_file", help="where to write the metrics JSON")
  parser.add_argument("--iou_threshold", type=float, default=0.5,
                      help="IoU at which boxes count as matched for the error breakdown and the browser "
                           "(precision/recall/F1 are also given at 0.5 and 0.75; mAP is over 0.5:0.95)")
  parser.add_argument("--semantic_threshold", type=float, default=0.7,
                      help="a predicted label maps to the closest ground-truth label at this similarity")
  parser.add_argument("--source", choices=("lm", "head"), default="lm",
                      help="lm: the parsed answer (prediction); head: the detection head (head_prediction)")
  parser.add_argument("--report_dir", help="write the HTML detection browser here")
  parser.add_argument("--data_root", help="image root for the browser (and for inference)")
  parser.add_argument("--report_max_images", type=int, default=1000,
                      help="images drawn in the browser (those with errors first)")
  parser.add_argument("--category_rules", help='JSON {"category": ["keyword", ...]} replacing the defaults')
  parser.add_argument("--embedding_model", help="local transformers model dir for embedding label similarity")
  parser.add_argument("--workers", type=int, default=None,
                      help="forked processes for COCOeval matching (default 1; helps only on idle cores)")
  parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print two metrics files side by side")
  # Inference first, then metrics (the batched eval job).
  parser.add_argument("--model_path")
  parser.add_argument("--input_jsonl")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--teacher_pool_file")
  parser.add_argument("--num_teachers", type=int, default=0)
  # In inference mode, flags this parser does not know (--max_new_tokens, --max_pixels, ...) go to
  # bbu_jax.infer, which checks them.
  args, args.inference_flags = parser.parse_known_args(argv)
  if args.inference_flags and not args.model_path:
    parser.error(f"unrecognized arguments: {' '.join(args.inference_flags)}")
  if not args.compare:
    if args.model_path or args.input_jsonl:
      if not (args.model_path and args.input_jsonl and args.output_file):
        parser.error("inference mode needs --model_path, --input_jsonl and --output_file")
    elif not (args.responses_file and args.output_file):
      parser.error("give --responses_file and --output_file (or --compare A B, or --model_path ...)")
  if not 0.0 < args.iou_threshold <= 1.0:
    parser.error(f"--iou_threshold must be in (0, 1], got {args.iou_threshold}")
  if not 0.0 <= args.semantic_threshold <= 1.0:
    parser.error(f"--semantic_threshold must be in [0, 1], got {args.semantic_threshold}")
  return args


def build_matcher(responses: Responses, semantic_threshold: float, embedding_model: str | None = None
                  ) -> LabelMatcher:
  """A matcher onto the ground-truth label vocabulary of all samples."""
  vocabulary = collections.Counter(obj["desc"] for sample in responses.samples for obj in sample.ground_truth)
  similarity = EmbeddingSimilarity(embedding_model) if embedding_model else CharSimilarity()
  return LabelMatcher(vocabulary, semantic_threshold, similarity)


def metrics_json(responses: Responses, evaluation: coco.Evaluation, responses_file: str, semantic_threshold: float,
                 similarity_name: str, merged_spellings: int = 0) -> dict[str, Any]:
  """The output JSON: evaluation_info, overall_metrics, category_metrics."""
  flat = evaluation.flat
  parse_failures = sum(1 for s in responses.samples if s.parse_error)
  info = {
      "responses_file": str(responses_file),
      "total_samples": len(responses.samples),
      "total_gt_objects": int(len(flat.gt_class)),
      "total_pred_objects": int(len(flat.dt_class)),
      "iou_thresholds": coco.COCO_IOU_THRESHOLDS,
      "semantic_threshold": semantic_threshold,
      "parse_failures": parse_failures,
      "parse_errors": dict(sorted(responses.parse_errors.items())),
      "input_problems": {key: int(count) for key, count in sorted(responses.problems.items()) if count},
      "file_format": responses.file_format,
      "match_iou_threshold": evaluation.match_iou_threshold,
      "scores": evaluation.score_source,
      "label_similarity": similarity_name,
      "gt_label_vocabulary": flat.vocabulary_size,
      "gt_label_spellings_merged": merged_spellings,
      "unmatched_pred_labels": len(flat.class_labels) - flat.vocabulary_size,
      "metric_notes": ("mAP: COCO AP over IoU 0.5:0.05:0.95; AP@x: COCO AP at IoU x; mAR: COCO AR, maxDets "
                       "100, all areas (pycocotools COCOeval, one category per ground-truth label). "
                       "precision/recall/f1@x: counts of COCOeval's greedy matching at IoU x. null: undefined "
                       "(no ground truth)."),
  }
  if responses.model_path is not None:
    info["model_path"] = responses.model_path
  if responses.mode is not None:
    info["mode"] = responses.mode
  return {"evaluation_info": info, "overall_metrics": evaluation.overall,
          "category_metrics": evaluation.categories}


def evaluate_responses(args: argparse.Namespace) -> dict[str, Any]:
  """Metrics of a responses file, written to args.output_file (and the browser to args.report_dir)."""
  start = time.perf_counter()
  responses = read_responses(args.responses_file, source=args.source)
  matcher = build_matcher(responses, args.semantic_threshold, args.embedding_model)
  categorizer = Categorizer(load_rules(args.category_rules))
  evaluation = coco.evaluate_samples(responses.samples, matcher, categorizer,
                                     match_iou_threshold=args.iou_threshold, workers=args.workers)
  similarity_name = f"embedding:{args.embedding_model}" if args.embedding_model else "char-bigram dice"
  result = metrics_json(responses, evaluation, args.responses_file, args.semantic_threshold, similarity_name,
                        matcher.merged_spellings)
  output = pathlib.Path(args.output_file)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
  if args.report_dir:
    from bbu_jax.eval import report
    page = report.write_report(args.report_dir, responses, evaluation, result, data_root=args.data_root,
                               max_images=args.report_max_images)
    print(f"detection browser written to {page}")
  overall = result["overall_metrics"]
  print(f"{len(responses.samples)} samples in {time.perf_counter() - start:.1f}s: "
        + ", ".join(f"{k}={_fmt(overall.get(k))}" for k in ("mAP", "AP@0.5", "AP@0.75", "mAR")))
  print(f"metrics written to {output}")
  return result


# ----------------------------------------------------------------------------------------------------
# Comparing runs.

def _fmt(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def compare_table(a: dict[str, Any], b: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
  """Overall and per-category figures of two metrics files side by side, with B - A."""
  rows = [("metric", name_a, name_b, "B-A")]
  def add(prefix: str, metrics_a: dict[str, Any], metrics_b: dict[str, Any]) -> None:
    keys = [k for k in list(metrics_a) + [k for k in metrics_b if k not in metrics_a]
            if not isinstance(metrics_a.get(k, metrics_b.get(k)), dict)]
    for key in keys:
      va, vb = metrics_a.get(key), metrics_b.get(key)
      delta = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
      rows.append((prefix + key, _fmt(va), _fmt(vb), _fmt(delta) if not isinstance(delta, float)
                   else f"{delta:+.4f}"))
  add("", a.get("overall_metrics", {}), b.get("overall_metrics", {}))
  cats_a, cats_b = a.get("category_metrics", {}), b.get("category_metrics", {})
  for category in list(cats_a) + [c for c in cats_b if c not in cats_a]:
    metrics_a, metrics_b = cats_a.get(category, {}), cats_b.get(category, {})
    short = {k: v for k, v in metrics_a.items() if k in ("mAP", "AP@0.5", "AP@0.75", "mAR", "f1@0.5")}
    short_b = {k: v for k, v in metrics_b.items() if k in ("mAP", "AP@0.5", "AP@0.75", "mAR", "f1@0.5")}
    add(f"{category}/", short, short_b)
  widths = [max(len(row[i]) for row in rows) for i in range(4)]
  lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
           for row in rows]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(lines)


def compare_files(path_a: str, path_b: str) -> str:
  loaded = []
  for path in (path_a, path_b):
    try:
      loaded.append(json.loads(pathlib.Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError) as error:
      raise SystemExit(f"--compare: cannot read metrics file {path}: {error}")
  return compare_table(loaded[0], loaded[1], pathlib.Path(path_a).name, pathlib.Path(path_b).name)


# ----------------------------------------------------------------------------------------------------
# Inference, then metrics.

def infer_then_evaluate(args: argparse.Namespace) -> dict[str, Any]:
  """Runs `python -m bbu_jax.infer` (its main) into a responses file beside the output, then evaluates it.

  Inference flags that evaluate does not define itself are passed through to bbu_jax.infer.
  """
  if importlib.util.find_spec("bbu_jax.infer") is None:
    raise SystemExit("inference is not available yet (bbu_jax.infer does not exist); run it separately "
                     "and pass its output with --responses_file")
  infer = importlib.import_module("bbu_jax.infer")
  output = pathlib.Path(args.output_file)
  responses_file = output.with_name(output.stem + ".responses.json")
  argv = ["--model_path", args.model_path, "--input_jsonl", args.input_jsonl, "--output_file", str(responses_file),
          "--batch_size", str(args.batch_size), "--num_teachers", str(args.num_teachers)]
  if args.data_root:
    argv += ["--data_root", args.data_root]
  if args.teacher_pool_file:
    argv += ["--teacher_pool_file", args.teacher_pool_file]
  status = infer.main(argv + list(args.inference_flags))
  if status:
    raise SystemExit(f"inference failed (exit status {status}); no metrics were computed")
  args.responses_file = str(responses_file)
  return evaluate_responses(args)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.compare:
    print(compare_files(*args.compare))
    return 0
  try:
    if args.model_path:
      infer_then_evaluate(args)
    else:
      evaluate_responses(args)
  except ValueError as error:  # an unreadable file or bad rules: one clear message
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
