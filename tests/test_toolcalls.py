"""parse_tool_calls: Qwen's <tool_call> tags, fenced JSON and bare JSON, malformed calls reported."""
import pytest

from layerroute_rt.runtime.toolcalls import parse_tool_calls

WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}


def test_tool_call_tags():
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
            '</tool_call>')
    assert parse_tool_calls(text) == [WEATHER]


def test_several_tags_in_order_with_prose_between():
    text = ('I will look both up.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            'and\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    assert parse_tool_calls(text) == [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]


def test_unclosed_last_tag_runs_to_the_end():
    assert parse_tool_calls('<tool_call>\n{"name": "a", "arguments": {"x": 1}}') == \
        [{"name": "a", "arguments": {"x": 1}}]


def test_json_fence():
    text = ('```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris",\n'
            '    "unit": "celsius"\n  }\n}\n```')
    assert parse_tool_calls(text) == [WEATHER]


def test_plain_fence_and_a_fence_in_another_language_is_left_alone():
    text = ('```python\nf = {"name": "x", "arguments": {}}\n```\n'
            '```\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n```')
    assert parse_tool_calls(text) == [WEATHER]


def test_fenced_list_of_calls():
    text = '```json\n[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y": [1, 2]}}]\n```'
    assert parse_tool_calls(text) == [{"name": "a", "arguments": {"x": 1}},
                                      {"name": "b", "arguments": {"y": [1, 2]}}]


def test_bare_json_in_prose():
    text = 'Sure! {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}} Done.'
    assert parse_tool_calls(text) == [WEATHER]


def test_bare_list_and_bare_objects_on_separate_lines():
    assert parse_tool_calls('[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]') == \
        [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]
    assert parse_tool_calls('{"name": "a", "arguments": {"x": 1}}\n{"name": "b", "arguments": {"x": 2}}') == \
        [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"x": 2}}]


def test_bare_json_needs_name_and_arguments():
    # a bare object with a "name" but no arguments is data, not a call
    assert parse_tool_calls('The user is {"name": "Bob", "age": 3}.') == []


def test_arguments_as_a_json_string_and_the_parameters_alias():
    assert parse_tool_calls('{"name": "a", "arguments": "{\\"x\\": 1}"}') == [{"name": "a", "arguments": {"x": 1}}]
    assert parse_tool_calls('```json\n{"name": "a", "parameters": {"x": 1}}\n```') == \
        [{"name": "a", "arguments": {"x": 1}}]


def test_openai_wrapper_is_unwrapped():
    text = '<tool_call>{"type": "function", "function": {"name": "a", "arguments": "{}"}}</tool_call>'
    assert parse_tool_calls(text) == [{"name": "a", "arguments": {}}]


def test_all_three_forms_in_one_text_in_order():
    text = ('```json\n{"name": "b", "arguments": {}}\n```\n<tool_call>{"name": "a", "arguments": {}}'
            '</tool_call>\nthen {"name": "c", "arguments": {}}')
    assert [c["name"] for c in parse_tool_calls(text)] == ["b", "a", "c"]


def test_malformed_json_is_reported_not_raised():
    calls = parse_tool_calls('<tool_call>\n{"name": "a", "arguments": {"x": 1,}}\n</tool_call>')
    assert len(calls) == 1 and set(calls[0]) == {"error", "text"}
    assert "not valid JSON" in calls[0]["error"] and '"x": 1,' in calls[0]["text"]


def test_malformed_call_next_to_a_good_one():
    text = ('<tool_call>{"name": "a", "arguments": {"x": }</tool_call>\n'
            '<tool_call>{"name": "b", "arguments": {"x": 2}}</tool_call>')
    calls = parse_tool_calls(text)
    assert "error" in calls[0] and calls[1] == {"name": "b", "arguments": {"x": 2}}


def test_truncated_bare_call_is_an_error_and_prose_braces_are_not():
    calls = parse_tool_calls('Use {braces} here. {"name": "a", "arguments": {"x": 1}')
    assert len(calls) == 1 and "error" in calls[0] and calls[0]["text"].startswith('{"name": "a"')
    # a failing '[' before a good call does not swallow it
    assert parse_tool_calls('[the call] {"name": "a", "arguments": {}}') == [{"name": "a", "arguments": {}}]


def test_bad_fields_are_errors():
    for body, needle in (('{"name": "", "arguments": {}}', "'name'"),
                         ('{"name": "a", "arguments": [1]}', "'arguments'"),
                         ('{"name": "a", "arguments": "{oops"}', "not valid JSON"),
                         ('[]', "empty list"),
                         ('"just a string"', "expected a call object")):
        calls = parse_tool_calls(f"<tool_call>{body}</tool_call>")
        assert len(calls) == 1 and needle in calls[0]["error"], (body, calls)


def test_no_call_at_all():
    assert parse_tool_calls("I cannot help with that: no function fits.") == []
    assert parse_tool_calls("") == []
    assert parse_tool_calls("Here is code:\n```python\nprint({'a': 1})\n```") == []


def test_not_a_string_is_an_error():
    assert "expected generated text" in parse_tool_calls(None)[0]["error"]


# -- json_value_spans: the argument values a training KL can weigh ------------------------------

@pytest.mark.parametrize("text, values", [
    ('```json\n{"name": "f", "arguments": {"a": 1.5e3, "b": [-2, true, null], "c": "x\\"y"}}\n```',
     ['"f"', "1.5e3", "-2", "true", "null", '"x\\"y"']),
    ('In 2021 "quoted" prose <tool_call>{"name": "g", "arguments": {"k" : "v"}}</tool_call>',
     ['"g"', '"v"']),                                   # outside brackets nothing counts
    ('{"a": nullable, "b": x2, "c": [3, .5], "d": "cut', ["3", ".5", '"cut']),
    ('[{"name": "h", "arguments": {}}, {"name": "i", "arguments": {"n": 0}}]', ['"h"', '"i"', "0"]),
    ("no json at all", []),
    ("", []),
])
def test_json_value_spans(text, values):
    from layerroute_rt.runtime.toolcalls import json_value_spans
    spans = json_value_spans(text)
    assert [text[s:e] for s, e in spans] == values
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))      # in order, disjoint


# -- streaming (ToolCallStream): chunking-invariant deltas that join into the answer -------------

import itertools  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402

from layerroute_rt.runtime.toolcalls import ToolCallStream, scan_tool_calls  # noqa: E402

STREAM_CASES = [
    # (text, expected calls as (name, arguments text), expected content)
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "n": [1, {"a": "]"}]}}\n</tool_call>',
     [("get_weather", '{"city": "Pa\\"ris}", "n": [1, {"a": "]"}]}')], None),
    ('\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {}}'
     '\n</tool_call>', [("a", '{"x": 1}'), ("b", "{}")], None),
    # another key order: parsed when the block closes, arguments re-serialized
    ('<tool_call>\n{"arguments": {"x":1}, "name": "f"}\n</tool_call>', [("f", '{"x": 1}')], None),
    # arguments as a JSON string
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 2}"}</tool_call>', [("f", '{"x": 2}')], None),
    # an unclosed last block runs to the end
    ('<tool_call>\n{"name": "a", "arguments": {"x": 1}}', [("a", '{"x": 1}')], None),
    # fenced JSON (Qwen-Coder's answer): decided at the end
    ('```json\n{"name": "a", "arguments": {"x": 1}}\n```', [("a", '{"x": 1}')], None),
    ("I cannot help with that.", [], "I cannot help with that."),
    ("<tool", [], "<tool"),
    ('<tool_call>\nnot json\n</tool_call>', [], '<tool_call>\nnot json\n</tool_call>'),
]


def _stream(text, rng):
    ids = itertools.count()
    s = ToolCallStream(lambda: f"call_{next(ids)}")
    deltas, i = [], 0
    while i < len(text):
        i = min(len(text), i + rng.randint(1, 6))
        deltas += s.update(text[:i])
    deltas += s.update(text, final=True)
    return deltas, s.result(text)


@pytest.mark.parametrize("text,calls,content", STREAM_CASES)
def test_streamed_tool_deltas_join_into_the_answer_for_any_chunking(text, calls, content):
    for seed in range(20):
        deltas, (got_content, got_calls) = _stream(text, random.Random(seed))
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls] == calls
        assert got_content == content
        joined: dict[int, dict] = {}
        streamed_content = ""
        for d in deltas:
            streamed_content += d.get("content", "")
            for t in d.get("tool_calls", []):
                if t["index"] not in joined:
                    assert t["function"]["arguments"] == "" and t["id"].startswith("call_")
                    joined[t["index"]] = {"id": t["id"], "type": t["type"],
                                          "function": {"name": t["function"]["name"], "arguments": ""}}
                else:
                    joined[t["index"]]["function"]["arguments"] += t["function"]["arguments"]
        assert [joined[i] for i in sorted(joined)] == got_calls
        assert streamed_content == (content or "")
        for c in got_calls:
            json.loads(c["function"]["arguments"])


def test_template_calls_stream_their_arguments_as_they_are_written():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
    cut = text.index("Paris") + 3
    calls, content = scan_tool_calls(text[:cut], final=False)
    assert calls == [("get_weather", '{"city": "Par', False)] and content is None
    assert scan_tool_calls(text[:text.index('"get_w') + 4], final=False) == ([], None)   # the name not yet whole
    assert scan_tool_calls("```json\n{", final=False) == ([], None)                       # decided at the end
