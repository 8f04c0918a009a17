"""Agent loops in-process (docs/DESIGN.md section 5): tools through the chat template, parsed tool calls
and finish reasons, the engine's prefix cache (hits equal uncached runs, the budget holds,
`sequence` granularity equals prefilling the turns as consecutive segments), KV cache buckets up
to max positions and a 10k-token conversation, one engine per LayerRouteModel, and streamed text."""
import dataclasses

import pytest
import torch

import layerroute_rt as lr
from layerroute_rt.model.cache import KVCache
from layerroute_rt.cli import DEMO_DIR
from layerroute_rt.runtime.generate import (
    _eos_ids,
    cache_bucket,
    encode_prompts,
    engine_for,
    load_tokenizer,
)
from layerroute_rt.runtime.prefix_cache import Entry, PrefixCache
from qwen_factory import save_random_qwen2

TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def demo():
    return lr.load(DEMO_DIR, adapter=DEMO_DIR / "adapter")


@pytest.fixture
def routed(tiny):
    model = lr.load(tiny[0])
    model.randomize_adapter(seed=1)          # random routers: about half the block-token pairs skip
    return model


def _with(model, **fields):
    model.lr_config = dataclasses.replace(model.lr_config, **fields)
    return model


def _turns(seed: int, n: int, vocab: int = 257) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


# -- tools, tool calls, finish reasons -----------------------------------------------------------

def test_tools_go_through_the_chat_template(demo):
    engine = lr.InferenceModel(demo)
    tok = load_tokenizer(engine)
    chat = [{"role": "user", "content": "weather in Oslo?"}]
    ids = encode_prompts(chat, engine, tools=[TOOL])[0]
    text = tok.apply_chat_template(chat, tools=[TOOL], tokenize=False, add_generation_prompt=True)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert "get_weather" in tok.decode(ids) and ids != encode_prompts(chat, engine)[0]


def test_tool_messages_and_assistant_tool_calls_are_rendered(demo):
    engine = lr.InferenceModel(demo)
    chat = [{"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "content": '{"celsius": 3}'}]
    text = load_tokenizer(engine).decode(encode_prompts(chat, engine, tools=[TOOL])[0])
    assert '"city": "Oslo"' in text and "<tool_response>" in text and '{"celsius": 3}' in text


def test_out_tool_calls_are_the_parsed_text_and_finish_reasons(demo):
    engine = lr.InferenceModel(demo)
    out = lr.generate(engine, [[{"role": "user", "content": "weather in Oslo?"}], "plan the trip"],
                      max_new_tokens=12, tools=[TOOL])
    assert out.tool_calls == [lr.parse_tool_calls(t) for t in out.text]
    eos = _eos_ids(engine, "auto")
    for toks, reason in zip(out.tokens, out.finish_reasons):
        assert reason == ("stop" if toks[-1] in eos else "length")
        assert (len(toks) == 12) == (reason == "length") or toks[-1] in eos


@pytest.mark.parametrize("tools, match", [
    ([], "non-empty list"), ([{"type": "function"}], r"tools\[0\]"), ("get_weather", "non-empty list")])
def test_bad_tools_are_clear_errors(demo, tools, match):
    with pytest.raises(ValueError, match=match):
        lr.generate(demo, "hi", max_new_tokens=2, tools=tools)


def test_tools_with_token_ids_is_an_error(demo):
    with pytest.raises(ValueError, match="tools need text or chat prompts"):
        lr.generate(demo, [[1, 2, 3]], max_new_tokens=2, tools=[TOOL])


# -- the prefix cache ------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_policy", ["compute", "drop"])
@pytest.mark.parametrize("merge", [True, False])
def test_prefix_cache_hits_equal_uncached_runs(routed, kv_policy, merge):
    """A 4-turn conversation, batch of two: each turn is the last prompt + what it generated +
    new tokens. Token granularity: the same tokens, decisions and stats as without the cache."""
    _with(routed, kv_policy=kv_policy)
    cached = lr.InferenceModel(routed, merge=merge)
    plain = lr.InferenceModel(routed, merge=merge, prefix_cache=False)
    convs = [[], []]
    for turn, extra in enumerate(zip(_turns(0, 4), _turns(1, 4))):
        prompts = [c + e for c, e in zip(convs, extra)]
        a = lr.generate(cached, prompts, max_new_tokens=5, eos_token_id=None)
        b = lr.generate(plain, prompts, max_new_tokens=5, eos_token_id=None)
        assert a.tokens == b.tokens
        assert torch.equal(a.executed, b.executed) and torch.equal(a.valid, b.valid)
        assert a.stats["skip_rate_per_layer"] == pytest.approx(b.stats["skip_rate_per_layer"])
        # all of the last turn is cached, up to the tokens it generated, the last one unfed
        expect = [0, 0] if turn == 0 else [len(c) - 1 for c in convs]
        assert a.stats["cached_prompt_tokens_per_seq"] == expect
        assert b.stats["cached_prompt_tokens"] == 0
        convs = [p + t for p, t in zip(prompts, a.tokens)]
    assert 0.2 < 1 - a.executed[:, a.valid].float().mean() < 0.8          # the routers did skip


@pytest.mark.parametrize("kv_policy", ["compute", "drop"])
def test_prefill_after_restored_prefixes_equals_full_prefill(routed, kv_policy):
    """The logits and decisions of a prefill after cached prefixes of unequal lengths (a batch
    of two, each left-padded apart) equal those of prefilling the whole prompts."""
    from layerroute_rt.runtime.decode_runner import (
        left_pad as _batch,
        plan_reuse as _plan_reuse,
        restore as _restore,
    )

    _with(routed, kv_policy=kv_policy)
    engine = lr.InferenceModel(routed)
    key = (0.5, frozenset(), "token", kv_policy)
    firsts = [list(range(20, 45)), list(range(100, 109))]
    lr.generate(engine, firsts, max_new_tokens=1)
    prompts = [firsts[0] + [3, 1, 4], firsts[1] + [2, 7, 1, 8, 2, 8, 1, 8]]
    reuse = _plan_reuse(engine, prompts, key, 1)
    assert reuse.counts == [25, 9] and reuse.width == 25
    cache = engine.new_cache(2, 64)
    _restore(cache, reuse)
    ids, mask = _batch(reuse.new, "cpu")
    logits, executed = engine.prefill(ids, mask, cache, 0.5)
    full_cache = engine.new_cache(2, 64)
    ids, mask = _batch(prompts, "cpu")
    full, full_exec = engine.prefill(ids, mask, full_cache, 0.5)
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
    for b, u in enumerate(len(n) for n in reuse.new):
        assert torch.equal(executed[:, b, -u:], full_exec[:, b, -u:])


def test_prefix_cache_partial_hit_and_a_full_hit(routed):
    engine = lr.InferenceModel(routed)
    base = list(range(10, 40))
    first = lr.generate(engine, [base], max_new_tokens=3, eos_token_id=None)
    other = base[:20] + [7, 7, 7]                                          # shares 20 tokens
    out = lr.generate(engine, [other], max_new_tokens=4, eos_token_id=None)
    assert out.stats["cached_prompt_tokens"] == 20
    again = lr.generate(engine, [base], max_new_tokens=3, eos_token_id=None)
    assert again.stats["cached_prompt_tokens"] == len(base) - 1            # one token left to run
    assert again.tokens == first.tokens
    plain = lr.InferenceModel(routed, prefix_cache=False)
    assert out.tokens == lr.generate(plain, [other], max_new_tokens=4, eos_token_id=None).tokens


def test_prefix_cache_is_keyed_by_tau_and_skip_set(routed):
    engine = lr.InferenceModel(routed)
    p = list(range(5, 25))
    lr.generate(engine, [p], max_new_tokens=2)
    assert lr.generate(engine, [p + [1]], max_new_tokens=2, tau=0.3).stats["cached_prompt_tokens"] == 0
    assert lr.generate(engine, [p + [1]], max_new_tokens=2, skip_layers=[1]).stats["cached_prompt_tokens"] == 0
    assert lr.generate(engine, [p + [1]], max_new_tokens=2).stats["cached_prompt_tokens"] == len(p)


def test_prefix_cache_stays_within_its_budget(routed):
    engine = lr.InferenceModel(routed, prefix_cache_tokens=60)
    for seed in range(12):
        lr.generate(engine, _turns(seed, 2), max_new_tokens=4, eos_token_id=None)
        assert engine.prefix_cache.tokens_held <= 60
    assert len(engine.prefix_cache) > 1
    lr.generate(engine, [list(range(100))], max_new_tokens=2)             # longer than the budget
    assert engine.prefix_cache.tokens_held <= 60


def _entry(tokens):
    n = len(tokens)
    return Entry(tuple(tokens), torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2),
                 torch.ones(1, n, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool))


def test_prefix_cache_lru_eviction_and_extension():
    cache = PrefixCache(max_tokens=10)
    cache.store("k", _entry([1, 2, 3, 4]))
    cache.store("k", _entry([5, 6, 7, 8]))
    assert cache.lookup("k", [1, 2, 3, 9])[1] == 3                        # [1..4] is now recent
    cache.store("k", _entry([9, 9, 9]))                                   # evicts [5..8]
    assert cache.lookup("k", [5, 6, 7, 8, 0])[1] == 0
    assert cache.lookup("k", [1, 2, 3, 4, 0])[1] == 4
    cache.store("k", _entry([1, 2, 3, 4, 5, 6]))                          # extends [1..4]: replaces it
    assert len(cache) == 2 and cache.tokens_held == 9
    assert cache.lookup("other", [1, 2, 3, 4, 5, 6, 7])[1] == 0           # keys are apart
    cache.store("k", _entry(list(range(11))))                             # over the budget: not kept
    assert cache.tokens_held == 9
    with pytest.raises(ValueError, match="max_tokens"):
        PrefixCache(max_tokens=0)


def test_prefix_cache_off(routed):
    engine = lr.InferenceModel(routed, prefix_cache=False)
    assert engine.prefix_cache is None
    lr.generate(engine, [[1, 2, 3]], max_new_tokens=2)
    assert lr.generate(engine, [[1, 2, 3, 4]], max_new_tokens=2).stats["cached_prompt_tokens"] == 0
    with pytest.raises(ValueError, match="prefix_cache must be True or False"):
        lr.InferenceModel(routed, prefix_cache="yes")


@pytest.mark.parametrize("kv_policy", ["compute", "drop"])
def test_sequence_granularity_cached_turn_equals_consecutive_segments(routed, kv_policy):
    """Under `sequence` granularity a cached turn is the reference path fed the first prompt (a
    step), the tokens its decode steps fed back (its decisions held), then the new turn as a step
    of its own (cache.new_step()), then greedy decoding."""
    _with(routed, granularity="sequence", kv_policy=kv_policy)
    engine = lr.InferenceModel(routed)
    p1 = list(range(30, 52))
    g1 = lr.generate(engine, [p1], max_new_tokens=6, eos_token_id=None).tokens[0]
    turn = [9, 8, 7, 6, 5, 4, 3]
    p2 = p1 + g1[:-1] + turn                       # the last generated token was never fed
    out = lr.generate(engine, [p2], max_new_tokens=6, eos_token_id=None)
    assert out.stats["cached_prompt_tokens"] == len(p1) + len(g1) - 1

    n = 6
    cache = KVCache(routed.config, 1, len(p2) + n, torch.float32, "cpu")
    routed(torch.tensor([p1]), cache=cache)
    for t in g1[:-1]:
        routed(torch.tensor([[t]]), cache=cache)
    cache.new_step()
    logits = routed(torch.tensor([turn]), cache=cache)
    ref = []
    for i in range(n):
        ref.append(int(logits[0, -1].argmax()))
        logits = routed(torch.tensor([ref[-1:]]), cache=cache)
    assert out.tokens[0] == ref
    seg = lr.generate(lr.InferenceModel(routed, prefix_cache=False), [p2], max_new_tokens=6,
                      eos_token_id=None)
    assert seg.stats["cached_prompt_tokens"] == 0          # one segment: decided over all of p2


# -- KV cache buckets and long conversations ------------------------------------------------------

def test_cache_buckets_are_powers_of_two_up_to_the_limit():
    assert [cache_bucket(n, 32768) for n in (1, 256, 257, 5000, 32768)] == [256, 256, 512, 8192, 32768]
    assert cache_bucket(3000, 4096) == 4096 and cache_bucket(10, 100) == 100


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("long")
    save_random_qwen2(path, seed=3, max_position_embeddings=32768)
    model = lr.load(path)
    model.randomize_adapter(seed=2)
    return model


def test_a_10k_token_conversation(long_model):
    """Ten turns of about 1k tokens: the KV cache grows by buckets past 4,096 and 8,192, each
    turn reuses the last one, and the tokens equal an uncached engine's."""
    cached = lr.InferenceModel(long_model)
    plain = lr.InferenceModel(long_model, prefix_cache=False)
    g = torch.Generator().manual_seed(0)
    conv: list[int] = []
    for turn in range(10):
        prompt = conv + torch.randint(0, 257, (1000,), generator=g).tolist()
        out = lr.generate(cached, [prompt], max_new_tokens=4, eos_token_id=None)
        assert out.stats["cached_prompt_tokens"] == max(len(conv) - 1, 0)   # the last token unfed
        conv = prompt + out.tokens[0]
    assert len(prompt) > 10_000
    assert out.tokens == lr.generate(plain, [prompt], max_new_tokens=4, eos_token_id=None).tokens
    assert max(k[1] for k in cached._runners) == 16384
    with pytest.raises(ValueError, match="cache slots; the KV cache holds at most 32768"):
        lr.generate(cached, [[1] * 32760], max_new_tokens=10)


# -- one engine per model ---------------------------------------------------------------------------

def test_one_engine_per_model_rebuilt_when_the_adapter_changes(routed):
    p = [[3, 4, 5, 6]]
    first = lr.generate(routed, p, max_new_tokens=4, eos_token_id=None)
    engine = engine_for(routed)
    lr.generate(routed, p, max_new_tokens=4, eos_token_id=None)
    assert engine_for(routed) is engine
    assert lr.generate(routed, p + p, max_new_tokens=4).stats["cached_prompt_tokens"] == 6
    with torch.no_grad():                                    # an in-place update (an optimizer step)
        routed.blocks[1].router.bias.add_(-50.0)
    changed = engine_for(routed)
    assert changed is not engine
    out = lr.generate(routed, p, max_new_tokens=4, eos_token_id=None)
    assert out.stats["skip_rate_per_layer"][1] == 1.0 and out.stats["cached_prompt_tokens"] == 0
    with routed.adapter_disabled():
        assert engine_for(routed) is not changed
    assert lr.generate(routed, p, max_new_tokens=4, eos_token_id=None).tokens == out.tokens
    _with(routed, tau=0.0)                                   # a new config: a new engine
    assert engine_for(routed).lr_config.tau == 0.0
    with torch.no_grad():
        routed.blocks[1].router.bias.add_(50.0)              # back to where it was
    _with(routed, tau=0.5)
    assert lr.generate(routed, p, max_new_tokens=4, eos_token_id=None).tokens == first.tokens


# -- streamed text ------------------------------------------------------------------------------------

def test_streamed_text_deltas_join_to_the_text(demo):
    engine = lr.InferenceModel(demo)
    prompts = ["weather in Oslo?", "plan a trip to Rome, step by step"]
    stream = lr.generate(engine, prompts, max_new_tokens=24, stream=True)
    chunks = list(stream)
    for b in range(2):
        assert "".join(c.text[b] for c in chunks) == stream.output.text[b]
        assert [c.tokens[b] for c in chunks if c.tokens[b] is not None] == stream.output.tokens[b]
    assert any(c.text[0] for c in chunks)


def test_stream_cancel_ends_one_sequence(demo):
    engine = lr.InferenceModel(demo)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    alone = lr.generate(engine, prompts, max_new_tokens=10, eos_token_id=None)
    stream = lr.generate(engine, prompts, max_new_tokens=10, eos_token_id=None, stream=True)
    for i, chunk in enumerate(stream):
        if i == 2:
            stream.cancel(1)
    out = stream.output
    assert out.finish_reasons == ["length", "cancelled"]
    assert out.tokens[0] == alone.tokens[0] and out.tokens[1] == alone.tokens[1][:3]
    with pytest.raises(ValueError, match="cancel"):
        stream.cancel(2)
