"""generate(): prompts in, tokens, text and skip statistics out, on the inference engine.

Prefill runs once per batch (engine.prefill); each decode step is engine.decode_step, which on
CUDA is captured once per (batch, cache length, tau, skip set) in a CUDA graph and replayed, with
greedy argmax inside the graph. The host reads tokens back only every `sync_every` steps (every
step with stream=True) to end sequences at EOS or a stop string; a sequence that ended keeps
being fed (its results are discarded) until the whole batch ended, so that nothing in the step
depends on the host. On CPU the same steps run eagerly.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from . import gguf_file, ops
from . import prefix_cache as prefix_cache_mod
from .config import check_tau
from .engine import DecodeState, InferenceModel
from .flops import FlopsReport, flops_report
from .model import LayerRouteModel, LoRALinear
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
    step (finish reason "cancelled"; the batch stops when every sequence has ended). After the
    iteration, `.output` holds the GenerateOutput."""

    def __init__(self, steps: Iterator, cancelled: set[int], batch: int):
        self._steps = steps
        self._cancelled = cancelled
        self._batch = batch
        self.output: GenerateOutput | None = None

    def cancel(self, b: int) -> None:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < self._batch:
            raise ValueError(f"GenerationStream.cancel: sequence must be in [0, {self._batch}), got {b!r}")
        self._cancelled.add(b)

    def __iter__(self):
        output = yield from self._steps
        if output is not None:              # a second iteration finds the steps exhausted
            self.output = output


class _TextDeltas:
    """Incremental detokenization of each sequence (a window of recent tokens decoded, as vLLM
    and TGI do): a token's text is given once it decodes to whole characters."""

    def __init__(self, tok, batch: int):
        self.tok = tok
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.prefix = [0] * batch          # the window's start
        self.read = [0] * batch            # tokens whose text was given

    def push(self, b: int, token: int, final: bool) -> str:
        ids = self.ids[b]
        ids.append(token)
        before = self.tok.decode(ids[self.prefix[b]:self.read[b]], skip_special_tokens=True)
        text = self.tok.decode(ids[self.prefix[b]:], skip_special_tokens=True)
        if len(text) > len(before) and (final or not text.endswith("\ufffd")):
            self.prefix[b], self.read[b] = self.read[b], len(ids)
            return text[len(before):]
        return ""


# -- inputs ------------------------------------------------------------------------------------

def checkpoint_tokenizer(directory):
    """The tokenizer a checkpoint directory ships (transformers, local files only), or a GGUF
    file's, or None."""
    if directory is not None and gguf_file.is_gguf(directory):
        return gguf_file.tokenizer(directory)
    if directory is None or not any((Path(directory) / f).exists()
                                    for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _no_tokenizer(engine: InferenceModel) -> str:
    if engine.tokenizer_dir is None:
        return "the model was not loaded from a checkpoint directory (layerroute_rt.load)"
    return f"{engine.tokenizer_dir} has none (tokenizer.json or tokenizer_config.json)"


def load_tokenizer(engine: InferenceModel):
    """The engine's checkpoint tokenizer, loaded once and cached on the engine (or None)."""
    if not hasattr(engine, "_tokenizer"):
        engine._tokenizer = checkpoint_tokenizer(engine.tokenizer_dir)
    return engine._tokenizer


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


def _batch(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and their mask [B, T]."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = True
    return ids.to(device), mask.to(device)


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


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from logits [B, vocab]: greedy at temperature 0, else top-k / top-p."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.double()           # float64: finite for any temperature > 0 (1e-300 too)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p          # keep the smallest set reaching top_p
        drop[:, 0] = False                 # and the top token always (rounding of a tiny top_p)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# -- the decode step, eager or as a CUDA graph ---------------------------------------------------

# The ops of a decode step; a CUDA graph needs each of them to keep its count on the device
# (a Triton or compiled kernel: the torch references read the count on the host).
DECODE_OPS = ("route_kv", "qkv_rope", "decode_attention", "linear_scatter_add", "norm_gate_up",
              "norm_linear")


def graphs_possible(device: torch.device) -> bool:
    """Whether a decode step on `device` can be captured in a CUDA graph."""
    return device.type == "cuda" and all(ops.backend(op, device) != "torch" for op in DECODE_OPS)


class _Runner:
    """A cache, the decode state over it and, on CUDA, the captured step, for one batch size,
    cache length, tau and skip set. Reused across generate() calls with the same key, by one
    generation at a time (`busy`)."""

    def __init__(self, engine: InferenceModel, batch: int, cache_len: int, tau: float,
                 skip: frozenset[int], use_graph: bool, batch_q: float = 1.0):
        self.engine, self.tau, self.skip, self.batch_q = engine, tau, skip, batch_q
        self.cache = engine.new_cache(batch, cache_len)
        self.use_graph = use_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.state: DecodeState | None = None
        self.greedy_next = torch.zeros(batch, dtype=torch.long, device=engine.device)
        self.busy = False
        self.branch_mode: str | None = None    # how the graph skips a block body (engine.branch_mode)

    def start(self) -> None:
        """After prefill: point the decode state at the cache (the same buffers when a graph
        was captured on them) and capture the step if it is not yet."""
        fresh = self.engine.decode_state(self.cache)
        fresh.batch_q = self.batch_q
        if self.state is None:
            self.state = fresh
        else:
            self.state.positions.copy_(fresh.positions)
            self.state.slot.copy_(fresh.slot)
            self.state.length.copy_(fresh.length)
            self.state.executed.copy_(fresh.executed)
            self.state.pred.copy_(fresh.pred)
            if fresh.seq_rows is not None:
                for (index, count), (i2, c2) in zip(self.state.seq_rows, fresh.seq_rows):
                    index.copy_(i2)
                    count.copy_(c2)
        if self.use_graph and self.graph is None:
            self._capture()

    def _eager_step(self) -> None:
        self.engine.decode_step(self.state, self.cache, self.tau, self.skip)
        torch.argmax(self.state.logits, -1, out=self.greedy_next)
        if self.graph is None:
            self.branch_mode = self.engine.last_branch_mode

    def step(self) -> None:
        if self.graph is None:
            self._eager_step()
        else:
            self.graph.replay()

    def _capture(self) -> None:
        """Warm up once on a side stream (Triton compiles and autotunes there), undo its writes
        to the decode state and the cache, then capture one step."""
        st = self.state
        saved = (st.positions.clone(), st.slot.clone(), st.length.clone(), st.tokens.clone(),
                 st.executed.clone(), st.pred.clone(), int(st.slot[0]))
        side = torch.cuda.Stream(device=self.engine.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._eager_step()
        torch.cuda.current_stream().wait_stream(side)
        self._restore(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._eager_step()
        self.branch_mode = self.engine.last_branch_mode
        self._restore(saved)               # capture records; restoring again is harmless
        self.graph = graph                 # only once captured

    def _restore(self, saved) -> None:
        positions, slot, length, tokens, executed, pred, first_free = saved
        self.state.positions.copy_(positions)
        self.state.slot.copy_(slot)
        self.state.length.copy_(length)
        self.state.tokens.copy_(tokens)
        self.state.executed.copy_(executed)
        self.state.pred.copy_(pred)
        self.cache.valid[:, :, first_free:] = False


MAX_RUNNERS = 8          # per engine: each holds a KV cache (and on CUDA a graph and its memory pool)
RUNNER_SLOTS = 1 << 16  # and their caches hold at most this many batch x cache slots together
MIN_BUCKET = 256


def cache_bucket(need: int, limit: int) -> int:
    """The KV cache length for `need` slots: the next power of two from MIN_BUCKET, at most
    `limit` (the engine's max_cache_len), so that caches and graphs are reused across calls as
    a conversation grows."""
    size = MIN_BUCKET
    while size < need:
        size *= 2
    return min(size, limit)


def _runner(engine: InferenceModel, batch: int, cache_len: int, tau: float, skip: frozenset[int],
            batch_q: float = 1.0) -> _Runner:
    """The engine's runner for this key, most recently used last; a private one while it is busy
    (another stream of the same shape is still open)."""
    use_graph = engine.use_cuda_graphs and not engine.host_counts and graphs_possible(engine.device)
    key = (batch, cache_len, tau, skip, engine.lr_config.granularity, engine.lr_config.kv_policy, batch_q)
    runners = engine.__dict__.setdefault("_runners", {})
    runner = runners.pop(key, None)
    if runner is not None and runner.busy:
        runners[key] = runner
        return _Runner(engine, batch, cache_len, tau, skip, use_graph, batch_q)
    if runner is None:
        idle = [k for k, r in runners.items() if not r.busy]             # least recently used first
        while idle and (len(runners) >= MAX_RUNNERS or
                        sum(k[0] * k[1] for k in runners) + batch * cache_len > RUNNER_SLOTS):
            runners.pop(idle.pop(0))
        runner = _Runner(engine, batch, cache_len, tau, skip, use_graph, batch_q)
    runners[key] = runner
    return runner


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


@dataclass
class _Reuse:
    """What a batch takes from the prefix cache: per sequence an entry and how many of its tokens
    (0: none), the width C of the cached region (sequence b's prefix ends at slot C) and the new
    tokens after it."""
    entries: list
    counts: list[int]
    width: int
    new: list[list[int]]


def _plan_reuse(engine: InferenceModel, prompts: list[list[int]], key: tuple, max_new: int) -> _Reuse:
    none = _Reuse([None] * len(prompts), [0] * len(prompts), 0, prompts)
    if engine.prefix_cache is None:
        return none
    hits = [engine.prefix_cache.lookup(key, p) for p in prompts]
    counts = [n for _, n in hits]
    width = max(counts)
    new = [p[n:] for p, n in zip(prompts, counts)]
    if width + max(len(p) for p in new) + max_new > engine.max_cache_len:
        return none            # cached prefixes of unequal length would need more slots than fit
    return _Reuse([e for e, _ in hits], counts, width, new)


def generate(model, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop=None, tau: float | None = None, skip_layers=None,
             stream: bool = False, seed: int | None = None, eos_token_id="auto",
             chat_template: bool = True, sync_every: int = 8, tools=None, batch_q: float = 1.0):
    """Generate up to `max_new_tokens` per sequence with true skipping.

    model: an InferenceModel, or a LayerRouteModel, whose engine is built on the first call and
    reused (engine_for: rebuilt only when its adapter changes).
    prompts: a string, a chat (list of message dicts: system, user, assistant, with tool_calls,
    and tool), a list of either, token ids [B, T] or a list of token-id lists. Text goes through
    the checkpoint's own tokenizer and, when it has one and chat_template is True, its chat
    template (a user turn plus the generation prompt), with `tools` (OpenAI-style function
    schemas) when given. Prompts of different lengths are left-padded into one batch.
    A prompt that starts with tokens the engine's prefix cache holds (same tau and skip set)
    prefills only the rest (see layerroute_rt.prefix_cache for what that means under `sequence`
    granularity), and the sequence it ends up with (prompt and fed-back tokens) is cached.
    Sampling: greedy at temperature 0, else seeded (seed) top-k / top-p. Each sequence ends on
    its own at an EOS token (eos_token_id: "auto" reads the checkpoint's generation config;
    None: no EOS) or when its text contains one of `stop` (the tokens up to the one that
    completes it are kept). tau overrides the adapter's; skip_layers forces blocks off for
    every token. stream=True returns a GenerationStream (see its docstring). batch_q < 1 is
    the batch policy (DESIGN.md section 6): in a decode step a block is skipped for every row
    when at least that fraction of the rows would skip it (1: a block runs if any row wants it).

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
    predicate read on the host, on the CPU; None without a decode step),
    decode_blocks_no_row_ran_pct: over the decode steps, the % of (step, block) pairs that no
    row still generating ran (the blocks whose weights a batched step need not read; None
    without a decode step).
    """
    engine = model if isinstance(model, InferenceModel) else engine_for(_check_model(model))
    stop = [stop] if isinstance(stop, str) else stop
    _check_args(max_new_tokens, temperature, top_k, top_p, stop, sync_every, seed, stream)
    tau = engine.lr_config.tau if tau is None else check_tau(tau)
    skip = engine.skip_set(skip_layers)
    batch_q = check_batch_q(batch_q, engine)
    prompts = encode_prompts(prompts, engine, chat_template, tools)
    _check_prompts(prompts, engine.config.vocab_size)
    T = max(len(p) for p in prompts)
    if T + max_new_tokens > engine.max_cache_len:
        raise ValueError(f"generate: a prompt of {T} tokens + max_new_tokens {max_new_tokens} needs "
                         f"{T + max_new_tokens} cache slots; the KV cache holds at most "
                         f"{engine.max_cache_len} (InferenceModel max_cache_len, at most "
                         f"max_position_embeddings {engine.config.max_position_embeddings})")
    eos = _eos_ids(engine, eos_token_id)
    tok = load_tokenizer(engine)
    if stop and tok is None:
        raise ValueError(f"generate: stop strings need the checkpoint's tokenizer: {_no_tokenizer(engine)}")
    key = prefix_key(engine, tau, skip, batch_q)
    reuse = _plan_reuse(engine, prompts, key, max_new_tokens)
    need = reuse.width + max(len(p) for p in reuse.new) + max_new_tokens
    cache_len = cache_bucket(need, engine.max_cache_len)
    cancelled: set[int] = set()
    steps = _generate_steps(engine, (len(prompts), cache_len, tau, skip, batch_q), prompts, reuse, key,
                            max_new_tokens, temperature, top_k, top_p, seed, eos, stop, tok,
                            1 if stream else sync_every, cancelled)
    if stream:
        return GenerationStream(steps, cancelled, len(prompts))
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value


def check_batch_q(batch_q, engine: InferenceModel) -> float:
    """The batch policy checked: q in (0, 1]; q < 1 needs token granularity."""
    if isinstance(batch_q, bool) or not isinstance(batch_q, (int, float)) or not 0.0 < batch_q <= 1.0:
        raise ValueError(f"batch_q must be in (0, 1], got {batch_q!r}")
    if batch_q < 1.0 and engine.lr_config.granularity != "token":
        raise ValueError(f"batch_q < 1 needs token granularity; the adapter has {engine.lr_config.granularity!r}")
    return float(batch_q)


def prefix_key(engine: InferenceModel, tau: float, skip: frozenset[int], batch_q: float = 1.0) -> tuple:
    """What decides how a token's K/V came out, the prefix cache's key: tau, the skip set, the
    granularity, the kv policy, and the batch policy when it is not exact (q < 1: a row's
    decisions then depend on its batch)."""
    key = (tau, skip, engine.lr_config.granularity, engine.lr_config.kv_policy)
    return key if batch_q == 1.0 else key + (batch_q,)


def _check_model(model):
    if not isinstance(model, LayerRouteModel):
        raise TypeError(f"generate: model must be an InferenceModel or a LayerRouteModel, got "
                        f"{type(model).__name__}")
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_steps(engine, runner_key, prompts, reuse, key, max_new, temperature, top_k, top_p,
                    seed, eos: set[int], stop, tok, sync_every, cancelled):
    """The generation loop as a generator: yields a StreamChunk at every host check when
    streaming (sync_every 1) and returns the GenerateOutput. It takes its runner when it starts
    running (not when a stream is made) and holds it until it ends."""
    runner = _runner(engine, *runner_key)
    runner.busy = True
    try:
        return (yield from _loop(engine, runner, prompts, reuse, key, max_new, temperature, top_k,
                                 top_p, seed, eos, stop, tok, sync_every, cancelled))
    finally:
        runner.busy = False


def _restore(cache, reuse: _Reuse) -> None:
    """Sequence b's cached prefix into slots [C - n_b, C) of an empty cache (C = reuse.width)."""
    C = reuse.width
    for b, (entry, n) in enumerate(zip(reuse.entries, reuse.counts)):
        if n:
            cache.k[:, b, :, C - n:C] = entry.k[:, :, :n]
            cache.v[:, b, :, C - n:C] = entry.v[:, :, :n]
            cache.valid[:, b, C - n:C] = entry.valid[:, :n]
            cache.seen[b] = n
    cache.length = C


def _loop(engine, runner: _Runner, prompts, reuse: _Reuse, key, max_new, temperature, top_k, top_p,
          seed, eos, stop, tok, sync_every, cancelled):
    device, B = engine.device, len(prompts)
    L = engine.config.num_hidden_layers
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    ids, mask = _batch(reuse.new, device)
    cache = runner.cache
    cache.reset()
    _restore(cache, reuse)
    _sync(device)
    t0 = time.perf_counter()
    logits, exec_new = engine.prefill(ids, mask, cache, runner.tau, runner.skip)
    nxt = sample(logits, temperature, top_k, top_p, generator)
    _sync(device)
    prefill_ms = 1e3 * (time.perf_counter() - t0)
    if max_new > 1:
        runner.start()                  # on CUDA the first call for a key captures the graph here
    state = runner.state

    new = torch.empty(B, max_new, dtype=torch.long, device=device)
    exec_hist = torch.zeros(max(max_new - 1, 0), L, B, dtype=torch.bool, device=device)
    host: list[list[int]] = [[] for _ in range(B)]    # new tokens read back, up to each end
    finish: list[str | None] = [None] * B
    deltas = _TextDeltas(tok, B) if sync_every == 1 and tok is not None else None
    checked = 0                                        # new tokens read back so far
    steps = 0
    _sync(device)
    t0 = time.perf_counter()
    for step in range(max_new):
        new[:, step] = nxt
        last = step == max_new - 1
        if last or (step + 1) % sync_every == 0:
            rows = new[:, checked:step + 1].tolist()                 # the host sync
            checked = step + 1
            fresh: list[int | None] = [None] * B
            for b in range(B):
                for t in rows[b]:
                    if finish[b] is None and b in cancelled:
                        finish[b] = "cancelled"
                    if finish[b] is not None:
                        break
                    host[b].append(t)
                    fresh[b] = t
                    if t in eos or bool(stop) and _stopped(tok, host[b], stop):
                        finish[b] = "stop"
                    elif len(host[b]) == max_new:
                        finish[b] = "length"
            if sync_every == 1:
                text = None if deltas is None else \
                    ["" if t is None else deltas.push(b, t, finish[b] is not None) for b, t in enumerate(fresh)]
                paused = time.perf_counter()
                yield StreamChunk(fresh, text)
                t0 += time.perf_counter() - paused               # the consumer's time is not ours
                for b in cancelled:                              # cancelled while we waited
                    finish[b] = finish[b] or "cancelled"
            if all(f is not None for f in finish) or last:
                break
        state.tokens.copy_(nxt)
        runner.step()
        exec_hist[step].copy_(state.executed)
        steps += 1
        # greedy: read (copied into `new` and the step's input) before the next step rewrites it
        nxt = runner.greedy_next if temperature == 0.0 else \
            sample(state.logits, temperature, top_k, top_p, generator)
    _sync(device)
    decode_ms = 1e3 * (time.perf_counter() - t0) / max(steps, 1)
    out = _output(engine, prompts, reuse, host, tok, exec_new, exec_hist[:steps], prefill_ms,
                  decode_ms if steps else None, runner.graph is not None,
                  decode_router_blocks(engine, runner.tau, runner.skip),
                  runner.branch_mode if steps else None)
    out.finish_reasons = [f or "length" for f in finish]
    if engine.prefix_cache is not None:
        _store(engine, cache, key, prompts, reuse, host, out, steps)
    return out


def _store(engine, cache, key, prompts, reuse: _Reuse, host, out: GenerateOutput, steps: int) -> None:
    """Each sequence as the cache now holds it (prompt, then the new tokens a decode step fed)
    into the prefix cache."""
    C, U = reuse.width, max(len(p) for p in reuse.new)
    T = max(len(p) for p in prompts)
    for b, prompt in enumerate(prompts):
        n, u = reuse.counts[b], len(reuse.new[b])
        fed = max(min(len(host[b]) - 1, steps), 0)
        if len(prompt) + fed > engine.prefix_cache.max_tokens:
            continue                                   # the cache would not keep it: no copy
        slots = torch.cat([torch.arange(C - n, C), torch.arange(C + U - u, C + U + fed)]).to(cache.device)
        executed = torch.cat([out.executed[:, b, T - len(prompt):T], out.executed[:, b, T:T + fed]], dim=1)
        engine.prefix_cache.store(key, prefix_cache_mod.Entry(
            tokens=tuple(prompt) + tuple(host[b][:fed]),
            k=cache.k[:, b].index_select(2, slots), v=cache.v[:, b].index_select(2, slots),
            valid=cache.valid[:, b].index_select(1, slots), executed=executed.clone()))


def _stopped(tok, tokens: list[int], stop) -> bool:
    text = tok.decode(tokens, skip_special_tokens=False)
    return any(s in text for s in stop)


def decode_router_blocks(engine: InferenceModel, tau: float, skip: frozenset[int]) -> int:
    """How many blocks run their router in a decode step: none at tau 0 or under `sequence`
    granularity (decided at prefill), else every block outside skip_layers."""
    if tau == 0.0 or engine.lr_config.granularity == "sequence":
        return 0
    return engine.config.num_hidden_layers - len(skip)


def generated_flops(engine: InferenceModel, executed: torch.Tensor, valid: torch.Tensor,
                    prompt_width: int, router_blocks: int) -> FlopsReport:
    """FLOPs of the forward passes that fed generated tokens: the decode steps, columns
    prompt_width.. of a GenerateOutput's executed [L, B, T + steps] and valid [B, T + steps]
    (a sequence's tokens up to its last one, which no step fed; the first new token, made by
    prefill, is the first one fed). Prompt tokens are left out; each fed token attends to its
    whole context (prompt included)."""
    fed = valid.clone()
    fed[:, :prompt_width] = False
    return flops_report(engine.config, engine.lr_config, executed, valid.long().cumsum(1), fed,
                        router_blocks=router_blocks)


def _output(engine, prompts, reuse: _Reuse, tokens, tok, exec_new, exec_hist, prefill_ms, decode_ms,
            graph, router_blocks: int, branch_mode) -> GenerateOutput:
    """The output over the whole prompts, left-padded to their longest (T): a cached token's
    decisions are its prefix-cache entry's, the others' prefill's (exec_new [L, B, U] over the
    new tokens, left-padded to U) and the decode steps' (exec_hist [steps, L, B])."""
    B, steps = len(prompts), exec_hist.shape[0]
    L = engine.config.num_hidden_layers
    T, U = max(len(p) for p in prompts), exec_new.shape[2]
    exec_prompt = torch.zeros(L, B, T, dtype=torch.bool)
    mask = torch.zeros(B, T, dtype=torch.bool)
    exec_new = exec_new.cpu()
    for b, p in enumerate(prompts):
        n, u = reuse.counts[b], len(reuse.new[b])
        mask[b, T - len(p):] = True
        if n:
            exec_prompt[:, b, T - len(p):T - u] = reuse.entries[b].executed[:, :n]
        exec_prompt[:, b, T - u:] = exec_new[:, b, U - u:]
    # Decode step j fed new token j of each sequence; it counts for a sequence that kept that
    # token and went on (j < its length - 1).
    fed = torch.zeros(B, steps, dtype=torch.bool)
    for b, row in enumerate(tokens):
        fed[b, :max(len(row) - 1, 0)] = True
    hist = exec_hist.cpu()                                   # [steps, L, B]
    ran = (hist & fed.t()[:, None, :]).any(2)                # [steps, L]: some row that went on ran it
    live_steps = fed.any(0)
    none_ran = (~ran[live_steps]).float().mean().item() * 100.0 if bool(live_steps.any()) else None
    executed = torch.cat([exec_prompt, hist.permute(1, 2, 0)], dim=2)
    valid = torch.cat([mask, fed], dim=1)
    executed &= valid[None]
    cfg, lr = engine.config, engine.lr_config
    report = flops_report(cfg, lr, executed, valid.long().cumsum(1), valid)
    n_real = valid.sum().clamp(min=1)
    generated = generated_flops(engine, executed, valid, T, router_blocks)
    stats = {
        "prefill_ms": prefill_ms,
        "decode_ms_per_step": decode_ms,
        "decode_ms_per_token": None if decode_ms is None else decode_ms / B,
        "decode_steps": steps,
        "new_tokens": sum(len(t) for t in tokens),
        "prompt_tokens_per_seq": [len(p) for p in prompts],
        "cached_prompt_tokens": sum(reuse.counts),
        "cached_prompt_tokens_per_seq": list(reuse.counts),
        "skip_rate_per_layer": (1.0 - executed.sum((1, 2)) / n_real).tolist(),
        "block_flops_skipped_pct": report.block_skipped_pct,
        "total_flops_skipped_pct": report.total_skipped_pct,
        "generated_block_flops_skipped_pct": generated.block_skipped_pct if steps else None,
        "generated_total_flops_skipped_pct": generated.total_skipped_pct if steps else None,
        "decode_blocks_no_row_ran_pct": none_ran,
        "cuda_graph": graph,
        "skipped_block_mode": branch_mode,
    }
    text = [tok.decode(t, skip_special_tokens=True) for t in tokens] if tok is not None else None
    calls = [parse_tool_calls(t) for t in text] if text is not None else None
    return GenerateOutput(tokens, text, executed, valid, stats, calls)
