"""Semantic label matching: each predicted label is mapped to the closest ground-truth label, or kept apart.

The default similarity is deterministic and character-level (normalized char-bigram Dice), with hard
rules that keep mutually exclusive values apart (brands, polarities, present/absent attributes, port
numbers), so that `BBU设备/华为` never matches `BBU设备/中兴` while spelling variants do match.
An optional sentence-embedding similarity uses a local transformers model directory.
"""

from __future__ import annotations

import collections
import re
import unicodedata
from typing import Callable, Iterable, Sequence

# Groups of mutually exclusive values. Within one group, each entry lists the spellings of one value;
# two labels that mention DIFFERENT values of a group never match, whatever their other characters.
# Longer spellings are found first, so 不符合要求 is not also read as 符合要求.
EXCLUSIVE_VALUES: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("华为", "huawei"), ("中兴", "zte"), ("爱立信", "ericsson"), ("诺基亚", "nokia"), ("大唐", "datang"),
     ("烽火", "fiberhome"), ("三星", "samsung")),
    (("bbu安装螺丝",), ("bbu端光纤插头",), ("odf端光纤插头",), ("地排处接地螺丝",), ("机柜处接地螺丝",)),
    (("正极", "positive"), ("负极", "negative")),
    (("有保护措施",), ("无保护措施",)),
    (("有遮挡",), ("无遮挡",)),
    (("符合要求",), ("不符合要求",)),
    (("弯曲半径合理",), ("弯曲半径不合理",)),
    (("显示完整",), ("只显示部分", "显示部分")),
    (("按要求配备",), ("未按要求配备",)),
    (("需要安装",), ("无需安装", "不需要安装")),
    (("安装方向正确",), ("安装方向错误", "安装方向不正确")),
    (("满载",), ("非满载", "未满载")),
    (("蛇形管",), ("铠装",), ("同时有蛇形管和铠装",)),
)

_DIGITS = re.compile(r"\d+")


def normalize_label(label: str) -> str:
  """Case, width and spacing folded away: NFKC (fullwidth -> ASCII), lower case, no spaces or punctuation."""
  folded = unicodedata.normalize("NFKC", label).lower()
  return "".join(ch for ch in folded
                 if not ch.isspace() and not unicodedata.category(ch).startswith(("P", "Z", "C")))


def _value_finders(groups: Sequence[Sequence[Sequence[str]]]
                   ) -> list[tuple[re.Pattern, dict[str, int], list[str]]]:
  """Per group: a regex of all spellings (longest first), spelling -> value index, canonical spellings."""
  finders = []
  for group in groups:
    value_of = {}
    for value_index, spellings in enumerate(group):
      for spelling in spellings:
        value_of[normalize_label(spelling)] = value_index
    alternatives = sorted(value_of, key=len, reverse=True)
    canonical = [normalize_label(spellings[0]) for spellings in group]
    finders.append((re.compile("|".join(re.escape(a) for a in alternatives)), value_of, canonical))
  return finders


class CharSimilarity:
  """Char-bigram Dice of normalized labels, 0 when they name different exclusive values or numbers.

  Deterministic and symmetric; 1.0 exactly when the normalized labels are equal.
  """

  def __init__(self, exclusive_values: Sequence[Sequence[Sequence[str]]] = EXCLUSIVE_VALUES,
               numbers_must_match: bool = True):
    self._finders = _value_finders(exclusive_values)
    self.numbers_must_match = numbers_must_match
    self._features: dict[str, tuple[str, collections.Counter, tuple]] = {}

  def _features_of(self, label: str):
    cached = self._features.get(label)
    if cached is None:
      norm = normalize_label(label)
      values = []
      for finder, value_of, canonical in self._finders:
        found = frozenset(value_of[m] for m in finder.findall(norm))
        values.append(found)
        if found:  # one spelling per value, so that 华为 and Huawei compare equal
          norm = finder.sub(lambda m, v=value_of, c=canonical: c[v[m.group(0)]], norm)
      grams = collections.Counter(norm[i:i + 2] for i in range(len(norm) - 1)) if len(norm) > 1 \
          else collections.Counter([norm])
      numbers = tuple(sorted(_DIGITS.findall(norm)))
      cached = self._features[label] = (norm, grams, tuple(values), numbers)
    return cached

  def conflict(self, a: str, b: str) -> bool:
    """True when the labels name different values of one exclusive group (or different numbers)."""
    _, _, values_a, numbers_a = self._features_of(a)
    _, _, values_b, numbers_b = self._features_of(b)
    if self.numbers_must_match and numbers_a != numbers_b:
      return True
    return any(va and vb and va != vb for va, vb in zip(values_a, values_b))

  def __call__(self, a: str, b: str) -> float:
    norm_a, grams_a, _, _ = self._features_of(a)
    norm_b, grams_b, _, _ = self._features_of(b)
    if norm_a == norm_b:
      return 1.0
    if not norm_a or not norm_b or self.conflict(a, b):
      return 0.0
    common = sum((grams_a & grams_b).values())
    return 2.0 * common / (sum(grams_a.values()) + sum(grams_b.values()))


class EmbeddingSimilarity:
  """Cosine similarity of mean-pooled hidden states of a local transformers model (AutoModel).

  The exclusive-value rule of CharSimilarity still applies: embeddings tend to place brands close.
  """

  def __init__(self, model_dir: str, rules: CharSimilarity | None = None, batch_size: int = 64):
    import torch  # noqa: F401 - transformers' AutoModel here is the PyTorch one
    from transformers import AutoModel, AutoTokenizer
    self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
    self._model = AutoModel.from_pretrained(model_dir).eval()
    self._rules = rules or CharSimilarity()
    self._batch_size = batch_size
    self._cache: dict[str, object] = {}

  def embed(self, labels: Iterable[str]) -> None:
    """Computes (and caches) the unit embeddings of labels, in batches."""
    import torch
    todo = [label for label in dict.fromkeys(labels) if label not in self._cache]
    for start in range(0, len(todo), self._batch_size):
      batch = todo[start:start + self._batch_size]
      tokens = self._tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
      with torch.no_grad():
        hidden = self._model(**tokens).last_hidden_state
      mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
      pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
      pooled = torch.nn.functional.normalize(pooled, dim=-1)
      for label, vector in zip(batch, pooled):
        self._cache[label] = vector

  def __call__(self, a: str, b: str) -> float:
    if normalize_label(a) == normalize_label(b):
      return 1.0
    if self._rules.conflict(a, b):
      return 0.0
    self.embed([a, b])
    return float(max(0.0, min(1.0, float(self._cache[a] @ self._cache[b]))))


class LabelMatcher:
  """Maps labels onto a ground-truth vocabulary with a similarity and a threshold.

  Ground-truth spellings that normalize alike (`螺丝连接点 / BBU 安装螺丝`, `螺丝连接点/BBU安装螺丝`) are
  one class, named by their most frequent spelling (`canonical`). `match(label)` returns (vocabulary
  label, similarity) when the best similarity is at least `threshold` (ties go to the vocabulary label
  first in sorted order), else (label, best similarity): an unmatched label stays its own class, so its
  boxes are false positives. Results are cached.
  """

  def __init__(self, vocabulary: Iterable[str] | collections.Counter, threshold: float = 0.7,
               similarity: Callable[[str, str], float] | None = None):
    counts = vocabulary if isinstance(vocabulary, collections.Counter) else collections.Counter(set(vocabulary))
    spellings: dict[str, list[str]] = {}
    for label in sorted(counts):
      spellings.setdefault(normalize_label(label), []).append(label)
    self._canonical_of_norm = {norm: max(group, key=lambda label: (counts[label], [-ord(c) for c in label]))
                               for norm, group in spellings.items()}
    self.vocabulary = sorted(self._canonical_of_norm.values())
    self.merged_spellings = sum(len(group) - 1 for group in spellings.values())
    self.threshold = threshold
    self.similarity = similarity or CharSimilarity()
    self._cache: dict[str, tuple[str, float]] = {}
    if isinstance(self.similarity, EmbeddingSimilarity):
      self.similarity.embed(self.vocabulary)

  def canonical(self, label: str) -> str:
    """The class name of a ground-truth label (itself unless a more frequent spelling exists)."""
    return self._canonical_of_norm.get(normalize_label(label), label)

  def match(self, label: str) -> tuple[str, float]:
    cached = self._cache.get(label)
    if cached is not None:
      return cached
    same = self._canonical_of_norm.get(normalize_label(label))
    if same is not None:
      result = (same, 1.0)
    else:
      best_label, best = label, 0.0
      for candidate in self.vocabulary:
        score = self.similarity(label, candidate)
        if score > best:
          best_label, best = candidate, score
      result = (best_label, best) if best >= self.threshold else (label, best)
    self._cache[label] = result
    return result
