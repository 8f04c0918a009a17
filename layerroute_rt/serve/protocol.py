"""The OpenAI wire format of the server (layerroute_rt.serve.app): its error bodies (APIError), the
ASGI guard in front of the app (API key 401, body limit 413, body-read timeout 408), the request
bodies (pydantic models whose field checks answer 400 with an OpenAI error body naming the field),
the messages and tools as the chat template takes them, and the response bodies built from the
worker's results (chat.completion, text_completion, their stream chunks, usage and logprobs)."""
from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator

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


def validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}",
                        code="invalid_json")
    param = _param(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "required field missing"
    return APIError(400, f"{param or 'body'}: {msg}", param=param, code="invalid_value")


# -- the HTTP guard -------------------------------------------------------------------------------

class Guard:
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


def _stops(v):
    """stop: a string or up to 4 of them (non-empty), as a list, or None."""
    stops = [v] if isinstance(v, str) else v
    if stops is None:
        return None
    if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or \
            not all(isinstance(s, str) and s for s in stops):
        raise ValueError("must be a non-empty string or a list of 1 to 4 non-empty strings")
    return stops


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """The fields chat and completions requests share."""
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX, strict=True)
    stop: Any = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, strict=True)
    response_format: dict | None = None
    ignore_eos: bool = False          # extension (as vLLM's): generate up to max_tokens

    _stop = field_validator("stop")(classmethod(lambda cls, v: _stops(v)))


class ChatCompletionRequest(_SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Any = None
    max_tokens: int | None = _positive()
    max_completion_tokens: int | None = _positive()
    logprobs: bool = Field(default=False, strict=True)
    top_logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)
    parallel_tool_calls: bool = Field(default=True, strict=True)

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


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions: a prompt as text or token ids (or a list of either), no template."""
    prompt: Any
    max_tokens: int | None = Field(default=16, ge=1, strict=True)
    logprobs: int | None = Field(default=None, ge=0, le=5, strict=True)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        """A string, a list of strings, a list of token ids or a list of them: as a list of
        strings or a list of id lists (non-empty)."""
        def ids(p):
            return isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        if isinstance(v, str):
            v = [v]
        elif ids(v):
            v = [v]
        if isinstance(v, list) and v and (all(isinstance(p, str) for p in v) or all(ids(p) for p in v)):
            if any(p == "" for p in v):
                raise ValueError("must not be empty")
            return v
        raise ValueError("must be a non-empty string, a list of strings, a list of token ids, or a list "
                         "of token-id lists")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        if v:
            raise ValueError("suffix (fill-in-the-middle) is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info):
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported")
        return v


def template_messages(req: ChatCompletionRequest) -> list[dict]:
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


def request_tools(req: ChatCompletionRequest) -> list[dict] | None:
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


# -- ids, token text, usage ------------------------------------------------------------------------

def printable(e: Exception) -> str:
    """An exception's message with characters JSON cannot carry (lone surrogates) escaped."""
    return str(e).encode("utf-8", "backslashreplace").decode("utf-8")


def completion_id(prefix: str = "chatcmpl-") -> str:
    return prefix + secrets.token_hex(12)


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


class TokenText:
    """A token's text and UTF-8 bytes, as logprobs report them (cached per id)."""

    def __init__(self, tok):
        self.tok = tok
        self._cache: dict[int, tuple[str, list[int]]] = {}
        try:
            from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode
            self._bytes = {c: b for b, c in bytes_to_unicode().items()}   # byte-level BPE
        except ImportError:
            self._bytes = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            piece = self.tok.convert_ids_to_tokens(token)
            text = self.tok.decode([token])
            if isinstance(piece, str) and piece and all(c in self._bytes for c in piece):
                raw = [self._bytes[c] for c in piece]
            else:
                raw = list(text.encode("utf-8"))
            self._cache[token] = (text, raw)
        return self._cache[token]

    def chat(self, entries) -> dict:
        """Chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
        def one(t, lp):
            text, raw = self(t)
            return {"token": text, "logprob": lp, "bytes": raw}
        return {"content": [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in top]}
                            for t, (lp, top) in entries]}

    def completion(self, entries, offset: int = 0) -> dict:
        """Completions logprobs: tokens, token_logprobs, top_logprobs (token -> logprob), text_offset."""
        tokens, lps, tops, offsets = [], [], [], []
        for t, (lp, top) in entries:
            text = self(t)[0]
            tokens.append(text)
            lps.append(lp)
            tops.append({self(a)[0]: alp for a, alp in top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def usage(prompts: list[list[int]], results: list[dict]) -> dict:
    """Each prompt counted once (n choices share it), every choice's completion tokens."""
    prompt = sum(len(p) for p in prompts)
    completion = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r["cached_tokens"] for r in results[::len(results) // len(prompts)])}}


# -- responses -------------------------------------------------------------------------------------

def _chat_message(result: dict) -> dict:
    if result["tool_calls"]:
        return {"role": "assistant", "content": result["content"], "tool_calls": result["tool_calls"]}
    return {"role": "assistant", "content": result["content"]}


def chat_completion(model_name: str, tokens: TokenText, prompts, results: list[dict]) -> dict:
    """The chat.completion body of a request's results (one per choice)."""
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": i, "message": _chat_message(r),
                     "logprobs": None if r["logprobs"] is None else tokens.chat(r["logprobs"]),
                     "finish_reason": r["finish_reason"]} for i, r in enumerate(results)],
        "usage": usage(prompts, results), "layerroute": results[0]["layerroute"] if len(results) == 1
        else [r["layerroute"] for r in results]}


def text_completion(model_name: str, tokens: TokenText, req: CompletionRequest, prompts,
                    results: list[dict]) -> dict:
    """The text_completion body of a request's results (n per prompt; the prompt first if echo)."""
    choices = []
    for i, r in enumerate(results):
        head = tokens.tok.decode(prompts[i // req.n]) if req.echo else ""
        choices.append({"index": i, "text": head + r["text"], "finish_reason": r["finish_reason"],
                        "logprobs": None if r["logprobs"] is None else
                        tokens.completion(r["logprobs"])})
    return {
        "id": completion_id("cmpl-"), "object": "text_completion", "created": int(time.time()),
        "model": model_name, "choices": choices, "usage": usage(prompts, results),
        "layerroute": [r["layerroute"] for r in results]}


class StreamChunks:
    """The server-sent events of one streamed request (one id and creation time for all)."""

    def __init__(self, model_name: str, tokens: TokenText, chat: bool):
        self.model_name, self.tokens, self.chat = model_name, tokens, chat
        self.id, self.created = completion_id("chatcmpl-" if chat else "cmpl-"), int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def __call__(self, index: int | None, delta: dict | None = None, finish=None, logprobs=None,
                 **extra) -> str:
        """A chunk of choice `index` (chat: its delta; completions: its text), or of no choice
        (index None: the usage chunk), with `extra` fields."""
        choices = []
        if index is not None:
            if self.chat:
                lp = None if not logprobs else self.tokens.chat(logprobs)
                choices = [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]
            else:
                lp = None if not logprobs else self.tokens.completion(logprobs)
                choices = [{"index": index, "text": (delta or {}).get("content", ""), "logprobs": lp,
                            "finish_reason": finish}]
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model_name,
                "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"
