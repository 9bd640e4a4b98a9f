"""The demo tokenizer: a byte-level BPE with Qwen2.5-VL's special tokens that transformers loads as is."""

import json

import pytest

from bbu_jax.data import tokenizer as tk

transformers = pytest.importorskip("transformers")

LABELS = ["螺丝连接点/BBU安装螺丝", "bbu基带处理单元/华为", "挡风板/安装", "标签贴纸", "光纤/有保护措施"]


def _corpus():
  texts = []
  for i in range(300):
    objects = [{"bbox_2d": [i, 2 * i % 700, i + 37, 2 * i % 700 + 41], "label": LABELS[(i + j) % 5]}
               for j in range(3)]
    texts.append(json.dumps(objects, ensure_ascii=False))
  texts += ["请找出图中的所有设备并给出边框。", "Find every object and give its box."] * 10
  return texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  tok = tk.train_bpe_tokenizer(_corpus(), vocab_size=1024)
  path = tmp_path_factory.mktemp("tok")
  tok.save(path)
  return tok, path


def test_specials_are_single_tokens_after_the_bpe_vocabulary(trained):
  tok, _ = trained
  ids = [tok.token_to_id(t) for t in tk.QWEN_SPECIAL_TOKENS]
  assert None not in ids
  # consecutive, in Qwen's published order, after every regular token
  assert ids == list(range(ids[0], ids[0] + len(ids)))
  assert ids[-1] == tok.vocab_size - 1
  assert tok.vocab_size <= 1024
  for t in tk.QWEN_SPECIAL_TOKENS:
    assert tok.encode(t) == [tok.token_to_id(t)]
  s = tok.special
  assert (s.image_token_id, s.vision_start_token_id, s.im_end_token_id, s.eos_token_id, s.pad_token_id) == (
      tok.token_to_id("<|image_pad|>"), tok.token_to_id("<|vision_start|>"), tok.token_to_id("<|im_end|>"),
      tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))


def test_digits_tokenize_one_by_one_and_text_round_trips(trained):
  tok, _ = trained
  text = '[{"bbox_2d": [301, 285, 357, 330], "label": "螺丝连接点/BBU安装螺丝"}]'
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  pieces = [tok.decode([i]) for i in ids]
  assert "3" in pieces and "301" not in pieces and "30" not in pieces


def test_number_digits_keeps_up_to_that_many_digits_in_one_token(tmp_path):
  """The demo's option: numbers of up to 3 digits become single tokens (as cl100k's pre-tokenizer splits
  them), so that a coordinate is one prediction; longer runs split every 3 digits, and text round-trips."""
  tok = tk.train_bpe_tokenizer(_corpus(), vocab_size=1024, number_digits=3)
  text = '[{"bbox_2d": [301, 285, 357, 330], "label": "螺丝连接点/BBU安装螺丝"}] 1234567'
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  pieces = [tok.decode([i]) for i in ids]
  for number in ("301", "285", "357", "330"):  # each seen in the corpus, so merged
    assert number in pieces, pieces
  assert max(len(p) for p in pieces if p.strip().isdigit()) == 3
  assert pieces[-3:] == ["123", "456", "7"]
  # Saved and loaded, by bbu_jax and by transformers, it splits the same way.
  tok.save(tmp_path)
  assert tk.Tokenizer.from_dir(tmp_path).encode(text) == ids
  assert transformers.AutoTokenizer.from_pretrained(str(tmp_path)).encode(text) == ids
  with pytest.raises(ValueError, match="number_digits"):
    tk.train_bpe_tokenizer(_corpus(), vocab_size=1024, number_digits=0)


def test_transformers_loads_it_with_the_chat_template(trained):
  tok, path = trained
  hf = transformers.AutoTokenizer.from_pretrained(str(path))
  assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
  messages = [
      {"role": "system", "content": "你是检测助手。"},
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find 物体"}]},
      {"role": "assistant", "content": '[{"bbox_2d": [1, 2, 30, 40], "label": "标签贴纸"}]'},
  ]
  rendered = hf.apply_chat_template(messages, tokenize=False)
  rendered_here = hf.apply_chat_template(messages, tokenize=False, chat_template=tk.QWEN25VL_CHAT_TEMPLATE)
  assert rendered == rendered_here
  assert rendered.startswith("<|im_start|>system\n你是检测助手。<|im_end|>\n<|im_start|>user\n<|vision_start|>")
  assert hf(rendered)["input_ids"] == tok.encode(rendered)


def test_from_dir_round_trip_and_missing_dir(trained, tmp_path):
  tok, path = trained
  again = tk.Tokenizer.from_dir(path)
  assert again.special == tok.special
  assert again.encode("挡风板/安装 [12, 34]") == tok.encode("挡风板/安装 [12, 34]")
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tk.Tokenizer.from_dir(tmp_path)


def test_vocab_too_small_is_refused():
  with pytest.raises(ValueError, match="too small"):
    tk.train_bpe_tokenizer(["abc"], vocab_size=200)


def test_config_token_ids_build_a_model_config(trained):
  from bbu_jax.models.config import Qwen25VLConfig
  tok, _ = trained
  config = Qwen25VLConfig(**tok.special.config_token_ids())
  assert config.image_token_id == tok.token_to_id("<|image_pad|>")
  assert config.vision_start_token_id == tok.token_to_id("<|vision_start|>")
  assert config.eos_token_id == tok.token_to_id("<|im_end|>")
  assert config.pad_token_id == config.bos_token_id == tok.token_to_id("<|endoftext|>")
  assert max(config.image_token_id, config.video_token_id, config.eos_token_id) < tok.vocab_size
