"""An OpenAI-compatible HTTP server over one inference engine (`layerroute serve`).

Endpoints: POST /v1/chat/completions, POST /v1/completions (a prompt as text or token ids, no
template), GET /v1/models, GET /v1/models/{id}, GET /health.

What holds:
* One worker thread owns the engine and runs its scheduler (layerroute_rt.runtime.scheduler: continuous
  batching): a request joins the running batch at the next iteration and leaves it when it
  ends; each row samples with its own temperature, top_p and seed.
* n choices (up to max_n) are n rows of the batch; they share the prompt's prefill (the
  scheduler prefills a prompt once for the requests that wait with it), choice j of a seeded
  request samples with seed + j, and usage counts the prompt once.
* Stop conditions are per request: EOS (unless the `ignore_eos` extension is set), the
  request's stop strings (the content is cut before the stop string, as OpenAI does) and its
  max_tokens. A client that disconnects has its sequences cancelled at the next step.
* A request's final response (or final stream chunk per choice) is sent when its sequences
  end, with usage (prompt, completion and cached prompt tokens from the engine's prefix cache)
  and skip statistics (the `layerroute` field). Streamed text is sent as it is made, held back
  only by as many characters as the longest stop string could still need.
* logprobs / top_logprobs (chat) and logprobs k (completions): each token's log-probability
  under the model's raw logits (before a grammar mask and the temperature, as vLLM reports
  them) and the k most likely tokens', best first; streamed with the deltas they came with.
* Tools go through the checkpoint's chat template; tool_choice "none" renders none, a named
  function renders only that one. Constrained decoding (layerroute_rt.runtime.grammar, xgrammar):
  tool_choice "required" or a named function makes the answer calls (in the template's
  <tool_call> format, arguments following their schemas), parallel_tool_calls false allows one
  call at most, and response_format json_object / json_schema makes it JSON; the grammar is
  compiled (cached) on a thread-pool thread, a bad schema is a 400.
* Tool calls (toolcalls.ToolCallStream): an answer in the template's <tool_call> format streams
  each call as the OpenAI API does, a first delta with the id and name, then the arguments'
  text in fragments as they are written; joined, they equal the non-streamed call (whose
  arguments are that same text). An answer in another form (fenced or bare JSON, prose) is
  decided when it ends (toolcalls.parse_tool_calls) and sent in one delta then; calls that do
  not parse are left in the content.
* Bad input is a 400 with an OpenAI error body naming the field (stream_options without stream
  included); a fault while generating is a 500 body for the requests it touched, and the
  worker goes on. Without `api_key`, no key is checked; with one, /v1/* needs
  `Authorization: Bearer KEY` (401 otherwise).

This module holds the app, its routes, the worker thread over the scheduler and the request
handling over it (Server); the OpenAI wire format (request models and their 400s, the guard in
front of the app, message and tool rendering, response and chunk bodies) is layerroute_rt.serve.protocol.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import copy
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.engine import InferenceModel
from ..runtime import grammar
from ..runtime.generate import _eos_ids, encode_prompts, load_tokenizer
from ..runtime.scheduler import Request as SequenceRequest
from ..runtime.scheduler import Scheduler
from ..runtime.toolcalls import ToolCallStream
from .protocol import CHARS_PER_TOKEN_MAX, SEED_MAX, APIError, ChatCompletionRequest, CompletionRequest, Guard, \
    StreamChunks, TokenText, call_id, chat_completion, printable, request_tools, template_messages, \
    text_completion, usage, validation_error

log = logging.getLogger("layerroute.serve")

DEFAULT_MAX_TOKENS = 1024      # when a request gives none (and the context has room)
MAX_BATCH = 32                 # rows of the running batch
PREFILL_CHUNK = 256            # prompt tokens prefilled per scheduler iteration
MAX_N = 8                      # choices per request (n), each a row of the batch
MAX_BODY_BYTES = 1 << 20       # request bodies past this are refused (413)
BODY_TIMEOUT_S = 10.0          # a body chunk not received within this is a 408
KEEP_ALIVE_S = 5.0             # an idle connection is closed after this


# -- jobs and the worker ---------------------------------------------------------------------------

@dataclass
class Job:
    """One sequence as the worker runs it (a scheduler.Request underneath): one choice of a
    request (`index`; a request of n choices has n jobs posting to one queue). The worker posts
    (index, "delta", (delta dict, logprob entries)), then (index, "done", dict) or
    (index, "error", APIError) to `events` (an asyncio queue, through the loop)."""
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    stop: list[str]
    eos: frozenset[int]
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    index: int = 0
    tool_stream: ToolCallStream | None = None   # a request with tools: its calls as they come
    logits_processor: object = None  # the choice's grammar (grammar.GrammarProcessor), or None
    logprobs: int | None = None      # top alternatives per token (0: the chosen token's only)
    request: SequenceRequest | None = None
    text: str = ""
    sent: int = 0                    # characters of text streamed
    lp_sent: int = 0                 # tokens whose logprobs were streamed
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
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, value))

    def _post_deltas(self, deltas: list[dict], final: bool) -> None:
        """The deltas, the logprobs of the tokens since the last on the first of them (on an
        empty delta at the end if the text held them all back)."""
        r = self.request
        fresh = list(zip(r.tokens[self.lp_sent:], r.token_logprobs[self.lp_sent:])) \
            if self.logprobs is not None else []
        if final and fresh and not deltas:
            deltas = [{}]
        for i, d in enumerate(deltas):
            self.post("delta", (d, fresh if i == 0 else []))
            if i == 0:
                self.lp_sent = len(r.token_logprobs)

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
        if self.stream and not final:      # the end is posted by done()
            upto = len(self.text) - (max((len(s) for s in self.stop), default=1) - 1)
            if upto > self.sent:
                deltas = self.tool_stream.update(self.text[:upto]) if self.tool_stream is not None \
                    else [{"content": self.text[self.sent:upto]}]
                self.sent = upto
                self._post_deltas(deltas, False)
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
        if self.stream:
            deltas = self.tool_stream.update(self.text, final=True) if self.tool_stream is not None \
                else [{"content": self.text[self.sent:]}] if self.sent < len(self.text) else []
            self.sent = len(self.text)
            self._post_deltas(deltas, True)
        content, calls = self.tool_stream.result(self.text) if self.tool_stream is not None else (self.text, [])
        self.post("done", {
            "text": self.text, "content": content, "tool_calls": calls,
            "finish_reason": "tool_calls" if calls else req.finish,
            "completion_tokens": len(req.tokens), "cached_tokens": req.stats.get("cached_prompt_tokens", 0),
            "logprobs": list(zip(req.tokens, req.token_logprobs)) if self.logprobs is not None else None,
            "layerroute": req.stats,
        })


class Worker:
    """The thread that owns the engine: it runs the continuous-batching scheduler
    (layerroute_rt.runtime.scheduler.Scheduler), which admits requests and ends them at every decode
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
                                      temperature=job.temperature, top_p=job.top_p, seed=job.seed,
                                      eos=job.eos, on_token=job.feed, on_done=done,
                                      logits_processor=job.logits_processor, logprobs=job.logprobs)
        self.scheduler.submit(job.request)


# -- the app ---------------------------------------------------------------------------------------

class Server:
    """Request handling over the Worker: checks against the engine (model, n, context), tokenization,
    the jobs, their results."""

    def __init__(self, engine: InferenceModel, model_name: str, worker: Worker, default_max_tokens: int,
                 max_n: int = MAX_N):
        self.engine, self.model_name, self.worker = engine, model_name, worker
        self.default_max_tokens, self.max_n = default_max_tokens, max_n
        self.tok = load_tokenizer(engine)
        if self.tok is None:
            raise ValueError("serve: the model has no tokenizer (tokenizer.json); chat needs one")
        self.tokens = TokenText(self.tok)
        self.eos = frozenset(_eos_ids(engine, "auto") | ({self.tok.eos_token_id} - {None}))
        self._local = threading.local()
        self.created = int(time.time())

    def _thread_tok(self):
        """This thread-pool thread's own copy of the tokenizer (no lock)."""
        tok = getattr(self._local, "tok", None)
        if tok is None:
            tok = self._local.tok = copy.deepcopy(self.tok)
        return tok

    def _encode(self, messages, tools) -> list[int]:
        return encode_prompts([messages], self.engine, tools=tools, tok=self._thread_tok())[0]

    def _encode_text(self, texts: list[str]) -> list[list[int]]:
        return encode_prompts(texts, self.engine, chat_template=False, tok=self._thread_tok())

    def _grammar(self, req, tools):
        """The request's compiled grammar (response_format, or tool_choice "required" / named,
        or "auto" constraining the calls to their schemas), or None; a bad spec or schema is a
        400 naming its field."""
        choice = getattr(req, "tool_choice", None)
        parallel = getattr(req, "parallel_tool_calls", True)
        if choice is not None and choice not in ("none", "auto", "required"):
            choice = {"type": "function", "function": {"name": choice}}
        if parallel is False and tools is not None and choice in (None, "auto"):
            choice = "auto"              # at most one call: the calls are constrained
        elif choice == "auto" or choice is None:
            choice = None                # free text, parsed for calls (as before)
        try:
            spec = grammar.constraint_spec(req.response_format, tools, choice, parallel)
            if spec is not None and req.ignore_eos:
                raise ValueError("ignore_eos cannot be combined with a constrained answer")
            return grammar.compile_constraint(self.engine, self.tok, self.eos, spec)
        except ValueError as e:
            text = str(e)
            field_name = "response_format" if text.startswith("response_format") else \
                "tool_choice" if text.startswith("tool_choice") else "tools" if text.startswith("tools") else \
                "parallel_tool_calls" if text.startswith("parallel_tool_calls") else "ignore_eos"
            raise APIError(400, printable(e), param=field_name, code="invalid_value") from e

    def _check(self, req) -> None:
        """What chat and completions requests share: the model, n, stream_options."""
        if req.model != self.model_name:
            raise APIError(404, f"model: {req.model!r} is not served here; the model is {self.model_name!r}",
                           param="model", code="model_not_found")
        if req.n > self.max_n:
            raise APIError(400, f"n: at most {self.max_n} choices per request (--max-n), got {req.n}",
                           param="n", code="invalid_value")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options",
                           code="invalid_value")

    def _fit(self, prompt: list[int], asked: int | None, param: str, prompt_param: str) -> int:
        """max tokens for a prompt within the context (400 where it cannot fit)."""
        limit = self.engine.max_cache_len
        if len(prompt) >= limit:
            raise APIError(400, f"{prompt_param}: the prompt has {len(prompt)} tokens; this model's context "
                                f"holds {limit} (prompt + completion)", param=prompt_param,
                           code="context_length_exceeded")
        if asked is not None and len(prompt) + asked > limit:
            raise APIError(400, f"{param}: the prompt has {len(prompt)} tokens and {param} is {asked}: "
                                f"{len(prompt) + asked} > the context of {limit} tokens", param=param,
                           code="context_length_exceeded")
        return asked or min(self.default_max_tokens, limit - len(prompt))

    def _jobs(self, req, prompts: list[list[int]], max_tokens: list[int], compiled, tools: bool,
              logprobs: int | None) -> list[Job]:
        """n jobs per prompt, posting to one queue; choice j of a seeded request has seed + j."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        temperature = 1.0 if req.temperature is None else req.temperature
        jobs = []
        for i, (prompt, cap) in enumerate(zip(prompts, max_tokens)):
            for j in range(req.n):
                seed = None if req.seed is None else (req.seed + j) % (SEED_MAX + 1)
                jobs.append(Job(
                    prompt=prompt, max_tokens=cap, temperature=temperature,
                    top_p=None if req.top_p in (None, 1.0) else req.top_p, seed=seed, stop=req.stop or [],
                    eos=frozenset() if req.ignore_eos else self.eos, stream=req.stream, loop=loop,
                    events=events, index=len(jobs), tool_stream=ToolCallStream(call_id) if tools else None,
                    logits_processor=None if compiled is None else grammar.GrammarProcessor(compiled),
                    logprobs=logprobs))
        return jobs

    async def chat_jobs(self, req: ChatCompletionRequest) -> tuple[list[list[int]], list[Job]]:
        """The request checked and tokenized, as its jobs (APIError 400 on bad input, 404 for
        another model)."""
        self._check(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs true", param="top_logprobs", code="invalid_value")
        tools = request_tools(req)
        messages = template_messages(req)
        for i, m in enumerate(messages):
            try:
                json.dumps(m, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(400, f"messages[{i}]: not valid Unicode text ({printable(e)})",
                               param=f"messages[{i}]", code="invalid_value") from e
        try:
            json.dumps(tools, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"tools: not valid Unicode text ({printable(e)})", param="tools",
                           code="invalid_value") from e
        limit = self.engine.max_cache_len
        chars = sum(len(m["content"] or "") for m in messages) + len(json.dumps(tools or []))
        if chars > CHARS_PER_TOKEN_MAX * limit:       # refused before tokenizing it
            raise APIError(400, f"messages: {chars} characters cannot fit this model's context of {limit} "
                                f"tokens", param="messages", code="context_length_exceeded")
        try:
            prompt = await run_in_threadpool(self._encode, messages, tools)
        except (ValueError, UnicodeError) as e:
            raise APIError(400, f"messages: {printable(e)}", param="messages", code="invalid_value") from e
        asked = req.max_completion_tokens or req.max_tokens
        cap = self._fit(prompt, asked, "max_completion_tokens" if req.max_completion_tokens else "max_tokens",
                        "messages")
        compiled = await run_in_threadpool(self._grammar, req, tools)     # compiled off the loop
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return [prompt], self._jobs(req, [prompt], [cap], compiled, tools is not None, logprobs)

    async def completion_jobs(self, req: "CompletionRequest") -> tuple[list[list[int]], list[Job]]:
        self._check(req)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo: echo with logprobs (the prompt's logprobs) is not supported",
                           param="echo", code="invalid_value")
        prompts = req.prompt
        if isinstance(prompts[0], str):
            limit = self.engine.max_cache_len
            for i, text in enumerate(prompts):
                if len(text) > CHARS_PER_TOKEN_MAX * limit:
                    raise APIError(400, f"prompt: {len(text)} characters cannot fit this model's context "
                                        f"of {limit} tokens", param="prompt", code="context_length_exceeded")
            try:
                prompts = await run_in_threadpool(self._encode_text, prompts)
            except (ValueError, UnicodeError) as e:
                raise APIError(400, f"prompt: {printable(e)}", param="prompt", code="invalid_value") from e
        vocab = self.engine.config.vocab_size
        for i, p in enumerate(prompts):
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt: token ids must lie in [0, {vocab}), got {bad[:5]}",
                               param="prompt", code="invalid_value")
        caps = [self._fit(p, req.max_tokens, "max_tokens", "prompt") for p in prompts]
        compiled = await run_in_threadpool(self._grammar, req, None)
        return prompts, self._jobs(req, prompts, caps, compiled, False, req.logprobs)

    async def results(self, jobs: list[Job], request: Request) -> list[dict] | JSONResponse:
        """Every job's result, in order; a client that goes away cancels them (499), an error
        of one is the response."""
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        events, out = jobs[0].events, {}
        try:
            while len(out) < len(jobs):
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    return JSONResponse({}, status_code=499)   # nobody reads it
                index, kind, value = getter.result()
                if kind == "error":
                    return value.response()
                if kind == "done":
                    out[index] = value
        finally:
            watcher.cancel()
            for job in jobs:
                job.cancel()                 # harmless once done
        return [out[i] for i in range(len(jobs))]

    async def stream(self, jobs: list[Job], req, prompts, chat: bool):
        """Server-sent events. Chat: a role chunk per choice, content or tool-call deltas, a
        final chunk per choice with finish_reason; completions: text chunks. Then a usage chunk
        if stream_options.include_usage, then [DONE]. The client going away (the generator
        closed or cancelled) cancels the jobs."""
        chunk = StreamChunks(self.model_name, self.tokens, chat)
        events, results = jobs[0].events, {}
        try:
            for job in jobs:
                if chat:
                    yield chunk(job.index, {"role": "assistant", "content": ""})
                elif req.echo:
                    yield chunk(job.index, {"content": self.tok.decode(prompts[job.index // req.n])})
            while len(results) < len(jobs):
                index, kind, value = await events.get()
                if kind == "delta":
                    delta, lps = value
                    yield chunk(index, delta, logprobs=lps)
                    continue
                if kind == "error":
                    yield f"data: {json.dumps(value.body())}\n\n"
                    break
                results[index] = value
                yield chunk(index, {}, value["finish_reason"], layerroute=value["layerroute"])
            else:
                if req.stream_options and req.stream_options.include_usage:
                    yield chunk(None, usage=usage(prompts, [results[i] for i in range(len(jobs))]))
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:
                job.cancel()               # harmless once done; ends the sequence otherwise


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: InferenceModel, model_name: str, api_key: str | None = None,
               skip_layers=None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               max_batch: int = MAX_BATCH, prefill_chunk: int = PREFILL_CHUNK, batch_q: float = 1.0,
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout_s: float = BODY_TIMEOUT_S,
               openapi: bool = False, max_n: int = MAX_N) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`. Its worker thread starts and stops with
    the app's lifespan (uvicorn runs it); `app.state.worker` is the worker. A request without
    max_tokens gets at most default_max_tokens (and what its context leaves). openapi: serve
    /openapi.json (no /docs page: it would load its scripts from a CDN). max_n: the most
    choices (n) one request may ask for."""
    worker = Worker(engine, skip_layers=skip_layers, max_batch=max_batch, prefill_chunk=prefill_chunk,
                    batch_q=batch_q)
    server = Server(engine, model_name, worker, default_max_tokens, max_n)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="layerroute_rt", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if openapi else None)
    app.state.worker = worker
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return validation_error(exc).response()

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

    async def run(req, request: Request, prompts, jobs, chat: bool):
        if not worker.alive:
            raise APIError(503, "the engine worker is not running", code="unavailable")
        for job in jobs:
            worker.submit(job)
        if req.stream:
            return StreamingResponse(server.stream(jobs, req, prompts, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        results = await server.results(jobs, request)
        if isinstance(results, JSONResponse):
            return results
        return JSONResponse(chat_completion(model_name, server.tokens, prompts, results) if chat else
                            text_completion(model_name, server.tokens, req, prompts, results))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        prompts, jobs = await server.chat_jobs(req)
        return await run(req, request, prompts, jobs, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompts, jobs = await server.completion_jobs(req)
        return await run(req, request, prompts, jobs, chat=False)

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
