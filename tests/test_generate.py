"""generate() on the inference engine: equal to transformers with skipping off, equal to the
reference path with skipping on (both granularities, both KV policies, merged and unmerged),
batching, streaming, EOS and stop strings, sampling, several adapters over one base, errors, and
a decode step that reads nothing back from the device."""
import contextlib
import dataclasses
import os

import pytest
import torch

import layerroute_rt as lr
from layerroute_rt.model.cache import KVCache
from layerroute_rt.cli import DEMO_DIR
from layerroute_rt.runtime.generate import load_tokenizer
from qwen_factory import QWEN25_05B, save_random_qwen2

PROMPTS = [[5, 9, 200, 3], [17, 1, 2, 3, 4, 5, 6, 7, 8], [250]]


def reference_greedy(model, prompts, n, tau=None, skip_layers=None):
    """Greedy decoding one prompt at a time through the model's reference path (the oracle)."""
    outs = []
    for p in prompts:
        cache = KVCache(model.config, 1, len(p) + n, model.model.embed_tokens.weight.dtype, "cpu")
        logits = model(torch.tensor([p]), tau=tau, skip_layers=skip_layers, cache=cache)
        toks = []
        for i in range(n):
            toks.append(int(logits[0, -1].argmax()))
            if i < n - 1:
                logits = model(torch.tensor([toks[-1:]]), tau=tau, skip_layers=skip_layers, cache=cache)
        outs.append(toks)
    return outs


@pytest.fixture
def routed(tiny):
    """The tiny model with random routers and LoRA: about half the block-token pairs skip."""
    model = lr.load(tiny[0])
    model.randomize_adapter(seed=1)
    return model


def test_greedy_equals_transformers_without_skipping(tiny):
    path, hf = tiny
    model = lr.load(path)
    prompt = torch.randint(0, 257, (1, 7), generator=torch.Generator().manual_seed(0))
    ref = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 7:].tolist()
    assert lr.generate(model, prompt, max_new_tokens=8, tau=0.0, eos_token_id=None).tokens[0] == ref


def test_qwen25_05b_shapes(tmp_path):
    """Full Qwen2.5-0.5B shapes, random weights, fp32: dense equals transformers; with 6 of the
    24 blocks skipped and with random routers, equal to the reference path."""
    hf = save_random_qwen2(tmp_path, **QWEN25_05B)
    prompt = torch.randint(0, QWEN25_05B["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(0))
    ref = hf.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    del hf
    model = lr.load(tmp_path)
    engine = lr.InferenceModel(model)
    assert lr.generate(engine, prompt, max_new_tokens=3, tau=0.0, eos_token_id=None).tokens[0] == ref
    skip = [2, 5, 9, 13, 17, 21]
    out = lr.generate(engine, prompt, max_new_tokens=3, skip_layers=skip, eos_token_id=None)
    assert out.tokens == reference_greedy(model, prompt.tolist(), 3, skip_layers=skip)
    assert [out.stats["skip_rate_per_layer"][i] for i in skip] == [1.0] * 6


@pytest.mark.parametrize("granularity", ["token", "sequence"])
@pytest.mark.parametrize("kv_policy", ["compute", "drop"])
@pytest.mark.parametrize("merge", [True, False])
def test_skipping_equals_reference_path(routed, granularity, kv_policy, merge):
    model = routed
    model.lr_config = dataclasses.replace(model.lr_config, granularity=granularity, kv_policy=kv_policy)
    out = lr.generate(lr.InferenceModel(model, merge=merge), PROMPTS, max_new_tokens=6, eos_token_id=None)
    assert out.tokens == reference_greedy(model, PROMPTS, 6)
    real = out.executed[:, out.valid]
    assert real.any() and not real.all()          # some blocks ran, some were skipped


@pytest.mark.parametrize("granularity", ["token", "sequence"])
@pytest.mark.parametrize("kv_policy", ["compute", "drop"])
@pytest.mark.parametrize("host_counts", [True, False])
def test_decode_logits_equal_reference_step_by_step(routed, granularity, kv_policy, host_counts):
    """Teacher-forced: a left-padded batch prefilled, then 6 decode steps, each step's logits and
    decisions equal to the reference path's on the same tokens. host_counts=False is the
    device-count path CUDA graphs run (here through the CPU ops)."""
    model = routed
    model.lr_config = dataclasses.replace(model.lr_config, granularity=granularity, kv_policy=kv_policy)
    engine = lr.InferenceModel(model, merge=False)
    ids = torch.tensor([[0, 0, 5, 9, 200], [17, 1, 2, 3, 4], [0, 0, 0, 0, 250]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    cache = engine.new_cache(3, 12)
    ref_cache = KVCache(model.config, 3, 12, torch.float32, "cpu")
    last, executed = engine.prefill(ids, mask, cache, 0.5)
    ref, ref_exec = model(ids, attention_mask=mask, cache=ref_cache, return_executed=True)
    torch.testing.assert_close(last, ref[:, -1], rtol=1e-4, atol=1e-4)
    assert torch.equal(executed, ref_exec)
    state = engine.decode_state(cache)
    feed = torch.randint(0, 257, (6, 3), generator=torch.Generator().manual_seed(2))
    skipped = 0
    for tokens in feed:
        state.tokens.copy_(tokens)
        engine.decode_step(state, cache, 0.5, host_counts=host_counts)
        ref, ref_exec = model(tokens[:, None], cache=ref_cache, return_executed=True)
        assert torch.equal(state.executed, ref_exec[:, :, 0])
        torch.testing.assert_close(state.logits, ref[:, -1], rtol=1e-4, atol=1e-4)
        skipped += int((~state.executed).sum())
    assert 0 < skipped < 6 * 3 * 3


@pytest.mark.parametrize("kv_policy", ["compute", "drop"])
@pytest.mark.parametrize("tau", [0.0, 0.5])
def test_prefill_attention_paths_equal_reference(routed, kv_policy, tau):
    """Prefill attends with plain causal attention where every token of a left-padded prompt
    runs the block, else with a mask: padding on the left (rows 0, 1), none (row 2) and inside
    the prompt (row 3, always the masked path), every token running (tau 0) or some skipping."""
    routed.lr_config = dataclasses.replace(routed.lr_config, kv_policy=kv_policy)
    engine = lr.InferenceModel(routed)
    ids = torch.randint(1, 257, (4, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1],
                         [1, 0, 1, 1, 0, 1]], dtype=torch.bool)
    cache = engine.new_cache(4, 8)
    last, executed = engine.prefill(ids, mask, cache, tau)
    ref, ref_exec = routed(ids, tau=tau, attention_mask=mask, return_executed=True)
    assert torch.equal(executed, ref_exec)
    torch.testing.assert_close(last, ref[:, -1], rtol=1e-4, atol=1e-4)
    assert executed[:, mask].all() if tau == 0.0 else not executed[:, mask].all()


@pytest.mark.parametrize("granularity", ["token", "sequence"])
@pytest.mark.parametrize("kv_policy", ["compute", "drop"])
def test_device_count_path_generates_as_the_reference(routed, granularity, kv_policy):
    """generate() through CUDA's decode path (counts never read on the host), here on the CPU
    ops, equals the reference path token for token."""
    routed.lr_config = dataclasses.replace(routed.lr_config, granularity=granularity, kv_policy=kv_policy)
    engine = lr.InferenceModel(routed, merge=False, host_counts=False)
    out = lr.generate(engine, PROMPTS, max_new_tokens=6, eos_token_id=None)
    assert out.tokens == reference_greedy(routed, PROMPTS, 6)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set without CUDA)")
@pytest.mark.parametrize("granularity, kv_policy, merge", [
    ("token", "compute", True), ("token", "drop", False), ("sequence", "compute", False),
    ("sequence", "drop", True)])
def test_device_count_path_with_triton_kernels(routed, monkeypatch, granularity, kv_policy, merge):
    """The same with every op on its Triton kernel (the interpreter), prefill and decode, on a
    ragged batch whose blocks both run and skip: token for token the reference path's."""
    routed.lr_config = dataclasses.replace(routed.lr_config, granularity=granularity, kv_policy=kv_policy)
    monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")
    engine = lr.InferenceModel(routed, merge=merge, host_counts=False)
    out = lr.generate(engine, PROMPTS, max_new_tokens=4, eos_token_id=None)
    monkeypatch.delenv("LAYERROUTE_BACKEND")
    assert out.tokens == reference_greedy(routed, PROMPTS, 4)
    real = out.executed[:, out.valid]
    assert real.any() and not real.all()
    assert out.stats["skipped_block_mode"] == "host_predicate"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set without CUDA)")
def test_triton_path_skip_layers_and_dense(routed, monkeypatch):
    """skip_layers blocks (left out of the step) and tau 0 (no router) through the Triton
    kernels equal the reference path."""
    monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")
    engine = lr.InferenceModel(routed, host_counts=False)
    skipped = lr.generate(engine, PROMPTS, max_new_tokens=3, eos_token_id=None, skip_layers=[1])
    dense = lr.generate(engine, PROMPTS, max_new_tokens=3, eos_token_id=None, tau=0.0)
    monkeypatch.delenv("LAYERROUTE_BACKEND")
    assert skipped.tokens == reference_greedy(routed, PROMPTS, 3, skip_layers=[1])
    assert dense.tokens == reference_greedy(routed, PROMPTS, 3, tau=0.0)
    assert skipped.stats["skip_rate_per_layer"][1] == 1.0
    assert dense.stats["skip_rate_per_layer"] == [0.0, 0.0, 0.0]


def test_merged_equals_unmerged(routed):
    ids = torch.tensor([PROMPTS[1]])
    logits = []
    for merge in (True, False):
        engine = lr.InferenceModel(routed, merge=merge)
        cache = engine.new_cache(1, 16)
        last, executed = engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), cache, 0.5)
        state = engine.decode_state(cache)
        state.tokens.fill_(7)
        engine.decode_step(state, cache, 0.5)
        logits.append((last, executed, state.logits.clone(), state.executed.clone()))
    (a0, e0, a1, s1), (b0, f0, b1, t1) = logits
    assert torch.equal(e0, f0) and torch.equal(s1, t1)
    torch.testing.assert_close(a0, b0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a1, b1, rtol=1e-5, atol=1e-5)


def test_merged_equals_unmerged_bf16(tiny):
    """In bf16 the merged weights round W + s B A once: the logits agree within bf16 tolerance
    (every block runs, tau 0, so that no decision flips on a rounding)."""
    model = lr.load(tiny[0], dtype=torch.bfloat16)
    model.randomize_adapter(seed=1)
    ids = torch.tensor([PROMPTS[1]])
    out = []
    for merge in (True, False):
        engine = lr.InferenceModel(model, merge=merge)
        last, _ = engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), engine.new_cache(1, 12), 0.0)
        out.append(last)
    assert torch.equal(engine.blocks[0].qkv_w, torch.cat([model.blocks[0].self_attn.q_proj.weight,
                                                          model.blocks[0].self_attn.k_proj.weight,
                                                          model.blocks[0].self_attn.v_proj.weight]))
    assert (out[0] - out[1]).abs().max() <= 0.03 * out[1].abs().max()


def test_batch_equals_one_by_one(routed):
    engine = lr.InferenceModel(routed)
    batch = lr.generate(engine, PROMPTS, max_new_tokens=6, eos_token_id=None)
    for p, toks in zip(PROMPTS, batch.tokens):
        assert lr.generate(engine, [p], max_new_tokens=6, eos_token_id=None).tokens[0] == toks


def test_stream_equals_returned(routed):
    engine = lr.InferenceModel(routed)
    kw = dict(max_new_tokens=7, eos_token_id=None, temperature=0.8, seed=4)
    stream = lr.generate(engine, PROMPTS, stream=True, **kw)
    steps = list(stream)
    streamed = [[s.tokens[b] for s in steps if s.tokens[b] is not None] for b in range(len(PROMPTS))]
    assert len(steps) == 7 and streamed == stream.output.tokens
    assert stream.output.tokens == lr.generate(engine, PROMPTS, **kw).tokens


def test_stream_kept_open_while_another_generation_runs(routed):
    """Two generations of the same shape share no cache: a paused stream resumes unharmed."""
    engine = lr.InferenceModel(routed)
    alone = lr.generate(engine, PROMPTS, max_new_tokens=6, eos_token_id=None).tokens
    stream = lr.generate(engine, PROMPTS, max_new_tokens=6, eos_token_id=None, stream=True)
    steps = iter(stream)
    next(steps), next(steps)
    other = [[3, 3, 3, 3], [4, 4, 4, 4, 4, 4, 4, 4, 4], [5]]
    lr.generate(engine, other, max_new_tokens=6, eos_token_id=None)
    list(steps)
    assert stream.output.tokens == alone
    list(stream)                                   # iterating again keeps the output
    assert stream.output.tokens == alone


def test_bf16_decode_paths_agree(tiny):
    """The device-count path (CUDA's) adds the attention and MLP outputs to the residual with
    the same roundings as the all-rows path and the reference: bf16 logits equal exactly. At a
    tau just above 0 every row still runs, but through the router (not tau 0's shortcut)."""
    model = lr.load(tiny[0], dtype=torch.bfloat16)
    model.randomize_adapter(seed=1)
    engine = lr.InferenceModel(model)
    ids = torch.tensor([[5, 9, 200, 3]])
    logits = []
    for host_counts in (True, False):
        cache = engine.new_cache(1, 12)
        last, _ = engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), cache, 1e-6)
        state = engine.decode_state(cache)
        for t in (7, 8, 9):
            state.tokens.fill_(t)
            engine.decode_step(state, cache, 1e-6, host_counts=host_counts)
            assert state.executed.all()
        logits.append(state.logits.clone())
    assert torch.equal(logits[0], logits[1])


def test_eos_ends_each_sequence(routed):
    engine = lr.InferenceModel(routed)
    free = lr.generate(engine, PROMPTS, max_new_tokens=8, eos_token_id=None).tokens
    eos = free[0][2]
    for sync_every in (1, 3, 8):
        out = lr.generate(engine, PROMPTS, max_new_tokens=8, eos_token_id=eos, sync_every=sync_every)
        for row, ref in zip(out.tokens, free):
            assert row == (ref[:ref.index(eos) + 1] if eos in ref else ref)
    # a sequence that ended is not counted in the stats after its end
    assert out.valid[0].sum() == len(PROMPTS[0]) + len(out.tokens[0]) - 1


def test_seeded_sampling(routed):
    engine = lr.InferenceModel(routed)
    kw = dict(max_new_tokens=6, temperature=1.0, top_k=50, top_p=0.9, eos_token_id=None)
    a = lr.generate(engine, PROMPTS, seed=3, **kw).tokens
    assert a == lr.generate(engine, PROMPTS, seed=3, **kw).tokens
    greedy = lr.generate(engine, PROMPTS, max_new_tokens=6, eos_token_id=None).tokens
    assert lr.generate(engine, PROMPTS, max_new_tokens=6, temperature=1.0, top_k=1, seed=0,
                       eos_token_id=None).tokens == greedy


def test_text_prompts_chat_template_and_stop_strings():
    """The bundled demo model: text through its tokenizer and chat template; a stop string ends
    the sequence at the token that completes it."""
    model = lr.load(DEMO_DIR, adapter=DEMO_DIR / "adapter")
    engine = lr.InferenceModel(model)
    tok = load_tokenizer(engine)
    prompts = ["Find flights from Paris to Rome.", [{"role": "user", "content": "Run the tests."}]]
    free = lr.generate(engine, prompts, max_new_tokens=12, eos_token_id=None)
    chat = tok.apply_chat_template([{"role": "user", "content": prompts[0]}], tokenize=False,
                                   add_generation_prompt=True)
    by_ids = lr.generate(engine, [tok.encode(chat, add_special_tokens=False)], max_new_tokens=12,
                         eos_token_id=None)
    assert by_ids.tokens[0] == free.tokens[0]
    assert free.text[0] == tok.decode(free.tokens[0], skip_special_tokens=True)
    full = tok.decode(free.tokens[0])
    stop = full[len(tok.decode(free.tokens[0][:3])):][:2]             # text of tokens 4..
    assert stop and stop in full
    cut = lr.generate(engine, prompts, max_new_tokens=12, eos_token_id=None, stop=stop)
    n = next(k for k in range(1, 13) if stop in tok.decode(free.tokens[0][:k]))
    assert cut.tokens[0] == free.tokens[0][:n]


def test_with_adapter_shares_the_base(tiny, tmp_path):
    a = lr.load(tiny[0])
    a.randomize_adapter(seed=1)
    b = lr.load(tiny[0])
    b.randomize_adapter(seed=2)
    b.save_adapter(tmp_path / "b")
    engine_a = lr.InferenceModel(a, merge=False)
    engine_b = engine_a.with_adapter(tmp_path / "b")
    assert engine_b.blocks[0].qkv_w is engine_a.blocks[0].qkv_w
    kw = dict(max_new_tokens=5, eos_token_id=None)
    assert lr.generate(engine_b, PROMPTS, **kw).tokens == reference_greedy(b, PROMPTS, 5)
    assert lr.generate(engine_a, PROMPTS, **kw).tokens == reference_greedy(a, PROMPTS, 5)
    with pytest.raises(ValueError, match="merged into the weights"):
        lr.InferenceModel(a).with_adapter(tmp_path / "b")
    b.lr_config = dataclasses.replace(b.lr_config, granularity="sequence", tau=0.4)
    b.save_adapter(tmp_path / "b_seq")
    engine_c = engine_a.with_adapter(tmp_path / "b_seq")       # the adapter's own settings
    assert (engine_c.lr_config.granularity, engine_c.lr_config.tau) == ("sequence", 0.4)
    assert a.lr_config.granularity == "token"
    assert lr.generate(engine_c, PROMPTS, **kw).tokens == reference_greedy(b, PROMPTS, 5)


def test_adapter_for_another_backbone_shape(tmp_path):
    save_random_qwen2(tmp_path / "small")
    save_random_qwen2(tmp_path / "wide", hidden_size=128)
    lr.load(tmp_path / "wide").save_adapter(tmp_path / "wide_adapter")
    with pytest.raises(lr.CheckpointError, match="hidden_size"):
        lr.load(tmp_path / "small", adapter=tmp_path / "wide_adapter")
    with pytest.raises(lr.CheckpointError, match="hidden_size"):
        lr.InferenceModel(lr.load(tmp_path / "small"), merge=False).with_adapter(tmp_path / "wide_adapter")


def test_stats(tiny):
    model = lr.load(tiny[0])
    out = lr.generate(model, [[1, 2, 3]], max_new_tokens=4, skip_layers=[0], eos_token_id=None)
    s = out.stats
    assert s["skip_rate_per_layer"] == [1.0, 0.0, 0.0]
    assert 0 < s["block_flops_skipped_pct"] < 100 / 3 and 0 < s["total_flops_skipped_pct"] < s["block_flops_skipped_pct"]
    assert s["decode_ms_per_step"] == s["decode_ms_per_token"] > 0        # batch 1
    assert s["prefill_ms"] > 0 and s["decode_steps"] == 3
    assert s["new_tokens"] == 4 and s["cuda_graph"] is False


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[1, 999]]), r"outside \[0, 257\)"),
    (dict(prompts="hello"), "need the checkpoint's tokenizer"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(stop=[""]), "stop must be a non-empty string"),
    (dict(tau=1.5), "tau"),
    (dict(skip_layers=[3]), r"block indices must be integers in \[0, 3\)"),
    (dict(max_new_tokens=1000), "needs 1002 cache slots; the KV cache holds at most 256"),
])
def test_errors(tiny, kwargs, match):
    model = lr.load(tiny[0])
    args = dict(prompts=[[1, 2]], max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=match):
        lr.generate(model, **args)


def test_prompt_longer_than_the_cache(tiny):
    engine = lr.InferenceModel(lr.load(tiny[0]), max_cache_len=16)
    with pytest.raises(ValueError, match="a prompt of 20 tokens \\+ max_new_tokens 1 needs 21 cache slots"):
        lr.generate(engine, [list(range(20))], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"max_cache_len must be in \[1, 256\]"):
        lr.InferenceModel(lr.load(tiny[0]), max_cache_len=1000)


@contextlib.contextmanager
def no_host_reads():
    """Any read of a tensor's value into Python fails (what a sync would be on a GPU)."""
    names = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def f(self, *args, **kwargs):
            raise AssertionError(f"host read of a tensor: Tensor.{name}")
        return f

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set without CUDA)")
@pytest.mark.parametrize("kv_policy", ["compute", "drop"])
def test_decode_step_reads_nothing_back(routed, monkeypatch, kv_policy):
    """With the Triton kernels (interpreter on CPU), a decode step reads no device value into
    Python but the blocks' predicates, once per block (engine.read_predicate: the CPU's
    stand-in for the CUDA graph's IF nodes): the counts stay on the device, as a CUDA graph
    needs. It still matches the reference path."""
    from layerroute_rt.runtime import engine as engine_module

    monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")
    routed.lr_config = dataclasses.replace(routed.lr_config, kv_policy=kv_policy)
    engine = lr.InferenceModel(routed, merge=False)
    ids = torch.tensor([[0, 0, 5, 9, 200], [17, 1, 2, 3, 4]])
    cache = engine.new_cache(2, 8)
    logits, _ = engine.prefill(ids, ids != 0, cache, 0.5)
    state = engine.decode_state(cache)
    state.tokens.copy_(logits.argmax(-1))
    reads = []
    real = engine_module.read_predicate
    monkeypatch.setattr(engine_module, "read_predicate", lambda p: reads.append(p) or real(p))
    with no_host_reads():
        engine.decode_step(state, cache, 0.5, host_counts=False)
    assert len(reads) == len(engine.blocks)
    assert all(p._base is state.pred or p.data_ptr() in
               {state.pred[i].data_ptr() for i in range(len(engine.blocks))} for p in reads)
    monkeypatch.delenv("LAYERROUTE_BACKEND")
    ref_cache = KVCache(routed.config, 2, 8, torch.float32, "cpu")
    routed(ids, attention_mask=ids != 0, cache=ref_cache)
    ref = routed(state.tokens[:, None], cache=ref_cache)[:, -1]
    torch.testing.assert_close(state.logits, ref, rtol=1e-4, atol=1e-4)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_cuda_graph_equals_eager(tiny, granularity):
    model = lr.load(tiny[0], device="cuda")
    model.randomize_adapter(seed=1)
    model.lr_config = dataclasses.replace(model.lr_config, granularity=granularity)
    kw = dict(max_new_tokens=10, eos_token_id=None)
    graph_engine = lr.InferenceModel(model)
    eager_engine = lr.InferenceModel(model, use_cuda_graphs=False)
    other = [[3, 3, 3, 3], [4, 4, 4, 4, 4, 4, 4, 4, 4], [5]]          # the same shape again:
    for prompts in (PROMPTS, other):                                  # the graph is replayed
        graphed = lr.generate(graph_engine, prompts, **kw)
        eager = lr.generate(eager_engine, prompts, **kw)
        assert graphed.stats["cuda_graph"] and not eager.stats["cuda_graph"]
        assert graphed.tokens == eager.tokens
        assert torch.equal(graphed.executed, eager.executed)
    sampled = dict(kw, temperature=0.8, top_p=0.9, seed=3)
    assert lr.generate(graph_engine, other, **sampled).tokens == lr.generate(eager_engine, other, **sampled).tokens


@needs_cuda
def test_cuda_decode_step_does_not_synchronise(tiny):
    model = lr.load(tiny[0], device="cuda")
    model.randomize_adapter(seed=1)
    engine = lr.InferenceModel(model)
    ids = torch.tensor([[5, 9, 200, 3]], device="cuda")
    cache = engine.new_cache(1, 16)
    logits, _ = engine.prefill(ids, ids >= 0, cache, 0.5)
    state = engine.decode_state(cache)
    state.tokens.copy_(logits.argmax(-1))
    engine.decode_step(state, cache, 0.5)                   # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.decode_step(state, cache, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("merge", [False, True])
def test_engine_holds_no_second_copy_of_the_weights(tiny, merge):
    """The fused weights replace the source's: unmerged, the source model and the engine hold
    the checkpoint's bytes once; merged, only the projections whose LoRA is merged in (q, k,
    v, o by default) exist twice (W in the source, W + scale B A in the engine). At
    Qwen2.5-0.5B's shapes that is 9% of the weights (under issue 13's 1.1x)."""
    model = lr.load(tiny[0])
    model.randomize_adapter(seed=1)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    checkpoint_bytes = _storage_bytes(frozen)
    engine = lr.InferenceModel(model, merge=merge)
    fused = [t for b in engine.blocks for t in (b.qkv_w, b.qkv_b, b.o_w, b.gate_up_w, b.down_w)]
    held = _storage_bytes([p for p in model.parameters() if not p.requires_grad] + fused)
    cfg = model.config
    shapes = cfg.linear_shapes()
    merged = sum(shapes[n][0] * shapes[n][1] for n in model.lr_config.targets) * 4 * len(model.blocks)
    assert held == checkpoint_bytes + (merged if merge else 0)
    big = lr.BackboneConfig(**{k: v for k, v in QWEN25_05B.items()})
    big_shapes = big.linear_shapes()
    per_block = sum(o * i for o, i in big_shapes.values()) + 2 * big.hidden_size + \
        big_shapes["q_proj"][0] + 2 * big_shapes["k_proj"][0]
    total = big.num_hidden_layers * per_block + big.vocab_size * big.hidden_size + big.hidden_size
    extra = big.num_hidden_layers * sum(big_shapes[n][0] * big_shapes[n][1] for n in model.lr_config.targets)
    assert (total + extra) / total < 1.1
    # the engine still generates as the reference path, and the source model still runs as
    # it did (its projections are views of the engine's tensors, or its own)
    assert lr.generate(engine, PROMPTS, max_new_tokens=3, eos_token_id=None).tokens == \
        reference_greedy(model, PROMPTS, 3)
