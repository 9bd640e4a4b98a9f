"""Per-object confidence scores from the log-probabilities of the generated tokens.

`parse_answer` gives each object the character span of its `{...}` text; `token_char_spans` maps every
generated token to the characters it decodes to, so an object's score is the geometric mean of the
probabilities of the tokens that overlap its span: exp(mean log p), in (0, 1], comparable across
objects of different text lengths.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
  """The GPT-2 byte-level alphabet (what ByteLevel BPE tokenizers, Qwen's included, write bytes as)."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
      + list(range(ord("®"), ord("ÿ") + 1))
  chars = list(printable)
  extra = 0
  for byte in range(256):
    if byte not in printable:
      printable.append(byte)
      chars.append(256 + extra)
      extra += 1
  return {chr(c): b for b, c in zip(printable, chars)}


def _special_ids(tokenizer) -> set[int]:
  decoder = tokenizer.backend.get_added_tokens_decoder()
  return {int(i) for i, token in decoder.items() if token.special}


def _byte_level_pieces(tokenizer, ids: Sequence[int]) -> list[bytes] | None:
  """Each token's bytes (specials: none), or None when the tokenizer is not byte-level."""
  table = _byte_level_decoder()
  specials = _special_ids(tokenizer)
  pieces = []
  for token_id in ids:
    if int(token_id) in specials:
      pieces.append(b"")
      continue
    token = tokenizer.backend.id_to_token(int(token_id))
    if token is None or any(ch not in table for ch in token):
      return None
    pieces.append(bytes(table[ch] for ch in token))
  return pieces


def token_char_spans(tokenizer, ids: Sequence[int]) -> tuple[str, np.ndarray]:
  """(text, spans (n, 2) int): the decoded text (special tokens skipped) and each token's [start, end)
  character range in it. A token that ends inside a multi-byte character owns that character too; a
  token that decodes to nothing has start == end."""
  ids = [int(i) for i in ids]
  text = tokenizer.decode(ids, skip_special_tokens=True)
  pieces = _byte_level_pieces(tokenizer, ids)
  if pieces is not None:
    data = b"".join(pieces)
    if "\ufffd" not in text and data.decode("utf-8", errors="replace") == text:
      # char_of_byte[p]: the character byte p belongs to; one extra entry for the end of the text.
      char_of_byte = np.repeat(np.arange(len(text)), [len(ch.encode("utf-8")) for ch in text])
      char_of_byte = np.append(char_of_byte, len(text))
      lengths = np.asarray([len(p) for p in pieces], np.int64)
      ends = np.cumsum(lengths)
      starts = ends - lengths
      spans = np.stack([char_of_byte[starts], char_of_byte[np.maximum(ends - 1, 0)] + 1], axis=1)
      spans[lengths == 0, 1] = spans[lengths == 0, 0]
      return text, spans
  # Any other tokenizer, or text with invalid UTF-8: prefix decoding is slower but always consistent.
  ends = [len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True)) for k in range(len(ids))]
  starts = [0] + ends[:-1]
  return text, np.asarray(list(zip(starts, ends)), np.int64).reshape(len(ids), 2)


def span_score(char_span: tuple[int, int], token_spans: np.ndarray, log_probs: np.ndarray) -> float | None:
  """exp(mean log p) of the tokens overlapping char_span [start, end); None when no token overlaps."""
  start, end = char_span
  overlap = (token_spans[:, 0] < end) & (token_spans[:, 1] > start)
  if not overlap.any():
    return None
  return float(math.exp(float(np.mean(np.asarray(log_probs, np.float64)[overlap]))))


def object_scores(objects: Sequence[dict], token_spans: np.ndarray, log_probs: np.ndarray) -> list[float | None]:
  """One score per parsed object (its "span" from parse_answer), in the objects' order."""
  return [span_score(tuple(obj["span"]), token_spans, log_probs) if obj.get("span") is not None else None
          for obj in objects]
