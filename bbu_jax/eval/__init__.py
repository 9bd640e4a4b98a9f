"""Evaluation: responses files -> COCO metrics (pycocotools) with semantic label matching, per-category
figures and an HTML detection browser. The entry point is `python -m bbu_jax.evaluate`."""
