"""The continuous-batching scheduler (layerroute_rt/runtime/scheduler.py) and the decode step's padding
rows and batch policy (engine.DecodeState.active, batch_q), on the bundled demo model: requests
that join a running batch at different steps get generate()'s greedy tokens, one at a time;
short ones leave first; long prompts prefill in chunks; sequence granularity keeps each
request's prefill decisions; a seeded request's tokens do not depend
on its companions; a per-row logits processor; cancel; padding rows run nothing and write
nowhere; the policy at q = 1 is today's step, at q < 1 it skips a block for the whole batch
exactly when the routers' votes say so."""
import contextlib
import dataclasses
import warnings

import pytest
import torch

import layerroute_rt as lr
from layerroute_rt.cli import DEMO_DIR
from layerroute_rt.runtime.generate import encode_prompts
from layerroute_rt.runtime.scheduler import Request, Scheduler


@pytest.fixture(scope="module")
def engine():
    return lr.InferenceModel(lr.load(DEMO_DIR, adapter=DEMO_DIR / "adapter"), prefix_cache=False)


@pytest.fixture(scope="module")
def prompts(engine):
    chats = [[{"role": "user", "content": f"Find flights from Paris to Rome on {d} May."}] for d in range(1, 7)]
    return [encode_prompts([c], engine)[0] for c in chats]


def alone(engine, prompt, n, **kw):
    return lr.generate(engine, [prompt], max_new_tokens=n, eos_token_id=None, **kw).tokens[0]


def drain(sched, reqs, join_at=None):
    """Step until done; reqs[k:] are submitted at iteration join_at[1] when join_at = (k, it).
    Returns the order in which requests finished."""
    k, at = join_at or (len(reqs), 0)
    for r in reqs[:k]:
        sched.submit(r)
    order, it = [], 0
    while sched.has_work() or it <= at:
        sched.step()
        it += 1
        if it == at:
            for r in reqs[k:]:
                sched.submit(r)
        order += [i for i, r in enumerate(reqs) if r.finish and i not in order]
    return order


def test_joining_requests_get_generates_tokens_and_short_ones_leave_first(engine, prompts):
    lens = [40, 5, 17, 2, 33, 9]
    expected = [alone(engine, p, n) for p, n in zip(prompts, lens)]
    sched = Scheduler(engine, max_batch=4, prefill_chunk=16)
    reqs = [Request(prompt=p, max_new_tokens=n) for p, n in zip(prompts, lens)]
    order = drain(sched, reqs, join_at=(3, 3))
    assert [r.tokens for r in reqs] == [list(t) for t in expected]
    assert all(r.finish == "length" for r in reqs)
    assert order.index(1) < order.index(0) and order.index(3) < order.index(4)   # short ones first
    stats = sched.stats()
    assert stats["finished"] == 6 and stats["running"] == 0 and stats["waiting"] == 0
    assert 1 < stats["mean_batch_rows"] <= 4
    assert 0 <= stats["blocks_no_row_ran_pct"] <= 100
    for r in reqs:                    # a row's stats: its own tokens, and the batches it ran in
        assert r.stats["decode_steps"] == len(r.tokens) - 1
        assert len(r.stats["skip_rate_per_layer"]) == engine.config.num_hidden_layers


def test_blocks_no_row_ran_counts_the_active_rows_only(engine, prompts):
    """One request alone at a bucket of 1, then with companions: a block no row ran at batch 1
    is one its router skipped, so the fraction equals the skip rate of its decode steps."""
    sched = Scheduler(engine, max_batch=4)
    req = Request(prompt=prompts[0], max_new_tokens=12)
    drain(sched, [req])
    st = req.stats
    assert st["mean_batch_rows"] == 1
    blocks = engine.config.num_hidden_layers
    decode_exec = torch.tensor(st["skip_rate_per_layer"])      # over prompt + fed: recompute below
    out = lr.generate(engine, [prompts[0]], max_new_tokens=12, eos_token_id=None)
    T = len(prompts[0])
    skipped = (~out.executed[:, 0, T:T + 11]).sum().item()
    assert st["batch_blocks_no_row_ran_pct"] == pytest.approx(100.0 * skipped / (11 * blocks))
    assert decode_exec.shape == (blocks,)


def test_a_long_prompt_prefills_in_chunks(engine, prompts):
    long = prompts[0] + prompts[1][1:] + prompts[2][1:]
    expected = alone(engine, long, 6)
    for chunk in (7, 1000):
        sched = Scheduler(engine, prefill_chunk=chunk)
        req = Request(prompt=long, max_new_tokens=6)
        drain(sched, [req])
        assert req.tokens == list(expected)
        assert sched.stats()["prefill_tokens"] == len(long)


def test_a_seeded_request_does_not_depend_on_its_companions(engine, prompts):
    def run(companions):
        sched = Scheduler(engine, max_batch=4)
        req = Request(prompt=prompts[0], max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
        others = [Request(prompt=p, max_new_tokens=10, temperature=1.0) for p in prompts[1:1 + companions]]
        drain(sched, [req] + others)
        return req.tokens

    assert run(0) == run(3)


def test_logits_processor_masks_its_row_only(engine, prompts):
    free = alone(engine, prompts[1], 4)
    banned = free[0]

    def ban(tokens, logits):
        logits[banned] = float("-inf")
        return logits

    sched = Scheduler(engine)
    masked = Request(prompt=prompts[0], max_new_tokens=4, logits_processor=ban)
    plain = Request(prompt=prompts[1], max_new_tokens=4)
    drain(sched, [masked, plain])
    assert banned not in masked.tokens and plain.tokens == list(free)


def test_cancel_and_eos_end_a_sequence(engine, prompts):
    first = alone(engine, prompts[0], 3)
    sched = Scheduler(engine)
    seen = []
    stop = Request(prompt=prompts[0], max_new_tokens=50, eos=frozenset({first[2]}))
    gone = Request(prompt=prompts[1], max_new_tokens=500, on_token=lambda t, s: seen.append(t) and False)
    sched.submit(stop)
    sched.submit(gone)
    for _ in range(6):
        sched.step()
    gone.cancel()
    while sched.has_work():
        sched.step()
    assert (stop.finish, stop.tokens) == ("stop", list(first))
    assert gone.finish == "cancelled" and len(gone.tokens) < 20 and seen == gone.tokens


def test_sequence_granularity_joins_and_leaves_with_its_prefill_decisions(prompts):
    """Under `sequence` granularity each request's blocks are decided once, at its prefill; rows
    that join a running batch keep them (padding rows hold none): the tokens equal each request
    alone, and every decode column of a request repeats its decisions."""
    model = lr.load(DEMO_DIR, adapter=DEMO_DIR / "adapter")
    model.lr_config = dataclasses.replace(model.lr_config, granularity="sequence")
    engine = lr.InferenceModel(model, prefix_cache=False)
    lens = [12, 3, 9, 5]
    expected = [alone(engine, p, n) for p, n in zip(prompts, lens)]
    sched = Scheduler(engine, max_batch=4, prefill_chunk=8)     # a prompt is never chunked here
    reqs = [Request(prompt=p, max_new_tokens=n) for p, n in zip(prompts, lens)]
    drain(sched, reqs, join_at=(2, 2))
    assert [r.tokens for r in reqs] == [list(t) for t in expected]
    skipped = 0
    for r in reqs:
        decode = r.executed[:, len(r.prompt):]
        assert decode.shape[1] == len(r.tokens) - 1
        assert torch.equal(decode, decode[:, :1].expand_as(decode))
        skipped += int((~decode[:, 0]).sum())
    assert skipped > 0                         # the routers did skip blocks for some request


# -- the decode step: padding rows and the batch policy ---------------------------------------------

def prefilled(engine, prompts, batch, tau):
    ids = torch.zeros(batch, max(len(p) for p in prompts), dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, ids.shape[1] - len(p):] = torch.tensor(p)
        mask[b, ids.shape[1] - len(p):] = True
    cache = engine.new_cache(batch, 256)
    logits, _ = engine.prefill(ids, mask, cache, tau)
    state = engine.decode_state(cache)
    state.tokens.copy_(logits.argmax(-1))
    return cache, state


@pytest.mark.parametrize("tau", [0.5, 0.0])
def test_padding_rows_run_nothing_and_write_nowhere(engine, prompts, tau):
    cache, state = prefilled(engine, prompts[:3] + [prompts[3]], 4, tau)
    ref_cache, ref_state = prefilled(engine, prompts[:3], 3, tau)
    state.active = torch.tensor([True, True, True, False])
    k_pad, valid_pad = cache.k[:, 3].clone(), cache.valid[:, 3].clone()
    for _ in range(3):
        engine.decode_step(state, cache, tau)
        engine.decode_step(ref_state, ref_cache, tau)
        assert not state.executed[:, 3].any()
        assert torch.equal(state.executed[:, :3], ref_state.executed)
        assert torch.allclose(state.logits[:3], ref_state.logits, atol=1e-4, rtol=1e-4)
        state.tokens[:3] = state.logits[:3].argmax(-1)
        ref_state.tokens.copy_(ref_state.logits.argmax(-1))
    assert torch.equal(cache.k[:, 3], k_pad) and torch.equal(cache.valid[:, 3], valid_pad)


def test_batch_policy_q1_is_todays_step_and_q_below_1_follows_the_votes(engine, prompts):
    tau, B = 0.5, 6
    texts = ["Find flights from Paris to Rome on 3 May.", "Plan a two-day trip to Oslo.",
             "What is the weather in Lima?", "Book a table for four at 8 pm.",
             "Convert 250 euros to yen.", "Send an email to Ana about the meeting."]
    prompts = [encode_prompts([[{"role": "user", "content": t}]], engine)[0] for t in texts]
    cache, state = prefilled(engine, prompts, B, tau)
    plain_cache, plain_state = prefilled(engine, prompts, B, tau)
    state.batch_q = 1.0
    engine.decode_step(state, cache, tau)
    engine.decode_step(plain_state, plain_cache, tau)
    assert torch.equal(state.executed, plain_state.executed)
    assert torch.allclose(state.logits, plain_state.logits, atol=1e-5, rtol=1e-5)

    # q < 1: replay the same step with a hook that records each block's router votes
    runs = {}
    for q in (1.0, 0.75, 0.5):
        cache, state = prefilled(engine, prompts, B, tau)
        state.batch_q = q
        votes = []
        original = engine._decide

        def spy(blk, h, tau_, st, i):
            votes.append((i, (torch.sigmoid(h.float() @ blk.router_w + blk.router_b) >= tau_).clone()))
            return original(blk, h, tau_, st, i)

        engine._decide = spy
        try:
            engine.decode_step(state, cache, tau)
        finally:
            del engine._decide
        for i, want in votes:
            skipping = B - int(want.sum())
            expected = torch.zeros_like(want) if skipping >= q * B else want
            assert torch.equal(state.executed[i], expected), (q, i)
        runs[q] = int(state.pred.sum())                 # blocks some row ran
    assert runs[0.5] <= runs[0.75] <= runs[1.0]
    assert runs[0.5] < runs[1.0]                        # the policy skipped something on this batch


def test_generate_batch_policy(engine):
    """generate(batch_q=1) is generate(); at q = 0.5 a batch of 4 runs fewer (step, block) pairs,
    every decode step's decisions follow the policy, and the no-row-ran stat counts them."""
    texts = ["Find flights from Paris to Rome on 3 May.", "Plan a two-day trip to Oslo.",
             "What is the weather in Lima?", "Convert 250 euros to yen."]
    kw = dict(max_new_tokens=12, eos_token_id=None, tau=0.5)
    plain = lr.generate(engine, texts, **kw)
    exact = lr.generate(engine, texts, batch_q=1.0, **kw)
    assert exact.tokens == plain.tokens and torch.equal(exact.executed, plain.executed)
    half = lr.generate(engine, texts, batch_q=0.5, **kw)
    T = plain.valid.shape[1] - plain.stats["decode_steps"]
    dec = half.executed[:, :, T:]                                # [L, B, steps]
    ran = dec.any(1)                                             # some row ran (step, block)
    # a block that runs, runs for at least half the rows (fewer than q of them skip it)
    assert bool(((dec.sum(1) > 4 * 0.5) | ~ran).all())
    assert half.stats["decode_blocks_no_row_ran_pct"] > plain.stats["decode_blocks_no_row_ran_pct"]
    assert half.stats["decode_blocks_no_row_ran_pct"] == pytest.approx(100.0 * (~ran).float().mean().item())
    with pytest.raises(ValueError, match="batch_q"):
        lr.generate(engine, texts, batch_q=0.0, **kw)


def test_a_requests_skip_stats_equal_generates(engine, prompts):
    """A request's FLOPs figures and decisions are generate()'s for the same prompt alone, and
    the scheduler's totals over one request are that request's (the generated-FLOPs counters)."""
    out = lr.generate(engine, [prompts[0]], max_new_tokens=24, eos_token_id=None)
    sched = Scheduler(engine, max_batch=2)
    req = Request(prompt=prompts[0], max_new_tokens=24)
    drain(sched, [req])
    assert req.tokens == out.tokens[0]
    T = len(prompts[0])
    assert torch.equal(req.executed, out.executed[:, 0, :T + len(req.tokens) - 1])
    for key in ("generated_total_flops_skipped_pct", "generated_block_flops_skipped_pct",
                "total_flops_skipped_pct", "block_flops_skipped_pct"):
        assert req.stats[key] == pytest.approx(out.stats[key], abs=1e-9), key
    assert sched.stats()["generated_total_flops_skipped_pct"] == pytest.approx(
        out.stats["generated_total_flops_skipped_pct"], abs=1e-9)
    assert out.stats["generated_total_flops_skipped_pct"] > 5          # the demo routers skip


def test_requests_that_each_fit_run_even_if_together_they_would_not(prompts):
    """The slots a join needs count the joining request and the running ones only: a long
    prompt and a long answer, each fitting the cache, both complete."""
    engine = lr.InferenceModel(lr.load(DEMO_DIR, adapter=DEMO_DIR / "adapter"), prefix_cache=False,
                               max_cache_len=80)
    long_prompt = (prompts[0] * 4)[:58]
    sched = Scheduler(engine, max_batch=2)
    reqs = [Request(prompt=long_prompt, max_new_tokens=5), Request(prompt=prompts[1][:10], max_new_tokens=60)]
    drain(sched, reqs)
    assert [r.error for r in reqs] == [None, None] and [len(r.tokens) for r in reqs] == [5, 60]


def test_cancel_before_the_first_step_and_unseeded_sampling(engine, prompts):
    stream = lr.generate(engine, prompts[:2], max_new_tokens=6, eos_token_id=None, stream=True)
    stream.cancel(1)
    list(stream)
    out = stream.output
    assert out.finish_reasons == ["length", "cancelled"] and out.tokens[1] == [] and len(out.tokens[0]) == 6
    assert not out.valid[1].any()                              # nothing ran for it
    # without a seed, sampling follows torch's default generator
    draws = []
    for s in (1, 2, 1):
        torch.manual_seed(s)
        draws.append(lr.generate(engine, prompts[:1], max_new_tokens=12, temperature=1.5, eos_token_id=None).tokens)
    assert draws[0] == draws[2] and draws[0] != draws[1]


@pytest.mark.parametrize("chunk", [7, 1000])
def test_requests_of_one_prompt_share_its_prefill(engine, prompts, chunk):
    """n choices: requests of the same prompt prefill it once (in one group, or in chunks), each
    samples its own tokens, and a cancelled leader hands its prefill to the next."""
    expected = alone(engine, prompts[0], 8)
    sched = Scheduler(engine, max_batch=4, prefill_chunk=chunk)
    greedy = [Request(prompt=prompts[0], max_new_tokens=8) for _ in range(2)]
    sampled = [Request(prompt=prompts[0], max_new_tokens=8, temperature=1.0, seed=s) for s in (1, 2)]
    drain(sched, greedy + sampled)
    assert sched.stats()["prefill_tokens"] == len(prompts[0])
    assert [r.tokens for r in greedy] == [list(expected)] * 2
    assert sampled[0].tokens != sampled[1].tokens
    assert [r.stats["prefill_shared"] for r in greedy + sampled] == [False, True, True, True]
    solo = Request(prompt=prompts[0], max_new_tokens=8, temperature=1.0, seed=2)
    drain(Scheduler(engine, prefill_chunk=chunk), [solo])
    assert solo.tokens == sampled[1].tokens           # following a prefill changes no draw

    sched = Scheduler(engine, max_batch=4, prefill_chunk=chunk)
    lead, heir = (Request(prompt=prompts[1], max_new_tokens=5) for _ in range(2))
    sched.submit(lead)
    sched.submit(heir)
    if chunk == 7:
        sched.step()                  # the leader has prefilled a chunk when it is cancelled
    lead.cancel()
    while sched.has_work():
        sched.step()
    assert lead.finish == "cancelled" and heir.tokens == list(alone(engine, prompts[1], 5))
    assert sched.stats()["prefill_tokens"] == len(prompts[1])


def test_logprobs_are_the_raw_logits_log_softmax(engine, prompts):
    """Each token's log-probability and its top k, from the model's logits before the
    processor: recomputed from a teacher-forced forward of the same tokens."""
    banned = alone(engine, prompts[0], 1)[0]

    def ban(tokens, logits):
        logits[banned] = float("-inf")
        return logits

    sched = Scheduler(engine, max_batch=2)
    plain = Request(prompt=prompts[0], max_new_tokens=6, logprobs=3)
    masked = Request(prompt=prompts[0] + [5], max_new_tokens=4, logprobs=0, logits_processor=ban,
                     temperature=0.7, seed=3)
    drain(sched, [plain, masked])
    for req, k in ((plain, 3), (masked, 0)):
        assert len(req.token_logprobs) == len(req.tokens)
        ids = torch.tensor([req.prompt + req.tokens])
        with torch.no_grad():
            ref = torch.log_softmax(engine.source(ids)[0].float(), -1)[len(req.prompt) - 1:-1]
        for i, (lp, top) in enumerate(req.token_logprobs):
            assert lp == pytest.approx(float(ref[i, req.tokens[i]]), abs=2e-3)
            assert len(top) == k and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
            if k:
                assert [t for t, _ in top] == ref[i].topk(k).indices.tolist()
                assert top[0][0] == req.tokens[i]         # greedy: the chosen token is the best
    assert banned not in masked.tokens


# -- the decode path ladder (decode_runner.decode_path) ------------------------------------------

class _FakeGraph:
    """Stands in for a captured CUDA graph on the CPU: replay runs the step eagerly, or with a
    wrong token where `corrupt`."""

    def __init__(self, runner, corrupt):
        self.runner, self.corrupt = runner, corrupt

    def replay(self):
        self.runner._eager_step()
        if self.corrupt:
            self.runner.greedy_next.add_(1)


def _ladder_engine(monkeypatch, fail: dict):
    """A fresh demo engine on which graphs 'exist' (graphs_possible, IF nodes available), and
    whose capture fails as `fail` says per level: "raise", "wrong" (other tokens) or None."""
    from layerroute_rt.runtime import engine as engine_mod
    from layerroute_rt.runtime import decode_runner
    monkeypatch.setattr(decode_runner, "graphs_possible", lambda device: True)
    monkeypatch.setattr(engine_mod, "conditional_nodes_unavailable",
                        lambda device=None: "no IF nodes (test)" if fail.get("conditional_node") == "absent" else None)

    def capture(self):
        level = self.engine.graph_branch
        if fail.get(level) == "raise":
            raise RuntimeError(f"capture failed at {level} (test)")
        graph = _FakeGraph(self, fail.get(level) == "wrong")
        self.graphs[self.state.active is not None] = graph
        return graph

    monkeypatch.setattr(decode_runner._Runner, "_capture", capture)
    eng = lr.InferenceModel(lr.load(DEMO_DIR, adapter=DEMO_DIR / "adapter"))
    eng.host_counts = False
    return eng


@pytest.mark.parametrize("fail, chosen", [
    ({}, "conditional_node"),
    ({"conditional_node": "raise"}, "early_exit"),
    ({"conditional_node": "absent"}, "early_exit"),
    ({"conditional_node": "wrong", "early_exit": "raise"}, "eager"),
])
def test_decode_path_ladder_takes_the_first_level_that_decodes_like_eager(monkeypatch, prompts, fail, chosen):
    from layerroute_rt.runtime.decode_runner import decode_path
    eng = _ladder_engine(monkeypatch, fail)
    with pytest.warns(UserWarning, match="decode path") if fail else contextlib.nullcontext():
        decode_path(eng)
    assert len(eng.prefix_cache) == 0 and not eng.__dict__.get("_runners")   # the probe left nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # chosen once: no second warning
        out = lr.generate(eng, [prompts[0]], max_new_tokens=6, eos_token_id=None)
    path = out.stats["decode_path"]
    assert path["mode"] == chosen and path["tried"][-1] == {"mode": chosen, "ok": True, "reason": None}
    reasons = {t["mode"]: t["reason"] for t in path["tried"] if not t["ok"]}
    for level, how in fail.items():
        expected = {"raise": "capture failed", "absent": "no IF nodes", "wrong": "differ from eager"}[how]
        assert expected in reasons[level], reasons
    assert out.tokens[0] == alone(engine_for_demo(), prompts[0], 6)     # whatever the path: eager's tokens


def engine_for_demo():
    return lr.InferenceModel(lr.load(DEMO_DIR, adapter=DEMO_DIR / "adapter"), prefix_cache=False)


def test_decode_path_on_the_cpu_is_eager_with_its_reason(engine):
    path = lr.generate(engine, "hi", max_new_tokens=2).stats["decode_path"]
    assert path["mode"] == "eager" and "no CUDA graphs on cpu" in path["tried"][0]["reason"]
