"""An OpenAI-compatible HTTP server over one inference engine (`layerroute serve`).

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id}, GET /health.

What holds:
* One worker thread owns the engine and runs its scheduler (layerroute_rt.scheduler: continuous
  batching): a request joins the running batch at the next iteration and leaves it when it
  ends; each row samples with its own temperature, top_p and seed.
* Stop conditions are per request: EOS (unless the `ignore_eos` extension is set), the
  request's stop strings (the content is cut before the stop string, as OpenAI does) and its
  max_tokens. A client that disconnects has its sequence cancelled at the next step.
* A request's final response (or final stream chunk) is sent when its sequence ends, with usage
  (prompt, completion and cached prompt tokens from the engine's prefix cache) and its skip
  statistics (the `layerroute` field). Streamed text is sent as it is made, held back only by
  as many characters as the longest stop string could still need.
* Tools go through the checkpoint's chat template; tool_choice "none" renders none, a named
  function renders only that one. Constrained decoding (layerroute_rt.grammar, xgrammar):
  tool_choice "required" or a named function makes the answer calls (in the template's
  <tool_call> format, arguments following their schemas), parallel_tool_calls false allows one
  call at most, and response_format json_object / json_schema makes it JSON; the grammar is
  compiled (cached) on a thread-pool thread, a bad schema is a 400. Tool calls are parsed from
  the whole text (toolcalls.parse_tool_calls) when the sequence ends; a request with tools
  therefore streams its answer in one delta at the end. Calls that do not parse are left in the
  content.
* Bad input is a 400 with an OpenAI error body naming the field; a fault while generating is a
  500 body for the requests it touched, and the worker goes on. Without `api_key`, no key is
  checked; with one, /v1/* needs `Authorization: Bearer KEY` (401 otherwise).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import copy
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import InferenceModel
from . import grammar
from .generate import _eos_ids, encode_prompts, load_tokenizer
from .scheduler import Request as SequenceRequest
from .scheduler import Scheduler
from .toolcalls import parse_tool_calls

log = logging.getLogger("layerroute.serve")

DEFAULT_MAX_TOKENS = 1024      # when a request gives none (and the context has room)
MAX_BATCH = 32                 # rows of the running batch
PREFILL_CHUNK = 256            # prompt tokens prefilled per scheduler iteration
MAX_BODY_BYTES = 1 << 20       # request bodies past this are refused (413)
BODY_TIMEOUT_S = 10.0          # a body chunk not received within this is a 408
KEEP_ALIVE_S = 5.0             # an idle connection is closed after this
CHARS_PER_TOKEN_MAX = 16       # a prompt of more characters than this x the context cannot fit
SEED_MAX = (1 << 63) - 1


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
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX, strict=True)
    stop: Any = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | None = None
    parallel_tool_calls: bool = Field(default=True, strict=True)
    response_format: dict | None = None
    ignore_eos: bool = False          # extension (as vLLM's): generate up to max_tokens

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        """"none", "auto", "required", {"type": "function", "function": {"name": str}} (kept as
        the name), or None."""
        if v is None or v in ("none", "auto", "required"):
            return v
        if isinstance(v, dict) and v.get("type") == "function" and isinstance(v.get("function"), dict) \
                and isinstance(v["function"].get("name"), str):
            return v["function"]["name"]
        raise ValueError("must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")

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
    if req.tool_choice in (None, "auto", "required"):
        return tools
    named = [t for t in tools if t["function"]["name"] == req.tool_choice]
    if not named:
        raise APIError(400, f"tool_choice: no tool named {req.tool_choice!r} in tools",
                       param="tool_choice", code="invalid_value")
    return named


# -- jobs and the worker ---------------------------------------------------------------------------

@dataclass
class Job:
    """One request as the worker runs it (a scheduler.Request underneath). The worker posts
    ("delta", str), then ("done", dict) or ("error", APIError) to `events` (an asyncio queue,
    through the loop)."""
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
    logits_processor: object = None  # the request's grammar (grammar.GrammarProcessor), or None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    request: SequenceRequest | None = None
    text: str = ""
    sent: int = 0
    stopped: bool = False            # a stop string was met

    @property
    def cancelled(self) -> bool:
        return self.request is not None and self.request.cancelled

    def cancel(self) -> None:
        """From the event loop: the client went away."""
        if self.request is not None:
            self.request.cancel()

    def post(self, kind: str, value) -> None:
        with contextlib.suppress(RuntimeError):          # the loop has closed
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def feed(self, token: int, text: str) -> bool:
        """One new token and the text it completed (on the worker's thread): apply the stop
        strings, post the text that no stop string can cut any more. True: a stop string ended
        it (the content is cut before it)."""
        if token in self.eos:
            final = True
        else:
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
            self.text += text
            cuts = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if cuts:
                self.text = self.text[:min(cuts)]
                self.stopped = True
            final = self.stopped or len(self.request.tokens) >= self.max_tokens
        if self.stream and not self.parse_tools:
            hold = 0 if final else max((len(s) for s in self.stop), default=1) - 1
            upto = len(self.text) - hold
            if upto > self.sent:
                self.post("delta", self.text[self.sent:upto])
                self.sent = upto
        return self.stopped

    def done(self, req: SequenceRequest) -> None:
        """The request ended (on the worker's thread): post its result or its error."""
        if req.error is not None:
            e = req.error
            self.post("error", e if isinstance(e, APIError) else
                      APIError(500, f"generation failed: {type(e).__name__}", code="generation_failed"))
            return
        if req.finish == "cancelled":
            return
        if self.stream and not self.parse_tools and self.sent < len(self.text):
            self.post("delta", self.text[self.sent:])
            self.sent = len(self.text)
        calls = [c for c in parse_tool_calls(self.text) if "name" in c] if self.parse_tools else []
        n = len(req.tokens)
        self.post("done", {
            "text": self.text, "tool_calls": calls,
            "finish_reason": "tool_calls" if calls else req.finish,
            "usage": {"prompt_tokens": len(self.prompt), "completion_tokens": n,
                      "total_tokens": len(self.prompt) + n,
                      "prompt_tokens_details": {"cached_tokens": req.stats.get("cached_prompt_tokens", 0)}},
            "layerroute": req.stats,
        })


class Worker:
    """The thread that owns the engine: it runs the continuous-batching scheduler
    (layerroute_rt.scheduler.Scheduler), which admits requests and ends them at every decode
    step."""

    def __init__(self, engine: InferenceModel, skip_layers=None, max_batch: int = MAX_BATCH,
                 prefill_chunk: int = PREFILL_CHUNK, batch_q: float = 1.0):
        self.scheduler = Scheduler(engine, skip_layers=skip_layers, max_batch=max_batch,
                                   prefill_chunk=prefill_chunk, batch_q=batch_q)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="layerroute-engine", daemon=True)
        self.cancelled = 0           # sequences ended because their client went away
        self.faults = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.scheduler.notify()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def running(self) -> int:
        return self.scheduler.running

    @property
    def waiting(self) -> int:
        return self.scheduler.waiting

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scheduler.run(self._stop)
            except Exception:                  # the worker never dies: log and go on
                self.faults += 1
                log.exception("scheduler step failed")

    def submit(self, job: Job) -> None:
        def done(req: SequenceRequest) -> None:
            if req.finish == "cancelled":
                self.cancelled += 1
            job.done(req)

        job.request = SequenceRequest(prompt=job.prompt, max_new_tokens=job.max_tokens,
                              temperature=job.temperature, top_p=job.top_p, seed=job.seed, eos=job.eos,
                              on_token=job.feed, on_done=done, logits_processor=job.logits_processor)
        self.scheduler.submit(job.request)


# -- the app ---------------------------------------------------------------------------------------

def _printable(e: Exception) -> str:
    """An exception's message with characters JSON cannot carry (lone surrogates) escaped."""
    return str(e).encode("utf-8", "backslashreplace").decode("utf-8")


def _completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def _tool_calls(calls: list[dict]) -> list[dict]:
    return [{"id": "call_" + secrets.token_hex(12), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in calls]


class Server:
    """Request handling over the Worker: validation, tokenization, responses."""

    def __init__(self, engine: InferenceModel, model_name: str, worker: Worker, default_max_tokens: int):
        self.engine, self.model_name, self.worker = engine, model_name, worker
        self.default_max_tokens = default_max_tokens
        self.tok = load_tokenizer(engine)
        if self.tok is None:
            raise ValueError("serve: the model has no tokenizer (tokenizer.json); chat needs one")
        self.eos = frozenset(_eos_ids(engine, "auto") | ({self.tok.eos_token_id} - {None}))
        self._local = threading.local()
        self.created = int(time.time())

    def _encode(self, messages, tools) -> list[int]:
        """On a thread-pool thread, with that thread's own copy of the tokenizer (no lock)."""
        tok = getattr(self._local, "tok", None)
        if tok is None:
            tok = self._local.tok = copy.deepcopy(self.tok)
        return encode_prompts([messages], self.engine, tools=tools, tok=tok)[0]

    def _grammar(self, req: ChatCompletionRequest, tools):
        """The request's grammar (response_format, or tool_choice "required" / named, or
        "auto" constraining the calls to their schemas) as a fresh matcher, or None; a bad spec
        or schema is a 400 naming its field."""
        choice = req.tool_choice
        if choice is not None and choice not in ("none", "auto", "required"):
            choice = {"type": "function", "function": {"name": choice}}
        if req.parallel_tool_calls is False and tools is not None and choice in (None, "auto"):
            choice = "auto"              # at most one call: the calls are constrained
        elif choice == "auto" or choice is None:
            choice = None                # free text, parsed for calls (as before)
        try:
            spec = grammar.constraint_spec(req.response_format, tools, choice, req.parallel_tool_calls)
            if spec is not None and req.ignore_eos:
                raise ValueError("ignore_eos cannot be combined with a constrained answer")
            compiled = grammar.compile_constraint(self.engine, self.tok, self.eos, spec)
        except ValueError as e:
            text = str(e)
            field_name = "response_format" if text.startswith("response_format") else \
                "tool_choice" if text.startswith("tool_choice") else "tools" if text.startswith("tools") else \
                "parallel_tool_calls" if text.startswith("parallel_tool_calls") else "ignore_eos"
            raise APIError(400, _printable(e), param=field_name, code="invalid_value") from e
        return None if compiled is None else grammar.GrammarProcessor(compiled)

    async def job(self, req: ChatCompletionRequest) -> Job:
        """The request checked and tokenized, as a Job (APIError 400 on bad input, 404 for
        another model)."""
        if req.model != self.model_name:
            raise APIError(404, f"model: {req.model!r} is not served here; the model is {self.model_name!r}",
                           param="model", code="model_not_found")
        tools = _tools(req)
        messages = _template_messages(req)
        for i, m in enumerate(messages):
            try:
                json.dumps(m, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(400, f"messages[{i}]: not valid Unicode text ({_printable(e)})",
                               param=f"messages[{i}]", code="invalid_value") from e
        try:
            json.dumps(tools, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"tools: not valid Unicode text ({_printable(e)})", param="tools",
                           code="invalid_value") from e
        limit = self.engine.max_cache_len
        chars = sum(len(m["content"] or "") for m in messages) + len(json.dumps(tools or []))
        if chars > CHARS_PER_TOKEN_MAX * limit:       # refused before tokenizing it
            raise APIError(400, f"messages: {chars} characters cannot fit this model's context of {limit} "
                                f"tokens", param="messages", code="context_length_exceeded")
        try:
            prompt = await run_in_threadpool(self._encode, messages, tools)
        except (ValueError, UnicodeError) as e:
            raise APIError(400, f"messages: {_printable(e)}", param="messages", code="invalid_value") from e
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
        processor = await run_in_threadpool(self._grammar, req, tools)     # compiled off the loop
        temperature = 1.0 if req.temperature is None else req.temperature
        return Job(logits_processor=processor, prompt=prompt, max_tokens=asked or min(self.default_max_tokens, limit - len(prompt)),
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
                    job.cancel()
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
            job.cancel()                   # harmless once done; ends the sequence otherwise


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Guard:
    """ASGI middleware in front of the app, before any body is read: the API key of /v1/*
    (401 with WWW-Authenticate), the body limit (413: at once from Content-Length, or when the
    bytes received pass it) and the body-read timeout (408: no body chunk for body_timeout_s)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_timeout_s: float):
        self.app, self.api_key = app, api_key
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s

    async def _reply(self, send, error: APIError, headers=()) -> None:
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return await self._reply(send, APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                                        code="invalid_api_key", type_="authentication_error"),
                                         [(b"www-authenticate", b'Bearer realm="layerroute"')])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self._reply(send, APIError(400, "Content-Length: not a number", code="invalid_request"))
            if int(length) > self.max_body_bytes:
                return await self._reply(send, APIError(
                    413, f"the request body has {int(length)} bytes; this server takes at most "
                         f"{self.max_body_bytes} (--max-body-bytes)", code="request_too_large"))
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, error = await self._read_body(receive)
        if error is not None:
            return await self._reply(send, error)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()         # after the body: the disconnect

        await self.app(scope, replay, send)

    async def _read_body(self, receive) -> tuple[bytes, APIError | None]:
        """The whole body, within the limit and the per-chunk timeout, or the error to answer."""
        parts, received = [], 0
        limit, timeout = self.max_body_bytes, self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:
                return b"", APIError(408, f"the request body was not received within {timeout:g} s",
                                     code="request_timeout")
            if message["type"] != "http.request":          # the client went away
                return b"", APIError(400, "the client closed the connection", code="invalid_request")
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                return b"", APIError(413, f"the request body passed {limit} bytes; this server takes at "
                                          f"most {limit} (--max-body-bytes)", code="request_too_large")
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts), None


def create_app(engine: InferenceModel, model_name: str, api_key: str | None = None,
               skip_layers=None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               max_batch: int = MAX_BATCH, prefill_chunk: int = PREFILL_CHUNK, batch_q: float = 1.0,
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout_s: float = BODY_TIMEOUT_S,
               openapi: bool = False) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`. Its worker thread starts and stops with
    the app's lifespan (uvicorn runs it); `app.state.worker` is the worker. A request without
    max_tokens gets at most default_max_tokens (and what its context leaves). openapi: serve
    /openapi.json (no /docs page: it would load its scripts from a CDN)."""
    worker = Worker(engine, skip_layers=skip_layers, max_batch=max_batch, prefill_chunk=prefill_chunk,
                    batch_q=batch_q)
    server = Server(engine, model_name, worker, default_max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="layerroute_rt", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if openapi else None)
    app.state.worker = worker
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)

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
        return APIError(500, f"internal error ({type(exc).__name__})").response()

    @app.get("/health")
    async def health():
        body = {"status": "ok" if worker.alive else "error", "model": model_name,
                "running": worker.running, "waiting": worker.waiting, "cancelled": worker.cancelled,
                "scheduler": worker.scheduler.stats()}
        return JSONResponse(body, status_code=200 if worker.alive else 503)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": server.created, "owned_by": "layerroute_rt",
                "max_model_len": engine.max_cache_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"model: {model_id!r} is not served here", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        job = await server.job(req)
        if not worker.alive:
            raise APIError(503, "the engine worker is not running", code="unavailable")
        worker.submit(job)
        if req.stream:
            return StreamingResponse(server.stream(job, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await server.complete(job, request)

    return app


def serve(engine: InferenceModel, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", keep_alive_s: float = KEEP_ALIVE_S, **options) -> None:
    """Run the app (create_app's options) under uvicorn until interrupted; an idle connection
    is closed after keep_alive_s."""
    import uvicorn

    app = create_app(engine, model_name, **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=keep_alive_s)


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
            keep_alive_s: float = KEEP_ALIVE_S):
    """Run `app` under uvicorn in a background thread (port 0: a free one); yields its base URL
    (http://host:port) once it listens, and shuts it down on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_keep_alive=keep_alive_s))
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
