"""The OpenAI-compatible server (layerroute_rt/serve.py), driven by the real `openai` client over
loopback: plain, streamed and stopped completions equal generate()'s text; tools and tool_choice
through the template and tool calls parsed back; 8 concurrent requests batched; every kind of bad
input answered 400 (401 for the key) with an OpenAI error body; a dropped stream frees its slot;
a fault inside generation is a 500 and the next request is served. One tool-call round trip on
the real model (marked real_model)."""
import http.client
import json
import threading
import time
import urllib.parse

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import layerroute_rt as lr  # noqa: E402
from layerroute_rt import serve as serve_mod  # noqa: E402
from layerroute_rt.cli import DEMO_DIR  # noqa: E402

KEY = "test-key"
MODEL = "layerroute-demo"
CHAT = [{"role": "user", "content": "Find flights from Paris to Rome on 3 May."}]
OTHER = [{"role": "system", "content": "You are a travel agent."},
         {"role": "user", "content": "Book a hotel in Oslo for two nights."}]
# A context from the demo model's synthetic trajectories (seed 1000, unseen in training) on which
# it answers greedily with a well-formed call of this tool (its arguments are made up, as the
# README says of the demo model).
PLACES = {"type": "function", "function": {
    "name": "search_places", "description": "Search for places of a kind near a location",
    "parameters": {"type": "object", "required": ["category", "near"], "properties": {
        "category": {"type": "string", "description": "Kind of place"},
        "near": {"type": "string", "description": "Address or city"},
        "radius_m": {"type": "integer", "description": "Search radius in meters"},
        "open_now": {"type": "boolean", "description": "Only places open now"},
        "keywords": {"type": "string", "description": "Extra keywords"}}}}}
WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
PLACES_CHAT = [{"role": "system", "content": "You are a health assistant. Use the available functions when "
                                             "they help, and never invent results that a tool should provide."},
               {"role": "user", "content": "Find a bakery near 157 Oak Avenue, Paris."}]


@pytest.fixture(scope="module")
def engine():
    return lr.InferenceModel(lr.load(DEMO_DIR, adapter=DEMO_DIR / "adapter"))


@pytest.fixture(scope="module")
def server(engine):
    app = serve_mod.create_app(engine, MODEL, api_key=KEY)
    with serve_mod.running(app) as url:
        yield url, app.state.scheduler


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def reference_text(engine, chat, max_tokens: int) -> str:
    """generate()'s greedy text for the chat, to max_tokens or the demo model's EOS (the server's
    worker is idle between requests, so the engine is free)."""
    with torch.no_grad():
        return lr.generate(engine, [chat], max_new_tokens=max_tokens).text[0]


def raw(url: str, method: str, path: str, body: bytes | None = None, key: str | None = KEY):
    """(status, body text) of one plain HTTP request."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=body, headers=headers)
    res = conn.getresponse()
    out = res.status, res.read().decode()
    conn.close()
    return out


def health(url: str) -> dict:
    status, body = raw(url, "GET", "/health", key=None)
    assert status == 200
    return json.loads(body)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    h = health(server[0])                                       # no key needed
    assert h["status"] == "ok" and h["model"] == MODEL


def test_plain_completion_equals_generate(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.tool_calls is None
    assert choice.message.content == reference_text(engine, CHAT, 10)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    ext = r.model_extra["layerroute"]
    assert len(ext["skip_rate_per_layer"]) == engine.config.num_hidden_layers
    assert 0 < ext["total_flops_skipped_pct"] < ext["block_flops_skipped_pct"] < 100
    assert ext["batch_size"] >= 1


def test_stream_equals_plain_and_reuses_the_prefix(client, server):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=10, temperature=0)
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert "layerroute" in finals[0].model_extra
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == plain.usage.completion_tokens
    # the same prompt a third time: all but its last token come from the shared prefix cache
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    status, body = raw(server[0], "POST", "/v1/chat/completions", json.dumps({**kw, "stream": True}).encode())
    events = [line for line in body.split("\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_stop_string_cuts_the_content(client, engine):
    full = reference_text(engine, CHAT, 12)
    stop = full[4:7]
    expected = full[:full.find(stop)]
    kw = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stop=[stop, "never-seen"])
    r = client.chat.completions.create(**kw)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "stop")
    streamed = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_tool_call_parsed(client):
    r = client.chat.completions.create(model=MODEL, messages=PLACES_CHAT, tools=[PLACES], max_tokens=48,
                                       temperature=0)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    (call,) = msg.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "search_places"
    assert isinstance(json.loads(call.function.arguments), dict)
    streamed = list(client.chat.completions.create(model=MODEL, messages=PLACES_CHAT, tools=[PLACES],
                                                   max_tokens=48, temperature=0, stream=True))
    final = streamed[-1].choices[0]
    assert final.finish_reason == "tool_calls"
    assert final.delta.tool_calls[0].function.name == "search_places"
    assert json.loads(final.delta.tool_calls[0].function.arguments) == json.loads(call.function.arguments)
    # the next turn: the call and its result go back through the template
    turn = PLACES_CHAT + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"places": ["Boulangerie Oak"]})}]
    nxt = client.chat.completions.create(model=MODEL, messages=turn, tools=[PLACES], max_tokens=4, temperature=0)
    assert nxt.usage.prompt_tokens > r.usage.prompt_tokens
    assert nxt.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 1


def test_tool_choice_decides_what_is_rendered(client):
    def prompt_tokens(**kw) -> int:
        return client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, temperature=0,
                                              **kw).usage.prompt_tokens

    both = prompt_tokens(tools=[PLACES, WEATHER])
    named = prompt_tokens(tools=[PLACES, WEATHER],
                          tool_choice={"type": "function", "function": {"name": "get_current_weather"}})
    none = prompt_tokens(tools=[PLACES, WEATHER], tool_choice="none")
    assert both > named > none == prompt_tokens()
    assert named == prompt_tokens(tools=[WEATHER])


def test_eight_concurrent_requests_are_batched(client, server, engine):
    chats = [CHAT, OTHER] * 4
    expected = [reference_text(engine, c, 8) for c in (CHAT, OTHER)]
    assert expected[0] != expected[1]
    results: list = [None] * 8

    def one(i):
        results[i] = client.chat.completions.create(model=MODEL, messages=chats[i], max_tokens=8 + i % 3,
                                                    temperature=0, extra_body={"ignore_eos": True})

    batches = server[1].batches
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results)
    for i, r in enumerate(results):                   # each got its own sequence and its own limit
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8 + i % 3
        assert r.choices[0].message.content.startswith(expected[i % 2])
    sizes = [r.model_extra["layerroute"]["batch_size"] for r in results]
    assert max(sizes) >= 2 and server[1].batches - batches < 8


@pytest.mark.parametrize("kw, param, code", [
    (dict(model="gpt-4o"), "model", "model_not_found"),
    (dict(max_tokens=0), "max_tokens", "invalid_value"),
    (dict(max_tokens=-5), "max_tokens", "invalid_value"),
    (dict(max_tokens=2.5), "max_tokens", "invalid_value"),
    (dict(max_completion_tokens=0), "max_completion_tokens", "invalid_value"),
    (dict(max_tokens=4096), "max_tokens", "context_length_exceeded"),
    (dict(messages=[{"role": "user", "content": "word " * 5000}]), "messages", "context_length_exceeded"),
    (dict(messages=[]), "messages", "invalid_value"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role", "invalid_value"),
    (dict(messages=[{"role": "user"}]), "messages[0].content", "invalid_value"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content", "invalid_value"),
    (dict(messages=CHAT + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]),
     "messages[1].tool_calls[0].function.arguments", "invalid_value"),
    (dict(temperature=3), "temperature", "invalid_value"),
    (dict(top_p=0), "top_p", "invalid_value"),
    (dict(seed=-1), "seed", "invalid_value"),
    (dict(n=2), "n", "invalid_value"),
    (dict(stop=[""]), "stop", "invalid_value"),
    (dict(tool_choice="auto"), "tool_choice", "invalid_value"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice",
     "invalid_value"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools[0].function.name",
     "invalid_value"),
])
def test_bad_request_is_400_naming_the_field(client, kw, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": MODEL, "messages": CHAT, "max_tokens": 4, **kw})
    assert e.value.status_code == 400
    body = e.value.body
    assert (body["param"], body["code"], body["type"]) == (param, code, "invalid_request_error")
    assert body["message"].startswith(param)


@pytest.mark.parametrize("body", [b'{"model": "layerroute-demo", "messages": [', b"[1, 2]", b"not json", b""])
def test_malformed_body_is_400(server, body):
    status, text = raw(server[0], "POST", "/v1/chat/completions", body)
    assert status == 400
    assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}


def test_api_key_is_checked(server):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert raw(server[0], "GET", "/v1/models", key=None)[0] == 401
    status, text = raw(server[0], "GET", "/v1/nothing")
    assert status == 404 and json.loads(text)["error"]["code"] == "not_found"


def test_dropped_stream_frees_its_slot(client, server, engine):
    url, scheduler = server
    cancelled = scheduler.cancelled
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3000, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()                                   # the client goes away mid-stream
    deadline = time.monotonic() + 30                 # 3000 tokens would take minutes
    while scheduler.cancelled == cancelled or health(url)["running"]:
        assert time.monotonic() < deadline, "the dropped stream's sequence kept running"
        time.sleep(0.05)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == reference_text(engine, CHAT, 6)


def test_a_dropped_plain_request_is_cancelled(server):
    url, scheduler = server
    cancelled = scheduler.cancelled
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = dict(model=MODEL, messages=CHAT, max_tokens=3000, temperature=0, ignore_eos=True)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    deadline = time.monotonic() + 30
    while not health(url)["running"]:                # started generating
        assert time.monotonic() < deadline
        time.sleep(0.02)
    conn.close()
    while scheduler.cancelled == cancelled or health(url)["running"]:
        assert time.monotonic() < deadline, "the dropped request's sequence kept running"
        time.sleep(0.05)


def test_batches_group_by_sampling_and_fit_the_cache():
    engine = type("E", (), {"max_cache_len": 100})()
    sched = serve_mod.Scheduler(engine, max_batch=3, max_batch_tokens=150)

    def job(prompt=10, max_tokens=10, temperature=0.0, top_p=None, seed=None):
        return serve_mod.Job(prompt=[1] * prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                             seed=seed, stop=[], eos=frozenset(), parse_tools=False, stream=False, loop=None)

    greedy = [job(seed=1), job(top_p=0.5), job(), job()]             # seed and top_p: no matter at t=0
    sampled = [job(temperature=0.7), job(temperature=0.7), job(temperature=0.7, top_p=0.9)]
    seeded = [job(temperature=0.7, seed=3), job(temperature=0.7, seed=3)]
    long = [job(prompt=60, max_tokens=30), job(prompt=20, max_tokens=70)]   # 60 + 70 > 100 slots
    wide = [job(prompt=40, max_tokens=20), job(prompt=40, max_tokens=20), job(prompt=40, max_tokens=20)]
    batches = sched._batches(greedy + sampled + seeded)
    ids = [[id(j) for j in b] for b in batches]
    assert ids == [[id(j) for j in greedy[:3]], [id(greedy[3])], [id(j) for j in sampled[:2]],
                   [id(sampled[2])], [id(seeded[0])], [id(seeded[1])]]
    assert [len(b) for b in sched._batches(long)] == [1, 1]
    assert [len(b) for b in sched._batches(wide)] == [2, 1]            # 3 x 60 slots > 150


def test_a_fault_in_generation_is_a_500_and_the_server_goes_on(client, server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(serve_mod, "generate", broken)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    assert e.value.status_code == 500 and "injected fault" in e.value.body["message"]
    monkeypatch.undo()
    assert health(server[0])["status"] == "ok"
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1


@pytest.mark.real_model
def test_real_model_tool_call_round_trip(real_model):
    engine = lr.InferenceModel(real_model)
    question = [{"role": "user", "content": "What's the weather like in Paris right now, in celsius?"}]
    with serve_mod.running(serve_mod.create_app(engine, "qwen2.5-coder-0.5b-instruct")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        r = client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=question,
                                           tools=[WEATHER], max_tokens=48, temperature=0)
        assert r.choices[0].finish_reason == "tool_calls"
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_current_weather"
        assert json.loads(call.function.arguments)["city"] == "Paris"
        turn = question + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                           {"role": "tool", "tool_call_id": call.id,
                            "content": json.dumps({"temperature": 18, "unit": "celsius"})}]
        answer = client.chat.completions.create(model="qwen2.5-coder-0.5b-instruct", messages=turn,
                                                tools=[WEATHER], max_tokens=16, temperature=0)
        assert answer.choices[0].message.content
        assert answer.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens - 1


def test_cli_serves_the_bundled_demo_model_on_loopback(monkeypatch):
    from layerroute_rt import cli

    seen = {}
    monkeypatch.setattr(serve_mod, "serve", lambda engine, name, **kw: seen.update(engine=engine, name=name, **kw))
    assert cli.main(["serve", "--api-key", "k", "--tau", "0.3"]) == 0
    assert (seen["name"], seen["host"], seen["port"], seen["api_key"]) == (MODEL, "127.0.0.1", 8000, "k")
    assert isinstance(seen["engine"], lr.InferenceModel) and seen["engine"].lr_config.tau == 0.3
