"""The runtime's one decode loop: iteration-level scheduling of many requests over one running
batch (docs: docs/DESIGN.md section 6). generate() and the server are both its clients.

At every iteration (`step`):
  1. waiting requests are prefilled, from the engine's prefix cache where it holds a prefix of
     the prompt, into a staging cache, at most `prefill_chunk` prompt tokens per iteration over
     all of them: the newcomers whose prompts fit the budget are prefilled together as one
     left-padded batch, a longer prompt alone over several iterations (the running streams keep
     their pace); a prompt fully prefilled samples its first token and joins the running batch
     in a free row;
  2. decode steps run the batch at a padded batch bucket (1, 2, 4, 8, ...): padding rows run
     nothing and write nowhere (DecodeState.active; under `sequence` granularity they hold no
     decision). On CUDA each (bucket, cache length) has its runner, whose step is captured
     once in a CUDA graph and replayed (graphs possible: every decode op keeps its counts on
     the device);
  3. each row's next token is chosen with that request's own parameters (its own generator
     when seeded, its logits processor first: a per-row mask fits there), and a sequence that
     ends (EOS, max_new_tokens, its owner's stop, a cancel) leaves its row.

The host reads the tokens back after every decode step, or, with sync_every k > 1 and no row
that needs the host between steps (a logits processor), after up to k steps chosen on the
device (generate()'s default: no host synchronisation inside the k steps). A row that ended
inside them was fed up to k - 1 more steps; their tokens are dropped and it leaves at the read.

The running cache has one slot column shared by its rows (decode writes every row's token at
state.slot): row b holds its tokens in slots [S - n_b, S), padding to the left invalid. A
joining sequence needs S >= n (its length) and room for every row's remaining tokens; when
either fails the batch is laid out again (rows packed, slots shifted, the cache and bucket
regrown or shrunk) into another runner's cache, off the decode step.

Skip under batching: a block's weights are read when one row of the step runs it. Each step
records how many blocks no active row ran; `stats()` reports their fraction next to the FLOPs
skipped. batch_q < 1 is the batch policy (engine.DecodeState.batch_q).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from types import SimpleNamespace

import torch

from . import grammar
from . import prefix_cache as prefix_cache_mod
from ..config import check_tau
from .decode_runner import (Reuse, _Runner, batch_bucket, cache_bucket, check_batch_q, decode_router_blocks,
                            generated_flops, left_pad, plan_reuse, prefix_key, restore, runner)
from .engine import InferenceModel
from .request import Request, _Seq
from ..model.flops import FlopsReport, flops_report
from .sampling import load_tokenizer, sample


class Scheduler:
    """The runtime's continuous-batching loop over one engine (see the module docstring).

    tau (default the adapter's), skip_layers: as generate(). max_batch: rows of the running
    batch. prefill_chunk: prompt tokens prefilled per iteration, over all waiting requests.
    batch_q: the batch policy (1: a block runs if any row wants it). sync_every: decode steps
    between host reads when no row needs the host (1: every step). tok: the tokenizer for the
    streamed text ("auto": the engine's). Not thread-safe except submit() and
    Request.cancel(): one thread calls step() (or run()). close() gives the runner back."""

    def __init__(self, engine: InferenceModel, tau: float | None = None, skip_layers=None,
                 max_batch: int = 32, prefill_chunk: int = 256, batch_q: float = 1.0,
                 sync_every: int = 1, tok="auto", _graph: bool | None = None):
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk), ("sync_every", sync_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Scheduler: {name} must be an integer >= 1, got {value!r}")
        self.engine = engine
        self.tau = engine.lr_config.tau if tau is None else check_tau(tau)
        self.skip = engine.skip_set(skip_layers)
        self.batch_q = check_batch_q(batch_q, engine)
        self.max_batch, self.prefill_chunk, self.sync_every = max_batch, prefill_chunk, sync_every
        self.key = prefix_key(engine, self.tau, self.skip, self.batch_q)
        self._graph = _graph                # None: the engine's decode path (decode_path)
        self.tok = load_tokenizer(engine) if tok == "auto" else tok
        self.router_blocks = decode_router_blocks(engine, self.tau, self.skip)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Seq] = deque()
        self._prefilling: list[_Seq] = []
        self._ready: list[_Seq] = []        # prefilled, waiting for room in the batch
        self.rows: list[_Seq | None] = []
        self.runner: _Runner | None = None
        self.S = 0                          # the running cache's next slot (host copy)
        self._sequences_changed = False
        self._counters = dict(steps=0, row_steps=0, block_steps=0, none_ran=0, finished=0,
                              prefill_tokens=0, relayouts=0, host_reads=0)
        self._time = dict(prefill_s=0.0, decode_s=0.0, capture_s=0.0)
        self._flops = [0.0] * 4             # generated tokens: block, block run, total, total run
        self._masks: grammar.BatchMask | None = None   # the constrained rows' bitmasks (made on first use)

    # -- the outside --------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        seq = _Seq(req, self.engine.device, self.tok)
        with self._wake:
            self._waiting.append(seq)
            self._wake.notify()

    @property
    def cache(self):
        return None if self.runner is None else self.runner.cache

    @property
    def state(self):
        return None if self.runner is None else self.runner.state

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + self._admitted()

    def _admitted(self) -> int:
        """Sequences started and not yet in the batch (followers of a prefill included)."""
        return sum(1 + len(s.followers) for s in self._prefilling) + len(self._ready)

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

    def close(self) -> None:
        """Give the runner back to the engine's pool (the scheduler may start another later)."""
        if self.runner is not None:
            self.runner.busy = False
        self.rows, self.runner, self.S = [], None, 0

    def stats(self) -> dict:
        c = self._counters
        report = FlopsReport(*self._flops)
        return {**c, **self._time, "mean_batch_rows": c["row_steps"] / c["steps"] if c["steps"] else None,
                "blocks_no_row_ran_pct": 100.0 * c["none_ran"] / c["block_steps"] if c["block_steps"] else None,
                "generated_total_flops_skipped_pct": report.total_skipped_pct if report.total_flops else None,
                "generated_block_flops_skipped_pct": report.block_skipped_pct if report.block_flops else None,
                "generated_flops": dict(zip(("block", "block_run", "total", "total_run"), self._flops)),
                "batch_q": self.batch_q, "tau": self.tau, "capacity": len(self.rows),
                "running": self.running, "waiting": self.waiting,
                "cuda_graph": bool(self.runner is not None and self.runner.graphs),
                "skipped_block_mode": None if self.runner is None else self.runner.branch_mode,
                "decode_path": self.engine.__dict__.get("_decode_path")}

    # -- one iteration ------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Admit and prefill (bounded), then the decode steps of the running batch. A failure
        ends every sequence it touched with `error` set, and the scheduler goes on."""
        t0 = time.perf_counter()
        try:
            self._prefill()
        except Exception as e:             # the sequences being prefilled fail; the batch goes on
            for seq in [f for s in self._prefilling for f in [s, *s.followers]] + self._ready:
                self._end(seq, None, error=e)
            self._prefilling, self._ready = [], []
        t1 = time.perf_counter()
        self._time["prefill_s"] += t1 - t0
        if self.running:
            captured = self.runner.capture_s
            try:
                self._decode()
            except Exception as e:
                for seq in [s for s in self.rows if s is not None]:
                    self._end(seq, None, error=e)
                self.close()
            capture = 0.0 if self.runner is None else self.runner.capture_s - captured
            self._time["decode_s"] += time.perf_counter() - t1 - capture
            self._time["capture_s"] += capture

    def run(self, stop: threading.Event) -> None:
        """Step until `stop` is set, sleeping while there is nothing to do."""
        while not stop.is_set():
            if self.wait_for_work(timeout=0.1):
                self.step()

    # -- prefill and joining ------------------------------------------------------------------

    def _prefill(self) -> None:
        """Start waiting requests while rows are left for them, prefill them in arrival order
        within the iteration's token budget, and join each one prefilled into the batch. A
        request whose prompt equals one being prefilled follows it: the prompt is prefilled
        once, and each samples its own first token from the same logits (n > 1 choices)."""
        if self._ready and not self._join_ready():
            return                         # the batch has no room yet: nothing jumps the queue
        while self._admitted() + self.running < self.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
            if seq.req.cancelled:
                self._end(seq, "cancelled")
                continue
            leader = next((s for s in self._prefilling if s.req.prompt == seq.req.prompt), None)
            if leader is not None:
                leader.followers.append(seq)
            else:
                self._prefilling.append(seq)
        for seq in list(self._prefilling):
            for f in [f for f in seq.followers if f.req.cancelled]:
                seq.followers.remove(f)
                self._end(f, "cancelled")
            if seq.req.cancelled:          # its first follower takes its place and its state
                if seq.followers:
                    heir, heir.followers = seq.followers[0], seq.followers[1:]
                    heir.follow(seq)
                    self._prefilling[self._prefilling.index(seq)] = heir
                else:
                    self._prefilling.remove(seq)
                seq.followers = []
                self._end(seq, "cancelled")
        budget = self.prefill_chunk
        done: list[tuple[_Seq, torch.Tensor]] = []
        group: list[_Seq] = []
        chunkable = self.engine.lr_config.granularity == "token"   # sequence: decided on the whole prompt
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            if seq.staging is not None:    # a long prompt under way: its next chunk
                budget -= self._chunk(seq, budget, done)
                continue
            todo = self._todo(seq)
            if todo <= budget or not (group or chunkable):   # whole, with the others that fit
                group.append(seq)
                budget -= todo
                continue
            if not group:                  # starts alone, in chunks
                self._start([seq])
                budget -= self._chunk(seq, budget, done)
            break
        if group:
            self._prefill_group(group, done)
        for seq, logits in list(done):
            self._prefilling.remove(seq)
            for f in seq.followers:
                f.follow(seq)
                f.shared_prefill = True
                done.append((f, logits))
            seq.followers = []
        if done:
            try:
                tokens = self._sample([s for s, _ in done], torch.stack([lg for _, lg in done]))
            except Exception as e:        # they have left _prefilling: each ends here, told
                for seq, _ in done:
                    self._end(seq, None, error=e)
                done, tokens = [], []
            for (seq, _), token in zip(done, tokens):
                if seq.failure is not None:
                    self._end(seq, None, error=seq.failure)
                elif seq.req.cancelled:
                    self._end(seq, "cancelled")
                elif self._emit(seq, token):
                    j, slots = seq.srow, seq.slots
                    self._store(seq, seq.staging.k[:, j].index_select(2, slots),
                                seq.staging.v[:, j].index_select(2, slots),
                                seq.staging.valid[:, j].index_select(1, slots))
                    self._end(seq, seq.req.finish)
                else:
                    self._ready.append(seq)
        if self._ready:
            self._join_ready()

    def _todo(self, seq: _Seq) -> int:
        """Prompt tokens it would prefill (after its cached prefix, looked up now)."""
        pc = self.engine.prefix_cache
        n = 0 if pc is None else pc.lookup(self.key, seq.req.prompt)[1]
        return len(seq.req.prompt) - n

    def _start(self, seqs: list[_Seq]) -> Reuse:
        """One staging cache for these sequences, sized for their whole prompts, each one's
        prefix restored from the prefix cache."""
        engine = self.engine
        prompts = [s.req.prompt for s in seqs]
        reuse = plan_reuse(engine, prompts, self.key, max(s.req.max_new_tokens for s in seqs))
        width = reuse.width + max(len(p) for p in reuse.new)
        staging = engine.new_cache(len(seqs), cache_bucket(width, engine.max_cache_len))
        restore(staging, reuse)
        for j, seq in enumerate(seqs):
            n, u = reuse.counts[j], len(reuse.new[j])
            seq.staging, seq.srow, seq.cached_prompt = staging, j, n
            seq.todo = list(reuse.new[j])
            seq.slots = torch.cat([torch.arange(reuse.width - n, reuse.width),
                                   torch.arange(width - u, width)]).to(engine.device)
            if n:
                seq.exec_cols.append(reuse.entries[j].executed[:, :n].cpu())
        return reuse

    def _chunk(self, seq: _Seq, budget: int, done: list) -> int:
        """The next chunk (at most `budget` tokens) of a sequence prefilled alone; returns its size."""
        chunk, seq.todo = seq.todo[:budget], seq.todo[budget:]
        ids = torch.tensor([chunk], dtype=torch.long, device=self.engine.device)
        logits, executed = self.engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), seq.staging,
                                               self.tau, self.skip)
        self._counters["prefill_tokens"] += len(chunk)
        seq.exec_cols.append(executed[:, 0].cpu())
        if not seq.todo:
            done.append((seq, logits[0]))
        return len(chunk)

    def _prefill_group(self, group: list[_Seq], done: list) -> None:
        """Sequences whose prompts fit the budget, prefilled together (left-padded)."""
        reuse = self._start(group)
        ids, mask = left_pad(reuse.new, self.engine.device)
        logits, executed = self.engine.prefill(ids, mask, group[0].staging, self.tau, self.skip)
        self._counters["prefill_tokens"] += int(mask.sum())
        executed = executed.cpu()
        U = ids.shape[1]
        for j, seq in enumerate(group):
            seq.exec_cols.append(executed[:, j, U - len(reuse.new[j]):])
            seq.todo = []
            done.append((seq, logits[j]))

    def _join_ready(self) -> bool:
        """The ready sequences into free rows, in order, the batch laid out again (once for all
        of them) when it needs rows or slots; False when the first cannot fit until rows leave."""
        while self._ready:
            if self._ready[0].req.cancelled:
                self._end(self._ready.pop(0), "cancelled")
                continue
            if not self._join(self._ready[0], len(self._ready)):
                return False
            self._ready.pop(0)
        return True

    def _join(self, seq: _Seq, joining: int) -> bool:
        n = len(seq.slots)
        live = [s for s in self.rows if s is not None]
        remaining = max(s.req.max_new_tokens - len(s.req.tokens) for s in live + [seq])
        free = [b for b, s in enumerate(self.rows) if s is None]
        cache_len = 0 if self.runner is None else self.cache.max_len
        if not free or self.S < n or self.S + remaining > cache_len:
            S = max([n] + [s.length for s in live])
            need = S + remaining
            if need > self.engine.max_cache_len:
                if not live:               # a request longer than the context was let in
                    raise ValueError(f"scheduler: {n} prompt tokens and {remaining} more need {need} "
                                     f"cache slots; the engine holds {self.engine.max_cache_len}")
                return False
            rows = max(batch_bucket(len(live) + joining, self.max_batch), len(self.rows) if free else 0)
            self._relayout(rows, max(cache_bucket(need, self.engine.max_cache_len), min(cache_len, self.engine.max_cache_len)), S)
            free = [b for b, s in enumerate(self.rows) if s is None]
        b, S, cache, st = free[0], self.S, self.cache, self.state
        staging, j, slots = seq.staging, seq.srow, seq.slots
        cache.valid[:, b] = False
        cache.k[:, b, :, S - n:S] = staging.k[:, j].index_select(2, slots)
        cache.v[:, b, :, S - n:S] = staging.v[:, j].index_select(2, slots)
        cache.valid[:, b, S - n:S] = staging.valid[:, j].index_select(1, slots)
        if self.runner.sequence:
            cache.seq_exec[:, b] = staging.seq_exec[:, j]
            self._sequences_changed = True
        st.positions[b] = staging.seen[j]
        st.tokens[b] = seq.req.tokens[-1]
        self.runner.active[b] = True
        seq.row, seq.length, seq.staging, seq.slots = b, n, None, None
        self.rows[b] = seq
        return True

    def _relayout(self, capacity: int, cache_len: int, S: int) -> None:
        """Another runner of `capacity` rows and `cache_len` slots whose next slot is S: the
        live rows packed first, each one's slots moved to end at S."""
        old = self.runner
        if old is not None and (old.cache.batch_size, old.cache.max_len) == (capacity, cache_len):
            new = old                      # the same bucket: shift in place, from a copy
            c, st = old.cache, old.state
            src = SimpleNamespace(cache=SimpleNamespace(k=c.k.clone(), v=c.v.clone(), valid=c.valid.clone(),
                                                        seq_exec=None if c.seq_exec is None else c.seq_exec.clone()),
                                  state=SimpleNamespace(positions=st.positions.clone(), tokens=st.tokens.clone()))
        else:
            new = runner(self.engine, capacity, cache_len, self.tau, self.skip, self.batch_q, self._graph)
            src = old
        new.reset(S)
        cache, state = new.cache, new.state
        rows: list[_Seq | None] = [None] * capacity
        for nb, seq in enumerate(s for s in self.rows if s is not None):
            b, n, end = seq.row, seq.length, self.S - seq.extra
            cache.k[:, nb, :, S - n:S] = src.cache.k[:, b, :, end - n:end]
            cache.v[:, nb, :, S - n:S] = src.cache.v[:, b, :, end - n:end]
            cache.valid[:, nb, S - n:S] = src.cache.valid[:, b, end - n:end]
            if new.sequence:
                cache.seq_exec[:, nb] = src.cache.seq_exec[:, b]
            state.positions[nb] = src.state.positions[b]
            state.tokens[nb] = src.state.tokens[b]
            new.active[nb] = True
            seq.row, seq.extra = nb, 0
            rows[nb] = seq
        if old is not None and old is not new:
            old.busy = False
        self._sequences_changed = new.sequence
        self.runner, self.rows, self.S = new, rows, S
        self._counters["relayouts"] += 1

    # -- decoding -----------------------------------------------------------------------------

    def _decode(self) -> None:
        live = [s for s in self.rows if s is not None]
        if self.S >= self.cache.max_len:   # no slot left: pack the rows (never for a fitting batch)
            self._relayout(len(self.rows), self.cache.max_len, max(s.length for s in live))
        run, st = self.runner, self.state
        if self._sequences_changed:
            run.refresh_sequences()
            self._sequences_changed = False
        padded = self.running < len(self.rows)
        k = 1
        if self.sync_every > 1 and all(s.deferrable and not s.req.cancelled for s in live):
            k = min(self.sync_every, self.cache.max_len - self.S,
                    max(s.req.max_new_tokens - len(s.req.tokens) for s in live))
        if k == 1 and not all(s.deferrable for s in live):     # the host picks every row's token
            run.step(padded)
            masks = self._fill_masks(live)     # host work while the device runs the step
            executed = st.executed.cpu()[None]
            tokens = [self._host_tokens(live, st.logits, masks)]
        else:
            execs, picks = [], []
            for _ in range(k):
                run.step(padded)
                nxt = self._device_tokens(live, run)
                execs.append(st.executed.clone())
                picks.append(nxt.clone())
                st.tokens.copy_(nxt)
            executed = torch.stack(execs).cpu()                 # [k, L, B]
            tokens = torch.stack(picks).tolist()                # the host read
        self._counters["host_reads"] += 1
        self.S += len(tokens)
        active = run.active.cpu()
        blocks = [i for i in range(executed.shape[1]) if i not in self.skip]
        c = self._counters
        left: list[_Seq] = []
        going = list(live)
        for s_i, row_tokens in enumerate(tokens):
            for seq in [q for q in going if q.failure is not None or q.req.cancelled]:
                # its processor failed, or it was cancelled since its last token: this step's
                # token is dropped, and the step does not count it
                if seq.failure is None:
                    seq.req.finish = "cancelled"
                seq.extra = len(tokens) - s_i
                left.append(seq)
                going.remove(seq)
            if not going:                  # every row ended in an earlier step of this read
                break
            rows = torch.zeros_like(active)
            rows[[s.row for s in going]] = True
            none_ran = int((~(executed[s_i][blocks] & rows[None]).any(1)).sum())
            c["steps"] += 1
            c["row_steps"] += len(going)
            c["block_steps"] += len(blocks)
            c["none_ran"] += none_ran
            still = []
            for seq in going:
                seq.exec_cols.append(executed[s_i, :, seq.row:seq.row + 1])
                seq.length += 1
                seq.steps += 1
                seq.none_ran += none_ran
                seq.batch_rows += len(going)
                if self._emit(seq, row_tokens[seq.row]):
                    seq.extra = len(tokens) - s_i - 1
                    left.append(seq)
                else:
                    still.append(seq)
            going = still
        for seq in left:
            self._leave(seq)
        if len(tokens) == 1 and not all(s.deferrable for s in live) and going:
            st.tokens[[s.row for s in going]] = torch.tensor([tokens[0][s.row] for s in going],
                                                             device=st.tokens.device)
        if self.running and self.running <= len(self.rows) // 4:      # a bucket a quarter the size holds them
            self._relayout(batch_bucket(self.running, self.max_batch), self.cache.max_len,
                           max(s.length for s in self.rows if s is not None))

    def _device_tokens(self, live: list[_Seq], run: _Runner) -> torch.Tensor:
        """The next token of every row [B], chosen on the device: the step's greedy argmax,
        a sampling row's draw from its own generator."""
        sampling = [s for s in live if s.req.temperature > 0.0]
        if not sampling:
            return run.greedy_next
        nxt = run.greedy_next.clone()
        for seq in sampling:
            r = seq.req
            nxt[seq.row] = sample(run.state.logits[seq.row:seq.row + 1], r.temperature, r.top_k, r.top_p,
                                  seq.generator)[0]
        return nxt

    def _host_tokens(self, live: list[_Seq], logits: torch.Tensor, masks=None) -> list[int]:
        """The next token per row (a list over the batch's rows; padding rows 0), each live
        row's from its own parameters after its logits processor."""
        out = [0] * logits.shape[0]
        for seq, token in zip(live, self._sample(live, logits[[s.row for s in live]], masks)):
            out[seq.row] = token
        return out

    def _fill_masks(self, seqs: list[_Seq]):
        """The grammar rows of seqs (a grammar.GrammarProcessor as logits processor) advanced
        and their bitmasks filled, all at once (grammar.BatchMask): (bitmask, their indices in
        seqs), or None when no row has a grammar. A row whose grammar fails gets its failure."""
        idx = [i for i, s in enumerate(seqs)
               if isinstance(s.req.logits_processor, grammar.GrammarProcessor) and s.failure is None]
        if not idx:
            return None
        if self._masks is None:
            self._masks = grammar.BatchMask()
        bitmask, failed = self._masks.fill([seqs[i].req.logits_processor for i in idx],
                                           [seqs[i].req.tokens for i in idx], idx, len(seqs))
        for j, e in failed.items():
            seqs[idx[j]].failure = e
        return bitmask, [i for j, i in enumerate(idx) if j not in failed]

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor, masks=None) -> list[int]:
        """Each sequence's next token from its row of logits [n, vocab] (changed in place),
        with its own parameters: the grammar rows masked together (masks: from _fill_masks, or
        filled here), any other logits processor called on its row."""
        if not seqs:
            return []
        for i, seq in enumerate(seqs):
            if seq.req.logprobs is not None:       # the raw logits', before any mask
                seq.pending_lp = torch.log_softmax(logits[i].float(), -1)
        masks = self._fill_masks(seqs) if masks is None else masks
        if masks is not None:
            self._masks.apply(logits, *masks)
        out = logits.argmax(-1)
        for i, seq in enumerate(seqs):
            r = seq.req
            row = logits[i]
            if seq.failure is not None:
                continue
            if r.logits_processor is not None and not isinstance(r.logits_processor, grammar.GrammarProcessor):
                try:
                    row = r.logits_processor(list(r.tokens), row.clone())
                except Exception as e:     # this row's processor failed: only this row ends
                    seq.failure = e
                    continue
                if r.temperature == 0.0:
                    out[i] = row.argmax()
            if r.temperature > 0.0:
                out[i] = sample(row[None], r.temperature, r.top_k, r.top_p, seq.generator)[0]
        return out.tolist()

    def _emit(self, seq: _Seq, token: int) -> bool:
        """The sequence's new token: its owner told, its end conditions checked. True if it ends."""
        r = seq.req
        r.tokens.append(token)
        if seq.pending_lp is not None:
            lp, seq.pending_lp = seq.pending_lp, None
            top = lp.topk(r.logprobs) if r.logprobs else None
            r.token_logprobs.append((float(lp[token]), [] if top is None else
                                     list(zip(top.indices.tolist(), top.values.tolist()))))
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
        self.runner.active[seq.row] = False
        if self.runner.sequence:
            self.cache.seq_exec[:, seq.row] = False
            self._sequences_changed = True
        if seq.failure is not None:
            self._end(seq, None, error=seq.failure)
            return
        b, end, n = seq.row, self.S - seq.extra, seq.length
        cache = self.cache
        self._store(seq, cache.k[:, b, :, end - n:end], cache.v[:, b, :, end - n:end],
                    cache.valid[:, b, end - n:end])
        self._end(seq, seq.req.finish)

    def _store(self, seq: _Seq, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """The sequence's K/V (prompt and the tokens decode fed: k, v [L, Hkv, n, hd], valid
        [L, n], in order) into the engine's prefix cache."""
        pc, r = self.engine.prefix_cache, seq.req
        n = valid.shape[1]
        if pc is None or n > pc.max_tokens:
            return
        fed = r.tokens[:n - len(r.prompt)]
        pc.store(self.key, prefix_cache_mod.Entry(
            tokens=tuple(r.prompt) + tuple(fed), k=k.clone(), v=v.clone(), valid=valid.clone(),
            executed=torch.cat(seq.exec_cols, dim=1)))

    def _end(self, seq: _Seq, finish: str | None, error: Exception | None = None) -> None:
        r = seq.req
        r.finish = r.finish or finish or ("error" if error else None)
        r.error = error
        if error is None and seq.exec_cols:
            r.executed = torch.cat(seq.exec_cols, dim=1)
            r.stats = self._seq_stats(seq, r.executed)
        self._counters["finished"] += 1
        if r.on_done is not None:
            r.on_done(r)

    def _seq_stats(self, seq: _Seq, executed: torch.Tensor) -> dict:
        """Skip statistics of one finished sequence, as generate() gives them for one row."""
        engine, r = self.engine, seq.req
        executed = executed[:, None]                                  # [L, 1, prompt + steps]
        n_prompt = len(r.prompt)
        valid = torch.ones(1, executed.shape[2], dtype=torch.bool)
        head = valid.clone()
        head[:, :n_prompt - 1] = False                # logits: the prompt's last token, then each fed one
        report = flops_report(engine.config, engine.lr_config, executed, valid.long().cumsum(1), valid, head=head)
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
            "prefill_shared": seq.shared_prefill,
            "decode_steps": seq.steps,
            "mean_batch_rows": seq.batch_rows / seq.steps if seq.steps else None,
            "batch_blocks_no_row_ran_pct": 100.0 * seq.none_ran / (seq.steps * n_blocks)
            if seq.steps and n_blocks else None,
            "ttft_s": None if seq.t_first is None else seq.t_first - seq.t_submit,
            "tau": self.tau, "batch_q": self.batch_q,
        }


__all__ = ["Request", "Scheduler"]
