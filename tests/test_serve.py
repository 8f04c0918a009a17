"""The OpenAI-compatible server (layerroute_rt/serve/app.py), driven by the real `openai` client over
loopback: plain, streamed and stopped completions equal generate()'s text; tools and tool_choice
through the template and tool calls parsed back; 8 concurrent requests batched; every kind of bad
input answered 400 (401 for the key) with an OpenAI error body; a dropped stream frees its slot;
a fault inside generation is a 500 and the next request is served. One tool-call round trip on
the real model (marked real_model)."""
import contextlib
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
from layerroute_rt.serve import app as serve_mod  # noqa: E402
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
        yield url, app.state.worker


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
    assert ext["mean_batch_rows"] >= 1 and 0 <= ext["batch_blocks_no_row_ran_pct"] <= 100


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


def join_tool_deltas(chunks) -> list[dict]:
    """The streamed tool calls joined as an OpenAI client does: by index, the first delta's id,
    type and name, then the argument fragments appended."""
    calls: dict[int, dict] = {}
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            if d.index not in calls:
                assert d.id and d.function.name and d.function.arguments == ""
                calls[d.index] = {"id": d.id, "function": {"name": d.function.name, "arguments": ""}}
            else:
                assert d.id is None and d.function.name is None
                calls[d.index]["function"]["arguments"] += d.function.arguments
    return [calls[i] for i in sorted(calls)]


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
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    (joined,) = join_tool_deltas(streamed)
    assert joined["function"] == call.function.model_dump()
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

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results)
    for i, r in enumerate(results):                   # each got its own sequence and its own limit
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8 + i % 3
        assert r.choices[0].message.content.startswith(expected[i % 2])
    rows = [r.model_extra["layerroute"]["mean_batch_rows"] for r in results]
    assert max(rows) >= 2                              # they shared decode steps


@pytest.mark.parametrize("kw, param, code", [
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
    (dict(seed=2 ** 70, temperature=0.5), "seed", "invalid_value"),
    (dict(n=9), "n", "invalid_value"),
    (dict(n=0), "n", "invalid_value"),
    (dict(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    (dict(top_logprobs=2), "top_logprobs", "invalid_value"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs", "invalid_value"),
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


def test_a_fault_in_generation_is_a_500_and_the_server_goes_on(client, server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(server[1].scheduler, "_decode", broken)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, extra_body={"ignore_eos": True})
    assert e.value.status_code == 500 and e.value.body["code"] == "generation_failed"
    assert "injected" not in e.value.body["message"]            # no exception text to the client
    monkeypatch.undo()
    assert health(server[0])["status"] == "ok"
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_a_short_request_joins_running_streams_and_finishes_first(client, server):
    """Continuous batching: 8 long streams run; a 2-token request sent while they run finishes
    while most of them are still running (an ordering; its latency is bench_serve's)."""
    started, finished = threading.Barrier(9), []
    lock = threading.Lock()

    def long_stream(i):
        stream = client.chat.completions.create(model=MODEL, messages=[CHAT, OTHER][i % 2], max_tokens=160,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
        for n, _ in enumerate(stream):
            if n == 2:
                started.wait(timeout=120)
        with lock:
            finished.append(i)

    threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait(timeout=120)                           # every long stream is generating
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, temperature=0,
                                       extra_body={"ignore_eos": True})
    with lock:
        done_before = len(finished)
    for t in threads:
        t.join(timeout=300)
    assert r.usage.completion_tokens == 2 and len(finished) == 8
    assert done_before <= 2, f"{done_before} of 8 long streams ended before the short request"
    assert r.model_extra["layerroute"]["mean_batch_rows"] > 1      # it ran beside them


def test_former_500s_are_400s(server):
    url = server[0]
    base = {"model": MODEL, "messages": CHAT, "max_tokens": 3}
    for extra, param in (({"top_p": 1e-300, "temperature": 1.0}, None), ({"temperature": 1e-300}, None)):
        status, text = raw(url, "POST", "/v1/chat/completions", json.dumps({**base, **extra}).encode())
        assert status == 200, text                      # valid values: they sample
    status, text = raw(url, "POST", "/v1/chat/completions",
                       b'{"model": "layerroute-demo", "max_tokens": 3, "messages": [{"role": "user", '
                       b'"content": "a\\ud800b"}]}')
    assert status == 400 and json.loads(text)["error"]["param"] == "messages[0]"
    status, text = raw(url, "POST", "/v1/chat/completions", json.dumps({**base, "seed": 2 ** 70}).encode())
    assert status == 400 and json.loads(text)["error"]["param"] == "seed"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_no_docs_or_openapi_unless_asked(server, engine):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert raw(server[0], "GET", path)[0] == 404
    app = serve_mod.create_app(engine, MODEL, openapi=True)
    with serve_mod.running(app) as url:
        status, text = raw(url, "GET", "/openapi.json")
        assert status == 200 and "/v1/chat/completions" in json.loads(text)["paths"]
        assert raw(url, "GET", "/docs")[0] == 404        # its page would load scripts from a CDN


def _send_headers(url, length: int | None, key: str | None = KEY, chunked: bool = False):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    if key:
        conn.putheader("Authorization", f"Bearer {key}")
    if chunked:
        conn.putheader("Transfer-Encoding", "chunked")
    elif length is not None:
        conn.putheader("Content-Length", str(length))
    conn.endheaders()
    return conn


def test_the_key_is_checked_before_the_body_is_read(server):
    conn = _send_headers(server[0], 10 << 20, key="wrong")     # a 10 MB body announced, none sent
    res = conn.getresponse()
    assert res.status == 401 and res.getheader("WWW-Authenticate", "").startswith("Bearer")
    assert json.loads(res.read())["error"]["code"] == "invalid_api_key"
    conn.close()


def test_a_10mb_body_is_refused_and_a_small_request_is_served_beside_it(server, client):
    url = server[0]
    result = {}

    def small():
        t0 = time.perf_counter()
        r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0)
        result["small"] = (r.usage.completion_tokens, time.perf_counter() - t0)

    conn = _send_headers(url, 10 << 20)                          # refused from its Content-Length
    res = conn.getresponse()
    assert res.status == 413 and json.loads(res.read())["error"]["code"] == "request_too_large"
    conn.close()
    conn = _send_headers(url, None, chunked=True)                 # no length: counted as it comes
    t = threading.Thread(target=small)
    t.start()
    status = None
    chunk = b"x" * (256 << 10)
    try:
        for _ in range(40):                                       # 10 MB
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except (BrokenPipeError, ConnectionResetError):
        pass                                                      # the server answered and closed
    with contextlib.suppress(http.client.HTTPException, OSError):
        status = conn.getresponse().status
    conn.close()
    t.join(timeout=120)
    assert status in (413, None)                                  # None: closed before we read it
    assert result["small"][0] == 3


def test_a_stalled_body_times_out(engine):
    app = serve_mod.create_app(engine, MODEL, body_timeout_s=0.5)
    with serve_mod.running(app) as url:
        conn = _send_headers(url, 100, key=None)
        conn.send(b'{"model": ')                                   # 10 of 100 bytes, then silence
        res = conn.getresponse()
        assert res.status == 408 and json.loads(res.read())["error"]["code"] == "request_timeout"
        conn.close()
        assert health(url)["status"] == "ok"


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


def greedy_ids(engine, prompt_ids, n):
    with torch.no_grad():
        return lr.generate(engine, [prompt_ids], max_new_tokens=n).tokens[0]


def ref_logprobs(engine, prompt_ids, ids):
    """log_softmax of the engine's model logits at each generated position (teacher-forced)."""
    with torch.no_grad():
        logits = engine.source(torch.tensor([list(prompt_ids) + list(ids)]))[0].float()
    return torch.log_softmax(logits, -1)[len(prompt_ids) - 1:-1]


def test_n_choices_share_the_prompt(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=OTHER, max_tokens=12, temperature=1.0, seed=5, n=3,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1                                       # each choice its own draw
    one = client.chat.completions.create(model=MODEL, messages=OTHER, max_tokens=12, temperature=1.0, seed=5,
                                         extra_body={"ignore_eos": True})
    assert one.choices[0].message.content == texts[0]                # choice j draws with seed + j
    assert r.usage.prompt_tokens == one.usage.prompt_tokens          # the prompt counted once
    assert r.usage.completion_tokens == 36
    ext = r.model_extra["layerroute"]
    assert len(ext) == 3 and sum(e["prefill_shared"] for e in ext) == 2    # prefilled once
    greedy = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, n=2)
    assert [c.message.content for c in greedy.choices] == [reference_text(engine, CHAT, 8)] * 2
    chunks = list(client.chat.completions.create(model=MODEL, messages=OTHER, max_tokens=12, temperature=1.0,
                                                 seed=5, n=3, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    streamed = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                for i in range(3)]
    assert streamed == texts
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens and chunks[-1].usage.completion_tokens == 36


def test_logprobs_are_sorted_and_match_the_engines_logits(client, engine):
    from layerroute_rt.runtime.generate import encode_prompts
    prompt = encode_prompts([CHAT], engine)[0]
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=4, extra_body={"ignore_eos": True})
    ids = greedy_ids(engine, prompt, 8)
    ref = ref_logprobs(engine, prompt, ids)
    tok = engine._tokenizer
    entries = r.choices[0].logprobs.content
    assert len(entries) == len(ids) == 8
    for i, e in enumerate(entries):
        assert e.token == tok.decode([ids[i]]) and e.logprob == pytest.approx(float(ref[i, ids[i]]), abs=2e-3)
        assert bytes(e.bytes).decode("utf-8", "replace") == tok.decode([ids[i]])
        top = [t.logprob for t in e.top_logprobs]
        assert len(top) == 4 and top == sorted(top, reverse=True)
        assert [t.token for t in e.top_logprobs] == [tok.decode([t]) for t in ref[i].topk(4).indices.tolist()]
        assert top == pytest.approx(ref[i].topk(4).values.tolist(), abs=2e-3)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                                 logprobs=True, stream=True, extra_body={"ignore_eos": True}))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in entries]      # (the prompt from the prefix cache
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-4)  # this time)
    assert all(e.top_logprobs == [] for e in streamed)


def test_completions_text_tokens_echo_stream_and_logprobs(client, engine, server):
    text = "The flight from Paris to Rome"
    with torch.no_grad():
        ref = lr.generate(engine, [text], max_new_tokens=10, chat_template=False, eos_token_id=None)
    ids = engine._tokenizer.encode(text)
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=10, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].text == ref.text[0]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10
    lp = r.choices[0].logprobs
    expected = ref_logprobs(engine, ids, ref.tokens[0])
    assert lp.token_logprobs == pytest.approx([float(expected[i, t]) for i, t in enumerate(ref.tokens[0])], abs=2e-3)
    assert "".join(lp.tokens) == ref.text[0] and lp.text_offset[0] == 0
    assert all(len(t) == 2 for t in lp.top_logprobs)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == ref.text[0]
    many = client.completions.create(model=MODEL, prompt=[text, "Hotels in Oslo"], max_tokens=4, temperature=0,
                                     n=2, echo=True)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text.startswith(text) and many.choices[2].text.startswith("Hotels in Oslo")
    assert many.choices[0].text == many.choices[1].text
    chunks = list(client.completions.create(model=MODEL, prompt=text, max_tokens=10, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text[0]
    assert chunks[-1].choices[0].finish_reason == "length"
    for kw, param in ((dict(prompt=""), "prompt"), (dict(prompt=[[1, 2], "x"]), "prompt"),
                      (dict(prompt=[10 ** 9]), "prompt"), (dict(suffix="end"), "suffix"),
                      (dict(best_of=3), "best_of"), (dict(echo=True, logprobs=1), "echo"),
                      (dict(logprobs=6), "logprobs"), (dict(n=9), "n"),
                      (dict(max_tokens=10 ** 6), "max_tokens")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{"model": MODEL, "prompt": text, **kw})
        assert e.value.body["param"] == param, (kw, e.value.body)
