"""Constrained decoding (layerroute_rt/runtime/grammar.py, xgrammar) on the bundled demo model:
tool_choice "required" and named give calls whose arguments validate against their schemas,
also for a prompt the unconstrained model answers in prose; parallel_tool_calls=False gives one
call at most; json_schema / json_object answers parse and validate; a row without a grammar is
untouched by its neighbour's; the mask equals a torch unpacking of the bitmask; bad specs are
ValueErrors naming the field; and the server honours the same fields (openai client)."""
import json

import jsonschema
import pytest
import torch

import layerroute_rt as lr
from layerroute_rt.runtime import grammar
from layerroute_rt.cli import DEMO_DIR
from layerroute_rt.runtime.generate import encode_prompts, load_tokenizer
from layerroute_rt.runtime.scheduler import Request, Scheduler

pytest.importorskip("xgrammar")

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"]}}}
BOOK = {"type": "function", "function": {"name": "book_hotel", "parameters": {
    "type": "object", "properties": {"hotel": {"type": "string"}, "nights": {"type": "integer", "minimum": 1}},
    "required": ["hotel", "nights"]}}}
TOOLS = [WEATHER, BOOK]
PROSE = [{"role": "user", "content": "Tell me a joke about cats."}]
TWO = [{"role": "user", "content": "Get the weather in Paris for 3 days and book the Ritz for 2 nights."}]
SCHEMA = {"type": "object", "properties": {"rating": {"enum": [1, 2, 3, 4, 5]}, "ok": {"type": "boolean"},
                                           "mood": {"enum": ["happy", "sad"]}},
          "required": ["rating", "ok", "mood"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine():
    return lr.InferenceModel(lr.load(DEMO_DIR, adapter=DEMO_DIR / "adapter"))


def _valid_calls(calls, tools, names=None):
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls, "no call"
    for c in calls:
        assert c["name"] in (names or by_name)
        jsonschema.validate(c["arguments"], by_name[c["name"]])


def test_required_and_named_give_valid_calls_where_the_model_answers_in_prose(engine):
    free = lr.generate(engine, [PROSE], max_new_tokens=60, tools=TOOLS)
    assert free.tool_calls == [[]]                      # unconstrained: prose
    for choice, names in (("required", None), ({"type": "function", "function": {"name": "book_hotel"}},
                                                ["book_hotel"])):
        out = lr.generate(engine, [PROSE, TWO], max_new_tokens=120, tools=TOOLS, tool_choice=choice)
        for calls, finish in zip(out.tool_calls, out.finish_reasons):
            assert finish == "stop"                    # the grammar ended at EOS
            _valid_calls(calls, TOOLS, names)


def test_parallel_tool_calls_false_gives_one_call_at_most(engine):
    for choice in ("required", "auto"):
        out = lr.generate(engine, [TWO, PROSE], max_new_tokens=160, tools=TOOLS, tool_choice=choice,
                          parallel_tool_calls=False)
        for text, calls in zip(out.text, out.tool_calls):
            assert text.count("<tool_call>") <= 1 and len(calls) <= 1
            if calls:
                _valid_calls(calls, TOOLS)


def test_json_schema_and_json_object_answers_validate(engine):
    fmt = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA, "strict": True}}
    out = lr.generate(engine, [PROSE, TWO], max_new_tokens=80, response_format=fmt)
    for text, finish in zip(out.text, out.finish_reasons):
        assert finish == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
    out = lr.generate(engine, [PROSE], max_new_tokens=200, response_format={"type": "json_object"})
    if out.finish_reasons[0] == "stop":               # a complete object (a long one is cut at the limit)
        assert isinstance(json.loads(out.text[0]), dict)
    else:
        assert out.text[0].lstrip().startswith("{")


def test_a_row_without_a_grammar_is_untouched_by_its_neighbours(engine):
    tok = load_tokenizer(engine)
    eos = frozenset({tok.convert_tokens_to_ids("<|im_end|>")})
    prompts = [encode_prompts([m], engine, tools=TOOLS)[0] for m in (PROSE, TWO)]
    alone = lr.generate(engine, [prompts[1]], max_new_tokens=30, tools=None, eos_token_id=sorted(eos)).tokens[0]
    compiled = grammar.compile_constraint(engine, tok, eos, grammar.constraint_spec(tools=TOOLS, tool_choice="required"))
    sched = Scheduler(engine, max_batch=2)
    reqs = [Request(prompt=prompts[0], max_new_tokens=30, eos=eos, logits_processor=grammar.GrammarProcessor(compiled)),
            Request(prompt=prompts[1], max_new_tokens=30, eos=eos)]
    for r in reqs:
        sched.submit(r)
    while sched.has_work():
        sched.step()
    assert reqs[1].tokens == alone
    assert tok.decode(reqs[0].tokens).startswith("<tool_call>")


def test_a_row_whose_grammar_ended_fails_alone(engine):
    """A grammar row that goes on after its grammar accepted its stop token (the request's EOS
    is another token) ends with an error naming why; its neighbour decodes as it would alone,
    at prefill (a processor already finished) and in decode."""
    tok = load_tokenizer(engine)
    eos = frozenset({tok.convert_tokens_to_ids("<|im_end|>")})
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA, "strict": True}}
    compiled = grammar.compile_constraint(engine, tok, eos, grammar.constraint_spec(fmt))
    prompts = [encode_prompts([m], engine)[0] for m in (PROSE, TWO)]
    alone = lr.generate(engine, [prompts[1]], max_new_tokens=40, eos_token_id=sorted(eos)).tokens[0]
    finished = grammar.GrammarProcessor(compiled)
    done = lr.generate(engine, [prompts[0]], max_new_tokens=80, eos_token_id=sorted(eos),
                       logits_processors=[finished])
    assert done.finish_reasons == ["stop"] and finished.matcher.is_terminated() is False  # not yet told of EOS
    for proc, other_eos in ((grammar.GrammarProcessor(compiled), {0}), (finished, eos)):
        sched = Scheduler(engine, max_batch=2)
        reqs = [Request(prompt=prompts[0], max_new_tokens=80, eos=frozenset(other_eos), logits_processor=proc),
                Request(prompt=prompts[1], max_new_tokens=40, eos=eos)]
        if proc is finished:      # it has seen EOS: the next fill finds its grammar ended
            proc.advance(done.tokens[0])
            reqs[0].tokens.extend(done.tokens[0])
        for r in reqs:
            sched.submit(r)
        while sched.has_work():
            sched.step()
        assert isinstance(reqs[0].error, RuntimeError) and "stop token" in str(reqs[0].error)
        assert reqs[1].error is None and reqs[1].tokens == alone


def test_the_mask_equals_the_bitmask_unpacked(engine):
    """The processor's logits: unchanged where the grammar's bitmask (32 tokens per int32,
    bit j of word w is token 32 w + j) allows a token, -inf elsewhere."""
    tok = load_tokenizer(engine)
    eos = frozenset({tok.convert_tokens_to_ids("<|im_end|>")})
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA, "strict": True}}
    proc = grammar.GrammarProcessor(grammar.compile_constraint(engine, tok, eos, grammar.constraint_spec(fmt)))
    vocab = engine.config.vocab_size
    g = torch.Generator().manual_seed(0)
    tokens: list[int] = []
    for _ in range(6):
        logits = torch.randn(vocab, generator=g)
        masked = proc(tokens, logits.clone())
        words = proc.mask[0].to(torch.int64) & 0xFFFFFFFF
        bits = ((words[:, None] >> torch.arange(32)) & 1).reshape(-1)[:vocab].bool()
        assert 0 < int(bits.sum()) < vocab
        assert torch.equal(masked[bits], logits[bits]) and bool(torch.isinf(masked[~bits]).all())
        tokens.append(int(masked.argmax()))


def test_the_batch_mask_equals_each_row_masked_alone(engine):
    """grammar.BatchMask (every row's bitmask filled in one call, applied in one call) gives
    each constrained row what its processor alone gives, leaves unconstrained rows as they
    were, and reports a row whose token its grammar forbids without touching the others."""
    tok = load_tokenizer(engine)
    eos = frozenset({tok.convert_tokens_to_ids("<|im_end|>")})
    specs = [grammar.constraint_spec({"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}),
             grammar.constraint_spec(tools=TOOLS, tool_choice="required"),
             grammar.constraint_spec({"type": "json_object"})]
    compiled = [grammar.compile_constraint(engine, tok, eos, s) for s in specs]
    batch = [grammar.GrammarProcessor(c) for c in compiled]
    alone = [grammar.GrammarProcessor(c) for c in compiled]
    rows = [0, 2, 3]                           # rows 1 and 4 of the 5 have no grammar
    masks = grammar.BatchMask()
    vocab = engine.config.vocab_size
    g = torch.Generator().manual_seed(1)
    tokens: list[list[int]] = [[], [], []]
    for step in range(8):
        logits = torch.randn(5, vocab, generator=g)
        want = logits.clone()
        for i, r in enumerate(rows):
            want[r] = alone[i](tokens[i], logits[r].clone())
        bitmask, failed = masks.fill(batch, tokens, rows, 5)
        assert failed == {}
        got = logits.clone()
        masks.apply(got, bitmask, rows)
        assert torch.equal(got, want), step
        for i, r in enumerate(rows):
            tokens[i].append(int(want[r].argmax()))
    bad = [int(t) for t in torch.nonzero(torch.isinf(want[rows[1]]))[:1, 0]]   # a token row 2 forbids
    tokens[1].append(bad[0])                   # row 0 has its last (allowed) token already
    _, failed = masks.fill(batch[:2], tokens[:2], rows[:2], 5)
    assert list(failed) == [1] and "sampled against its mask" in str(failed[1])


def test_bad_specs_are_errors_naming_the_field(engine):
    cases = [
        (dict(tool_choice="required"), "tool_choice needs tools"),
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "no tool named 'nope'"),
        (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice"),
        (dict(response_format={"type": "yaml"}), "response_format"),
        (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}),
         "response_format.json_schema.schema"),
        (dict(tools=TOOLS, tool_choice="required", parallel_tool_calls="no"), "parallel_tool_calls"),
        (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "response_format"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            lr.generate(engine, [PROSE], max_new_tokens=4, **kw)
    with pytest.raises(ValueError, match="EOS"):
        lr.generate(engine, [PROSE], max_new_tokens=4, eos_token_id=None, response_format={"type": "json_object"})


# -- the server ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(engine):
    openai = pytest.importorskip("openai")
    from layerroute_rt.serve import app as serve_mod
    with serve_mod.running(serve_mod.create_app(engine, "layerroute-demo")) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_server_tool_choice_required_named_and_json_schema(client):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model="layerroute-demo", messages=PROSE, tools=TOOLS, tool_choice=choice,
                                           max_tokens=120, temperature=0)
        calls = r.choices[0].message.tool_calls
        assert calls and r.choices[0].finish_reason == "tool_calls"
        _valid_calls([{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in calls],
                     TOOLS, None if choice == "required" else ["get_weather"])
    r = client.chat.completions.create(model="layerroute-demo", messages=TWO, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=160, temperature=0)
    assert len(r.choices[0].message.tool_calls) == 1
    r = client.chat.completions.create(model="layerroute-demo", messages=PROSE, max_tokens=80, temperature=0,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "review", "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_server_bad_schema_is_a_400(client):
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="layerroute-demo", messages=PROSE, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="layerroute-demo", messages=PROSE, max_tokens=8, tool_choice="required")
    assert e.value.body["param"] == "tool_choice"


def test_a_failing_grammar_ends_its_row_alone(engine):
    """A row whose logits processor raises ends with that error; the batch goes on."""
    prompts = [encode_prompts([m], engine)[0] for m in (PROSE, TWO)]
    alone = lr.generate(engine, [prompts[1]], max_new_tokens=12, eos_token_id=None).tokens[0]

    def broken(tokens, logits):
        if len(tokens) >= 3:
            raise RuntimeError("grammar broke")
        return logits

    sched = Scheduler(engine, max_batch=2)
    reqs = [Request(prompt=prompts[0], max_new_tokens=12, logits_processor=broken),
            Request(prompt=prompts[1], max_new_tokens=12)]
    for r in reqs:
        sched.submit(r)
    while sched.has_work():
        sched.step()
    assert reqs[0].finish == "error" and "grammar broke" in str(reqs[0].error) and len(reqs[0].tokens) == 3
    assert reqs[1].error is None and reqs[1].tokens == alone


def test_server_streamed_tool_deltas_join_into_the_answer(client):
    """tool_choice "required" on two calls: the first delta of each call carries its id and
    name, then its arguments arrive in several fragments; joined by index they equal the
    non-streamed answer's calls."""
    kw = dict(model="layerroute-demo", messages=TWO, tools=TOOLS, tool_choice="required", max_tokens=160,
              temperature=0)
    plain = client.chat.completions.create(**kw).choices[0].message
    chunks = list(client.chat.completions.create(stream=True, **kw))
    calls, fragments = {}, {}
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            if d.index not in calls:
                assert d.id and d.function.name and d.function.arguments == ""
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
                fragments[d.index] = fragments.get(d.index, 0) + 1
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(t.function.name, t.function.arguments) for t in plain.tool_calls]
    assert len(calls) >= 1 and all(n > 3 for n in fragments.values())      # streamed, not in one piece
    _valid_calls([{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in calls.values()], TOOLS)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
