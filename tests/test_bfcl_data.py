"""The BFCL loader: records and answers, clear errors for malformed ones, live_* refused, and the
training trajectories it gives (the reference call in the Qwen template's tool-call format)."""
import json

import pytest

from layerroute_rt.data import bfcl, render_step
from layerroute_rt.data.types import DataFormatError

FN = {"name": "math.hypot", "description": "Euclidean norm.",
      "parameters": {"type": "dict", "properties": {"x": {"type": "integer"}, "y": {"type": "float"},
                                                     "z": {"type": "integer"}}, "required": ["x", "y"]}}


def write(root, category, questions, answers=None):
    (root / "possible_answer").mkdir(parents=True, exist_ok=True)
    (root / f"BFCL_v4_{category}.json").write_text("".join(
        (q if isinstance(q, str) else json.dumps(q)) + "\n" for q in questions))
    if answers is not None:
        (root / "possible_answer" / f"BFCL_v4_{category}.json").write_text("".join(
            (a if isinstance(a, str) else json.dumps(a)) + "\n" for a in answers))


def question(i, fn=FN):
    return {"id": f"simple_python_{i}", "question": [[{"role": "user", "content": f"hypot of {i} and 4"}]],
            "function": [fn]}


def answer(i):
    return {"id": f"simple_python_{i}", "ground_truth": [{"math.hypot": {"x": [i], "y": [4.0, 4], "z": ["", 0]}}]}


def test_cases_answers_and_tools(tmp_path):
    write(tmp_path, "simple_python", [question(0), question(1)], [answer(1), answer(0)])
    cases = bfcl.load_category(tmp_path, "simple_python")
    assert [c.id for c in cases] == ["simple_python_0", "simple_python_1"]
    assert cases[1].ground_truth[0]["math.hypot"]["x"] == [1]
    tool = cases[0].tools[0]
    assert tool["type"] == "function" and tool["function"]["parameters"]["type"] == "object"
    assert tool["function"]["parameters"]["properties"]["y"]["type"] == "number"
    # the first allowed value of each parameter; "" first means it may be left out
    assert bfcl.reference_calls(cases[1]) == [("math.hypot", {"x": 1, "y": 4.0})]


def test_irrelevance_has_no_answers(tmp_path):
    write(tmp_path, "irrelevance", [question(0)])
    (case,) = bfcl.load_category(tmp_path, "irrelevance")
    assert case.ground_truth is None and bfcl.reference_calls(case) == []
    with pytest.raises(ValueError, match="no tool call to train on"):
        bfcl.to_trajectory(case)


@pytest.mark.parametrize("category", ["live_simple", "live_multiple", "live_irrelevance"])
def test_live_categories_are_refused(tmp_path, category):
    with pytest.raises(ValueError, match="live_\\* categories are kept for an outside check"):
        bfcl.load_category(tmp_path, category)


def test_unknown_category_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown BFCL category 'simple_rust'"):
        bfcl.load_category(tmp_path, "simple_rust")
    with pytest.raises(FileNotFoundError, match="BFCL_v4_multiple.json: no such BFCL file"):
        bfcl.load_category(tmp_path, "multiple")


@pytest.mark.parametrize("record, answers, message", [
    ("{not json", [answer(0)], r"BFCL_v4_simple_python\.json:1: not valid JSON"),
    ("[1, 2]", [answer(0)], r":1: expected a JSON object, got list"),
    ({"id": "simple_python_0", "question": [[{"role": "user", "content": "x"}]]}, [answer(0)],
     r":1: missing field\(s\) \['function'\]"),
    ({**question(0), "question": []}, [answer(0)], r":1: field 'question' must be a non-empty list"),
    ({**question(0), "question": [[{"role": "robot", "content": "x"}]]}, [answer(0)],
     r":1: field 'question': each message needs a role"),
    ({**question(0), "function": [{"description": "no name"}]}, [answer(0)],
     r":1: field 'function': each entry needs a string 'name'"),
    (question(0), [{"id": "simple_python_0", "ground_truth": [{"a": {"x": [1]}, "b": {}}]}],
     r"possible_answer/BFCL_v4_simple_python\.json:1: field 'ground_truth': each call is an object with one key"),
    (question(0), [{"id": "simple_python_0", "ground_truth": [{"a": {"x": 1}}]}],
     r"field 'ground_truth': a's parameters must map each name to a list"),
    (question(0), [answer(5)], r":1: case 'simple_python_0' has no possible answer"),
])
def test_malformed_records_name_file_line_and_field(tmp_path, record, answers, message):
    write(tmp_path, "simple_python", [record], answers)
    with pytest.raises(DataFormatError, match=message):
        bfcl.load_category(tmp_path, "simple_python")


def test_split_is_stable_and_disjoint(tmp_path):
    write(tmp_path, "simple_python", [question(i) for i in range(20)], [answer(i) for i in range(20)])
    cases = bfcl.load_category(tmp_path, "simple_python")
    train, held = bfcl.split_ids(cases, 5, seed=0)
    assert len(held) == 5 and not {c.id for c in train} & {c.id for c in held}
    assert [c.id for c in bfcl.split_ids(cases[::-1], 5, seed=0)[1]] == [c.id for c in held]
    assert [c.id for c in bfcl.split_ids(cases, 3, seed=0)[1]] == [c.id for c in held[:3]]
    assert [c.id for c in bfcl.split_ids(cases, 5, seed=1)[1]] != [c.id for c in held]


def test_trajectory_renders_the_call_in_the_template_format(tmp_path):
    write(tmp_path, "simple_python", [question(3)], [answer(3)])
    traj = bfcl.to_trajectory(bfcl.load_category(tmp_path, "simple_python")[0])
    context, step = render_step(traj, 1)                # built-in Qwen ChatML (no tokenizer)
    assert "# Tools" in context and '"name": "math.hypot"' in context
    assert context.endswith("<|im_start|>user\nhypot of 3 and 4<|im_end|>\n<|im_start|>assistant\n")
    assert step == '<tool_call>\n{"name": "math.hypot", "arguments": {"x": 3, "y": 4.0}}\n</tool_call><|im_end|>'
