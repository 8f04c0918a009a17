"""layerroute_rt.data: the synthetic generator, the loaders (fixtures in tests/fixtures/data), the
training examples and collate, and the evaluation splits."""
from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pytest
import tokenizers
import torch
import torch.nn.functional as F

import layerroute_rt as lr
from layerroute_rt import data as D
from qwen_factory import save_random_qwen2

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok():
    """A small Qwen-style tokenizer (with the Qwen2.5 chat template), trained here on synthetic text."""
    texts = [D.render_trajectory(t) for t in D.generate_trajectories(80, seed=123)]
    return D.train_tokenizer(texts, vocab_size=1200)


@pytest.fixture(scope="module")
def trajectories():
    return D.generate_trajectories(60, seed=0)


# ---------------------------------------------------------------------------------------------
# Synthetic generator
# ---------------------------------------------------------------------------------------------

def _check_value(value, schema: dict, where: str) -> None:
    """A small JSON-schema check: types, enums, required and unknown properties, nesting."""
    types = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
             "object": dict}
    kind = schema["type"]
    assert isinstance(value, types[kind]), (where, value)
    assert kind == "boolean" or not isinstance(value, bool), (where, value)      # bool is an int in Python
    if "enum" in schema:
        assert value in schema["enum"], (where, value)
    if kind == "array":
        for i, item in enumerate(value):
            _check_value(item, schema["items"], f"{where}[{i}]")
    if kind == "object":
        assert set(schema["required"]) <= set(value), (where, value)
        assert set(value) <= set(schema["properties"]), (where, value)
        for key, item in value.items():
            _check_value(item, schema["properties"][key], f"{where}.{key}")


def test_generator_is_deterministic_per_seed():
    a, b = D.generate_trajectories(15, seed=7), D.generate_trajectories(15, seed=7)
    assert a == b
    assert a != D.generate_trajectories(15, seed=8)
    assert D.generate_trajectories(4, seed=7) == a[:4]           # trajectory i depends on (seed, i) only
    assert len({t.id for t in a}) == 15


def test_catalog_covers_many_tools_domains_and_argument_types():
    assert len(D.TOOLS) >= 30 and len(D.DOMAINS) >= 8
    assert len({t.name for t in D.TOOLS}) == len(D.TOOLS)
    kinds = set()

    def walk(schema):
        kinds.add("enum" if "enum" in schema else schema["type"])
        for sub in schema.get("properties", {}).values():
            walk(sub)
        if "items" in schema:
            walk(schema["items"])

    for tool in D.TOOLS:
        for sub in tool.schema()["function"]["parameters"]["properties"].values():
            walk(sub)
        # user-task templates name only required, scalar arguments
        fields = {f for _, f, _, _ in string.Formatter().parse(tool.task) if f}
        required = {p.name for p in tool.params.props if p.required and p.kind not in ("array", "object")}
        assert fields and fields <= required, tool.name
    assert kinds == {"string", "integer", "number", "boolean", "enum", "array", "object"}


def test_tool_calls_parse_and_match_their_schemas(trajectories):
    n_calls = 0
    for traj in trajectories:
        offered = {t["function"]["name"]: t["function"]["parameters"] for t in traj.tools}
        steps = list(traj.steps)
        for i, step in enumerate(steps):
            if step.type != "tool_call":
                continue
            blocks = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", step.content, re.DOTALL)
            calls = D.parse_tool_calls(step.content)
            assert len(blocks) == len(calls) >= 1
            assert D.format_tool_calls(calls) == step.content
            for block, (name, arguments) in zip(blocks, calls):
                assert json.loads(block) == {"name": name, "arguments": arguments}
                assert name in offered, (traj.id, name)
                _check_value(arguments, offered[name], f"{traj.id}:{name}")
                n_calls += 1
            # one observation per call follows the call step
            assert [s.type for s in steps[i + 1:i + 1 + len(calls)]] == ["observation"] * len(calls)
            for obs in steps[i + 1:i + 1 + len(calls)]:
                assert isinstance(json.loads(obs.content), dict)
    assert n_calls > len(trajectories)


def test_all_step_types_present_in_order(trajectories):
    assert {s.type for t in trajectories for s in t.steps} == set(D.STEP_TYPES)
    for traj in trajectories:
        types = [s.type for s in traj.steps]
        assert types[:2] == ["system", "user"] and types[-1] == "final_answer"
        assert types.count("final_answer") == 1 and "tool_call" in types


def test_length_controls_are_respected():
    trajs = D.generate_trajectories(40, seed=3, tool_call_len=(110, 170), planning_len=(260, 380),
                                    final_answer_len=(50, 90))
    ranges = {"tool_call": (110, 170), "planning": (260, 380), "final_answer": (50, 90)}
    for step_type, (lo, hi) in ranges.items():
        lengths = [len(s.content) for t in trajs for s in t.of_type(step_type)]
        assert lengths and all(lo <= n <= hi for n in lengths), (step_type, min(lengths), max(lengths))
    # any length function, e.g. words
    words = lambda s: len(s.split())  # noqa: E731
    trajs = D.generate_trajectories(20, seed=3, tool_call_len=(8, 30), planning_len=(30, 45),
                                    final_answer_len=(10, 20), length_fn=words)
    for step_type, (lo, hi) in (("tool_call", (8, 30)), ("planning", (30, 45)), ("final_answer", (10, 20))):
        assert all(lo <= words(s.content) <= hi for t in trajs for s in t.of_type(step_type))


def test_length_matched_pairs_exist_with_default_settings():
    trajs = D.generate_trajectories(200, seed=0)
    calls = [len(s.content) for t in trajs for s in t.of_type("tool_call")]
    plans = [len(s.content) for t in trajs for s in t.of_type("planning")]
    pairs = D.match_lengths(calls, plans, rel_tol=0.05, abs_tol=2)
    assert len(pairs) >= 100
    assert all(D.within_tolerance(calls[i], plans[j], 0.05, 2) for i, j in pairs)


def test_generator_rejects_bad_settings():
    with pytest.raises(ValueError, match="tool_call_len"):
        D.generate_trajectories(2, tool_call_len=(50, 10))
    with pytest.raises(ValueError, match="cannot build a tool call of length in \\[5, 10\\]"):
        D.generate_trajectories(2, tool_call_len=(5, 10))
    with pytest.raises(ValueError, match="unknown or no domains"):
        D.generate_trajectories(2, domains=("astrology",))
    assert {d for t in D.generate_trajectories(10, domains=("code",)) for d in t.meta["domains"]} == {"code"}


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------

SYS, USR, PLAN, CALL, OBS, FINAL = "system", "user", "planning", "tool_call", "observation", "final_answer"
FIXTURE_TYPES = {
    ("openai.jsonl", "openai"): [[SYS, USR, CALL, OBS, FINAL], [USR, PLAN, CALL, OBS, OBS, PLAN, FINAL],
                                 [USR, FINAL, USR, FINAL]],
    ("sharegpt.jsonl", "sharegpt"): [[SYS, USR, CALL, OBS, FINAL], [SYS, USR, FINAL]],
    ("hermes.json", "hermes"): [[SYS, USR, CALL, OBS, OBS, FINAL], [SYS, USR, PLAN, CALL, OBS, FINAL]],
    ("glaive.json", "glaive"): [[SYS, USR, CALL, OBS, FINAL, USR, PLAN, CALL, OBS, FINAL], [SYS, USR, FINAL]],
    ("xlam.json", "xlam"): [[USR, CALL], [USR, CALL]],
}


@pytest.mark.parametrize("name,fmt", list(FIXTURE_TYPES))
def test_loader_reads_fixture_into_step_types(name, fmt):
    trajs = D.load_dataset(FIXTURES / name)
    assert [[s.type for s in t.steps] for t in trajs] == FIXTURE_TYPES[name, fmt]
    assert all(t.source == f"{fmt}:{name}" for t in trajs)
    assert D.load_dataset(FIXTURES / name, format=fmt) == trajs
    for traj in trajs:
        for step in traj.of_type("tool_call"):
            calls = D.parse_tool_calls(step.content)
            assert calls and D.format_tool_calls(calls) == step.content     # normalised Hermes/Qwen text
        for tool in traj.tools:
            assert tool["type"] == "function" and isinstance(tool["function"]["name"], str)


def test_loaders_keep_contents_and_arguments():
    openai = D.load_dataset(FIXTURES / "openai.jsonl")
    assert openai[0].id == "openai.jsonl:1" and openai[2].id == "openai.jsonl:4"      # blank line skipped
    assert D.parse_tool_calls(openai[0].steps[2].content) == [("get_forecast",
                                                               {"location": "Lisbon", "days": 2})]
    assert openai[1].steps[1] == D.Step("planning", "I will run both conversions at once.")
    assert [a["to_currency"] for _, a in D.parse_tool_calls(openai[1].steps[2].content)] == ["EUR", "JPY"]
    assert openai[2].steps[1].content == "I'm an assistant that can call tools."     # list of text parts

    sharegpt = D.load_dataset(FIXTURES / "sharegpt.jsonl")
    assert sharegpt[0].steps[0] == D.Step("system", "You are a local guide.")
    assert sharegpt[0].tools[0]["function"]["name"] == "search_places"

    hermes = D.load_dataset(FIXTURES / "hermes.json")
    assert hermes[0].id == "hermes.json[0]" and hermes[0].tools == ()
    assert D.parse_tool_calls(hermes[0].steps[2].content) == [("get_stock_quote", {"symbol": "NVDA"}),
                                                              ("get_stock_quote", {"symbol": "AMD"})]
    assert json.loads(hermes[0].steps[4].content)["content"]["price"] == 158.2
    assert hermes[1].steps[2] == D.Step("planning", "I'll create the event now.")

    glaive = D.load_dataset(FIXTURES / "glaive.json")
    assert glaive[0].steps[0].content.startswith("You are a helpful assistant with access")
    assert D.parse_tool_calls(glaive[0].steps[2].content) == [
        ("get_exchange_rate", {"base_currency": "USD", "target_currency": "EUR"})]
    assert glaive[0].steps[6] == D.Step("planning", "Let me check that for you.")
    assert glaive[0].steps[-1].content == "One British pound is 191.3 Japanese yen."

    xlam = D.load_dataset(FIXTURES / "xlam.json")
    assert [t["function"]["name"] for t in xlam[1].tools] == ["calculate_factorial", "is_palindrome"]
    assert len(D.parse_tool_calls(xlam[0].steps[1].content)) == 2


@pytest.mark.parametrize("name,where,field,problem", [
    ("openai_malformed.jsonl", ":2", "messages[1].tool_calls[0].function.arguments",
     "expected a JSON object string, got string 'location=Rome'"),
    ("sharegpt_malformed.jsonl", ":3", "conversations[1].from", "expected one of human, user, gpt"),
    ("hermes_malformed.json", ": record [1]", "conversations[1].value.tool_call[0]", "not valid JSON"),
    ("glaive_malformed.json", ": record [1]", "chat",
     "turn 1 (ASSISTANT): <functioncall> is not a JSON object"),
    ("xlam_malformed.json", ": record [0]", "answers[1].arguments", "expected a JSON object string"),
])
def test_loader_rejects_malformed_fixture(name, where, field, problem):
    with pytest.raises(D.DataFormatError, match=re.escape(f"{name}{where}: field '{field}': {problem}")):
        D.load_dataset(FIXTURES / name)


GOOD = {"openai": {"messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}]},
        "sharegpt": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        "glaive": {"chat": "USER: hi\n\n\nASSISTANT: hello <|endoftext|>"},
        "xlam": {"query": "q", "tools": "[]", "answers": "[{\"name\": \"f\", \"arguments\": {}}]"}}
MALFORMED = [
    ("openai", {"messages": "hi"}, "messages", "expected array, got string"),
    ("openai", {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "expected system, user"),
    ("openai", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "expected a string"),
    ("openai", {"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]},
     "messages[0].tool_calls[0].function", "missing"),
    ("openai", {"messages": [{"role": "assistant",
                              "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[0].tool_calls[0].function.arguments", "expected a JSON object string, got string '[1]'"),
    ("openai", {"messages": [{"role": "user", "content": "x"}], "tools": [3]}, "tools[0]",
     "expected an object"),
    ("sharegpt", {"conversations": [{"from": "human"}]}, "conversations[0].value", "missing"),
    ("sharegpt", {"conversations": [{"from": "function_call", "value": "{\"name\": 3}"}]},
     "conversations[0].value[0].name", "expected string"),
    ("sharegpt", {"conversations": [{"from": "gpt",
                                     "value": "<tool_call>{\"name\": \"f\", \"arguments\": 1}</tool_call>"}]},
     "conversations[0].value.tool_call[0].arguments", "expected a JSON object string"),
    ("sharegpt", {"conversations": [{"from": "gpt", "value": "<tool_call>{\"name\": \"f\"}"}]},
     "conversations[0].value", "unbalanced <tool_call> tags"),
    ("glaive", {"chat": 3}, "chat", "expected string"),
    ("glaive", {"chat": "hello there"}, "chat", "no USER:/ASSISTANT:"),
    ("xlam", {"query": "q", "tools": [], "answers": "[]"}, "tools", "expected string"),
    ("xlam", {"query": "q", "tools": "[]", "answers": "oops"}, "answers",
     "expected a JSON string of a non-empty list"),
    ("xlam", {"query": "q", "tools": "[{\"description\": \"d\"}]", "answers": "[]"}, "tools[0].name",
     "missing"),
]


@pytest.mark.parametrize("fmt,record,field,problem", MALFORMED)
def test_loader_rejects_malformed_line_naming_file_line_and_field(tmp_path, fmt, record, field, problem):
    path = tmp_path / f"{fmt}_bad.jsonl"
    path.write_text("\n".join([json.dumps(GOOD[fmt]), "", json.dumps(record), json.dumps(GOOD[fmt])]) + "\n")
    with pytest.raises(D.DataFormatError, match=re.escape(f"{fmt}_bad.jsonl:3: field '{field}': {problem}")):
        D.load_dataset(path, format=fmt)
    path.write_text(json.dumps(GOOD[fmt]) + "\n")                     # the good record alone loads
    assert len(D.load_dataset(path, format=fmt)) == 1


def test_loader_file_level_errors(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD["openai"]) + "\n{\"messages\": [\n")
    with pytest.raises(D.DataFormatError, match=r"broken\.jsonl:2: invalid JSON"):
        D.load_dataset(path)
    path.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    with pytest.raises(D.DataFormatError,
                       match=r"broken\.jsonl:1: cannot tell the data format .*'completion', 'prompt'"):
        D.load_dataset(path)
    path.write_text("[1, 2]")
    with pytest.raises(D.DataFormatError, match=r"broken\.jsonl: record \[0\]: cannot tell the data format"):
        D.load_dataset(path)
    path.write_text(" \n")
    with pytest.raises(D.DataFormatError, match="the file is empty"):
        D.load_dataset(path)
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        D.load_dataset(path, format="csv")


def test_openai_jsonl_round_trip(tmp_path, trajectories):
    path = tmp_path / "synthetic.jsonl"
    D.save_openai_jsonl(trajectories, path)
    loaded = D.load_dataset(path)
    assert [t.steps for t in loaded] == [t.steps for t in trajectories]
    assert [t.tools for t in loaded] == [t.tools for t in trajectories]


# ---------------------------------------------------------------------------------------------
# Examples and collate
# ---------------------------------------------------------------------------------------------

def _all_fixture_trajectories():
    return [t for name, _ in FIXTURE_TYPES for t in D.load_dataset(FIXTURES / name)]


def test_builtin_chatml_matches_the_qwen_template(tok, trajectories):
    for traj in trajectories[:20] + _all_fixture_trajectories():
        messages = D.to_chat_messages(traj.steps)
        for k in range(1, len(messages) + 1):
            for gen in (False, True):
                ours = D.render_chatml(messages[:k], traj.tools, gen)
                ref = tok.apply_chat_template(messages[:k], tools=list(traj.tools) or None, tokenize=False,
                                              add_generation_prompt=gen)
                assert ours == ref, (traj.id, k, gen)


def test_loss_mask_covers_exactly_the_step_tokens(tok, trajectories):
    trajs = trajectories[:15] + _all_fixture_trajectories()
    by_id = {t.id: t for t in trajs}
    assistant_types = ("tool_call", "planning", "final_answer")
    examples = D.build_examples(trajs, tok, max_length=4096, step_types=assistant_types)
    assert {e.step_type for e in examples} == set(assistant_types)
    assert len(examples) == sum(s.type in assistant_types for t in trajs for s in t.steps[1:])
    for e in examples:
        step = by_id[e.traj_id].steps[e.step_index]
        assert e.step_type == step.type
        n = len(e.input_ids)
        assert e.loss_mask == [False] * (n - e.step_len) + [True] * e.step_len
        assert e.labels == [t if m else D.IGNORE_INDEX for t, m in zip(e.input_ids, e.loss_mask)]
        step_text = tok.decode(e.input_ids[n - e.step_len:], skip_special_tokens=False)
        assert step_text == step.content + "<|im_end|>"
        context = tok.decode(e.input_ids[:n - e.step_len], skip_special_tokens=False)
        assert context.endswith("<|im_start|>assistant\n")
        assert (context, step.content + "<|im_end|>") == D.render_step(by_id[e.traj_id], e.step_index)
    # a tokenizers.Tokenizer (no chat template: the built-in ChatML) gives the same examples
    raw = D.build_examples(trajs, tok.backend_tokenizer, max_length=4096, step_types=assistant_types)
    assert isinstance(tok.backend_tokenizer, tokenizers.Tokenizer) and raw == examples


def test_context_is_truncated_from_the_left_never_the_step(tok, trajectories):
    full = D.build_examples(trajectories[:10], tok, max_length=100_000)
    max_length = 96
    with pytest.warns(UserWarning, match="left out"):
        short = D.build_examples(trajectories[:10], tok, max_length=max_length)
    kept = {(e.traj_id, e.step_index): e for e in short}
    assert 0 < len(kept) < len(full)
    for e in full:
        s = kept.get((e.traj_id, e.step_index))
        if s is None:
            assert e.step_len >= max_length
            continue
        assert len(s.input_ids) == min(len(e.input_ids), max_length)
        assert s.input_ids == e.input_ids[-len(s.input_ids):]          # a suffix: context cut on the left
        assert s.step_len == e.step_len and sum(s.loss_mask) == e.step_len


def test_examples_reject_bad_arguments(tok, trajectories):
    with pytest.raises(ValueError, match="not assistant steps"):
        D.build_examples(trajectories[:1], tok, step_types=("observation",))
    with pytest.raises(ValueError, match="step 1 is not an assistant step"):
        D.render_step(trajectories[0], 1)                                   # the user turn
    with pytest.raises(ValueError, match="at least one example"):
        D.collate([])


def test_value_label_weight_marks_the_json_value_tokens(tok):
    """1 + weight on exactly the tokens that overlap a JSON value of the decoded step, 1 on the
    rest; the tokens add up to the text, so every value character lies in a weighted token."""
    from layerroute_rt.runtime.toolcalls import json_value_spans
    text = '```json\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n```'
    ids = tok.encode(text, add_special_tokens=False)
    weight = D.value_label_weight(tok, ids, 4.0)
    assert len(weight) == len(ids) and set(weight) == {1.0, 5.0}
    value_chars = {i for s, e in json_value_spans(text) for i in range(s, e)}
    pos = 0
    for t, w in zip(ids, weight):
        piece = tok.decode([t])
        chars = set(range(pos, pos + len(piece)))
        assert (w == 5.0) == bool(chars & value_chars), (piece, w)
        pos += len(piece)
    assert pos == len(text)
    assert D.value_label_weight(tok, ids, 0.0) == (1.0,) * len(ids)
    assert D.value_label_weight(tok, tok.encode("plain words only", add_special_tokens=False), 4.0) \
        == (1.0,) * len(tok.encode("plain words only", add_special_tokens=False))
    with pytest.raises(ValueError, match="weight must be >= 0"):
        D.value_label_weight(tok, ids, -1.0)


def test_collate_label_weight(tok, trajectories):
    examples = D.build_examples(trajectories[:2], tok, max_length=1024)[:3]
    assert "label_weight" not in D.collate(examples)
    import dataclasses
    w = tuple(float(i % 3) for i in range(len(examples[1].input_ids)))
    weighted = [examples[0], dataclasses.replace(examples[1], label_weight=w), examples[2]]
    batch = D.collate(weighted)
    n = len(w)
    assert batch["label_weight"].dtype == torch.float32
    assert batch["label_weight"][1, :n].tolist() == list(w)
    assert (batch["label_weight"][1, n:] == 1).all() and (batch["label_weight"][[0, 2]] == 1).all()
    with pytest.raises(ValueError, match="label_weight has 2 entries"):
        dataclasses.replace(examples[0], label_weight=(1.0, 1.0))


def test_collate_pads_right_and_fits_train_forward(tok, trajectories, tmp_path):
    examples = D.build_examples(trajectories[:4], tok, max_length=1024)
    examples = sorted(examples, key=lambda e: len(e.input_ids))[:12:3]
    lengths = [len(e.input_ids) for e in examples]
    assert len(set(lengths)) > 1
    batch = D.collate(examples, pad_id=tok.pad_token_id)
    B, T = len(examples), max(lengths)
    for key in ("input_ids", "labels", "attention_mask", "loss_mask"):
        assert batch[key].shape == (B, T)
    assert batch["input_ids"].dtype == torch.long and batch["loss_mask"].dtype == torch.bool
    assert batch["step_type"] == [e.step_type for e in examples]
    assert batch["step_len"].tolist() == [e.step_len for e in examples]
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["input_ids"][b, :n].tolist() == e.input_ids
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all()
        assert (batch["labels"][b, n:] == D.IGNORE_INDEX).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)
        assert batch["loss_mask"][b].tolist() == e.loss_mask + [False] * (T - n)

    # the batch drives LayerRouteModel.train_forward; its CE is the mean over the step tokens
    save_random_qwen2(tmp_path, vocab_size=len(tok))
    model = lr.load(tmp_path)
    keys = ("input_ids", "labels", "attention_mask", "loss_mask")
    with torch.no_grad():
        out = model.train_forward(**{k: batch[k] for k in keys})
    logp = F.log_softmax(out.logits[:, :-1].float(), -1)
    targets = batch["input_ids"][:, 1:]
    nll = -logp.gather(-1, targets[..., None])[..., 0]
    mask = batch["loss_mask"][:, 1:]
    torch.testing.assert_close(out.ce, nll[mask].mean(), rtol=1e-5, atol=1e-5)
    assert int(mask.sum()) == sum(e.step_len for e in examples)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

def test_heldout_split_is_disjoint_by_trajectory(tok, trajectories):
    train, held = D.heldout_split(trajectories, fraction=0.2, seed=1)
    assert len(held) == 12 and len(train) == 48
    assert {t.id for t in train}.isdisjoint({t.id for t in held})
    assert {t.id for t in train} | {t.id for t in held} == {t.id for t in trajectories}
    assert D.heldout_split(trajectories, 0.2, seed=1) == (train, held)
    assert D.heldout_split(trajectories, 0.2, seed=2)[1] != held
    train_ex, held_ex = (D.build_examples(x, tok, max_length=256) for x in (train[:10], held))
    assert {e.traj_id for e in train_ex}.isdisjoint({e.traj_id for e in held_ex})


def test_match_lengths_pairs_nearest_within_tolerance():
    pairs = D.match_lengths([10, 50, 100, 300], [48, 11, 500, 104, 103], rel_tol=0.1, abs_tol=2)
    assert sorted(pairs) == [(0, 1), (1, 0), (2, 4)]
    assert D.match_lengths([10], []) == []


def test_length_matched_split_removes_the_length_type_correlation(tok):
    # tool calls short, planning long: the unmatched set confounds type with length
    trajs = D.generate_trajectories(100, seed=5, tool_call_len=(70, 260), planning_len=(150, 700))
    examples = D.build_examples(trajs, tok, max_length=1024)
    stats = D.split_stats(examples)
    assert stats["r_type_length"] < -0.4
    assert stats["mean_step_len"]["planning"] > 1.5 * stats["mean_step_len"]["tool_call"]
    matched = D.length_matched_split(examples, rel_tol=0.1, abs_tol=4, seed=0)
    pairs = list(zip(matched[::2], matched[1::2]))
    assert len(pairs) >= 60
    assert all(a.step_type == "tool_call" and b.step_type == "planning" for a, b in pairs)
    assert all(D.within_tolerance(a.step_len, b.step_len, 0.1, 4) for a, b in pairs)
    assert len({(e.traj_id, e.step_index) for e in matched}) == len(matched)
    matched_stats = D.split_stats(matched)
    assert abs(matched_stats["r_type_length"]) < 0.1
    assert matched_stats["n"] == {"planning": len(pairs), "tool_call": len(pairs)}
