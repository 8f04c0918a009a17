"""An OpenAI-compatible HTTP server over one inference engine (`layerroute serve`).

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id}, GET /health.

What holds:
* One worker thread owns the engine (it is not thread-safe). Each time it is free it takes every
  request queued at that moment (after waiting `batch_window_s` for stragglers) and runs those
  with the same sampling parameters as one batch through `generate(stream=True)`: greedy
  requests together whatever their seed and top_p, sampled ones by (temperature, top_p), a
  seeded sampled request alone (its output then depends on its seed only). This is batching per
  arrival wave, not continuous batching: a request that arrives while a batch runs waits for it.
* Stop conditions are per request, applied by the worker on each step's tokens: EOS (unless the
  `ignore_eos` extension is set), the request's stop strings (the content is cut before the stop
  string, as OpenAI does) and its max_tokens; a sequence that meets one is ended with
  `GenerationStream.cancel`, so one batch serves requests with different limits. A client that
  disconnects has its sequence cancelled at the next step.
* A request's final response (or final stream chunk) is sent when its batch ends: usage
  (prompt, completion and cached prompt tokens from the engine's prefix cache, which all
  requests share) and the skip statistics (the `layerroute` field, for this sequence) come from
  the batch's GenerateOutput. Streamed text is sent as it is made, held back only by as many
  characters as the longest stop string could still need.
* Tools go through the checkpoint's chat template; tool_choice "none" renders none, a named
  function renders only that one (the output is not constrained to call it). Tool calls are
  parsed from the whole text (toolcalls.parse_tool_calls) when the sequence ends; a request with
  tools therefore streams its answer in one delta at the end. Calls that do not parse are left
  in the content.
* Bad input is a 400 with an OpenAI error body naming the field; a fault while generating is a
  500 body for that batch's requests, and the worker goes on. Without `api_key`, no key is
  checked; with one, /v1/* needs `Authorization: Bearer KEY` (401 otherwise).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import InferenceModel
from .flops import flops_report
from .generate import (_eos_ids, decode_router_blocks, encode_prompts, generate, generated_flops,
                       load_tokenizer)
from .toolcalls import parse_tool_calls

log = logging.getLogger("layerroute.serve")

DEFAULT_MAX_TOKENS = 1024      # when a request gives none (and the context has room)
MAX_BATCH = 32                 # sequences per batch
MAX_BATCH_TOKENS = 65536       # KV-cache slots per batch (sequences x their longest length)


# -- errors ----------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _param(loc) -> str | None:
    """A pydantic error location as a field path: ("body", "messages", 0, "role") -> messages[0].role."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or None


def _validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}",
                        code="invalid_json")
    param = _param(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "required field missing"
    return APIError(400, f"{param or 'body'}: {msg}", param=param, code="invalid_value")


# -- the protocol ----------------------------------------------------------------------------------

def _positive():
    return Field(default=None, ge=1, strict=True)


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="a JSON object, as a string")


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        """A string, or a list of text parts (joined), or None."""
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in v):
            return "".join(p["text"] for p in v)
        raise ValueError("must be a string or a list of {'type': 'text', 'text': str} parts "
                         "(only text content is supported)")


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Any = None
    max_tokens: int | None = _positive()
    max_completion_tokens: int | None = _positive()
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, strict=True)
    stop: Any = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | None = None
    ignore_eos: bool = False          # extension (as vLLM's): generate up to max_tokens

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        """"none", "auto", {"type": "function", "function": {"name": str}}, or None."""
        if v is None or v in ("none", "auto"):
            return v
        if isinstance(v, dict) and v.get("type") == "function" and isinstance(v.get("function"), dict) \
                and isinstance(v["function"].get("name"), str):
            return v["function"]["name"]
        raise ValueError("must be 'none', 'auto' or {'type': 'function', 'function': {'name': ...}}")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        """A string or up to 4 of them (non-empty), as a list, or None."""
        stops = [v] if isinstance(v, str) else v
        if stops is None:
            return None
        if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or \
                not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of 1 to 4 non-empty strings")
        return stops

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v not in (None, 1):
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v


def _template_messages(req: ChatCompletionRequest) -> list[dict]:
    """The messages as the chat template takes them: tool-call arguments decoded to objects,
    'developer' as 'system', content required except on an assistant turn with tool calls."""
    out = []
    for i, m in enumerate(req.messages):
        msg: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.content}
        if m.tool_calls:
            if m.role != "assistant":
                raise APIError(400, f"messages[{i}].tool_calls: only assistant messages have tool calls",
                               param=f"messages[{i}].tool_calls", code="invalid_value")
            calls = []
            for j, c in enumerate(m.tool_calls):
                try:
                    args = json.loads(c.function.arguments)
                except json.JSONDecodeError as e:
                    args = e
                if not isinstance(args, dict):
                    p = f"messages[{i}].tool_calls[{j}].function.arguments"
                    raise APIError(400, f"{p}: must be a JSON object as a string", param=p, code="invalid_value")
                calls.append({"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": args}})
            msg["tool_calls"] = calls
            msg["content"] = m.content or ""
        elif m.content is None:
            raise APIError(400, f"messages[{i}].content: required for a {m.role} message",
                           param=f"messages[{i}].content", code="invalid_value")
        if m.role == "tool" and m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def _tools(req: ChatCompletionRequest) -> list[dict] | None:
    """The tools the template renders, after tool_choice."""
    if req.tool_choice is not None and not req.tools:
        raise APIError(400, "tool_choice: given without tools", param="tool_choice", code="invalid_value")
    if not req.tools or req.tool_choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if req.tool_choice in (None, "auto"):
        return tools
    named = [t for t in tools if t["function"]["name"] == req.tool_choice]
    if not named:
        raise APIError(400, f"tool_choice: no tool named {req.tool_choice!r} in tools",
                       param="tool_choice", code="invalid_value")
    return named


# -- jobs and the worker ---------------------------------------------------------------------------

@dataclass
class Job:
    """One request as the worker runs it. The worker posts ("delta", str), then ("done", dict)
    or ("error", APIError) to `events` (an asyncio queue, through the loop)."""
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    stop: list[str]
    eos: frozenset[int]
    parse_tools: bool
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False          # set from the event loop: the client went away
    # worker state
    n_tokens: int = 0
    text: str = ""
    sent: int = 0
    finish: str | None = None

    def post(self, kind: str, value) -> None:
        with contextlib.suppress(RuntimeError):          # the loop has closed
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def batch_key(self):
        if self.temperature == 0.0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sampled", self.temperature, self.top_p)

    def feed(self, token: int, text: str) -> None:
        """One new token and the text it completed: count it, apply the stop conditions, post
        the text that can no longer be cut by a stop string."""
        self.n_tokens += 1
        if token in self.eos:
            self.finish = "stop"
        else:
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
            self.text += text
            cuts = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if cuts:
                self.text = self.text[:min(cuts)]
                self.finish = "stop"
            elif self.n_tokens >= self.max_tokens:
                self.finish = "length"
        if self.stream and not self.parse_tools:
            hold = 0 if self.finish else max((len(s) for s in self.stop), default=1) - 1
            upto = len(self.text) - hold
            if upto > self.sent:
                self.post("delta", self.text[self.sent:upto])
                self.sent = upto


def sequence_stats(engine: InferenceModel, out, b: int, router_blocks: int) -> dict:
    """Skip statistics of sequence b of a GenerateOutput: over its prompt and generated tokens,
    and over its generated tokens alone (None when no decode step fed one)."""
    executed, valid = out.executed[:, b:b + 1], out.valid[b:b + 1]
    width = valid.shape[1] - out.stats["decode_steps"]          # the left-padded prompt width
    report = flops_report(engine.config, engine.lr_config, executed, valid.long().cumsum(1), valid)
    fed = bool(valid[:, width:].any())
    generated = generated_flops(engine, executed, valid, width, router_blocks) if fed else None
    return {
        "skip_rate_per_layer": (1.0 - executed.sum((1, 2)) / valid.sum().clamp(min=1)).tolist(),
        "block_flops_skipped_pct": report.block_skipped_pct,
        "total_flops_skipped_pct": report.total_skipped_pct,
        "generated_block_flops_skipped_pct": generated.block_skipped_pct if fed else None,
        "generated_total_flops_skipped_pct": generated.total_skipped_pct if fed else None,
    }


class Scheduler:
    """The worker thread that owns the engine (see the module docstring)."""

    def __init__(self, engine: InferenceModel, skip_layers=None, batch_window_s: float = 0.005,
                 max_batch: int = MAX_BATCH, max_batch_tokens: int = MAX_BATCH_TOKENS):
        self.engine, self.skip_layers = engine, skip_layers
        self.batch_window_s, self.max_batch, self.max_batch_tokens = batch_window_s, max_batch, max_batch_tokens
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="layerroute-engine", daemon=True)
        self.running = 0             # sequences of the current batch still generating
        self.batches = 0
        self.cancelled = 0           # sequences ended because their client went away

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            time.sleep(self.batch_window_s)
            jobs = [job]
            with contextlib.suppress(queue.Empty):
                while True:
                    nxt = self._queue.get_nowait()
                    if nxt is None:
                        self._queue.put(None)            # stop after these
                        break
                    jobs.append(nxt)
            for batch in self._batches([j for j in jobs if not j.cancelled]):
                try:
                    self._run_batch(batch)
                except Exception as e:                   # the worker never dies of a batch
                    log.exception("generation failed for a batch of %d", len(batch))
                    err = APIError(400 if isinstance(e, ValueError) else 500,
                                   f"generation failed: {type(e).__name__}: {e}")
                    for j in batch:
                        j.post("error", err)
                finally:
                    self.running = 0

    def _batches(self, jobs: list[Job]) -> list[list[Job]]:
        """Jobs grouped by batch_key, in arrival order, each group split so that a batch has at
        most max_batch sequences, its longest prompt + largest max_tokens fit the engine's
        cache, and its cache (batch size x that length) at most max_batch_tokens slots (a job
        alone always runs: it fits the context)."""
        groups: dict[tuple, list[list[Job]]] = {}
        for j in jobs:
            batches = groups.setdefault(j.batch_key(), [])
            for batch in batches:
                length = max(len(o.prompt) for o in batch + [j]) + max(o.max_tokens for o in batch + [j])
                if len(batch) < self.max_batch and length <= self.engine.max_cache_len \
                        and (len(batch) + 1) * length <= self.max_batch_tokens:
                    batch.append(j)
                    break
            else:
                batches.append([j])
        return [b for batches in groups.values() for b in batches]

    def _run_batch(self, jobs: list[Job]) -> None:
        first = jobs[0]
        self.running = len(jobs)
        self.batches += 1
        with torch.no_grad():
            stream = generate(self.engine, [j.prompt for j in jobs],
                              max_new_tokens=max(j.max_tokens for j in jobs), temperature=first.temperature,
                              top_p=first.top_p, seed=first.seed if first.temperature > 0 else None,
                              skip_layers=self.skip_layers, eos_token_id=None, stream=True)
            ended: set[int] = set()
            for chunk in stream:
                for b, job in enumerate(jobs):
                    if job.finish is None and chunk.tokens[b] is not None:
                        job.feed(chunk.tokens[b], chunk.text[b])
                    if job.finish is None and job.cancelled:
                        job.finish = "cancelled"
                        self.cancelled += 1
                    if job.finish is not None and b not in ended:
                        stream.cancel(b)
                        ended.add(b)
                self.running = len(jobs) - len(ended)
        out = stream.output
        tau = self.engine.lr_config.tau
        router_blocks = decode_router_blocks(self.engine, tau, self.engine.skip_set(self.skip_layers))
        batch_stats = {"batch_size": len(jobs), "prefill_ms": out.stats["prefill_ms"],
                       "decode_ms_per_step": out.stats["decode_ms_per_step"], "tau": tau}
        for b, job in enumerate(jobs):
            if job.finish == "cancelled":
                continue
            calls = [c for c in parse_tool_calls(job.text) if "name" in c] if job.parse_tools else []
            job.post("done", {
                "text": job.text, "tool_calls": calls,
                "finish_reason": "tool_calls" if calls else job.finish,
                "usage": {"prompt_tokens": len(job.prompt), "completion_tokens": job.n_tokens,
                          "total_tokens": len(job.prompt) + job.n_tokens,
                          "prompt_tokens_details": {
                              "cached_tokens": out.stats["cached_prompt_tokens_per_seq"][b]}},
                "layerroute": {**sequence_stats(self.engine, out, b, router_blocks), **batch_stats},
            })


# -- the app ---------------------------------------------------------------------------------------

def _completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def _tool_calls(calls: list[dict]) -> list[dict]:
    return [{"id": "call_" + secrets.token_hex(12), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in calls]


class Server:
    """Request handling over a Scheduler: validation, tokenization, responses."""

    def __init__(self, engine: InferenceModel, model_name: str, scheduler: Scheduler,
                 default_max_tokens: int):
        self.engine, self.model_name, self.scheduler = engine, model_name, scheduler
        self.default_max_tokens = default_max_tokens
        self.tok = load_tokenizer(engine)
        if self.tok is None:
            raise ValueError("serve: the model has no tokenizer (tokenizer.json); chat needs one")
        self.eos = frozenset(_eos_ids(engine, "auto") | ({self.tok.eos_token_id} - {None}))
        self._encode_lock = threading.Lock()
        self.created = int(time.time())

    def _encode(self, messages, tools) -> list[int]:
        with self._encode_lock:
            return encode_prompts([messages], self.engine, tools=tools)[0]

    async def job(self, req: ChatCompletionRequest) -> Job:
        """The request checked and tokenized, as a Job (APIError 400 on bad input)."""
        if req.model != self.model_name:
            raise APIError(400, f"model: {req.model!r} is not served here; the model is {self.model_name!r}",
                           param="model", code="model_not_found")
        tools = _tools(req)
        messages = _template_messages(req)
        try:
            prompt = await run_in_threadpool(self._encode, messages, tools)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from e
        limit = self.engine.max_cache_len
        if len(prompt) >= limit:
            raise APIError(400, f"messages: the prompt has {len(prompt)} tokens; this model's context "
                                f"holds {limit} (prompt + completion)", param="messages",
                           code="context_length_exceeded")
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and len(prompt) + asked > limit:
            p = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{p}: the prompt has {len(prompt)} tokens and {p} is {asked}: "
                                f"{len(prompt) + asked} > the context of {limit} tokens", param=p,
                           code="context_length_exceeded")
        temperature = 1.0 if req.temperature is None else req.temperature
        return Job(prompt=prompt, max_tokens=asked or min(self.default_max_tokens, limit - len(prompt)),
                   temperature=temperature, top_p=None if req.top_p in (None, 1.0) else req.top_p,
                   seed=req.seed, stop=req.stop or [], eos=frozenset() if req.ignore_eos else self.eos,
                   parse_tools=tools is not None, stream=req.stream, loop=asyncio.get_running_loop())

    def _message(self, result: dict) -> dict:
        if result["tool_calls"]:
            return {"role": "assistant", "content": None, "tool_calls": _tool_calls(result["tool_calls"])}
        return {"role": "assistant", "content": result["text"]}

    async def complete(self, job: Job, request: Request) -> JSONResponse:
        """Wait for the job's result; a client that goes away cancels it."""
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            while True:
                getter = asyncio.ensure_future(job.events.get())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    job.cancelled = True
                    return JSONResponse({}, status_code=499)   # nobody reads it
                kind, value = getter.result()
                if kind == "error":
                    return value.response()
                if kind == "done":
                    break
        finally:
            watcher.cancel()
        return JSONResponse({
            "id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": self._message(value), "logprobs": None,
                         "finish_reason": value["finish_reason"]}],
            "usage": value["usage"], "layerroute": value["layerroute"]})

    async def stream(self, job: Job, req: ChatCompletionRequest):
        """Server-sent events: a role chunk, content deltas, a final chunk with finish_reason
        (and tool_calls), a usage chunk if stream_options.include_usage, then [DONE]. The client
        going away (the generator closed or cancelled) cancels the job."""
        cid, created = _completion_id(), int(time.time())

        def chunk(delta: dict | None, finish=None, **extra) -> str:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish}]
            body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": self.model_name, "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await job.events.get()
                if kind == "delta":
                    yield chunk({"content": value})
                    continue
                if kind == "error":
                    yield f"data: {json.dumps(value.body())}\n\n"
                    break
                if value["tool_calls"]:
                    calls = [{"index": i, **c} for i, c in enumerate(_tool_calls(value["tool_calls"]))]
                    yield chunk({"tool_calls": calls}, value["finish_reason"], layerroute=value["layerroute"])
                else:
                    if job.parse_tools and value["text"]:
                        yield chunk({"content": value["text"]})
                    yield chunk({}, value["finish_reason"], layerroute=value["layerroute"])
                if req.stream_options and req.stream_options.include_usage:
                    yield chunk(None, usage=value["usage"])
                break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True           # harmless once done; ends the sequence otherwise


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: InferenceModel, model_name: str, api_key: str | None = None,
               skip_layers=None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               batch_window_s: float = 0.005, max_batch: int = MAX_BATCH,
               max_batch_tokens: int = MAX_BATCH_TOKENS) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`. Its worker thread starts and stops with
    the app's lifespan (uvicorn runs it). `app.state.scheduler` is the worker. A request without
    max_tokens gets at most default_max_tokens (and what its context leaves)."""
    scheduler = Scheduler(engine, skip_layers=skip_layers, batch_window_s=batch_window_s,
                          max_batch=max_batch, max_batch_tokens=max_batch_tokens)
    server = Server(engine, model_name, scheduler, default_max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="layerroute_rt", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None,
                        type_="invalid_request_error").response()

    @app.exception_handler(Exception)
    async def _fault(request, exc: Exception):
        log.exception("request failed")
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        body = {"status": "ok" if scheduler.alive else "error", "model": model_name,
                "running": scheduler.running, "waiting": scheduler.waiting,
                "batches": scheduler.batches, "cancelled": scheduler.cancelled}
        return JSONResponse(body, status_code=200 if scheduler.alive else 503)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": server.created, "owned_by": "layerroute_rt",
                "max_model_len": engine.max_cache_len}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"model: {model_id!r} is not served here", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        job = await server.job(req)
        if not scheduler.alive:
            raise APIError(503, "the engine worker is not running", code="unavailable")
        scheduler.submit(job)
        if req.stream:
            return StreamingResponse(server.stream(job, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await server.complete(job, request)

    return app


def serve(engine: InferenceModel, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, skip_layers=None, log_level: str = "info") -> None:
    """Run the app under uvicorn until interrupted."""
    import uvicorn

    app = create_app(engine, model_name, api_key=api_key, skip_layers=skip_layers)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Run `app` under uvicorn in a background thread (port 0: a free one); yields its base URL
    (http://host:port) once it listens, and shuts it down on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, name="layerroute-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"serve: uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
