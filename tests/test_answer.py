"""Tests for the assistant answer text: format_answer's exact spelling and parse_answer's salvage."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from bbu_jax.data import answer
from bbu_jax.data.answer import AnswerParseError, format_answer, parse_answer

OBJECTS = [
    {"bbox_2d": [301, 285, 357, 330], "desc": "螺丝连接点/BBU安装螺丝"},
    {"bbox_2d": [12, 40, 80, 300], "desc": "BBU设备/华为,显示完整"},
    {"bbox_2d": [5, 40, 9, 60], "label": "标签/5G-RRU1-光纤"},
]


def test_format_answer_exact_spelling_and_order():
  text = format_answer(OBJECTS)
  assert text == ('[{"bbox_2d": [5, 40, 9, 60], "label": "标签/5G-RRU1-光纤"}, '
                  '{"bbox_2d": [12, 40, 80, 300], "label": "BBU设备/华为,显示完整"}, '
                  '{"bbox_2d": [301, 285, 357, 330], "label": "螺丝连接点/BBU安装螺丝"}]')
  assert json.loads(text)[0]["bbox_2d"] == [5, 40, 9, 60]


def test_format_answer_empty_rounding_and_geometry():
  assert format_answer([]) == "[]"
  text = format_answer([{"bbox_2d": [1.4, 2.6, 10.5, 11.5], "desc": "a"},
                        {"quad": [204, 74, 271, 84, 245, 818, 183, 844], "desc": "挡风板/华为"},
                        {"line": [0, 191, 7, 190, 41, 162], "desc": "光纤"}])
  boxes = [o["bbox_2d"] for o in json.loads(text)]
  assert boxes == [[1, 3, 10, 12], [183, 74, 271, 844], [0, 162, 41, 191]]


def test_format_answer_rejects_objects_without_box_or_label():
  with pytest.raises(ValueError, match="object 1"):
    format_answer([{"bbox_2d": [0, 0, 1, 1], "desc": "a"}, {"desc": "no box"}])
  with pytest.raises(ValueError, match="object 0"):
    format_answer([{"bbox_2d": [0, 0, 1, 1]}])


def test_round_trip_with_spans():
  text = format_answer(OBJECTS)
  parsed = parse_answer(text)
  assert parsed.error is None and parsed.repairs == () and parsed.skipped == {}
  assert [o["desc"] for o in parsed.objects] == ["标签/5G-RRU1-光纤", "BBU设备/华为,显示完整", "螺丝连接点/BBU安装螺丝"]
  for obj in parsed.objects:
    start, end = obj["span"]
    assert json.loads(text[start:end]) == {"bbox_2d": obj["bbox_2d"], "label": obj["desc"]}
  assert format_answer(parsed.objects) == text


def test_round_trip_real_records(shared_data):
  count = 0
  for line in (shared_data / "bbu_records_v3.jsonl").read_text(encoding="utf-8").splitlines()[:60]:
    record = json.loads(line)
    text = format_answer(record["objects"])
    parsed = parse_answer(text)
    assert parsed.error is None
    assert len(parsed.objects) == len(record["objects"])
    assert format_answer(parsed.objects) == text
    count += len(parsed.objects)
  assert count > 100


def test_fenced_and_prose():
  body = format_answer(OBJECTS[:2])
  parsed = parse_answer("Sure, here are the objects:\n```json\n" + body + "\n```\nDone.")
  assert parsed.error is None
  assert {"code fence", "surrounding text"} <= set(parsed.repairs)
  assert len(parsed.objects) == 2


def test_truncated_salvages_complete_objects():
  text = format_answer(OBJECTS)
  cut = text[:text.rindex("{") + 15]
  parsed = parse_answer(cut)
  assert parsed.error == answer.ERROR_TRUNCATED
  assert [o["bbox_2d"] for o in parsed.objects] == [[5, 40, 9, 60], [12, 40, 80, 300]]
  # Cut inside a string, and cut right after a separating comma.
  assert parse_answer(text[:text.index("BBU设备") + 2]).error == answer.ERROR_TRUNCATED
  after_comma = text[:text.index("}, ") + 2]
  parsed = parse_answer(after_comma)
  assert parsed.error == answer.ERROR_TRUNCATED and len(parsed.objects) == 1


def test_slightly_malformed():
  parsed = parse_answer("[{'bbox_2d': [1, 2, 3, 4], 'label': 'a',}, {\"bbox_2d\": [5, 6, 7, 8,], \"desc\": \"b\"},]")
  assert parsed.error is None
  assert [(o["bbox_2d"], o["desc"]) for o in parsed.objects] == [([1, 2, 3, 4], "a"), ([5, 6, 7, 8], "b")]
  assert {"single quotes", "trailing comma"} <= set(parsed.repairs)
  parsed = parse_answer('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}')
  assert parsed.error is None and "missing closing bracket" in parsed.repairs and len(parsed.objects) == 1
  parsed = parse_answer('[{bbox_2d: [1, 2, 3, 4], label: "x"}]')
  assert parsed.objects[0]["desc"] == "x" and "bare key" in parsed.repairs


def test_bad_boxes_are_skipped_and_counted():
  text = json.dumps([
      {"bbox_2d": [1, "a", 3, 4], "label": "x"},
      {"bbox_2d": [1, 2, 3], "label": "x"},
      {"bbox_2d": [1, 2, 3, 4, 5], "label": "x"},
      {"bbox_2d": "1,2,3,4", "label": "x"},
      {"bbox_2d": [1, 2, 3, 4]},
      {"bbox_2d": [1, 2, 3, 4], "label": ""},
      {"label": "no box"},
      {"bbox_2d": [1, 2, 3, 4], "label": "ok"},
  ])
  parsed = parse_answer(text)
  assert [o["desc"] for o in parsed.objects] == ["ok"]
  assert parsed.skipped == {answer.SKIP_BOX_NON_NUMERIC: 2, answer.SKIP_BOX_LENGTH: 2,
                            answer.SKIP_MISSING_LABEL: 2, answer.SKIP_MISSING_BOX: 1}
  parsed = parse_answer('[{"bbox_2d": [1, NaN, 3, 4], "label": "x"}]')
  assert parsed.skipped == {answer.SKIP_BOX_NON_FINITE: 1} and parsed.objects == []


def test_errors_and_wrappers():
  assert parse_answer("").error == answer.ERROR_EMPTY
  assert parse_answer("I see no objects.").error == answer.ERROR_NO_JSON
  assert parse_answer(None).error == answer.ERROR_NO_JSON
  parsed = parse_answer("[]")
  assert parsed.error is None and parsed.objects == []
  parsed = parse_answer('{"objects": [{"bbox_2d": [1, 2, 3, 4], "desc": "y"}]}')
  assert parsed.error is None and parsed.objects[0]["desc"] == "y"
  parsed = parse_answer('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [1 2], "label": @}]')
  assert parsed.error == answer.ERROR_INVALID_JSON and len(parsed.objects) == 1
  with pytest.raises(AnswerParseError, match="truncated"):
    parse_answer('[{"bbox_2d": [1, 2', strict=True)


_FRAGMENTS = st.sampled_from([
    "[", "]", "{", "}", ",", ":", '"', "'", "\\", "```json", "```", '"bbox_2d"', "'label'", '"desc"', "bbox_2d",
    "[1, 2, 3, 4]", "[1e999, -0, 3]", "NaN", "null", "true", "螺丝/华为", " ", "\n", "\x00", "\ud800",
])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(st.one_of(_FRAGMENTS, st.text(max_size=5)), max_size=60)
                 .map("".join)))
def test_parse_answer_never_raises(text):
  parsed = parse_answer(text)
  assert parsed.error in (None, answer.ERROR_EMPTY, answer.ERROR_NO_JSON, answer.ERROR_TRUNCATED,
                          answer.ERROR_INVALID_JSON)
  for obj in parsed.objects:
    start, end = obj["span"]
    assert 0 <= start < end <= len(text) and text[start] == "{" and text[end - 1] == "}"
    assert len(obj["bbox_2d"]) == 4 and isinstance(obj["desc"], str)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 2000), min_size=4, max_size=4),
                          st.text(min_size=1, max_size=12).filter(str.strip)), max_size=8),
       st.integers(0, 10_000))
def test_round_trip_and_any_cut_salvages_a_prefix(rows, cut):
  objects = [{"bbox_2d": box, "desc": label} for box, label in rows]
  text = format_answer(objects)
  parsed = parse_answer(text)
  assert parsed.error is None and format_answer(parsed.objects) == text
  prefix = parse_answer(text[:cut % (len(text) + 1)])
  assert [o["bbox_2d"] for o in prefix.objects] == [o["bbox_2d"] for o in parsed.objects[:len(prefix.objects)]]
  assert [o["desc"] for o in prefix.objects] == [o["desc"] for o in parsed.objects[:len(prefix.objects)]]


def test_quotes_in_surrounding_prose_do_not_hide_the_json():
  parsed = parse_answer('The 5" unit and it\'s label: [{"bbox_2d": [1, 2, 3, 4], "label": "a"}] that\'s all')
  assert parsed.error is None and [o["desc"] for o in parsed.objects] == ["a"]
  assert "surrounding text" in parsed.repairs
