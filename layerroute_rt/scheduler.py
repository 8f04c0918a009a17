"""Iteration-level scheduling (DESIGN.md section 6): many requests, one running batch.

At every iteration (`step`):
  1. waiting requests are prefilled, from the engine's prefix cache where it holds a prefix of
     the prompt, into a one-sequence staging cache, at most `prefill_chunk` prompt tokens per
     iteration over all of them (a long prompt takes several iterations, so the running streams
     keep their pace); a prompt fully prefilled samples its first token and joins the running
     batch in a free row;
  2. one decode step runs the batch (engine.decode_step) at a padded batch bucket (1, 2, 4, 8,
     ...): padding rows run nothing and write nowhere (DecodeState.active);
  3. each row's next token is sampled with that request's own parameters (its own generator
     when seeded, its logits processor first: a per-row mask fits there), and a sequence that
     ends (EOS, max_new_tokens, its owner's stop, a cancel) leaves its row at once.

The running cache has one slot column shared by its rows (decode writes every row's token at
state.slot): row b holds its tokens in slots [S - n_b, S), padding to the left invalid. A
joining sequence needs S >= n (its length) and room for every row's remaining tokens; when
either fails the batch is laid out again (rows packed, slots shifted, the cache and bucket
regrown or shrunk), a copy of the cache made off the decode step.

Skip under batching: a block's weights are read when one row of the step runs it. Each step
records how many blocks no active row ran; `stats()` reports their fraction next to the FLOPs
skipped. batch_q < 1 is the batch policy (engine.DecodeState.batch_q).

Only token granularity is scheduled (sequence granularity decides per prompt at prefill).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import prefix_cache as prefix_cache_mod
from .config import check_tau
from .engine import InferenceModel
from .flops import FlopsReport, flops_report
from .generate import MIN_BUCKET, _TextDeltas, cache_bucket, decode_router_blocks, generated_flops, \
    load_tokenizer, prefix_key, sample

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class Request:
    """One sequence to generate. on_token(token, text) is called on the scheduler's thread for
    each new token (text: what it completed, as generate's stream gives it); returning True ends
    the sequence (finish "stop": its owner's stop string). on_done(request) is called once, when
    it has ended; `error` is then set if generation failed. `cancel()` may be called from any
    thread. logits_processor(tokens so far, logits [vocab] float32) -> logits runs before this
    row's sampling."""
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos: frozenset[int] = frozenset()
    on_token: Callable[[int, str], bool] | None = None
    on_done: Callable[["Request"], None] | None = None
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None
    # results
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None            # "stop", "length" or "cancelled"
    error: Exception | None = None
    stats: dict = field(default_factory=dict)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class _Seq:
    """A request as the scheduler runs it: its staging cache while it prefills, then its row."""

    def __init__(self, req: Request, device, tok):
        self.req = req
        self.generator = torch.Generator(device=device).manual_seed(req.seed) \
            if req.seed is not None and req.temperature > 0 else None
        self.deltas = _TextDeltas(tok, 1) if tok is not None else None
        self.staging = None
        self.todo: list[int] = []           # prompt tokens still to prefill
        self.cached_prompt = 0              # taken from the prefix cache
        self.exec_cols: list[torch.Tensor] = []   # [L, n] decisions of its tokens, in order
        self.logits: torch.Tensor | None = None
        self.row = -1
        self.length = 0                     # its tokens in the running cache
        self.steps = 0                      # decode steps it was fed in
        self.none_ran = 0                   # over those steps: blocks no row of the batch ran
        self.batch_rows = 0                 # and the active rows summed
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None


class Scheduler:
    """The runtime's continuous-batching loop over one engine (see the module docstring).

    tau (default the adapter's), skip_layers: as generate(). max_batch: rows of the running
    batch. prefill_chunk: prompt tokens prefilled per iteration, over all waiting requests.
    batch_q: the batch policy (1: a block runs if any row wants it). Not thread-safe except
    submit() and Request.cancel(): one thread calls step() (or run())."""

    def __init__(self, engine: InferenceModel, tau: float | None = None, skip_layers=None,
                 max_batch: int = 32, prefill_chunk: int = 256, batch_q: float = 1.0):
        if engine.lr_config.granularity != "token":
            raise ValueError("Scheduler: continuous batching needs token granularity; the adapter has "
                             f"{engine.lr_config.granularity!r} (use generate())")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= BATCH_BUCKETS[-1]:
            raise ValueError(f"Scheduler: max_batch must be an integer in [1, {BATCH_BUCKETS[-1]}], got {max_batch!r}")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"Scheduler: prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        if not isinstance(batch_q, (int, float)) or not 0.0 < batch_q <= 1.0:
            raise ValueError(f"Scheduler: batch_q must be in (0, 1], got {batch_q!r}")
        self.engine = engine
        self.tau = engine.lr_config.tau if tau is None else check_tau(tau)
        self.skip = engine.skip_set(skip_layers)
        self.max_batch, self.prefill_chunk, self.batch_q = max_batch, prefill_chunk, float(batch_q)
        self.key = prefix_key(engine, self.tau, self.skip, self.batch_q)
        self.tok = load_tokenizer(engine)
        self.router_blocks = decode_router_blocks(engine, self.tau, self.skip)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Seq] = deque()
        self._prefilling: list[_Seq] = []
        self._ready: _Seq | None = None     # prefilled, waiting for room in the batch
        self.rows: list[_Seq | None] = []
        self.cache = None
        self.state = None
        self.S = 0                          # the running cache's next slot (host copy)
        self._general = torch.Generator(device=engine.device).manual_seed(0)
        self._counters = dict(steps=0, row_steps=0, block_steps=0, none_ran=0, finished=0,
                              prefill_tokens=0, relayouts=0)
        self._flops = [0.0] * 4             # generated tokens: block, block run, total, total run

    # -- the outside --------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        seq = _Seq(req, self.engine.device, self.tok)
        with self._wake:
            self._waiting.append(seq)
            self._wake.notify()

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._prefilling) + (self._ready is not None)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        with self._wake:
            if not self.has_work():
                self._wake.wait(timeout)
        return self.has_work()

    def notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def stats(self) -> dict:
        c = self._counters
        report = FlopsReport(*self._flops)
        return {**c, "mean_batch_rows": c["row_steps"] / c["steps"] if c["steps"] else None,
                "blocks_no_row_ran_pct": 100.0 * c["none_ran"] / c["block_steps"] if c["block_steps"] else None,
                "generated_total_flops_skipped_pct": report.total_skipped_pct if report.total_flops else None,
                "generated_block_flops_skipped_pct": report.block_skipped_pct if report.block_flops else None,
                "generated_flops": dict(zip(("block", "block_run", "total", "total_run"), self._flops)),
                "batch_q": self.batch_q, "tau": self.tau, "capacity": len(self.rows),
                "running": self.running, "waiting": self.waiting}

    # -- one iteration ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Admit and prefill (bounded), then one decode step of the running batch. A failure
        ends every sequence it touched with `error` set, and the scheduler goes on."""
        try:
            self._prefill()
        except Exception as e:             # the sequences being prefilled fail; the batch goes on
            for seq in self._prefilling + ([self._ready] if self._ready else []):
                self._end(seq, None, error=e)
            self._prefilling, self._ready = [], None
        if self.running:
            try:
                self._decode()
            except Exception as e:
                for seq in [s for s in self.rows if s is not None]:
                    self._end(seq, None, error=e)
                self.rows, self.cache, self.state, self.S = [], None, None, 0

    def run(self, stop: threading.Event) -> None:
        """Step until `stop` is set, sleeping while there is nothing to do."""
        while not stop.is_set():
            if self.wait_for_work(timeout=0.1):
                self.step()

    # -- prefill and joining ------------------------------------------------------------------

    def _prefill(self) -> None:
        """Start waiting requests while rows are left for them, prefill them in arrival order
        within the iteration's token budget, and join each one prefilled into the batch."""
        if self._ready is not None and not self._join():
            return                         # the batch has no room yet: nothing jumps the queue
        while len(self._prefilling) + self.running < self.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
            if seq.req.cancelled:
                self._end(seq, "cancelled")
                continue
            self._start(seq)
            self._prefilling.append(seq)
        budget = self.prefill_chunk
        for seq in list(self._prefilling):
            if seq.req.cancelled:
                self._prefilling.remove(seq)
                self._end(seq, "cancelled")
                continue
            if budget <= 0:
                break
            chunk, seq.todo = seq.todo[:budget], seq.todo[budget:]
            budget -= len(chunk)
            ids = torch.tensor([chunk], dtype=torch.long, device=self.engine.device)
            logits, executed = self.engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), seq.staging,
                                                   self.tau, self.skip)
            self._counters["prefill_tokens"] += len(chunk)
            seq.exec_cols.append(executed[:, 0].cpu())
            if seq.todo:
                continue
            ends = self._emit(seq, self._sample([seq], logits)[0])    # a failure: still listed
            self._prefilling.remove(seq)
            if ends:
                self._end(seq, seq.req.finish)
                continue
            self._ready = seq
            if not self._join():
                return

    def _start(self, seq: _Seq) -> None:
        """A staging cache for the sequence, its prefix restored from the prefix cache."""
        engine, prompt = self.engine, seq.req.prompt
        entry, n = (None, 0) if engine.prefix_cache is None else engine.prefix_cache.lookup(self.key, prompt)
        seq.staging = engine.new_cache(1, cache_bucket(len(prompt), engine.max_cache_len))
        if n:
            seq.staging.k[:, 0, :, :n] = entry.k[:, :, :n]
            seq.staging.v[:, 0, :, :n] = entry.v[:, :, :n]
            seq.staging.valid[:, 0, :n] = entry.valid[:, :n]
            seq.staging.seen[0] = n
            seq.staging.length = n
            seq.exec_cols.append(entry.executed[:, :n].cpu())
        seq.cached_prompt = n
        seq.todo = list(prompt[n:])

    def _join(self) -> bool:
        """The ready sequence into a free row, the batch laid out again when it needs a row or
        slots; False when it cannot fit until rows leave."""
        seq = self._ready
        n = seq.staging.length
        live = [s for s in self.rows if s is not None]
        remaining = max(s.req.max_new_tokens - len(s.req.tokens) for s in live + [seq])
        free = [b for b, s in enumerate(self.rows) if s is None]
        cache_len = 0 if self.cache is None else self.cache.max_len
        if not free or self.S < n or self.S + remaining > cache_len:
            S = max([n] + [s.length for s in live])
            need = S + remaining
            if need > self.engine.max_cache_len:
                if not live:               # a request longer than the context was let in
                    raise ValueError(f"scheduler: {n} prompt tokens and {remaining} more need {need} "
                                     f"cache slots; the engine holds {self.engine.max_cache_len}")
                return False
            rows = min(next(b for b in BATCH_BUCKETS if b >= len(live) + 1), self.max_batch)
            if free:
                rows = max(rows, len(self.rows))
            self._relayout(rows, max(cache_bucket(need, self.engine.max_cache_len), min(cache_len, self.engine.max_cache_len)), S)
            free = [b for b, s in enumerate(self.rows) if s is None]
        b, S, cache, st = free[0], self.S, self.cache, self.state
        cache.valid[:, b] = False
        cache.k[:, b, :, S - n:S] = seq.staging.k[:, 0, :, :n]
        cache.v[:, b, :, S - n:S] = seq.staging.v[:, 0, :, :n]
        cache.valid[:, b, S - n:S] = seq.staging.valid[:, 0, :n]
        st.positions[b] = seq.staging.seen[0]
        st.tokens[b] = seq.req.tokens[-1]
        st.active[b] = True
        seq.row, seq.length, seq.staging = b, n, None
        self.rows[b] = seq
        self._ready = None
        return True

    def _relayout(self, capacity: int, cache_len: int, S: int) -> None:
        """A new running cache of `capacity` rows and `cache_len` slots whose next slot is S:
        the live rows packed first, each one's slots moved to end at S."""
        engine = self.engine
        cache = engine.new_cache(capacity, cache_len)
        state = engine.decode_state(cache)
        state.active = torch.zeros(capacity, dtype=torch.bool, device=engine.device)
        state.batch_q = self.batch_q
        rows: list[_Seq | None] = [None] * capacity
        for nb, seq in enumerate(s for s in self.rows if s is not None):
            b, n = seq.row, seq.length
            cache.k[:, nb, :, S - n:S] = self.cache.k[:, b, :, self.S - n:self.S]
            cache.v[:, nb, :, S - n:S] = self.cache.v[:, b, :, self.S - n:self.S]
            cache.valid[:, nb, S - n:S] = self.cache.valid[:, b, self.S - n:self.S]
            state.positions[nb] = self.state.positions[b]
            state.tokens[nb] = self.state.tokens[b]
            state.active[nb] = True
            seq.row = nb
            rows[nb] = seq
        cache.length = S
        state.slot.fill_(S)
        state.length.fill_(S + 1)
        self.cache, self.state, self.rows, self.S = cache, state, rows, S
        self._counters["relayouts"] += 1

    # -- decoding -----------------------------------------------------------------------------

    def _decode(self) -> None:
        if self.S >= self.cache.max_len:   # no slot left: pack the rows (never for a fitting batch)
            live = [s for s in self.rows if s is not None]
            self._relayout(len(self.rows), self.cache.max_len, max(s.length for s in live))
        st = self.state
        active = st.active
        if self.running == len(self.rows):      # no padding row: the plain step (route kernel)
            st.active = None
        try:
            self.engine.decode_step(st, self.cache, self.tau, self.skip)
        finally:
            st.active = active
        self.S += 1
        live = [s for s in self.rows if s is not None]
        executed = st.executed.cpu()
        active = active.cpu()
        blocks = [i for i in range(executed.shape[0]) if i not in self.skip]
        none_ran = int((~(executed[blocks] & active[None]).any(1)).sum())
        c = self._counters
        c["steps"] += 1
        c["row_steps"] += len(live)
        c["block_steps"] += len(blocks)
        c["none_ran"] += none_ran
        tokens = self._sample(live, st.logits[[s.row for s in live]])
        for seq, token in zip(live, tokens):
            seq.exec_cols.append(executed[:, seq.row:seq.row + 1])
            seq.length += 1
            seq.steps += 1
            seq.none_ran += none_ran
            seq.batch_rows += len(live)
            if self._emit(seq, token):
                self._leave(seq)
        going = [(s.row, s.req.tokens[-1]) for s in live if s.row >= 0 and self.rows[s.row] is s]
        if going:
            rows, toks = zip(*going)
            st.tokens[list(rows)] = torch.tensor(toks, device=st.tokens.device)
        if self.running and self.running <= len(self.rows) // 4:      # a bucket a quarter the size holds them
            self._relayout(next(b for b in BATCH_BUCKETS if b >= self.running), self.cache.max_len,
                           max(s.length for s in self.rows if s is not None))

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> list[int]:
        """Each sequence's next token from its row of logits [n, vocab], with its own parameters."""
        if not seqs:
            return []
        out = logits.argmax(-1)
        for i, seq in enumerate(seqs):
            r = seq.req
            row = logits[i]
            if r.logits_processor is not None:
                row = r.logits_processor(list(r.tokens), row.clone())
                if r.temperature == 0.0:
                    out[i] = row.argmax()
            if r.temperature > 0.0:
                out[i] = sample(row[None], r.temperature, r.top_k, r.top_p, seq.generator or self._general)[0]
        return out.tolist()

    def _emit(self, seq: _Seq, token: int) -> bool:
        """The sequence's new token: its owner told, its end conditions checked. True if it ends."""
        r = seq.req
        r.tokens.append(token)
        if seq.t_first is None:
            seq.t_first = time.perf_counter()
        final = token in r.eos or len(r.tokens) >= r.max_new_tokens or r.cancelled
        text = seq.deltas.push(0, token, final) if seq.deltas is not None else ""
        stop = bool(r.on_token(token, text)) if r.on_token is not None else False
        if r.cancelled:
            r.finish = "cancelled"
        elif token in r.eos or stop:
            r.finish = "stop"
        elif len(r.tokens) >= r.max_new_tokens:
            r.finish = "length"
        return r.finish is not None

    def _leave(self, seq: _Seq) -> None:
        self.rows[seq.row] = None
        self.state.active[seq.row] = False
        self._store(seq)
        self._end(seq, seq.req.finish)

    def _store(self, seq: _Seq) -> None:
        """The sequence's K/V (prompt and the tokens decode fed) into the engine's prefix cache."""
        pc, r = self.engine.prefix_cache, seq.req
        if pc is None or seq.length > pc.max_tokens:
            return
        b, S, n = seq.row, self.S, seq.length
        fed = r.tokens[:n - len(r.prompt)]
        pc.store(self.key, prefix_cache_mod.Entry(
            tokens=tuple(r.prompt) + tuple(fed), k=self.cache.k[:, b, :, S - n:S].clone(),
            v=self.cache.v[:, b, :, S - n:S].clone(), valid=self.cache.valid[:, b, S - n:S].clone(),
            executed=torch.cat(seq.exec_cols, dim=1)))

    def _end(self, seq: _Seq, finish: str | None, error: Exception | None = None) -> None:
        r = seq.req
        r.finish = r.finish or finish or ("error" if error else None)
        r.error = error
        if error is None and seq.exec_cols:
            r.stats = self._seq_stats(seq)
        self._counters["finished"] += 1
        if r.on_done is not None:
            r.on_done(r)

    def _seq_stats(self, seq: _Seq) -> dict:
        """Skip statistics of one finished sequence, as generate() gives them for one row."""
        engine, r = self.engine, seq.req
        executed = torch.cat(seq.exec_cols, dim=1)[:, None]           # [L, 1, prompt + steps]
        n_prompt = len(r.prompt)
        valid = torch.ones(1, executed.shape[2], dtype=torch.bool)
        report = flops_report(engine.config, engine.lr_config, executed, valid.long().cumsum(1), valid)
        generated = generated_flops(engine, executed, valid, n_prompt, self.router_blocks) if seq.steps else None
        if generated is not None:
            for i, v in enumerate((generated.block_flops, generated.block_flops_run, generated.total_flops,
                                   generated.total_flops_run)):
                self._flops[i] += v
        n_blocks = engine.config.num_hidden_layers - len(self.skip)
        return {
            "skip_rate_per_layer": (1.0 - executed.sum((1, 2)) / executed.shape[2]).tolist(),
            "block_flops_skipped_pct": report.block_skipped_pct,
            "total_flops_skipped_pct": report.total_skipped_pct,
            "generated_block_flops_skipped_pct": generated.block_skipped_pct if generated else None,
            "generated_total_flops_skipped_pct": generated.total_skipped_pct if generated else None,
            "cached_prompt_tokens": seq.cached_prompt,
            "decode_steps": seq.steps,
            "mean_batch_rows": seq.batch_rows / seq.steps if seq.steps else None,
            "batch_blocks_no_row_ran_pct": 100.0 * seq.none_ran / (seq.steps * n_blocks)
            if seq.steps and n_blocks else None,
            "ttft_s": None if seq.t_first is None else seq.t_first - seq.t_submit,
            "tau": self.tau, "batch_q": self.batch_q,
        }


__all__ = ["Request", "Scheduler", "BATCH_BUCKETS", "MIN_BUCKET"]
