"""generate(): prompts in, tokens, text and skip statistics out, on the inference engine.

generate() is a client of the runtime's one loop, the scheduler (layerroute_rt.runtime.scheduler): its
prompts are submitted together to a scheduler of their batch size, whose first iteration
prefills them as one left-padded batch (engine.prefill); each decode step is engine.decode_step,
which on CUDA is captured once per (batch bucket, cache length, tau, skip set) in a CUDA graph
and replayed, with greedy argmax inside the graph. The host reads tokens back only every
`sync_every` steps (every step with stream=True) to end sequences at EOS or a stop string; a
sequence that ended inside those steps was fed on (its results are discarded), so that nothing
in the step depends on the host. A sequence that ended leaves the batch at the read. On CPU the
same steps run eagerly.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from . import grammar
from ..config import check_tau
from .engine import InferenceModel
from ..model.flops import flops_report
from ..model.modeling import LayerRouteModel, LoRALinear
from .sampling import TextDeltas, checkpoint_tokenizer, load_tokenizer, sample, _no_tokenizer  # noqa: F401
from .decode_runner import (DECODE_OPS, MIN_BUCKET, cache_bucket, check_batch_q, decode_router_blocks,  # noqa: F401
                            generated_flops, graphs_possible, left_pad, plan_reuse, prefix_key, restore)
from .scheduler import Request, Scheduler
from .toolcalls import parse_tool_calls


@dataclass
class GenerateOutput:
    tokens: list[list[int]]              # the new tokens of each sequence (EOS / stop included)
    text: list[str] | None               # their decoded text (None without a tokenizer)
    executed: torch.Tensor               # [L, B, T + steps] bool: who ran which block, for the
    valid: torch.Tensor                  # prompts (T, left-padded) and the tokens fed back by the
                                         # decode steps; valid [B, T + steps]: real tokens
    stats: dict = field(default_factory=dict)
    tool_calls: list[list[dict]] | None = None   # per sequence, toolcalls.parse_tool_calls(text)
    finish_reasons: list[str] = field(default_factory=list)   # "stop" (EOS or a stop string),
                                                                # "length" or "cancelled"


@dataclass
class StreamChunk:
    """One step of a stream: per sequence its new token id (None once it has ended) and the
    text that token completed ("" while it is part of a character still to come; None without
    a tokenizer). Joined, a sequence's text pieces are its GenerateOutput text."""
    tokens: list[int | None]
    text: list[str] | None


class GenerationStream:
    """Iterate to get a StreamChunk per decode step. `cancel(b)` ends sequence b at the next
    step (finish reason "cancelled"; the stream ends when every sequence has ended). After the
    iteration, `.output` holds the GenerateOutput."""

    def __init__(self, steps: Iterator, requests: list[Request]):
        self._steps = steps
        self._requests = requests
        self.output: GenerateOutput | None = None

    def cancel(self, b: int) -> None:
        n = len(self._requests)
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < n:
            raise ValueError(f"GenerationStream.cancel: sequence must be in [0, {n}), got {b!r}")
        self._requests[b].cancel()

    def __iter__(self):
        output = yield from self._steps
        if output is not None:              # a second iteration finds the steps exhausted
            self.output = output


# -- inputs ------------------------------------------------------------------------------------

def _check_tools(tools) -> None:
    if not isinstance(tools, (list, tuple)) or not tools:
        raise ValueError(f"generate: tools must be a non-empty list of tool schemas, got {tools!r}")
    for i, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"generate: tools[{i}] must be a dict with a function name ({{'type': "
                             f"'function', 'function': {{'name', 'description', 'parameters'}}}}), got {t!r}")


def encode_prompts(prompts, engine: InferenceModel, chat_template: bool = True, tools=None,
                   tok=None) -> list[list[int]]:
    """Token ids per prompt from: a string, a list of strings, a chat (a list of message dicts)
    or a list of chats, token ids [B, T] as a tensor, or a list of token-id lists. tools (a
    list of OpenAI-style function schemas) go through the chat template with every text prompt.
    tok: the tokenizer (default the engine's; a thread may pass its own copy)."""
    if tools is not None:
        _check_tools(tools)
        if not chat_template:
            raise ValueError("generate: tools go through the chat template; chat_template=False has none")
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"generate: input_ids must be an integer tensor [batch, seq_len], got "
                             f"{prompts.dtype} of shape {list(prompts.shape)}")
        if tools is not None:
            raise ValueError("generate: tools need text or chat prompts (they are rendered by the chat "
                             "template), got token ids")
        return prompts.tolist()
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("generate: prompts must be a string, a chat, token ids, or a non-empty list of them")
    if all(isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                for t in p) for p in prompts):
        if tools is not None:
            raise ValueError("generate: tools need text or chat prompts (they are rendered by the chat "
                             "template), got token ids")
        return [list(p) for p in prompts]
    tok = load_tokenizer(engine) if tok is None else tok
    out = []
    for i, p in enumerate(prompts):
        is_chat = isinstance(p, list) and all(isinstance(m, dict) for m in p) and p
        if not isinstance(p, str) and not is_chat:
            raise ValueError(f"generate: prompt {i} is a {type(p).__name__}: expected a string, a chat "
                             "(list of {'role', 'content'} dicts) or a list of token ids")
        if tok is None:
            raise ValueError(f"generate: text prompts need the checkpoint's tokenizer: "
                             f"{_no_tokenizer(engine)}; pass token ids")
        if tools is not None and not tok.chat_template:
            raise ValueError(f"generate: tools go through the chat template, and the tokenizer in "
                             f"{engine.tokenizer_dir} has none")
        if is_chat or (chat_template and tok.chat_template):
            if not tok.chat_template:
                raise ValueError(f"generate: prompt {i} is a chat, but the tokenizer in "
                                 f"{engine.tokenizer_dir} has no chat template")
            messages = p if is_chat else [{"role": "user", "content": p}]
            try:
                text = tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                               add_generation_prompt=True)
            except Exception as e:        # the template's own checks (jinja raise_exception)
                raise ValueError(f"generate: prompt {i}: the chat template of {engine.tokenizer_dir} "
                                 f"rejected it: {e}") from e
            out.append(tok.encode(text, add_special_tokens=False))
        else:
            out.append(tok.encode(p))
    return out


def _check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")


def _eos_ids(engine: InferenceModel, eos_token_id) -> set[int]:
    """eos_token_id: "auto" (the checkpoint's generation_config.json, else its tokenizer's),
    None (no EOS), an int or a list of ints."""
    if eos_token_id is None:
        return set()
    if eos_token_id != "auto":
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < engine.config.vocab_size
                   for t in ids):
            raise ValueError(f"generate: eos_token_id must be token ids in [0, {engine.config.vocab_size}), "
                             f"got {eos_token_id!r}")
        return set(ids)
    found = None
    directory = engine.tokenizer_dir
    if directory is not None and (Path(directory) / "generation_config.json").is_file():
        found = json.loads((Path(directory) / "generation_config.json").read_text()).get("eos_token_id")
    if found is None and load_tokenizer(engine) is not None:
        found = load_tokenizer(engine).eos_token_id
    return set() if found is None else set([found] if isinstance(found, int) else found)


def engine_for(model: LayerRouteModel) -> InferenceModel:
    """The model's engine, built on the first call and kept on the model; built again only when
    the adapter changed: its config, a LoRA or router tensor (replaced or updated in place: an
    optimizer step, load_adapter), an adapter switched off, or a backbone tensor replaced."""
    cached = model.__dict__.get("_layerroute_engine")
    if cached is not None and cached[1] == _fingerprint(model):
        return cached[0]
    model.__dict__.pop("_layerroute_engine", None)          # free the old engine first
    engine = InferenceModel(model)
    model.__dict__["_layerroute_engine"] = (engine, _fingerprint(model))
    return engine


def _fingerprint(model: LayerRouteModel) -> tuple:
    return (repr(model.lr_config),
            tuple((p.data_ptr(), p._version) for p in model.parameters()),
            tuple(m.adapter_enabled for m in model.modules() if isinstance(m, LoRALinear)))


# -- generate ------------------------------------------------------------------------------------

def _check_args(max_new_tokens, temperature, top_k, top_p, stop, sync_every, seed, stream):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0.0 \
            or temperature == float("inf"):
        raise ValueError(f"generate: temperature must be a finite number >= 0, got {temperature!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be an integer >= 1, got {top_k!r}")
    if stop is not None and (not isinstance(stop, (list, tuple)) or not stop
                             or not all(isinstance(s, str) and s for s in stop)):
        raise ValueError(f"generate: stop must be a non-empty string or a list of non-empty strings, got {stop!r}")
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"generate: sync_every must be an integer >= 1, got {sync_every!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"generate: seed must be None or an integer >= 0, got {seed!r}")
    if not isinstance(stream, bool):
        raise ValueError(f"generate: stream must be True or False, got {stream!r}")


def generate(model, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop=None, tau: float | None = None, skip_layers=None,
             stream: bool = False, seed: int | None = None, eos_token_id="auto",
             chat_template: bool = True, sync_every: int = 8, tools=None, batch_q: float = 1.0,
             response_format=None, tool_choice=None, parallel_tool_calls: bool = True,
             logits_processors=None):
    """Generate up to `max_new_tokens` per sequence with true skipping.

    model: an InferenceModel, or a LayerRouteModel, whose engine is built on the first call and
    reused (engine_for: rebuilt only when its adapter changes).
    prompts: a string, a chat (list of message dicts: system, user, assistant, with tool_calls,
    and tool), a list of either, token ids [B, T] or a list of token-id lists. Text goes through
    the checkpoint's own tokenizer and, when it has one and chat_template is True, its chat
    template (a user turn plus the generation prompt), with `tools` (OpenAI-style function
    schemas) when given. Prompts of different lengths are left-padded into one batch.
    A prompt that starts with tokens the engine's prefix cache holds (same tau and skip set)
    prefills only the rest (see layerroute_rt.runtime.prefix_cache for what that means under `sequence`
    granularity), and the sequence it ends up with (prompt and fed-back tokens) is cached.
    Sampling: greedy at temperature 0, else top-k / top-p, sequence b drawing from its own
    generator seeded with seed + b when seed is given (torch's default generator otherwise). Each sequence ends on
    its own at an EOS token (eos_token_id: "auto" reads the checkpoint's generation config;
    None: no EOS) or when its text contains one of `stop` (the tokens up to the one that
    completes it are kept). tau overrides the adapter's; skip_layers forces blocks off for
    every token. stream=True returns a GenerationStream (see its docstring). batch_q < 1 is
    the batch policy (docs/DESIGN.md section 6): in a decode step a block is skipped for every row
    when at least that fraction of the rows would skip it (1: a block runs if any row wants it).
    Constrained decoding (layerroute_rt.runtime.grammar, xgrammar): response_format ({"type":
    "json_object"} or {"type": "json_schema", "json_schema": {"schema": ..., "strict": ...}})
    or tool_choice with tools ("auto", "required" or a named function {"type": "function",
    "function": {"name": ...}}; parallel_tool_calls=False: one call at most) masks each
    sequence's logits with its grammar before sampling; tool_choice "none" renders no tools.
    logits_processors: one per prompt (or None for a row), each called as (tokens so far,
    logits [vocab] float32) -> logits before that row's sampling, e.g. a
    grammar.GrammarProcessor of each row's own grammar (not with response_format/tool_choice).
    A constrained batch reads its tokens on the host every step.

    Returns a GenerateOutput, with tool_calls parsed from each text (toolcalls.parse_tool_calls)
    and finish_reasons; its stats: prefill_ms, decode_ms_per_step (one token for each
    sequence of the batch), decode_ms_per_token (per step over the batch size: the same at
    batch 1), decode_steps, new_tokens, prompt_tokens_per_seq, cached_prompt_tokens (taken
    from the prefix cache, summed over the batch) and cached_prompt_tokens_per_seq,
    skip_rate_per_layer (fraction of the real tokens, prompt and fed-back, that skipped each
    block; a cached prompt token counts with the decisions it was computed with),
    block_flops_skipped_pct and total_flops_skipped_pct over those tokens (routers charged on
    every block), generated_block_flops_skipped_pct and generated_total_flops_skipped_pct over
    the generated tokens alone (see generated_flops: the decode steps, each fed token of each
    sequence once, its last token excluded since no step fed it; routers charged only where a
    decode step ran them; None when no decode step ran), cuda_graph, and
    skipped_block_mode: how the decode step skipped a block body that no row ran
    ("conditional_node": a CUDA-graph IF node; "early_exit": its kernels ran and exited at
    count 0, where IF nodes are not available or without a graph; "host_predicate": the
    predicate read on the host, on the CPU; None without a decode step), decode_path: the
    engine's decode path and the ladder it was chosen by (decode_runner.decode_path),
    decode_blocks_no_row_ran_pct: over the decode steps, the % of (step, block outside
    skip_layers) pairs that no row still generating ran (the blocks whose weights a batched step need not read; None
    without a decode step).
    """
    engine = model if isinstance(model, InferenceModel) else engine_for(_check_model(model))
    stop = [stop] if isinstance(stop, str) else stop
    _check_args(max_new_tokens, temperature, top_k, top_p, stop, sync_every, seed, stream)
    tau = engine.lr_config.tau if tau is None else check_tau(tau)
    skip = engine.skip_set(skip_layers)
    batch_q = check_batch_q(batch_q, engine)
    spec = grammar.constraint_spec(response_format, tools, tool_choice, parallel_tool_calls)
    prompts = encode_prompts(prompts, engine, chat_template, None if tool_choice == "none" else tools)
    _check_prompts(prompts, engine.config.vocab_size)
    T = max(len(p) for p in prompts)
    if T + max_new_tokens > engine.max_cache_len:
        raise ValueError(f"generate: a prompt of {T} tokens + max_new_tokens {max_new_tokens} needs "
                         f"{T + max_new_tokens} cache slots; the KV cache holds at most "
                         f"{engine.max_cache_len} (InferenceModel max_cache_len, at most "
                         f"max_position_embeddings {engine.config.max_position_embeddings})")
    eos = frozenset(_eos_ids(engine, eos_token_id))
    tok = load_tokenizer(engine)
    if stop and tok is None:
        raise ValueError(f"generate: stop strings need the checkpoint's tokenizer: {_no_tokenizer(engine)}")
    if spec is not None and not eos:
        raise ValueError("generate: response_format and tool_choice need an EOS token (eos_token_id) to end "
                         "a sequence whose grammar is complete")
    compiled = grammar.compile_constraint(engine, tok, eos, spec)
    if logits_processors is not None:
        if compiled is not None:
            raise ValueError("generate: logits_processors cannot be combined with response_format or tool_choice "
                             "(their grammar is a logits processor)")
        if not isinstance(logits_processors, (list, tuple)) or len(logits_processors) != len(prompts) or \
                not all(p is None or callable(p) for p in logits_processors):
            raise ValueError(f"generate: logits_processors must be a list of {len(prompts)} callables or None "
                             f"(one per prompt)")
    pending: list[deque] = [deque() for _ in prompts]     # tokens not yet given to the stream

    def on_token(b: int):
        def told(token: int, text: str) -> bool:
            if stream:
                pending[b].append((token, text))
            return bool(stop) and _stopped(tok, requests[b].tokens, stop)
        return told

    requests = [Request(prompt=p, max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
                        top_p=top_p, seed=None if seed is None else seed + b, eos=eos, on_token=on_token(b),
                        logits_processor=logits_processors[b] if logits_processors is not None else
                        None if compiled is None else grammar.GrammarProcessor(compiled))
                for b, p in enumerate(prompts)]
    sched = Scheduler(engine, tau=tau, skip_layers=sorted(skip), max_batch=len(prompts),
                      prefill_chunk=sum(len(p) for p in prompts), batch_q=batch_q,
                      sync_every=1 if stream else sync_every, tok=tok if stream else None)
    steps = _run(engine, sched, requests, prompts, pending, stream)
    if stream:
        return GenerationStream(steps, requests)
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value


def _check_model(model):
    if not isinstance(model, LayerRouteModel):
        raise TypeError(f"generate: model must be an InferenceModel or a LayerRouteModel, got "
                        f"{type(model).__name__}")
    return model


def _run(engine, sched: Scheduler, requests: list[Request], prompts, pending: list[deque], stream: bool):
    """The scheduler stepped until every request ended, as a generator: yields a StreamChunk
    per new token of the sequences when streaming and returns the GenerateOutput. The
    scheduler takes its runner at its first step (not when a stream is made) and gives it back
    when it ends."""
    try:
        for r in requests:
            sched.submit(r)
        while sched.has_work():
            sched.step()
            while stream and any(pending):
                told = [q.popleft() if q else None for q in pending]
                yield StreamChunk([None if t is None else t[0] for t in told],
                                  None if sched.tok is None else ["" if t is None else t[1] for t in told])
        stats = sched.stats()
    finally:
        sched.close()
    for r in requests:
        if r.error is not None:
            raise r.error
    return _output(engine, prompts, requests, stats, load_tokenizer(engine),
                   decode_router_blocks(engine, sched.tau, sched.skip))


def _stopped(tok, tokens: list[int], stop) -> bool:
    text = tok.decode(tokens, skip_special_tokens=False)
    return any(s in text for s in stop)


def _output(engine, prompts, requests: list[Request], sched_stats: dict, tok,
            router_blocks: int) -> GenerateOutput:
    """The output over the whole prompts, left-padded to their longest (T), then the decode
    steps (columns T..): sequence b's decisions (Request.executed: its prompt tokens, a cached
    one's from its prefix-cache entry, then the tokens decode fed it, its last one unfed)."""
    B, L = len(prompts), engine.config.num_hidden_layers
    T = max(len(p) for p in prompts)
    fed = [r.stats.get("decode_steps", 0) for r in requests]
    steps = max(fed)
    executed = torch.zeros(L, B, T + steps, dtype=torch.bool)
    valid = torch.zeros(B, T + steps, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, requests)):
        if r.executed is None:         # cancelled before its prefill: nothing ran, nothing counts
            continue
        executed[:, b, T - len(p):T] = r.executed[:, :len(p)]
        executed[:, b, T:T + fed[b]] = r.executed[:, len(p):]
        valid[b, T - len(p):T + fed[b]] = True
    cfg, lr = engine.config, engine.lr_config
    head = valid.clone()
    head[:, :T - 1] = False                   # logits: each prompt's last token (column T - 1), then each fed one
    report = flops_report(cfg, lr, executed, valid.long().cumsum(1), valid, head=head)
    n_real = valid.sum().clamp(min=1)
    generated = generated_flops(engine, executed, valid, T, router_blocks)
    decode_s = sched_stats["decode_s"]
    tokens = [r.tokens for r in requests]
    stats = {
        "prefill_ms": 1e3 * sched_stats["prefill_s"],
        "decode_ms_per_step": 1e3 * decode_s / steps if steps else None,
        "decode_ms_per_token": 1e3 * decode_s / steps / B if steps else None,
        "decode_steps": steps,
        "new_tokens": sum(len(t) for t in tokens),
        "prompt_tokens_per_seq": [len(p) for p in prompts],
        "cached_prompt_tokens": sum(r.stats.get("cached_prompt_tokens", 0) for r in requests),
        "cached_prompt_tokens_per_seq": [r.stats.get("cached_prompt_tokens", 0) for r in requests],
        "skip_rate_per_layer": (1.0 - executed.sum((1, 2)) / n_real).tolist(),
        "block_flops_skipped_pct": report.block_skipped_pct,
        "total_flops_skipped_pct": report.total_skipped_pct,
        "generated_block_flops_skipped_pct": generated.block_skipped_pct if steps else None,
        "generated_total_flops_skipped_pct": generated.total_skipped_pct if steps else None,
        "decode_blocks_no_row_ran_pct": sched_stats["blocks_no_row_ran_pct"] if steps else None,
        "cuda_graph": sched_stats["cuda_graph"],
        "skipped_block_mode": sched_stats["skipped_block_mode"] if steps else None,
        "decode_path": sched_stats["decode_path"],
    }
    text = [tok.decode(t, skip_special_tokens=True) for t in tokens] if tok is not None else None
    calls = [parse_tool_calls(t) for t in text] if text is not None else None
    return GenerateOutput(tokens, text, executed, valid, stats, calls, [r.finish or "length" for r in requests])
