"""The fixed-shape decode runners the scheduler (scheduler.py) runs its batch on: the padded
batch and KV cache buckets, the runner of one bucket (its running cache, decode state and, on
CUDA, the decode step captured in a CUDA graph), the engine's pool of runners, the decode path
ladder (the CUDA graph levels tried once per engine against eager decoding), and prefix reuse
(a batch's prompts restored from the engine's prefix cache)."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from .. import ops
from .engine import DecodeState, InferenceModel
from ..model.flops import FlopsReport, flops_report

MIN_BUCKET = 256         # the smallest KV cache length
MAX_RUNNERS = 8          # per engine: each holds a KV cache (and on CUDA graphs and their memory pool)
RUNNER_SLOTS = 1 << 16  # and their caches hold at most this many batch x cache slots together

# The ops of a decode step; a CUDA graph needs each of them to keep its count on the device
# (a Triton or compiled kernel: the torch references read the count on the host).
DECODE_OPS = ("route_kv", "qkv_rope", "decode_attention", "linear_scatter_add", "norm_gate_up",
              "norm_linear")


def cache_bucket(need: int, limit: int) -> int:
    """The KV cache length for `need` slots: the next power of two from MIN_BUCKET, at most
    `limit` (the engine's max_cache_len), so that caches and graphs are reused across calls as
    a conversation grows."""
    size = MIN_BUCKET
    while size < need:
        size *= 2
    return min(size, limit)


def batch_bucket(rows: int, max_batch: int) -> int:
    """The padded batch size for `rows` sequences: the next power of two, at most max_batch."""
    size = 1
    while size < rows:
        size *= 2
    return min(size, max_batch)


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


# -- prefix reuse for a batch of prompts ---------------------------------------------------------

def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and their mask [B, T]."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = True
    return ids.to(device), mask.to(device)


@dataclass
class Reuse:
    """What a batch takes from the prefix cache: per sequence an entry and how many of its tokens
    (0: none), the width C of the cached region (sequence b's prefix ends at slot C) and the new
    tokens after it."""
    entries: list
    counts: list[int]
    width: int
    new: list[list[int]]


def plan_reuse(engine: InferenceModel, prompts: list[list[int]], key: tuple, max_new: int) -> Reuse:
    none = Reuse([None] * len(prompts), [0] * len(prompts), 0, prompts)
    if engine.prefix_cache is None:
        return none
    hits = [engine.prefix_cache.lookup(key, p) for p in prompts]
    counts = [n for _, n in hits]
    width = max(counts)
    new = [p[n:] for p, n in zip(prompts, counts)]
    if width + max(len(p) for p in new) + max_new > engine.max_cache_len:
        return none            # cached prefixes of unequal length would need more slots than fit
    return Reuse([e for e, _ in hits], counts, width, new)


def restore(cache, reuse: Reuse) -> None:
    """Sequence b's cached prefix into slots [C - n_b, C) of an empty cache (C = reuse.width)."""
    C = reuse.width
    for b, (entry, n) in enumerate(zip(reuse.entries, reuse.counts)):
        if n:
            cache.k[:, b, :, C - n:C] = entry.k[:, :, :n]
            cache.v[:, b, :, C - n:C] = entry.v[:, :, :n]
            cache.valid[:, b, C - n:C] = entry.valid[:, :n]
            cache.seen[b] = n
    cache.length = C


# -- the decode step of one bucket, eager or as a CUDA graph -------------------------------------

def graphs_possible(device: torch.device) -> bool:
    """Whether a decode step on `device` can be captured in a CUDA graph."""
    return device.type == "cuda" and all(ops.backend(op, device) != "torch" for op in DECODE_OPS)


class _Runner:
    """A running cache of one bucket (rows, cache length) for one tau, skip set and batch
    policy, its decode state, and on CUDA the captured step: one graph with padding rows
    (state.active) and one without (the plain route kernel). The step computes the greedy next
    token of every row on the device (greedy_next). Held by one scheduler at a time (`busy`)."""

    def __init__(self, engine: InferenceModel, batch: int, cache_len: int, tau: float,
                 skip: frozenset[int], use_graph: bool, batch_q: float = 1.0):
        self.engine, self.tau, self.skip = engine, tau, skip
        self.cache = engine.new_cache(batch, cache_len)
        self.sequence = engine.lr_config.granularity == "sequence"
        if self.sequence:
            self.cache.decide_sequences()
        self.state: DecodeState = engine.decode_state(self.cache)
        self.state.batch_q = batch_q
        self.active = torch.zeros(batch, dtype=torch.bool, device=engine.device)
        self.greedy_next = torch.zeros(batch, dtype=torch.long, device=engine.device)
        self.use_graph = use_graph
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.capture_s = 0.0                   # spent capturing (left out of the decode time)
        self.busy = False
        self.branch_mode: str | None = None    # how the step skips a block body (engine.branch_mode)

    def reset(self, S: int) -> None:
        """An empty cache whose next slot is S, no row active."""
        cache, st = self.cache, self.state
        cache.valid.zero_()
        cache.seen.zero_()
        cache.length = S
        if self.sequence:
            cache.seq_exec.zero_()
        self.active.zero_()
        st.positions.zero_()
        st.tokens.zero_()
        st.slot.fill_(S)
        st.length.fill_(S + 1)

    def refresh_sequences(self) -> None:
        """Sequence granularity: the decode state's rows per block from the cache's decisions
        (cache.seq_exec, False for padding rows), copied into the same buffers (a graph reads
        them). A host read: called between steps when rows joined or left."""
        st = self.state
        for i, (index, count) in enumerate(st.seq_rows):
            i2, c2 = ops.compact_rows_ref(self.cache.seq_exec[i].contiguous())
            index.copy_(i2)
            count.copy_(c2)
            st.pred[i] = bool(c2[0] > 0)
        st.executed.copy_(self.cache.seq_exec)

    def step(self, padded: bool) -> None:
        st = self.state
        st.active = self.active if padded and not self.sequence else None
        if not self.use_graph:
            self._eager_step()
            return
        graph = self.graphs.get(st.active is not None)
        if graph is None:
            t0 = time.perf_counter()
            try:
                graph = self._capture()
            except Exception as e:         # run eagerly from now on: slower, never wrong
                warnings.warn(f"layerroute_rt: CUDA graph capture of the decode step failed ({e}); "
                              "decoding eagerly")
                self.use_graph = False
                self._eager_step()
                return
            finally:
                self.capture_s += time.perf_counter() - t0
        graph.replay()

    def _eager_step(self) -> None:
        self.engine.decode_step(self.state, self.cache, self.tau, self.skip)
        torch.argmax(self.state.logits, -1, out=self.greedy_next)
        self.branch_mode = self.engine.last_branch_mode

    def _capture(self, debug: bool = False) -> torch.cuda.CUDAGraph:
        """Warm up once on a side stream (Triton compiles and autotunes there), undo its writes
        to the decode state and the cache, then capture one step (debug: with the graph's debug
        mode on, for its DOT dump)."""
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
        if debug:
            graph.enable_debug_mode()
        with torch.cuda.graph(graph):
            self._eager_step()
        self._restore(saved)               # capture records; restoring again is harmless
        self.graphs[st.active is not None] = graph
        return graph

    def _restore(self, saved) -> None:
        positions, slot, length, tokens, executed, pred, first_free = saved
        st = self.state
        st.positions.copy_(positions)
        st.slot.copy_(slot)
        st.length.copy_(length)
        st.tokens.copy_(tokens)
        st.executed.copy_(executed)
        st.pred.copy_(pred)
        self.cache.valid[:, :, first_free:] = False


# -- the decode path: a ladder tried once per engine --------------------------------------------

LADDER = ("conditional_node", "early_exit", "eager")
PROBE_STEPS = 4


def decode_path(engine: InferenceModel) -> dict:
    """How this engine's decode steps run, chosen once (on the first batch) and kept on it:
    {"mode": "conditional_node" (a CUDA graph, each block body under an IF node),
    "early_exit" (a CUDA graph whose skipped bodies' kernels exit at count 0) or "eager",
    "tried": [{"mode", "ok", "reason"}]}. Each graph level is captured and checked against
    eager decoding on a short greedy decode (PROBE_STEPS tokens of a fixed prompt) before it is
    used; a level that is unavailable, fails to capture or replay, or decodes other tokens is
    passed over with one warning giving its reason. Never raises."""
    found = engine.__dict__.get("_decode_path")
    if found is not None:
        return found
    tried: list[dict] = []
    if not graphs_possible(engine.device):
        tried.append({"mode": "graph", "ok": False, "reason": f"no CUDA graphs on {engine.device} (or a "
                                                              f"decode op without a device-side count)"})
    elif not engine.use_cuda_graphs:
        tried.append({"mode": "graph", "ok": False, "reason": "use_cuda_graphs=False"})
    elif engine.host_counts:
        tried.append({"mode": "graph", "ok": False, "reason": "host_counts: the predicates are read on the host"})
    else:
        from .engine import conditional_nodes_unavailable
        for mode in LADDER[:2]:
            why = conditional_nodes_unavailable(engine.device) if mode == "conditional_node" else None
            if why is None:
                why = _probe(engine, mode)
            tried.append({"mode": mode, "ok": why is None, "reason": why})
            if why is None:
                break
            warnings.warn(f"layerroute_rt: decode path {mode!r} not used: {why}")
    mode = next((t["mode"] for t in tried if t["ok"]), "eager")
    if mode == "eager":
        tried.append({"mode": "eager", "ok": True, "reason": None})
    engine.graph_branch = mode if mode != "eager" else "conditional_node"
    found = engine.__dict__["_decode_path"] = {"mode": mode, "tried": tried}
    return found


def _probe(engine: InferenceModel, mode: str) -> str | None:
    """None if a decode captured with `mode` gives eager decoding's greedy tokens, else why not."""
    from .scheduler import Request, Scheduler
    prompt = [1 + i * 7919 % (engine.config.vocab_size - 1) for i in range(8)]

    def decode(graph: str | None) -> list[int]:
        engine.graph_branch = graph or "conditional_node"
        sched = Scheduler(engine, max_batch=1, tau=engine.lr_config.tau, _graph=graph is not None)
        req = Request(prompt=prompt, max_new_tokens=PROBE_STEPS)
        sched.submit(req)
        try:
            while sched.has_work():
                sched.step()
        finally:
            sched.close()
        if req.error is not None:
            raise req.error
        return req.tokens

    cache, engine.prefix_cache = engine.prefix_cache, None      # the probe leaves nothing cached
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")                       # a capture that falls back fails
            expected = decode(None)
            got = decode(mode)
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        engine.prefix_cache = cache
        engine.__dict__.get("_runners", {}).clear()
    if got != expected:
        return f"greedy tokens {got} differ from eager decoding's {expected}"
    return None


def runner(engine: InferenceModel, batch: int, cache_len: int, tau: float, skip: frozenset[int],
           batch_q: float = 1.0, use_graph: bool | None = None) -> _Runner:
    """The engine's idle runner for this key (most recently used last), marked busy; a private
    one while that one is busy (another scheduler holds a batch of the same shape). use_graph
    (None: the engine's decode_path) captures the step in a CUDA graph."""
    if use_graph is None:
        use_graph = decode_path(engine)["mode"] != "eager"
    key = (batch, cache_len, tau, skip, engine.lr_config.granularity, engine.lr_config.kv_policy, batch_q,
           use_graph)
    runners = engine.__dict__.setdefault("_runners", {})
    found = runners.pop(key, None)
    if found is not None and found.busy:
        runners[key] = found
        found = None
        private = True
    else:
        private = False
    if found is None:
        idle = [k for k, r in runners.items() if not r.busy]             # least recently used first
        while idle and (len(runners) >= MAX_RUNNERS or
                        sum(k[0] * k[1] for k in runners) + batch * cache_len > RUNNER_SLOTS):
            runners.pop(idle.pop(0))
        found = _Runner(engine, batch, cache_len, tau, skip, use_graph, batch_q)
    if not private:
        runners[key] = found
    found.busy = True
    return found


__all__ = ["MIN_BUCKET", "cache_bucket", "batch_bucket"]
