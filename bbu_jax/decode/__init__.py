"""Batched generation (generate.py: KV cache, prefill, while_loop decode, sampling) and per-object scores
from token log-probabilities (scoring.py)."""
