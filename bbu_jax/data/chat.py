"""ChatProcessor: the ONE prompt builder of training and inference, and the parser of answers back into
boxes in the image file's frame.

A sample is Qwen2.5-VL's chat: system (label hierarchy and output format), then per teacher a
user(image + prompt) / assistant(answer) pair, then the student's user turn and its answer. Answers are
the JSON array of `answer.format_answer` in the frame of the RESIZED image the model sees (smart_resize);
`parse_response` scales predictions back to the file's frame. The text is rendered exactly as
transformers' `apply_chat_template` renders it with Qwen2.5-VL's template (with each image's single
`<|image_pad|>` repeated once per merged vision token, as Qwen's processor does) and tokenized in one
pass, so ids equal transformers' and the inference prompt is an exact prefix of the training ids.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from bbu_jax.data import answer as answer_lib
from bbu_jax.data import images as images_lib
from bbu_jax.data import labels as labels_lib
from bbu_jax.data.geometry import scale_box
from bbu_jax.data.tokenizer import Tokenizer
from bbu_jax.models.rope import get_rope_index

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"

PROMPT_LANGUAGES = ("zh", "en")

_SYSTEM_PROMPT = {
    "zh": ("你是通信机柜设备检测助手。找出图片中所有目标，输出一个 JSON 数组，每个目标写成 "
           '{{"bbox_2d": [x1, y1, x2, y2], "label": "类型/属性"}}，坐标是图片的像素坐标（左上角为原点，'
           "x 向右、y 向下），目标按 y1、x1 从小到大排列；没有目标时输出 []。\n"
           "目标类型及其属性：\n{hierarchy}"),
    "en": ("You detect equipment in photos of telecom cabinets. Find every object in the image and answer "
           'with one JSON array; write each object as {{"bbox_2d": [x1, y1, x2, y2], "label": '
           '"type/property"}} in pixel coordinates of the image (origin top-left, x right, y down), objects '
           "sorted by y1 then x1; answer [] when there are none.\n"
           "Object types and their properties:\n{hierarchy}"),
}
_USER_PROMPT = {
    "zh": "请检测图中的所有目标，按要求输出 JSON。",
    "en": "Detect every object in the image and answer in the required JSON.",
}
_CANDIDATES = {"zh": "候选标签：{}", "en": "Candidate labels: {}"}
_CANDIDATE_SEPARATOR = {"zh": "，", "en": ", "}
_NO_PROPERTY = {"zh": "（无属性）", "en": "(no property)"}


def hierarchy_text(hierarchy: Mapping[str, Sequence[str]], language: str) -> str:
  """One line per object type: `- type: property, property` (the system prompt's label list)."""
  separator = _CANDIDATE_SEPARATOR[language]
  lines = []
  for object_type, properties in hierarchy.items():
    lines.append(f"- {object_type}: {separator.join(properties) if properties else _NO_PROPERTY[language]}")
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ChatConfig:
  """What shapes the prompt; the same values must be used in training and inference."""

  prompt_language: str = "zh"
  label_hierarchy: Mapping[str, Sequence[str]] = dataclasses.field(
      default_factory=lambda: dict(labels_lib.DEFAULT_LABEL_HIERARCHY))
  candidate_phrases: tuple[str, ...] = ()  # listed in every user turn when given
  images: images_lib.ImageProcessorConfig = images_lib.ImageProcessorConfig()
  max_caption_tokens: int = 32  # detection caption targets: desc tokens + eos, truncated to this

  def __post_init__(self):
    if self.prompt_language not in PROMPT_LANGUAGES:
      raise ValueError(f"prompt_language must be one of {PROMPT_LANGUAGES}, got {self.prompt_language!r}")
    if self.max_caption_tokens < 2:
      raise ValueError(f"max_caption_tokens must be >= 2 (one token + eos), got {self.max_caption_tokens}")


def _record_size(record: dict) -> tuple[int, int]:
  return int(record["width"]), int(record["height"])


def answer_objects(record: dict, image_config: images_lib.ImageProcessorConfig) -> list[dict]:
  """The record's objects as boxes in the resized frame (rounded, clamped), with their desc."""
  width, height = _record_size(record)
  rh, rw = image_config.resized_size(height, width)
  return [{"bbox_2d": scale_box(obj["bbox_2d"], (width, height), (rw, rh)), "desc": obj["desc"]}
          for obj in record["objects"]]


def system_prompt(config: ChatConfig) -> str:
  language = config.prompt_language
  return _SYSTEM_PROMPT[language].format(hierarchy=hierarchy_text(config.label_hierarchy, language))


def user_prompt(config: ChatConfig) -> str:
  language = config.prompt_language
  text = _USER_PROMPT[language]
  if config.candidate_phrases:
    text += "\n" + _CANDIDATES[language].format(_CANDIDATE_SEPARATOR[language].join(config.candidate_phrases))
  return text


def tokenizer_training_texts(records: Sequence[dict], config: ChatConfig = ChatConfig()) -> list[str]:
  """What a demo BPE is trained on: every record's answer (in the resized frame) and the prompts of
  both languages, each prompt once per record, as often as training reads it: BPE merges by frequency,
  so the prompts every sample repeats become a few long tokens (the demo's 189-token Chinese system
  prompt, given once, stayed at 189 tokens; weighted, 60) and the step time goes
  to the image and answer tokens instead."""
  texts = []
  repeats = max(1, len(records))
  for language in PROMPT_LANGUAGES:
    language_config = dataclasses.replace(config, prompt_language=language)
    texts += [system_prompt(language_config), user_prompt(language_config)] * repeats
  texts += [answer_lib.format_answer(answer_objects(record, config.images)) for record in records]
  return texts


class ImageReadError(ValueError):
  """An image file that is missing, cannot be decoded, or is not the size its record says; the message
  names the record and the file."""


class ImageLoader:
  """Reads a record's image from `data_root` (the record's single path is relative to it)."""

  def __init__(self, data_root: str | os.PathLike | None):
    self.data_root = pathlib.Path(data_root) if data_root is not None else None

  def __call__(self, record: dict) -> Image.Image:
    path = pathlib.Path(record["images"][0])
    if self.data_root is not None and not path.is_absolute():
      path = self.data_root / path
    try:
      return images_lib.load_image(path)
    except ValueError as e:  # files change after validation (deleted, truncated): say which record
      raise ImageReadError(f"record {record.get('id')}: {e}") from e


@dataclasses.dataclass
class _Rendered:
  text: str
  answer_spans: list[tuple[int, int, bool]]  # (start, end, is_student) of each answer incl. <|im_end|>
  student_user_span: tuple[int, int]  # the student's user content: vision block and prompt
  prompt_end: int  # end of "<|im_start|>assistant\n" of the student's turn


class ChatProcessor:
  """Builds training samples and inference prompts from records; parses answers back."""

  def __init__(self, tokenizer: Tokenizer, config: ChatConfig = ChatConfig()):
    self.tokenizer = tokenizer
    self.config = config
    self.special = tokenizer.special
    self.system_prompt = system_prompt(config)
    self.user_prompt = user_prompt(config)

  # --- frames ------------------------------------------------------------------------------------

  def resized_size(self, width: int, height: int) -> tuple[int, int]:
    """(width, height) of the model's frame for an image file of this size."""
    rh, rw = self.config.images.resized_size(height, width)
    return rw, rh

  def answer_text(self, record: dict) -> str:
    """The assistant answer for a record: its boxes in the resized frame, sorted by (y1, x1)."""
    return answer_lib.format_answer(answer_objects(record, self.config.images))

  # --- rendering -----------------------------------------------------------------------------------

  def _num_image_tokens(self, record: dict) -> int:
    width, height = _record_size(record)
    return self.config.images.num_image_tokens(height, width)

  def _user_turn(self, record: dict) -> tuple[str, int, int]:
    """The user turn's text and the span of its content (vision block + prompt) within it."""
    head = f"{IM_START}user\n"
    content = VISION_START + IMAGE_PAD * self._num_image_tokens(record) + VISION_END + self.user_prompt
    return head + content + f"{IM_END}\n", len(head), len(head) + len(content)

  def _render(self, record: dict, teachers: Sequence[dict], with_answer: bool) -> _Rendered:
    parts = [f"{IM_START}system\n{self.system_prompt}{IM_END}\n"]
    offset = len(parts[0])
    spans: list[tuple[int, int, bool]] = []
    turns = [(t, False) for t in teachers] + [(record, True)]
    student_user_span = (0, 0)
    prompt_end = 0
    for turn_record, is_student in turns:
      user, content_start, content_end = self._user_turn(turn_record)
      if is_student:
        student_user_span = (offset + content_start, offset + content_end)
      parts.append(user)
      offset += len(user)
      head = f"{IM_START}assistant\n"
      parts.append(head)
      offset += len(head)
      if is_student:
        prompt_end = offset
        if not with_answer:
          break
      answer = self.answer_text(turn_record) + IM_END
      spans.append((offset, offset + len(answer), is_student))
      parts.append(answer + "\n")
      offset += len(answer) + 1
    return _Rendered("".join(parts), spans, student_user_span, prompt_end)

  def chat_messages(self, record: dict, teachers: Sequence[dict] = (), with_answer: bool = True
                    ) -> list[dict]:
    """The same chat as transformers messages (for apply_chat_template; one image entry per image)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": self.system_prompt}]
    for turn_record in list(teachers) + [record]:
      messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.user_prompt}]})
      if with_answer or turn_record is not record:
        messages.append({"role": "assistant", "content": self.answer_text(turn_record)})
    return messages

  # --- images ------------------------------------------------------------------------------------

  def _process_images(self, records: Sequence[dict], image_loader: Callable[[dict], Image.Image]
                      ) -> tuple[np.ndarray, np.ndarray]:
    pixel_values, grids = [], []
    for rec in records:
      if len(rec["images"]) != 1:
        raise ValueError(f"record {rec['id']}: expected exactly one image, got {len(rec['images'])}")
      image = image_loader(rec)
      if image.size != _record_size(rec):  # e.g. a file replaced after validation
        raise ImageReadError(f"record {rec['id']}: image {rec['images'][0]} is {image.size[0]}x{image.size[1]} "
                         f"but the record says {rec['width']}x{rec['height']}")
      pv, grid = images_lib.process_image(image, self.config.images)
      pixel_values.append(pv)
      grids.append(grid)
    return np.concatenate(pixel_values, axis=0), np.stack(grids).astype(np.int64)

  def _positions(self, input_ids: np.ndarray, grids: np.ndarray) -> np.ndarray:
    positions, _ = get_rope_index(input_ids, grids, image_token_id=self.special.image_token_id,
                                  vision_start_token_id=self.special.vision_start_token_id,
                                  spatial_merge_size=self.config.images.merge_size)
    return positions

  # --- public --------------------------------------------------------------------------------------

  def build_training_sample(self, record: dict, teachers: Sequence[dict] = (),
                            image_loader: Callable[[dict], Image.Image] | None = None) -> dict:
    """One training sample (numpy), unpadded.

    input_ids (S,) int32; teacher_mask / student_mask (S,) bool: the token is part of a teacher's /
    the student's answer (its closing <|im_end|> included); student_text_mask (S,) bool: the student's
    user content (vision block and prompt); positions (3, S) int32 (M-RoPE, starting at 0);
    pixel_values (N, patch_dim) float32 and image_grid_thw (n_images, 3) of the teachers' images then
    the student's, in text order; image_is_student (n_images,) bool; det_boxes (O, 4) float32: the
    student's answer boxes normalized by the resized image size (xyxy in [0, 1]); det_caption_ids
    (O, max_caption_tokens) int32: desc tokens + eos, 0-padded; id: the record id.
    """
    rendered = self._render(record, teachers, with_answer=True)
    ids, offsets = self.tokenizer.encode_with_offsets(rendered.text)
    input_ids = np.asarray(ids, np.int32)
    starts = np.asarray([o[0] for o in offsets], np.int64)
    ends = np.asarray([o[1] for o in offsets], np.int64)
    teacher_mask = np.zeros(len(ids), bool)
    student_mask = np.zeros(len(ids), bool)
    for start, end, is_student in rendered.answer_spans:
      inside = (starts >= start) & (ends <= end)
      straddles = (starts < end) & (ends > start) & ~inside
      if straddles.any():
        raise AssertionError(f"record {record['id']}: a token crosses an answer boundary; the tokenizer "
                             "merges across chat-template pieces")
      (student_mask if is_student else teacher_mask)[inside] = True
    user_start, user_end = rendered.student_user_span
    student_text_mask = (starts >= user_start) & (ends <= user_end)
    pixel_values, grids = self._process_images(list(teachers) + [record], image_loader or ImageLoader(None))
    boxes, captions = self.detection_targets(record)
    return {
        "id": record["id"],
        "input_ids": input_ids,
        "teacher_mask": teacher_mask,
        "student_mask": student_mask,
        "student_text_mask": student_text_mask,
        "positions": self._positions(input_ids, grids),
        "pixel_values": pixel_values,
        "image_grid_thw": grids,
        "image_is_student": np.arange(len(grids)) == len(grids) - 1,
        "det_boxes": boxes,
        "det_caption_ids": captions,
    }

  def build_inference_prompt(self, record: dict, teachers: Sequence[dict] = (),
                             image_loader: Callable[[dict], Image.Image] | None = None,
                             with_images: bool = True) -> dict:
    """The training sample up to the student's answer: input_ids, positions, next_position, and the
    images (pixel_values, image_grid_thw) unless `with_images` is False."""
    rendered = self._render(record, teachers, with_answer=False)
    input_ids = np.asarray(self.tokenizer.encode(rendered.text), np.int32)
    out: dict[str, Any] = {"id": record["id"], "input_ids": input_ids}
    all_records = list(teachers) + [record]
    grids = np.asarray([self.config.images.grid_thw(r["height"], r["width"]) for r in all_records], np.int64)
    if with_images:
      out["pixel_values"], grids = self._process_images(all_records, image_loader or ImageLoader(None))
    positions, next_position = get_rope_index(
        input_ids, grids, image_token_id=self.special.image_token_id,
        vision_start_token_id=self.special.vision_start_token_id, spatial_merge_size=self.config.images.merge_size)
    out.update(image_grid_thw=grids, positions=positions, next_position=next_position)
    return out

  def prompt_text(self, record: dict, teachers: Sequence[dict] = ()) -> str:
    return self._render(record, teachers, with_answer=False).text

  def training_text(self, record: dict, teachers: Sequence[dict] = ()) -> str:
    return self._render(record, teachers, with_answer=True).text

  def detection_targets(self, record: dict) -> tuple[np.ndarray, np.ndarray]:
    """(O, 4) float32 boxes of the answer normalized by the resized size, (O, L) int32 caption ids.

    Objects in the answer's order (sorted by (y1, x1)), so box k is the k-th object of the answer.
    """
    objects = answer_lib.parse_answer(self.answer_text(record)).objects
    width, height = self.resized_size(*_record_size(record))
    boxes = np.zeros((len(objects), 4), np.float32)
    captions = np.zeros((len(objects), self.config.max_caption_tokens), np.int32)
    for k, obj in enumerate(objects):
      boxes[k] = np.asarray(obj["bbox_2d"], np.float32) / np.asarray([width, height, width, height], np.float32)
      tokens = self.tokenizer.encode(obj["desc"])[: self.config.max_caption_tokens - 1]
      tokens.append(self.special.eos_token_id)
      captions[k, : len(tokens)] = tokens
    return boxes, captions

  def parse_response(self, text: str, record_or_size: dict | tuple[int, int]) -> answer_lib.ParsedAnswer:
    """The objects of an answer with boxes moved to the image FILE's frame (rounded, clipped).

    record_or_size: a record (its width/height) or the file's (width, height). Every other field that
    parse_answer gives (desc, span, error, repairs, skipped) is kept.
    """
    file_size = _record_size(record_or_size) if isinstance(record_or_size, dict) else tuple(record_or_size)
    model_size = self.resized_size(*file_size)
    parsed = answer_lib.parse_answer(text)
    objects = []
    for obj in parsed.objects:
      moved = dict(obj)
      moved["bbox_2d"] = scale_box(obj["bbox_2d"], model_size, file_size)
      objects.append(moved)
    return dataclasses.replace(parsed, objects=objects)
