"""The text tokenizer: whatever a model directory carries (tokenizer.json), or a small byte-level BPE with
all of Qwen2.5-VL's special tokens trained on the synthetic answers for models trained from scratch.

Either way the result is a `tokenizers` tokenizer saved as tokenizer.json + tokenizer_config.json (with
Qwen2.5-VL's chat template) that transformers' AutoTokenizer loads unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2.5-VL's special tokens in the order of their published ids (151643...151664). A tokenizer
# trained here appends them after its BPE vocabulary in the same order.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)

# Qwen2's pre-tokenizer split: digits one by one (coordinates tokenize digit by digit), letters with
# one leading non-letter, punctuation runs, newlines apart.
QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# The chat template Qwen2.5-VL's published processor ships (one <|image_pad|> per image; the processor,
# and ChatProcessor, repeat it once per merged vision token).
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
  """The ids a model config and the chat builder need (Qwen25VLConfig field names where they exist)."""

  image_token_id: int
  video_token_id: int
  vision_start_token_id: int
  vision_end_token_id: int
  im_start_token_id: int
  im_end_token_id: int
  bos_token_id: int  # <|endoftext|>; Qwen adds no BOS, but configs carry it
  eos_token_id: int  # <|im_end|>: generation stops at the end of the assistant turn
  pad_token_id: int  # <|endoftext|>

  def config_token_ids(self) -> dict[str, int]:
    """The ids as Qwen25VLConfig keyword arguments: `Qwen25VLConfig(..., **ids.config_token_ids())`."""
    return {k: v for k, v in dataclasses.asdict(self).items()
            if k not in ("im_start_token_id", "im_end_token_id")}


class Tokenizer:
  """A `tokenizers.Tokenizer` with Qwen2.5-VL's special tokens, encoding text without adding any."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, source: str = "<memory>"):
    self.backend = tokenizer
    self.source = source
    missing = [t for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                           "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
               if tokenizer.token_to_id(t) is None]
    if missing:
      raise ValueError(f"{source}: tokenizer lacks Qwen2.5-VL special tokens {missing}")
    tid = tokenizer.token_to_id
    self.special = SpecialTokenIds(
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
        im_start_token_id=tid("<|im_start|>"), im_end_token_id=tid("<|im_end|>"),
        bos_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"))

  @property
  def vocab_size(self) -> int:
    """Number of ids including added special tokens (a model's embedding needs at least this many rows)."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.backend.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and each token's (start, end) character span in `text`."""
    enc = self.backend.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.backend.decode(list(int(i) for i in ids), skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  # --- files -----------------------------------------------------------------------------------

  @classmethod
  def from_dir(cls, path: str | pathlib.Path) -> "Tokenizer":
    """Loads `path/tokenizer.json` (a Hugging Face model directory or one written by `save`)."""
    file = pathlib.Path(path) / "tokenizer.json"
    if not file.exists():
      raise FileNotFoundError(f"{file}: no tokenizer.json in the model directory")
    return cls(tokenizers.Tokenizer.from_file(str(file)), source=str(file))

  def save(self, path: str | pathlib.Path, model_max_length: int = 32768) -> None:
    """Writes tokenizer.json + tokenizer_config.json that transformers' AutoTokenizer loads."""
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    self.backend.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS
                                      if t not in ("<|endoftext|>", "<|im_end|>")],
        "chat_template": QWEN25VL_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2),
                                               encoding="utf-8")


def pretokenize_pattern(number_digits: int = 1) -> str:
  """Qwen2's split pattern (every digit apart); `number_digits` > 1 keeps runs of up to that many
  digits together, as cl100k's pattern does with 3, so the BPE can learn whole numbers."""
  if number_digits < 1:
    raise ValueError(f"number_digits must be >= 1, got {number_digits}")
  return QWEN_PRETOKENIZE_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,%d}|" % number_digits, 1)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, number_digits: int = 1) -> Tokenizer:
  """A byte-level BPE over `texts` with Qwen2's pre-tokenizer, `vocab_size` ids in all (numbers split as
  `pretokenize_pattern(number_digits)` says).

  The BPE vocabulary takes ids [0, vocab_size - 22) and Qwen2.5-VL's 22 special tokens follow in their
  published order, as in Qwen's own vocabulary (specials after the merges).
  """
  num_regular = vocab_size - len(QWEN_SPECIAL_TOKENS)
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if num_regular < len(alphabet):
    raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                     f"{len(alphabet) + len(QWEN_SPECIAL_TOKENS)} ids (256 bytes + 22 special tokens)")
  tok = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(pretokenize_pattern(number_digits)), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
  trainer = trainers.BpeTrainer(vocab_size=num_regular, min_frequency=2, show_progress=False,
                                initial_alphabet=alphabet, special_tokens=[])
  tok.train_from_iterator(texts, trainer=trainer)
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in QWEN_SPECIAL_TOKENS])
  if tok.get_vocab_size(with_added_tokens=True) > vocab_size:
    raise AssertionError(f"trained vocabulary has {tok.get_vocab_size(True)} ids, over {vocab_size}")
  return Tokenizer(tok, source="trained byte-level BPE")


def load_or_train_tokenizer(model_path: str | pathlib.Path | None, texts: Iterable[str] | None = None,
                            vocab_size: int = 4096, number_digits: int = 1) -> Tokenizer:
  """The model directory's tokenizer when it has one, else a BPE trained on `texts` (the demo)."""
  if model_path is not None and (pathlib.Path(model_path) / "tokenizer.json").exists():
    return Tokenizer.from_dir(model_path)
  if texts is None:
    raise FileNotFoundError(f"{model_path}: no tokenizer.json and no texts to train a tokenizer on")
  return train_bpe_tokenizer(texts, vocab_size=vocab_size, number_digits=number_digits)
