"""Batched generation (bbu_jax.decode) against transformers' generate on a tiny random Qwen2.5-VL, and
per-object scores from token log-probabilities."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402

import _tiny_models as tm  # noqa: E402
from bbu_jax.data.answer import format_answer, parse_answer  # noqa: E402
from bbu_jax.data.tokenizer import train_bpe_tokenizer  # noqa: E402
from bbu_jax.decode import scoring  # noqa: E402
from bbu_jax.decode.generate import (GenerationSettings, Generator, make_prompt_batch, prompt_bucket,  # noqa: E402
                                     select_tokens, size_bucket, top_p_filter)
from bbu_jax.models import load_pretrained  # noqa: E402
from bbu_jax.models.rope import get_rope_index  # noqa: E402

MAX_NEW = 12
PATCHES = 128  # one patch budget for every batch below, so the tests share compiled programs


def batch_of(prompts, config, **kwargs):
  return make_prompt_batch(prompts, config, min_patch_bucket=PATCHES, **kwargs)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  hf = tm.tiny_hf_model(seed=3, tie_word_embeddings=False, vision_depth=2, fullatt_block_indexes=(1,))
  path = tmp_path_factory.mktemp("decode_model")
  hf.save_pretrained(path)
  ours = load_pretrained(path)
  return hf, ours, Generator(ours.model)


def make_prompt(rng, grids, text_lengths):
  ids = tm.token_row(rng, grids, text_lengths)
  grids = np.asarray(grids, np.int64).reshape(-1, 3)
  positions, next_position = get_rope_index(ids, grids, image_token_id=tm.IMAGE_TOKEN_ID, spatial_merge_size=tm.MERGE)
  return {"input_ids": ids, "positions": positions, "next_position": next_position,
          "pixel_values": tm.random_patches(rng, grids), "image_grid_thw": grids}


def prompts_of(seed):
  """Three rows of different lengths and image sizes; the last is teacher-guided in shape: two teacher
  images, each with its own text (the answer) after it, then the student's image and prompt."""
  rng = np.random.default_rng(seed)
  return [
      make_prompt(rng, [(1, 8, 8)], [5, 9]),
      make_prompt(rng, [(1, 4, 6)], [2, 3]),
      make_prompt(rng, [(1, 4, 4), (1, 6, 4), (1, 8, 6)], [6, 11, 9, 4]),
  ]


def settings(**kwargs):
  return GenerationSettings(max_new_tokens=kwargs.pop("max_new_tokens", MAX_NEW), eos_token_ids=(tm.EOS_ID,),
                            pad_token_id=tm.PAD_ID, **kwargs)


def hf_generate(hf, prompt, max_new_tokens=MAX_NEW):
  ids = torch.as_tensor(prompt["input_ids"])[None]
  with torch.no_grad():
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                      pixel_values=torch.as_tensor(prompt["pixel_values"]),
                      image_grid_thw=torch.as_tensor(prompt["image_grid_thw"]),
                      mm_token_type_ids=(ids == tm.IMAGE_TOKEN_ID).to(torch.int32),
                      max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tm.EOS_ID,
                      pad_token_id=tm.PAD_ID, output_logits=True, return_dict_in_generate=True)
  tokens = out.sequences[0, ids.shape[1]:].numpy()
  logits = torch.stack(out.logits, dim=1)[0].float()
  log_probs = torch.log_softmax(logits, dim=-1).numpy()
  return tokens, log_probs[np.arange(len(tokens)), tokens]


def test_greedy_batch_equals_transformers_generate_token_for_token(models):
  hf, ours, generator = models
  prompts = prompts_of(0)
  out = generator.generate(batch_of(prompts, ours.config), settings())
  for row, prompt in enumerate(prompts):
    ref_tokens, ref_log_probs = hf_generate(hf, prompt)
    np.testing.assert_array_equal(out.row_tokens(row), ref_tokens, err_msg=f"row {row}")
    np.testing.assert_allclose(out.row_log_probs(row), ref_log_probs, atol=2e-4, rtol=0, err_msg=f"row {row}")


def test_a_row_decodes_the_same_alone_and_in_a_padded_batch_when_sampling(models):
  _, ours, generator = models
  prompts = prompts_of(1)
  sampled = settings(temperature=1.3, top_p=0.95)
  batched = generator.generate(batch_of(prompts, ours.config), sampled, seed=7, row_seeds=[10, 11, 12])
  for row, prompt in enumerate(prompts):
    alone = generator.generate(batch_of([prompt], ours.config), sampled, seed=7, row_seeds=[10 + row])
    np.testing.assert_array_equal(batched.row_tokens(row), alone.row_tokens(0), err_msg=f"row {row}")
    np.testing.assert_allclose(batched.row_log_probs(row), alone.row_log_probs(0), atol=1e-5, rtol=0)
  other_seed = generator.generate(batch_of(prompts, ours.config), sampled, seed=8, row_seeds=[10, 11, 12])
  assert not np.array_equal(other_seed.tokens, batched.tokens)


def test_eos_and_budgets_end_rows_and_filler_rows_generate_nothing(models):
  _, ours, generator = models
  prompts = prompts_of(2)
  prompts = prompts[:2]
  free = generator.generate(batch_of(prompts, ours.config, batch_size=3), settings())
  assert free.lengths[2] == 0 and np.all(free.tokens[2] == tm.PAD_ID)  # the filler row
  # Declare row 0's 4th greedy token an end-of-sequence token: row 0 stops right after it.
  stop = int(free.tokens[0, 3])
  assert stop not in free.tokens[0, :3]
  stopped = generator.generate(batch_of(prompts, ours.config, batch_size=3),
                               GenerationSettings(max_new_tokens=MAX_NEW, eos_token_ids=(tm.EOS_ID, stop),
                                                  pad_token_id=tm.PAD_ID),
                               budgets=np.array([MAX_NEW, 5, MAX_NEW]))
  assert stopped.lengths[0] == 4
  np.testing.assert_array_equal(stopped.row_tokens(0), free.tokens[0, :4])
  assert np.all(stopped.tokens[0, 4:] == tm.PAD_ID) and np.all(stopped.log_probs[0, 4:] == 0)
  enders = np.flatnonzero(np.isin(free.row_tokens(1)[:5], [tm.EOS_ID, stop]))
  assert stopped.lengths[1] == (enders[0] + 1 if len(enders) else 5)
  assert np.all(stopped.log_probs[:2][stopped.tokens[:2] != tm.PAD_ID] < 0)


def test_prompts_of_different_lengths_in_one_bucket_compile_once(models):
  _, ours, generator = models
  traces = generator.trace_count
  rng = np.random.default_rng(5)
  short = [make_prompt(rng, [(1, 4, 4)], [3, 2]) for _ in range(2)]
  longer = [make_prompt(rng, [(1, 4, 4)], [20, 17]) for _ in range(2)]
  assert prompt_bucket(len(short[0]["input_ids"])) == prompt_bucket(len(longer[1]["input_ids"]))
  for batch in (short, longer, short[:1]):
    generator.generate(batch_of(batch, ours.config, batch_size=2), settings(max_new_tokens=4))
  assert generator.trace_count == traces + 1
  long_prompt = [make_prompt(rng, [(1, 4, 4)], [70, 2])]  # past the first bucket
  generator.generate(batch_of(long_prompt, ours.config, batch_size=2), settings(max_new_tokens=4))
  assert generator.trace_count == traces + 2


def test_size_buckets_waste_under_a_quarter_and_are_few():
  sizes = np.arange(1, 8193)
  buckets = np.asarray([size_bucket(int(n), 64) for n in sizes])
  assert np.all(buckets >= sizes) and np.all(np.diff(buckets) >= 0) and np.all(buckets % 64 == 0)
  assert np.all(buckets - sizes < np.maximum(64, sizes / 4))
  assert len(set(buckets.tolist())) <= 4 * 7 + 1  # four per doubling from 64 to 8192, plus 64


def test_top_p_keeps_the_smallest_nucleus():
  logits = np.log(np.array([[0.05, 0.5, 0.15, 0.3]], np.float32))
  kept = np.isfinite(np.asarray(top_p_filter(logits, 0.7)))
  np.testing.assert_array_equal(kept, [[False, True, False, True]])
  kept = np.isfinite(np.asarray(top_p_filter(logits, 0.01)))
  np.testing.assert_array_equal(kept, [[False, True, False, False]])


def test_suppressed_tokens_are_never_chosen_and_greedy_takes_the_argmax():
  logits = np.array([[0.0, 5.0, 1.0], [3.0, 2.0, 1.0]], np.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  tokens, log_probs = select_tokens(logits, keys, settings(suppress_token_ids=(1,)))
  np.testing.assert_array_equal(tokens, [2, 0])
  expected = np.log(np.exp(1.0) / (1 + np.exp(1.0)))  # token 2 of row 0 among {0, 2}
  np.testing.assert_allclose(log_probs[0], expected, rtol=1e-6)


# --- Scores -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe():
  texts = [format_answer([{"bbox_2d": [i, 2 * i, 3 * i, 4 * i], "desc": d}])
           for i in range(40) for d in ("螺丝连接点/BBU安装螺丝", "标签贴纸", "bbu基带处理单元/华为")]
  return train_bpe_tokenizer(texts, vocab_size=400)


def test_token_char_spans_cover_the_decoded_text_in_order(bpe):
  text = format_answer([{"bbox_2d": [1, 2, 30, 40], "desc": "螺丝连接点/BBU安装螺丝"},
                        {"bbox_2d": [5, 6, 70, 80], "desc": "标签贴纸"}])
  ids = bpe.encode(text) + [bpe.special.eos_token_id]
  decoded, spans = scoring.token_char_spans(bpe, ids)
  assert decoded == text
  assert spans[0, 0] == 0 and spans[-2, 1] == len(text) and spans[-1, 0] == spans[-1, 1] == len(text)
  assert np.all(spans[1:, 0] >= spans[:-1, 0]) and np.all(spans[:, 1] >= spans[:, 0])
  for token, (start, end) in zip(ids, spans):
    piece = bpe.decode([token])
    if "\ufffd" not in piece:  # a token of whole characters decodes to exactly its span
      assert text[start:end] == piece


def test_object_scores_follow_the_log_probs_of_the_objects_tokens(bpe):
  text = format_answer([{"bbox_2d": [1, 2, 30, 40], "desc": "标签贴纸"},
                        {"bbox_2d": [5, 60, 70, 80], "desc": "螺丝连接点/BBU安装螺丝"}])
  ids = bpe.encode(text)
  _, spans = scoring.token_char_spans(bpe, ids)
  objects = parse_answer(text).objects
  second_start = objects[1]["span"][0]
  # Confident about the first object, unsure about the second.
  log_probs = np.where(spans[:, 0] < second_start, np.log(0.9), np.log(0.2))
  scores = scoring.object_scores(objects, spans, log_probs)
  assert 0 < scores[1] < scores[0] <= 1
  np.testing.assert_allclose(scores, [0.9, 0.2], rtol=1e-9)
  mixed = log_probs.copy()
  inside_first = (spans[:, 0] >= objects[0]["span"][0]) & (spans[:, 1] <= objects[0]["span"][1])
  mixed[np.flatnonzero(inside_first)[0]] = np.log(0.1)
  first_score = scoring.object_scores(objects, spans, mixed)[0]
  expected = np.exp(np.mean(mixed[(spans[:, 0] < objects[0]["span"][1]) & (spans[:, 1] > objects[0]["span"][0])]))
  assert first_score == pytest.approx(expected) and first_score < 0.9
