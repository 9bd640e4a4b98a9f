"""The inference entry point end to end on synthetic records with a tiny random model and its own tokenizer:
responses file, data-parallel split, unreadable images, teacher-guided prompts (parity with transformers),
similar-teacher selection and its cache, frames and scores of parsed answers."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import _tiny_models as tm  # noqa: E402
from bbu_jax import evaluate, infer  # noqa: E402
from bbu_jax.data import images as images_lib  # noqa: E402
from bbu_jax.data import records as records_lib  # noqa: E402
from bbu_jax.data import synthetic  # noqa: E402
from bbu_jax.data.answer import format_answer  # noqa: E402
from bbu_jax.data.chat import ChatConfig, ChatProcessor, ImageLoader, tokenizer_training_texts  # noqa: E402
from bbu_jax.data.tokenizer import train_bpe_tokenizer  # noqa: E402
from bbu_jax.decode.generate import GenerationSettings, Generator, make_prompt_batch  # noqa: E402
from bbu_jax.models.weights import load_model  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_PIXELS = 112 * 112
MAX_NEW = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Synthetic records (images of two sizes), a BPE tokenizer trained on them and a tiny random model
  whose special token ids are the tokenizer's, saved as a Hugging Face directory."""
  root = tmp_path_factory.mktemp("infer")
  data = root / "data"
  synthetic.generate(data, num_train=0, num_val=3, num_teacher=3, image_sizes=[(112, 112), (140, 84)])
  val, _ = records_lib.load_records(data / "val.jsonl")
  pool, _ = records_lib.load_records(data / "teacher_pool.jsonl")
  chat_config = ChatConfig(images=images_lib.ImageProcessorConfig(max_pixels=MAX_PIXELS))
  tokenizer = train_bpe_tokenizer(tokenizer_training_texts(val + pool, chat_config), vocab_size=512)
  sp = tokenizer.special
  config = transformers.Qwen2_5_VLConfig(
      text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=144, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, hidden_act="silu",
                       max_position_embeddings=4096,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                       bos_token_id=sp.bos_token_id, eos_token_id=sp.eos_token_id, pad_token_id=sp.pad_token_id),
      vision_config=dict(depth=2, hidden_size=32, intermediate_size=72, num_heads=2, in_channels=3, patch_size=14,
                         temporal_patch_size=2, spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1],
                         out_hidden_size=64, hidden_act="silu"),
      image_token_id=sp.image_token_id, video_token_id=sp.video_token_id,
      vision_start_token_id=sp.vision_start_token_id, vision_end_token_id=sp.vision_end_token_id,
      tie_word_embeddings=False)
  for c in (config, config.text_config, config.vision_config):
    c._attn_implementation = "eager"
  torch.manual_seed(0)
  hf = transformers.Qwen2_5_VLForConditionalGeneration(config).float().eval()
  tm.randomize_(hf, seed=4)
  model_dir = root / "model"
  hf.save_pretrained(model_dir)
  tokenizer.save(model_dir)
  # The input: the val records plus one whose image file is missing.
  broken = dict(records_lib.export_record(val[0]), id="broken", images=["images/missing.jpg"])
  inputs = root / "input.jsonl"
  records_lib.write_jsonl(inputs, [records_lib.export_record(r) for r in val] + [broken])
  return {"root": root, "data": data, "model_dir": model_dir, "inputs": inputs, "val": val, "pool": pool,
          "tokenizer": tokenizer, "chat_config": chat_config, "hf": hf}


def test_cli_on_two_devices_writes_a_responses_file_the_evaluator_scores(setup, tmp_path):
  output = tmp_path / "responses.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run(
      [sys.executable, "-m", "bbu_jax.infer", "--model_path", str(setup["model_dir"]), "--input_jsonl",
       str(setup["inputs"]), "--output_file", str(output), "--data_root", str(setup["data"]), "--batch_size", "2",
       "--max_new_tokens", str(MAX_NEW), "--max_pixels", str(MAX_PIXELS), "--no_progress"],
      env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  responses = json.loads(output.read_text(encoding="utf-8"))
  assert responses["mode"] == "standard" and responses["model_path"] == str(setup["model_dir"])
  assert responses["config"]["devices"] == 2 and responses["config"]["compilations"] == 1
  samples = {s["id"]: s for s in responses["samples"]}
  assert list(samples) == [r["id"] for r in setup["val"]] + ["broken"]
  assert "unreadable image" in samples["broken"]["error"] and samples["broken"]["prediction"] == []
  for record in setup["val"]:
    sample = samples[record["id"]]
    assert isinstance(sample["raw_response"], str) and 1 <= sample["num_tokens"] <= MAX_NEW
    assert (sample["width"], sample["height"]) == (record["width"], record["height"])
    assert [o["desc"] for o in sample["ground_truth"]] == [o["desc"] for o in record["objects"]]
    assert sample["teachers"] == [] and "error" not in sample
    assert all(0 < p["score"] <= 1 for p in sample["prediction"])

  # One device gives the same answers: the data-parallel split changes nothing.
  single = infer.run_inference(str(setup["model_dir"]), str(setup["inputs"]), str(tmp_path / "single.json"),
                               str(setup["data"]), batch_size=2, max_new_tokens=MAX_NEW, max_pixels=MAX_PIXELS,
                               progress=False)
  assert [s["raw_response"] for s in single["samples"]] == [s["raw_response"] for s in responses["samples"]]

  metrics = tmp_path / "metrics.json"
  assert evaluate.main(["--responses_file", str(output), "--output_file", str(metrics)]) == 0
  report = json.loads(metrics.read_text(encoding="utf-8"))
  assert report["evaluation_info"]["total_samples"] == 4
  assert report["evaluation_info"]["total_gt_objects"] == sum(len(r["objects"]) for r in setup["val"]) + \
      len(setup["val"][0]["objects"])
  assert {"mAP", "AP@0.5", "AP@0.75", "mAR"} <= set(report["overall_metrics"])


def test_teacher_guided_prompt_decodes_as_transformers_generate(setup):
  """Teacher turns with their own images before the student's, built by the ChatProcessor."""
  model, config = load_model(setup["model_dir"])
  processor = ChatProcessor(setup["tokenizer"], setup["chat_config"])
  loader = ImageLoader(setup["data"])
  val, pool = setup["val"], setup["pool"]
  prompts = [processor.build_inference_prompt(val[0], pool[:2], image_loader=loader),
             processor.build_inference_prompt(val[1], pool[2:], image_loader=loader)]
  assert len(prompts[0]["image_grid_thw"]) == 3 and len(prompts[1]["image_grid_thw"]) == 2
  settings = GenerationSettings(max_new_tokens=MAX_NEW, eos_token_ids=(config.eos_token_id,),
                                pad_token_id=config.pad_token_id)
  out = Generator(model).generate(make_prompt_batch(prompts, config), settings)
  for row, prompt in enumerate(prompts):
    ids = torch.as_tensor(prompt["input_ids"].astype(np.int64))[None]
    with torch.no_grad():
      ref = setup["hf"].generate(
          input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.as_tensor(prompt["pixel_values"]),
          image_grid_thw=torch.as_tensor(prompt["image_grid_thw"]),
          mm_token_type_ids=(ids == config.image_token_id).to(torch.int32), max_new_tokens=MAX_NEW,
          do_sample=False, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    np.testing.assert_array_equal(out.row_tokens(row), ref[0, ids.shape[1]:].numpy(), err_msg=f"row {row}")


def test_similar_teachers_are_the_nearest_pool_images_and_pool_features_are_cached(setup, tmp_path):
  val = setup["val"]
  # A pool entry showing the student's own image under another id must be its nearest teacher.
  twin = dict(records_lib.export_record(val[0]), id="twin_of_val0")
  pool_file = tmp_path / "pool.jsonl"
  records_lib.write_jsonl(pool_file, [records_lib.export_record(r) for r in setup["pool"]] + [twin])
  inputs = tmp_path / "input.jsonl"
  records_lib.write_jsonl(inputs, [records_lib.export_record(val[0])])
  output = tmp_path / "guided.json"
  responses = infer.run_inference(str(setup["model_dir"]), str(inputs), str(output), str(setup["data"]),
                                  batch_size=2, teacher_pool_file=str(pool_file), num_teachers=2,
                                  teacher_selection="similar", max_new_tokens=4, max_pixels=MAX_PIXELS,
                                  progress=False)
  assert responses["mode"] == "teacher_guided"
  teachers = responses["samples"][0]["teachers"]
  assert len(teachers) == 2 and teachers[0] == "twin_of_val0" and val[0]["id"] not in teachers
  cached = list(tmp_path.glob("guided.pool_features.*.npz"))
  assert len(cached) == 1

  # A second call with the same pool reads the cache instead of running the vision tower.
  model, _ = load_model(setup["model_dir"])
  image_config = images_lib.ImageProcessorConfig(max_pixels=MAX_PIXELS)
  calls = []

  class CountingEmbedder(infer.VisionEmbedder):
    def __call__(self, processed, batch_size):
      calls.append(len(processed))
      return super().__call__(processed, batch_size)

  embedder = CountingEmbedder(model)
  pool, _ = records_lib.load_records(pool_file)
  loader = ImageLoader(setup["data"])
  features = infer.pool_features(embedder, pool, loader, image_config, 2, cached[0])
  assert calls == [] and features.shape == (len(pool), 64)
  fresh = infer.pool_features(embedder, pool, loader, image_config, 2, tmp_path / "fresh.npz")
  assert calls == [len(pool)]
  np.testing.assert_allclose(fresh, features, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)


def test_random_teachers_are_seeded_and_never_the_student(setup, tmp_path):
  pool_ids = [r["id"] for r in setup["pool"]] + [setup["val"][0]["id"]]
  from bbu_jax.data.teachers import sample_teachers
  draw = lambda seed: sample_teachers(pool_ids, setup["val"][0]["id"], seed=seed, epoch=0, index=0,
                                      teacher_ratio=1.0, num_teacher_samples=2)
  assert draw(3) == draw(3) and len(draw(3)) == 2 and len(pool_ids) - 1 not in draw(3)


def test_response_sample_puts_boxes_in_the_file_frame_with_scores(setup):
  processor = ChatProcessor(setup["tokenizer"], ChatConfig(images=images_lib.ImageProcessorConfig(max_pixels=MAX_PIXELS)))
  record = {"id": "r", "images": ["x.jpg"], "width": 280, "height": 168, "objects": []}
  model_w, model_h = processor.resized_size(280, 168)
  assert (model_w, model_h) == (140, 84)  # the model sees half the file's size
  text = format_answer([{"bbox_2d": [10, 20, 30, 40], "desc": "标签贴纸"},
                        {"bbox_2d": [50, 20, 70, 80], "desc": "线缆/光纤"}])
  tokens = np.asarray(setup["tokenizer"].encode(text) + [setup["tokenizer"].special.eos_token_id])
  log_probs = np.full(len(tokens), np.log(0.5))
  log_probs[len(tokens) // 2:] = np.log(0.9)
  sample = infer.response_sample(record, ["t1"], processor, tokens, log_probs)
  assert sample["raw_response"] == text and sample["parse_error"] is None and sample["teachers"] == ["t1"]
  boxes = [p["bbox_2d"] for p in sample["prediction"]]
  assert boxes == [[20, 40, 60, 80], [100, 40, 140, 160]]
  scores = [p["score"] for p in sample["prediction"]]
  assert 0.5 <= scores[0] < scores[1] <= 0.9


def test_bad_arguments_are_refused_with_one_message(setup, tmp_path, capsys):
  code = infer.main(["--model_path", str(setup["model_dir"]), "--input_jsonl", str(setup["inputs"]),
                     "--output_file", str(tmp_path / "o.json"), "--num_teachers", "2"])
  assert code == 2 and "--num_teachers needs --teacher_pool_file" in capsys.readouterr().err
  assert not (tmp_path / "o.json").exists()


def test_head_reads_the_student_turn_as_in_training(setup):
  processor = ChatProcessor(setup["tokenizer"], setup["chat_config"])
  loader = ImageLoader(setup["data"])
  val, pool = setup["val"], setup["pool"]
  prompts = [processor.build_inference_prompt(val[0], pool[:2], image_loader=loader),
             processor.build_inference_prompt(val[1], [], image_loader=loader)]
  model_config = load_model(setup["model_dir"])[1]
  batch = make_prompt_batch(prompts, model_config, batch_size=3)
  sp = setup["tokenizer"].special
  text_valid, vision_valid = infer.head_memory_masks(batch, prompts, sp.image_token_id, sp.vision_start_token_id,
                                                     sp.im_end_token_id, 4)
  for row, (record, teachers) in enumerate([(val[0], pool[:2]), (val[1], [])]):
    training = processor.build_training_sample(record, teachers, image_loader=loader)
    n = len(prompts[row]["input_ids"])
    np.testing.assert_array_equal(text_valid[row, -n:], training["student_text_mask"][:n])
    assert not text_valid[row, :-n].any()
    student_tokens = int(np.prod(training["image_grid_thw"][-1])) // 4
    merged = np.flatnonzero(batch.vision_meta["merged_valid"][row])
    np.testing.assert_array_equal(np.flatnonzero(vision_valid[row]), merged[-student_tokens:])
  np.testing.assert_array_equal(text_valid[2], text_valid[0])  # the filler row copies row 0


def test_a_checkpoint_with_a_detection_head_gets_head_predictions(setup, tmp_path):
  from flax import nnx
  from bbu_jax.models import bbu_model
  from bbu_jax.models.detection_head import DetectionHeadConfig
  from bbu_jax.models.weights import read_config
  head = DetectionHeadConfig(hidden_size=64, num_queries=5, width=32, num_layers=1, num_heads=4, mlp_dim=64,
                             adapter_dim=8, caption_max_len=6, caption_layers=1)
  model = bbu_model.BBUModel(read_config(setup["model_dir"]), detection=head, rngs=nnx.Rngs(0))
  checkpoint = bbu_model.save(model, tmp_path / "ckpt", source_dir=setup["model_dir"])
  inputs = tmp_path / "input.jsonl"
  records_lib.write_jsonl(inputs, [records_lib.export_record(r) for r in setup["val"][:2]])
  output = tmp_path / "responses.json"
  responses = infer.run_inference(str(checkpoint), str(inputs), str(output), str(setup["data"]), batch_size=2,
                                  max_new_tokens=3, max_pixels=MAX_PIXELS, progress=False)
  assert responses["config"]["detection_head"] is True
  for sample, record in zip(responses["samples"], setup["val"]):
    predictions = sample["head_prediction"]
    assert len(predictions) == 5
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and all(0 < v < 1 for v in scores)
    for p in predictions:
      x1, y1, x2, y2 = p["bbox_2d"]
      assert 0 <= x1 <= x2 <= record["width"] and 0 <= y1 <= y2 <= record["height"] and isinstance(p["desc"], str)
  metrics = tmp_path / "metrics.json"
  assert evaluate.main(["--responses_file", str(output), "--output_file", str(metrics), "--source", "head"]) == 0
  assert json.loads(metrics.read_text())["evaluation_info"]["total_pred_objects"] <= 10


def test_evaluate_runs_inference_first_with_model_path(setup, tmp_path):
  """bbu_jax.evaluate --model_path ... calls run_inference with its own arguments, then scores."""
  inputs = tmp_path / "input.jsonl"
  records_lib.write_jsonl(inputs, [records_lib.export_record(setup["val"][1])])
  metrics = tmp_path / "metrics.json"
  code = evaluate.main(["--model_path", str(setup["model_dir"]), "--input_jsonl", str(inputs), "--data_root",
                        str(setup["data"]), "--output_file", str(metrics), "--batch_size", "1"])
  assert code == 0
  responses = json.loads((tmp_path / "metrics.responses.json").read_text(encoding="utf-8"))
  assert [s["id"] for s in responses["samples"]] == [setup["val"][1]["id"]]
  assert json.loads(metrics.read_text())["evaluation_info"]["total_samples"] == 1


def test_the_model_folders_chat_settings_are_the_defaults_and_flags_override_them(setup, tmp_path):
  model_dir = tmp_path / "model"
  shutil.copytree(setup["model_dir"], model_dir)
  (model_dir / "chat_config.json").write_text(json.dumps(
      {"prompt_language": "en", "min_pixels": 3136, "max_pixels": MAX_PIXELS // 2,
       "label_hierarchy": {"挡风板": ["安装"]}}), encoding="utf-8")
  common = dict(model_path=str(model_dir), input_jsonl=str(setup["inputs"]), data_root=str(setup["data"]),
                batch_size=2, progress=False, max_new_tokens=2)
  trained = infer.run_inference(output_file=str(tmp_path / "a.json"), **common)["config"]
  assert (trained["prompt_language"], trained["max_pixels"]) == ("en", MAX_PIXELS // 2)
  flagged = infer.run_inference(output_file=str(tmp_path / "b.json"), prompt_language="zh", **common)["config"]
  assert (flagged["prompt_language"], flagged["max_pixels"]) == ("zh", MAX_PIXELS // 2)
