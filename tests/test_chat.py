"""ChatProcessor: ids equal transformers' chat template + tokenizer, the inference prompt is a prefix of
the training ids, masks mark exactly the answers, and boxes survive the round trip between frames."""

import json

import numpy as np
import pytest
from PIL import Image

from bbu_jax.data import chat as chat_lib
from bbu_jax.data import labels as labels_lib
from bbu_jax.data import tokenizer as tk
from bbu_jax.data.geometry import smart_resize

transformers = pytest.importorskip("transformers")

LABELS = labels_lib.synthetic_labels()


def _record(rid, width, height, n_objects, seed):
  rng = np.random.default_rng(seed)
  objects = []
  for _ in range(n_objects):
    x1, y1 = int(rng.integers(0, width - 2)), int(rng.integers(0, height - 2))
    x2, y2 = int(rng.integers(x1 + 1, width + 1)), int(rng.integers(y1 + 1, height + 1))
    objects.append({"bbox_2d": [x1, y1, x2, y2], "desc": LABELS[int(rng.integers(len(LABELS)))]})
  objects.sort(key=lambda o: (o["bbox_2d"][1], o["bbox_2d"][0]))
  return {"id": rid, "images": [f"{rid}.jpg"], "width": width, "height": height, "objects": objects}


def _loader(record):
  rng = np.random.default_rng(len(record["id"]))
  return Image.fromarray(rng.integers(0, 256, (record["height"], record["width"], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  records = [_record(f"c{i}", 400 + i, 900 - i, 8, seed=i) for i in range(60)]
  corpus = chat_lib.tokenizer_training_texts(records) * 3
  tok = tk.train_bpe_tokenizer(corpus, vocab_size=1024)
  path = tmp_path_factory.mktemp("tok")
  tok.save(path)
  return tok, path


# (width, height): downscaled, upscaled, non-square tall, already resized, wide.
SIZES = [(1440, 1920), (150, 90), (300, 1400), (532, 728), (1000, 333)]


@pytest.mark.parametrize("language", ["zh", "en"])
def test_ids_equal_transformers_chat_template(tokenizer, language):
  tok, path = tokenizer
  hf = transformers.AutoTokenizer.from_pretrained(str(path))
  processor = chat_lib.ChatProcessor(tok, chat_lib.ChatConfig(prompt_language=language,
                                                              candidate_phrases=tuple(LABELS[:3])))
  student = _record("s", 532, 728, 5, seed=1)
  teachers = [_record("t1", 150, 90, 2, seed=2), _record("t2", 1440, 1920, 0, seed=3)]
  sample = processor.build_training_sample(student, teachers, _loader)

  rendered = hf.apply_chat_template(processor.chat_messages(student, teachers), tokenize=False,
                                    chat_template=tk.QWEN25VL_CHAT_TEMPLATE)
  # Qwen's processor repeats each image's single <|image_pad|> once per merged token.
  pieces = rendered.split("<|image_pad|>")
  assert len(pieces) == 4
  counts = [processor.config.images.num_image_tokens(r["height"], r["width"]) for r in teachers + [student]]
  expanded = pieces[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:]))
  assert expanded == processor.training_text(student, teachers)
  np.testing.assert_array_equal(sample["input_ids"], hf(expanded)["input_ids"])
  assert int((sample["input_ids"] == tok.special.image_token_id).sum()) == sum(counts)
  np.testing.assert_array_equal(sample["image_grid_thw"].prod(-1) // 4, counts)
  assert sample["pixel_values"].shape == (sum(counts) * 4, processor.config.images.patch_dim)

  prompt = hf.apply_chat_template(processor.chat_messages(student, teachers, with_answer=False),
                                  tokenize=False, add_generation_prompt=True,
                                  chat_template=tk.QWEN25VL_CHAT_TEMPLATE)
  pieces = prompt.split("<|image_pad|>")
  prompt = pieces[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:]))
  inference = processor.build_inference_prompt(student, teachers, _loader)
  np.testing.assert_array_equal(inference["input_ids"], hf(prompt)["input_ids"])


def test_inference_prompt_is_exact_prefix_of_training_sample(tokenizer):
  tok, _ = tokenizer
  processor = chat_lib.ChatProcessor(tok)
  student = _record("s", 1440, 1920, 12, seed=4)
  teachers = [_record("t", 300, 1400, 3, seed=5)]
  train = processor.build_training_sample(student, teachers, _loader)
  infer = processor.build_inference_prompt(student, teachers, _loader)
  n = len(infer["input_ids"])
  np.testing.assert_array_equal(train["input_ids"][:n], infer["input_ids"])
  np.testing.assert_array_equal(train["positions"][:, :n], infer["positions"])
  np.testing.assert_array_equal(train["pixel_values"], infer["pixel_values"])
  np.testing.assert_array_equal(train["image_grid_thw"], infer["image_grid_thw"])
  # the rest is exactly the student's answer and its <|im_end|>, then the template's newline
  answer_ids = train["input_ids"][n:]
  assert tok.decode(answer_ids, skip_special_tokens=False) == processor.answer_text(student) + "<|im_end|>\n"
  assert train["student_mask"][n:-1].all() and not train["student_mask"][:n].any()
  assert not train["student_mask"][-1]
  # next_position continues the prompt's positions
  assert infer["next_position"] == int(infer["positions"].max()) + 1
  # images-free prompt (sizes from the record) gives the same ids and grids
  light = processor.build_inference_prompt(student, teachers, with_images=False)
  np.testing.assert_array_equal(light["input_ids"], infer["input_ids"])
  np.testing.assert_array_equal(light["image_grid_thw"], infer["image_grid_thw"])


def test_masks_mark_teacher_and_student_answers(tokenizer):
  tok, _ = tokenizer
  processor = chat_lib.ChatProcessor(tok)
  student = _record("s", 532, 728, 4, seed=6)
  teachers = [_record("t1", 532, 728, 3, seed=7), _record("t2", 150, 90, 1, seed=8)]
  sample = processor.build_training_sample(student, teachers, _loader)
  ids = sample["input_ids"]
  decode = lambda mask: tok.decode(ids[mask], skip_special_tokens=False)  # noqa: E731
  expected_teacher = "".join(processor.answer_text(t) + "<|im_end|>" for t in teachers)
  assert decode(sample["teacher_mask"]) == expected_teacher
  assert decode(sample["student_mask"]) == processor.answer_text(student) + "<|im_end|>"
  assert not (sample["teacher_mask"] & sample["student_mask"]).any()
  student_text = decode(sample["student_text_mask"])
  n_student_pads = processor.config.images.num_image_tokens(728, 532)
  assert student_text == ("<|vision_start|>" + "<|image_pad|>" * n_student_pads + "<|vision_end|>"
                          + processor.user_prompt)
  np.testing.assert_array_equal(sample["image_is_student"], [False, False, True])


@pytest.mark.parametrize("width,height", SIZES)
def test_boxes_survive_round_trip_within_one_resized_pixel(tokenizer, width, height):
  tok, _ = tokenizer
  processor = chat_lib.ChatProcessor(tok)
  record = _record("r", width, height, 20, seed=width + height)
  text = processor.answer_text(record)
  rh, rw = smart_resize(height, width)
  model_boxes = np.asarray([o["bbox_2d"] for o in json.loads(text)], float)
  assert model_boxes[:, [0, 2]].max() <= rw and model_boxes[:, [1, 3]].max() <= rh
  parsed = processor.parse_response(text, record)
  assert parsed.error is None and len(parsed.objects) == len(record["objects"])
  back = np.asarray([o["bbox_2d"] for o in parsed.objects], float)
  original = np.asarray([o["bbox_2d"] for o in record["objects"]], float)
  # answers are sorted by (y1, x1) in the model frame; ties after rounding may swap, so match by label too
  order_back = sorted(range(len(back)), key=lambda i: (tuple(back[i]), parsed.objects[i]["desc"]))
  order_orig = sorted(range(len(original)), key=lambda i: (tuple(original[i]), record["objects"][i]["desc"]))
  one_pixel = np.asarray([width / rw, height / rh] * 2)
  error = np.abs(back[order_back] - original[order_orig])
  assert (error <= one_pixel + 1e-9).all(), (error.max(0), one_pixel)
  if rw > width:  # upscaled: the resized frame is finer than the file's, so the trip is exact
    np.testing.assert_array_equal(back[order_back], original[order_orig])
  # a size tuple works as well as the record
  assert processor.parse_response(text, (width, height)).objects == parsed.objects


def test_detection_targets_follow_answer_order(tokenizer):
  tok, _ = tokenizer
  processor = chat_lib.ChatProcessor(tok, chat_lib.ChatConfig(max_caption_tokens=4))
  record = _record("r", 1440, 1920, 6, seed=9)
  boxes, captions = processor.detection_targets(record)
  answer = json.loads(processor.answer_text(record))
  rh, rw = smart_resize(1920, 1440)
  np.testing.assert_allclose(boxes * [rw, rh, rw, rh], [o["bbox_2d"] for o in answer], rtol=1e-6)
  for k, obj in enumerate(answer):
    ids = tok.encode(obj["label"])[:3] + [tok.special.eos_token_id]
    np.testing.assert_array_equal(captions[k, :len(ids)], ids)
    assert (captions[k, len(ids):] == 0).all()


def test_empty_answer_and_errors(tokenizer):
  tok, _ = tokenizer
  processor = chat_lib.ChatProcessor(tok)
  record = _record("e", 532, 728, 0, seed=10)
  sample = processor.build_training_sample(record, (), _loader)
  assert tok.decode(sample["input_ids"][sample["student_mask"]], skip_special_tokens=False) == "[]<|im_end|>"
  assert sample["det_boxes"].shape == (0, 4)
  wrong = dict(record, width=533)
  with pytest.raises(ValueError, match="record e: image e.jpg is 532x728 but the record says 533x728"):
    processor.build_training_sample(wrong, (), lambda r: _loader(record))
  with pytest.raises(ValueError, match="prompt_language"):
    chat_lib.ChatConfig(prompt_language="fr")


def test_system_prompt_names_hierarchy_and_format(tokenizer):
  tok, _ = tokenizer
  for language in ("zh", "en"):
    processor = chat_lib.ChatProcessor(tok, chat_lib.ChatConfig(
        prompt_language=language, label_hierarchy=labels_lib.SYNTHETIC_LABEL_HIERARCHY))
    for object_type, properties in labels_lib.SYNTHETIC_LABEL_HIERARCHY.items():
      assert object_type in processor.system_prompt
      assert all(p in processor.system_prompt for p in properties)
    assert '"bbox_2d": [x1, y1, x2, y2]' in processor.system_prompt
  zh = chat_lib.ChatProcessor(tok, chat_lib.ChatConfig(prompt_language="zh")).user_prompt
  en = chat_lib.ChatProcessor(tok, chat_lib.ChatConfig(prompt_language="en")).user_prompt
  assert zh != en


def test_real_records_answers_keep_their_boxes(tokenizer, shared_data):
  """The real records were smart-resized already, so the model frame is the file frame: the answer
  carries the records' own boxes (quads and lines as their min/max boxes) and parses back unchanged."""
  from bbu_jax.data import records as records_lib
  tok, _ = tokenizer
  processor = chat_lib.ChatProcessor(tok)
  for name in ("bbu_records.jsonl", "bbu_records_v3.jsonl"):
    real, _ = records_lib.load_records(shared_data / name, on_error="skip")
    assert real
    for record in real:
      assert processor.resized_size(record["width"], record["height"]) == (record["width"], record["height"])
      text = processor.answer_text(record)
      expected = sorted((o["bbox_2d"], o["desc"]) for o in record["objects"])
      parsed = processor.parse_response(text, record)
      assert parsed.error is None
      assert sorted((o["bbox_2d"], o["desc"]) for o in parsed.objects) == expected


def test_tokenizer_training_texts_cover_prompts_and_answers(tokenizer):
  tok, _ = tokenizer
  records = [_record("a", 1440, 1920, 3, seed=11), _record("b", 150, 90, 2, seed=12)]
  texts = chat_lib.tokenizer_training_texts(records)
  for language in chat_lib.PROMPT_LANGUAGES:
    processor = chat_lib.ChatProcessor(tok, chat_lib.ChatConfig(prompt_language=language))
    assert processor.system_prompt in texts and processor.user_prompt in texts
  # answers as the model sees them: in the resized frame
  assert texts[-2:] == [processor.answer_text(r) for r in records]
  assert texts[-2] != chat_lib.answer_lib.format_answer(records[0]["objects"])
