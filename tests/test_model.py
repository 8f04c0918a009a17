"""The LayerRoute model against transformers (and peft), and its two paths against each other."""
from __future__ import annotations

import pytest
import torch
import transformers

import layerroute_rt as lr
from layerroute_rt.model import modeling as model_mod
from qwen_factory import QWEN25_05B, save_random_qwen2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf = save_random_qwen2(path)
    return path, hf


@pytest.fixture(scope="module")
def tiny_untied_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_untied")
    hf = save_random_qwen2(path, seed=1, tie_word_embeddings=False)
    return path, hf


def ids(batch=2, seq=13, vocab=257, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Equality with transformers and peft
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny_dir", "tiny_untied_dir"])
def test_dense_equals_transformers(which, request):
    path, hf = request.getfixturevalue(which)
    model = lr.load(path)
    x = ids()
    with torch.no_grad():
        ref = hf(x).logits
    assert rel_err(model(x, tau=0.0), ref) < 1e-4
    assert rel_err(model.train_forward(x, tau=0.0).logits, ref) < 1e-4


def test_dense_equals_transformers_qwen25_05b_shapes(tmp_path):
    """The full Qwen2.5-0.5B shapes (vocab 151936, 24 blocks, 14/2 heads), random weights, fp32."""
    hf = save_random_qwen2(tmp_path, **QWEN25_05B)
    model = lr.load(tmp_path)
    assert sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad) == 494_032_768
    x = ids(batch=1, seq=6, vocab=QWEN25_05B["vocab_size"])
    with torch.no_grad():
        ref = hf(x).logits
    del hf
    assert rel_err(model(x, tau=0.0), ref) < 1e-4


def test_random_adapter_equals_transformers_plus_peft(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    path, _ = tiny_dir
    model = lr.load(path)
    model.randomize_adapter(seed=3)
    model.export_peft(tmp_path / "peft")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    x = ids(seed=5)
    with torch.no_grad():
        ref = hf(x).logits
        base = hf.get_base_model()
    ours = model(x, tau=0.0)
    assert rel_err(ours, ref) < 1e-4
    with torch.no_grad(), hf.disable_adapter():
        plain = base(x).logits
    assert rel_err(ours, plain) > 1e-3, "the random adapter must change the logits"


def test_load_dtypes(tiny_dir):
    path, hf = tiny_dir
    x = ids()
    with torch.no_grad():
        ref = hf(x).logits
    for dtype, tol in [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)]:
        model = lr.load(path, dtype=dtype)
        assert model.model.embed_tokens.weight.dtype == dtype
        assert model.blocks[0].router.weight.dtype == torch.float32   # trainable stays fp32
        out = model(x, tau=0.0)
        assert out.dtype == dtype and rel_err(out, ref) < tol


# ---------------------------------------------------------------------------------------------
# Real skipping in the reference path
# ---------------------------------------------------------------------------------------------

def routed(path, seed=0, **config):
    model = lr.load(path, config=lr.LayerRouteConfig(**config))
    model.randomize_adapter(seed=seed)
    return model


@pytest.mark.parametrize("kv_policy", ["compute", "drop"])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_train_path_equals_reference_path(tiny_dir, kv_policy, granularity):
    model = routed(tiny_dir[0], kv_policy=kv_policy, granularity=granularity)
    x = ids(batch=3, seq=17, seed=1)
    logits, executed = model(x, return_executed=True)
    train = model.train_forward(x)
    assert torch.equal(train.executed, executed)
    frac = executed.float().mean()
    assert 0.1 < frac < 0.9, f"test needs a mix of running and skipping tokens, got {frac:.2f}"
    assert rel_err(train.logits, logits) < 1e-5


@pytest.mark.parametrize("kv_policy", ["compute", "drop"])
def test_skipped_rows_are_not_fed_to_the_block(tiny_dir, kv_policy):
    """q_proj, o_proj and the MLP see only executing rows; k/v see every row under "compute"."""
    model = routed(tiny_dir[0], kv_policy=kv_policy)
    rows: dict[str, list[int]] = {}
    hooks = []
    for i, block in enumerate(model.blocks):
        for name, mod in [("q", block.self_attn.q_proj), ("k", block.self_attn.k_proj),
                          ("o", block.self_attn.o_proj), ("mlp", block.mlp.down_proj)]:
            key = f"{i}.{name}"
            rows[key] = []
            hooks.append(mod.register_forward_hook(
                lambda m, a, out, key=key: rows[key].append(a[0].reshape(-1, a[0].shape[-1]).shape[0])))
    x = ids(batch=2, seq=11, seed=2)
    _, executed = model(x, return_executed=True)
    for h in hooks:
        h.remove()
    n = x.numel()
    for i in range(len(model.blocks)):
        ran = int(executed[i].sum())
        expected = [ran] if ran else []
        assert rows[f"{i}.q"] == expected and rows[f"{i}.o"] == expected and rows[f"{i}.mlp"] == expected
        assert rows[f"{i}.k"] == ([n] if kv_policy == "compute" else expected)


def test_skipped_tokens_keep_their_residual(tmp_path):
    """One block: a token that skips it ends with exactly the embedding's logits."""
    path = tmp_path / "one"
    save_random_qwen2(path, num_hidden_layers=1)
    model = routed(path, seed=4)
    x = ids(batch=2, seq=15, seed=3)
    logits, executed = model(x, return_executed=True)
    bypass = model(x, skip_layers=[0])
    skipped = ~executed[0]
    assert 0 < int(skipped.sum()) < x.numel()
    assert torch.equal(logits[skipped], bypass[skipped])
    assert not torch.allclose(logits[~skipped], bypass[~skipped])


def test_skip_all_layers_leaves_embedding_norm_head(tiny_dir):
    path, hf = tiny_dir
    model = routed(path)
    x = ids()
    with torch.no_grad():
        expected = hf.lm_head(hf.model.norm(hf.model.embed_tokens(x)))
    out = model(x, skip_layers=list(range(len(model.blocks))))
    assert rel_err(out, expected) < 1e-6


def test_skip_layers_equals_pruned_transformers(tiny_dir):
    """skip_layers=[1] is ShortGPT-style pruning: transformers with block 1 deleted."""
    path, _ = tiny_dir
    model = lr.load(path)
    pruned = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    del pruned.model.layers[1]
    pruned.config.num_hidden_layers -= 1
    pruned.config.layer_types = pruned.config.layer_types[:-1]
    for i, layer in enumerate(pruned.model.layers):
        layer.self_attn.layer_idx = i
    x = ids()
    with torch.no_grad():
        ref = pruned(x, use_cache=False).logits
    assert rel_err(model(x, tau=0.0, skip_layers=[1]), ref) < 1e-4
    assert rel_err(model.train_forward(x, tau=0.0, skip_layers=[1]).logits, ref) < 1e-4


def test_tau_extremes(tiny_dir):
    model = routed(tiny_dir[0])
    x = ids()
    _, executed = model(x, tau=0.0, return_executed=True)
    assert executed.all()
    _, executed = model(x, tau=1.0, return_executed=True)
    assert not executed.any()


# ---------------------------------------------------------------------------------------------
# KV cache: prefill + decode equal the full forward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_policy", ["compute", "drop"])
def test_prefill_then_decode_equals_full_forward(tiny_dir, kv_policy):
    model = routed(tiny_dir[0], kv_policy=kv_policy, seed=6)
    x = ids(batch=2, seq=14, seed=4)
    full, executed = model(x, return_executed=True)
    cache = lr.KVCache(model.config, batch_size=2, max_len=20, dtype=torch.float32, device="cpu")
    parts, parts_exec = [], []
    for lo, hi in [(0, 8), (8, 9), (9, 12), (12, 13), (13, 14)]:
        out, ex = model(x[:, lo:hi], cache=cache, return_executed=True)
        parts.append(out)
        parts_exec.append(ex)
    assert torch.equal(torch.cat(parts_exec, dim=2), executed)
    assert rel_err(torch.cat(parts, dim=1), full) < 1e-5


def test_sequence_granularity_decides_at_prefill(tiny_dir):
    model = routed(tiny_dir[0], granularity="sequence", seed=7)
    x = ids(batch=4, seq=9, seed=5)
    cache = lr.KVCache(model.config, batch_size=4, max_len=12, dtype=torch.float32, device="cpu")
    _, prefill_exec = model(x[:, :6], cache=cache, return_executed=True)
    # one decision per (layer, sequence), held for every token of the step
    assert torch.equal(prefill_exec, prefill_exec[:, :, :1].expand_as(prefill_exec))
    assert prefill_exec.any() and not prefill_exec.all()
    for t in range(6, 9):
        _, ex = model(x[:, t:t + 1], cache=cache, return_executed=True)
        assert torch.equal(ex[:, :, 0], prefill_exec[:, :, 0])


@pytest.mark.parametrize("kv_policy", ["compute", "drop"])
def test_left_padded_batch_equals_one_by_one(tiny_dir, kv_policy):
    model = routed(tiny_dir[0], kv_policy=kv_policy, seed=8)
    seqs = [ids(1, n, seed=10 + n)[0] for n in (5, 9, 7)]
    width = max(len(s) for s in seqs)
    batch = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for b, s in enumerate(seqs):
        batch[b, width - len(s):] = s
        mask[b, width - len(s):] = True
    cache = lr.KVCache(model.config, batch_size=3, max_len=width + 2, dtype=torch.float32, device="cpu")
    out = model(batch, attention_mask=mask, cache=cache)
    nxt = ids(3, 1, seed=99)
    step = model(nxt, cache=cache)
    for b, s in enumerate(seqs):
        single = model(torch.cat([s, nxt[b]])[None])
        assert rel_err(out[b, width - len(s):], single[0, :-1]) < 1e-5
        assert rel_err(step[b, 0], single[0, -1]) < 1e-5


def test_cache_errors(tiny_dir):
    model = lr.load(tiny_dir[0])
    cache = lr.KVCache(model.config, batch_size=1, max_len=4, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="exceed max_len 4"):
        model(ids(1, 5), cache=cache)
    with pytest.raises(ValueError, match="built for batch 1"):
        model(ids(2, 2), cache=cache)


# ---------------------------------------------------------------------------------------------
# Autograd path
# ---------------------------------------------------------------------------------------------

def test_gradients_reach_routers_and_lora_only(tiny_dir):
    model = routed(tiny_dir[0])
    x = ids(seed=6)
    out = model.train_forward(x, labels=x)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {
        "weight", "bias", "lora_A", "lora_B"}
    assert all(".router." in n or ".lora_" in n for n, p in model.named_parameters() if p.requires_grad)


_INTERPRETED = __import__("os").environ.get("TRITON_INTERPRET") == "1"
_ON_CPU = pytest.mark.skipif(not _INTERPRETED, reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1")
_ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
_TRITON_DEVICES = ([pytest.param("cpu", dt, marks=_ON_CPU) for dt in (torch.float32, torch.float16)]
                   + [pytest.param("cuda", dt, marks=_ON_CUDA)
                      for dt in (torch.float32, torch.float16, torch.bfloat16)])


@pytest.mark.parametrize("device,dtype", _TRITON_DEVICES)
def test_training_through_the_triton_lora_kernel(tiny_dir, monkeypatch, device, dtype):
    """The training path's LoRA projections go through ops.lora_linear: with the Triton kernel
    and its autograd backward (CUDA, or the interpreter on CPU), loss and every trainable
    gradient agree with the torch expression's: in fp32 directly, in half precision with an
    error against the fp32 result at most twice torch's own (STYLE.md)."""
    def loss_and_grads(backend, dt):
        monkeypatch.setenv("LAYERROUTE_BACKEND", backend)
        model = routed(tiny_dir[0]).to(device, dt)
        for name, p in model.named_parameters():     # routers and LoRA stay float32
            if p.requires_grad:
                p.data = p.data.float()
        x = ids(seed=6).to(device)
        out = model.train_forward(x, labels=x)
        out.loss.backward()
        return [out.loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad]

    from python_kernels import lora_linear as kernel
    calls = []
    apply = kernel.LoRALinearFunction.apply
    monkeypatch.setattr(kernel.LoRALinearFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    exact = loss_and_grads("torch", torch.float32)
    torch_dt = loss_and_grads("torch", dtype)
    assert not calls
    triton_dt = loss_and_grads("triton", dtype)
    assert len(calls) == 4 * len(routed(tiny_dir[0]).blocks)      # q, k, v, o per block
    for i, (want, t, k) in enumerate(zip(exact, torch_dt, triton_dt)):
        if dtype == torch.float32:
            assert rel_err(k, want) < 1e-4, i
        else:
            assert rel_err(k, want) <= 2 * rel_err(t, want) + 1e-3, (i, rel_err(k, want), rel_err(t, want))


class TrainLoss(torch.nn.Module):
    """forward(x) = the training loss with labels x, so torch.func.functional_call can swap params."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x):
        return self.m.train_forward(x, labels=x).loss


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def test_gradcheck_soft_part_float64(tmp_path):
    """gradcheck (float64) of the loss w.r.t. LoRA, with some blocks skipped by the gates.

    Router weights are 0 so p does not depend on h and the hard decisions are fixed (layer 1 skips,
    the others run); the straight-through gate then has value and gradient of a constant."""
    path = tmp_path / "m"
    save_random_qwen2(path, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=31)
    model = routed(path, seed=1, rank=2).double()
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.router.weight.zero_()
            block.router.bias.fill_(-2.0 if i == 1 else 2.0)
    x = ids(batch=2, seq=5, vocab=31, seed=7)
    names = list(_lora_params(model))
    inputs = tuple(p.detach().clone().requires_grad_(True) for p in _lora_params(model).values())

    def f(*params):
        return torch.func.functional_call(TrainLoss(model), {f"m.{n}": p for n, p in zip(names, params)},
                                          (x,), strict=False)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_router_gradient_matches_finite_differences(tmp_path, monkeypatch):
    """The straight-through gradient w.r.t. the routers is the exact gradient of the surrogate
    g = hard + p(theta) - p(theta0): check it against central differences of that surrogate."""
    path = tmp_path / "m"
    save_random_qwen2(path, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=31)
    model = routed(path, seed=2, rank=2).double()
    x = ids(batch=2, seq=6, vocab=31, seed=8)
    out = model.train_forward(x, labels=x)
    out.loss.backward()
    routers = {n: p for n, p in model.named_parameters() if ".router." in n}
    p0 = [p.detach().clone() for p in out.probs.unbind(0)]
    hard0 = out.executed.clone()

    def surrogate_loss():
        calls = iter(p0)
        monkeypatch.setattr(model_mod, "gate_mix", lambda h, out, p, hard:
                            h + (hard.to(p.dtype) + p - next(calls))[..., None] * (out - h))
        with torch.no_grad():
            res = model.train_forward(x, labels=x)
        monkeypatch.undo()
        assert torch.equal(res.executed, hard0), "a decision flipped under the perturbation"
        return float(res.loss)

    eps = 1e-6
    checked = 0
    for name, p in routers.items():
        flat = p.data.view(-1)
        for j in range(0, flat.numel(), 3):
            old = float(flat[j])
            flat[j] = old + eps
            up = surrogate_loss()
            flat[j] = old - eps
            down = surrogate_loss()
            flat[j] = old
            fd = (up - down) / (2 * eps)
            assert abs(fd - float(p.grad.view(-1)[j])) <= 1e-6 + 1e-4 * abs(fd), (name, j)
            checked += 1
    assert checked > 20


def test_gate_term_and_loss_mask(tiny_dir):
    model = routed(tiny_dir[0], gate_lambda=0.5)
    x = ids(seed=9)
    out = model.train_forward(x, labels=x)
    assert torch.allclose(out.gate_loss, out.probs.mean())
    assert torch.allclose(out.loss, out.ce + 0.5 * out.gate_loss)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, 7:] = True
    masked = model.train_forward(x, labels=x, loss_mask=mask)
    logp = torch.log_softmax(out.logits[:, 6:-1].float(), -1)
    ce = -logp.gather(-1, x[:, 7:, None]).mean()
    assert torch.allclose(masked.ce, ce, rtol=1e-5)
    target = lr.load(tiny_dir[0], config=lr.LayerRouteConfig(target_rate=0.25))
    t = target.train_forward(x)
    assert torch.allclose(t.gate_loss, (t.probs.mean() - 0.25) ** 2)


def test_agreement_term_is_the_per_block_variance_of_p(tiny_dir):
    """agree_loss = mean over blocks of the (population) variance of p over the gated tokens;
    agree_lambda adds it to the loss; under `sequence` each sequence's p counts once."""
    model = routed(tiny_dir[0], gate_lambda=0.5, agree_lambda=2.0)
    x = ids(seed=9)
    out = model.train_forward(x, labels=x)
    var = out.probs.flatten(1).var(1, unbiased=False).mean()
    assert float(out.agree_loss) > 1e-6
    assert torch.allclose(out.agree_loss, var, rtol=1e-5)
    assert torch.allclose(out.loss, out.ce + 0.5 * out.gate_loss + 2.0 * out.agree_loss)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, 5:] = True                                    # only these tokens are gated
    m = model.train_forward(x, labels=x, route_mask=mask)
    gated = m.probs[:, mask]                               # [L, n]
    assert torch.allclose(m.agree_loss, gated.var(1, unbiased=False).mean(), rtol=1e-5)
    off = routed(tiny_dir[0], gate_lambda=0.5)
    o = off.train_forward(x, labels=x)
    assert torch.allclose(o.loss, o.ce + 0.5 * o.gate_loss)            # default 0: left out
    seq = routed(tiny_dir[0], granularity="sequence", agree_lambda=1.0)
    s_out = seq.train_forward(x, labels=x)
    assert torch.allclose(s_out.agree_loss, s_out.probs[:, :, 0].var(1, unbiased=False).mean(), rtol=1e-5)
    for bad in (-1.0, True, "1"):
        with pytest.raises(ValueError, match="agree_lambda"):
            lr.LayerRouteConfig(agree_lambda=bad)


# ---------------------------------------------------------------------------------------------
# Adapters, parameter counts, errors
# ---------------------------------------------------------------------------------------------

def test_adapter_round_trip(tiny_dir, tmp_path):
    path, _ = tiny_dir
    model = routed(path, seed=11, granularity="sequence", rank=4, alpha=8)
    model.save_adapter(tmp_path / "adapter")
    again = lr.load(path, adapter=tmp_path / "adapter")
    assert again.lr_config == model.lr_config
    x = ids(seed=12)
    assert torch.equal(again(x), model(x))
    with pytest.raises(ValueError, match="rank: adapter 4, config 8"):
        lr.load(path, adapter=tmp_path / "adapter", config=lr.LayerRouteConfig())
    tuned = lr.load(path, adapter=tmp_path / "adapter",
                    config=lr.LayerRouteConfig(rank=4, alpha=8, tau=0.0))
    assert tuned.lr_config.tau == 0.0


def test_adapter_for_another_backbone_is_rejected(tiny_dir, tiny_untied_dir, tmp_path):
    other = tmp_path / "other"
    save_random_qwen2(other, hidden_size=32, intermediate_size=48)
    lr.load(other).save_adapter(tmp_path / "adapter")
    with pytest.raises(lr.CheckpointError, match=r"adapter_config.json.*another backbone shape.*hidden_size: adapter 32, backbone 64"):
        lr.load(tiny_dir[0], adapter=tmp_path / "adapter")
    with pytest.raises(lr.CheckpointNotFoundError, match="adapter_config.json: missing"):
        lr.load(tiny_dir[0], adapter=tmp_path)


def test_count_parameters_qwen25_05b():
    cfg = lr.BackboneConfig(**{k: v for k, v in QWEN25_05B.items()}, model_type="qwen2")
    counts = lr.count_parameters(cfg, lr.LayerRouteConfig())
    assert counts == {"routers": 21_528, "lora": 1_081_344, "trainable": 1_102_872,
                      "backbone": 494_032_768}
    assert f"{100 * counts['trainable'] / counts['backbone']:.2f}" == "0.22"


def test_count_parameters_matches_a_built_model(tiny_untied_dir):
    model = lr.load(tiny_untied_dir[0], config=lr.LayerRouteConfig(rank=3, targets=("q_proj", "down_proj")))
    counts = lr.count_parameters(model.config, model.lr_config)
    params = dict(model.named_parameters())
    assert counts["routers"] == sum(p.numel() for n, p in params.items() if ".router." in n)
    assert counts["lora"] == sum(p.numel() for n, p in params.items() if ".lora_" in n)
    assert counts["backbone"] == sum(p.numel() for p in params.values() if not p.requires_grad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(tau=1.5), r"tau must be a number in \[0, 1\]"),
    (dict(tau=-0.1), r"tau must be a number in \[0, 1\]"),
    (dict(targets=("q_proj", "qkv")), r"unknown target module\(s\) \['qkv'\]"),
    (dict(granularity="batch"), "granularity must be one of"),
    (dict(kv_policy="keep"), "kv_policy must be one of"),
    (dict(alpha=0), "alpha must be a number > 0"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr.LayerRouteConfig(**kwargs)


def test_bad_call_arguments(tiny_dir):
    model = lr.load(tiny_dir[0])
    with pytest.raises(ValueError, match=r"tau must be a number in \[0, 1\]"):
        model(ids(), tau=2.0)
    with pytest.raises(ValueError, match=r"skip_layers: block indices must be integers in \[0, 3\)"):
        model(ids(), skip_layers=[3])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 257\)"):
        model(torch.tensor([[1, 257]]))
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype must be"):
        lr.load(tiny_dir[0], dtype=torch.int8)


# ---------------------------------------------------------------------------------------------
# Review fixes: adapters by name, config checks, labels, sequence steps, NaN-safe gate
# ---------------------------------------------------------------------------------------------

def test_save_adapter_never_replaces_a_foreign_directory(tiny_dir, tmp_path):
    model = lr.load(tiny_dir[0])
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("keep me")
    with pytest.raises(lr.CheckpointError, match=r"project: exists and holds other files \(notes.txt\)"):
        model.save_adapter(tmp_path / "project")
    with pytest.raises(lr.CheckpointError, match="refusing to replace"):
        model.export_peft(tmp_path / "project")
    assert (tmp_path / "project" / "notes.txt").read_text() == "keep me"
    model.save_adapter(tmp_path / "adapter")
    model.save_adapter(tmp_path / "adapter")          # an earlier adapter is replaced


def test_adapter_is_selected_by_name_not_requires_grad(tiny_dir, tmp_path):
    model = lr.load(tiny_dir[0])
    model.randomize_adapter(seed=2)
    model.requires_grad_(False)
    n = len(model.adapter_state_dict())
    assert n == 3 * (2 + 2 * 4)                       # 3 blocks: router w, b + A, B on 4 targets
    model.save_adapter(tmp_path / "a")
    again = lr.load(tiny_dir[0], adapter=tmp_path / "a")
    x = ids()
    assert torch.equal(again(x), model(x))


def test_load_adapter_checks_rank_alpha_targets(tiny_dir, tmp_path):
    lr.load(tiny_dir[0], config=lr.LayerRouteConfig(alpha=16)).save_adapter(tmp_path / "a")
    other = lr.load(tiny_dir[0], config=lr.LayerRouteConfig(alpha=64))
    with pytest.raises(lr.CheckpointError, match=r"adapter_config.json.*alpha: adapter 16.0, model 64.0"):
        other.load_adapter(tmp_path / "a")


def test_ignored_labels_equal_loss_mask(tiny_dir):
    model = lr.load(tiny_dir[0])
    x = ids(seed=13)
    labels = x.clone()
    labels[:, :6] = -100
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, :6] = False
    a = model.train_forward(x, labels=labels).ce
    b = model.train_forward(x, labels=x, loss_mask=mask).ce
    assert torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"labels: ids must lie in \[0, 257\) or be -100"):
        model.train_forward(x, labels=torch.full_like(x, 999))
    with pytest.raises(ValueError, match="labels shape"):
        model.train_forward(x, labels=x[:, :3])


def test_sequence_route_mask_and_new_step(tiny_dir):
    """The train path's route_mask has its inference counterpart; new_step re-decides."""
    model = routed(tiny_dir[0], granularity="sequence", seed=14)
    x = ids(batch=4, seq=12, seed=15)
    step = torch.zeros_like(x, dtype=torch.bool)
    step[:, 8:] = True
    train = model.train_forward(x, route_mask=step)
    logits, executed = model(x, route_mask=step, return_executed=True)
    assert torch.equal(train.executed, executed)
    assert rel_err(train.logits, logits) < 1e-5
    _, all_tokens = model(x, return_executed=True)
    assert not torch.equal(all_tokens, executed), "the route mask must matter in this test"

    held = lr.KVCache(model.config, batch_size=4, max_len=12, dtype=torch.float32, device="cpu")
    _, first = model(x[:, :8], cache=held, return_executed=True)
    _, kept = model(x[:, 8:], cache=held, return_executed=True)
    assert torch.equal(kept, first[:, :, :4])          # without new_step the decisions hold
    fresh = lr.KVCache(model.config, batch_size=4, max_len=12, dtype=torch.float32, device="cpu")
    model(x[:, :8], cache=fresh)
    fresh.new_step()
    _, second = model(x[:, 8:], cache=fresh, return_executed=True)
    assert torch.equal(second, second[:, :, :1].expand_as(second))   # one decision per sequence
    assert not torch.equal(second, kept)               # ... made anew from the new step's tokens


def test_cache_of_another_dtype_is_rejected(tiny_dir):
    model = lr.load(tiny_dir[0])
    cache = lr.KVCache(model.config, batch_size=1, max_len=4, dtype=torch.float16, device="cpu")
    with pytest.raises(ValueError, match="cache: built for torch.float16 on cpu, the model runs torch.float32"):
        model(ids(1, 2), cache=cache)


def test_gate_mix_is_exact_and_nan_safe():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    out = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.rand(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    hard = torch.tensor([[True, False, True], [False, False, True]])
    y = model_mod.gate_mix(h, out, p, hard)
    assert torch.equal(y, torch.where(hard[..., None], out, h))
    w = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    (y * w).sum().backward()
    # the straight-through formula h + g (out - h), g = hard + p - p.detach()
    h2, out2, p2 = (t.detach().clone().requires_grad_(True) for t in (h, out, p))
    ((h2 + (hard.double() + p2 - p2.detach())[..., None] * (out2 - h2)) * w).sum().backward()
    for a, b in [(h.grad, h2.grad), (out.grad, out2.grad), (p.grad, p2.grad)]:
        assert torch.allclose(a, b)
    inf_out = torch.full((1, 2, 4), float("inf"), dtype=torch.float16)
    h16 = torch.ones(1, 2, 4, dtype=torch.float16)
    mixed = model_mod.gate_mix(h16, inf_out, torch.zeros(1, 2), torch.tensor([[False, False]]))
    assert torch.equal(mixed, h16)


def test_unsupported_activation_is_rejected(tmp_path):
    save_random_qwen2(tmp_path, hidden_act="gelu")
    with pytest.raises(ValueError, match=r"config.json: hidden_act 'gelu' is not supported"):
        lr.load(tmp_path)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (14, 2), (6, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_causal_path_equals_masked_path(heads, kv_heads, dtype):
    """_attention without a mask (causal, KV heads as they are) equals the masked path (K/V
    repeated, explicit lower-triangular mask) and the textbook softmax."""
    g = torch.Generator().manual_seed(heads)
    B, T, hd = 2, 37, 16
    q = torch.randn(B, heads, T, hd, generator=g).to(dtype)
    k, v = (torch.randn(B, kv_heads, T, hd, generator=g).to(dtype) for _ in range(2))
    tril = torch.ones(T, T, dtype=torch.bool).tril()
    causal = model_mod._attention(q, k, v)
    masked = model_mod._attention(q, k, v, tril[None, None].expand(B, 1, T, T))
    kr, vr = (t.float().repeat_interleave(heads // kv_heads, 1) for t in (k, v))
    scores = (q.float() @ kr.transpose(-1, -2)) / hd ** 0.5
    want = scores.masked_fill(~tril, float("-inf")).softmax(-1) @ vr
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(causal.float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(masked.float(), want, atol=tol, rtol=tol)
