"""The fused block-stage kernels (route_kv, qkv_rope, linear_scatter_add, norm_gate_up,
norm_linear) against their torch references, under the Triton interpreter on CPU (or on CUDA):
fp32 and fp16, odd sizes, 0, 1 and all rows of a row list, with and without an unmerged LoRA,
K/V written for the skipping rows (kv_policy "compute") or not ("drop"), decode (one row per
sequence) and prefill (rows_per_seq > 1) layouts.

fp32: the kernel equals the reference to float32 rounding. fp16: the kernel's error against an
fp32 oracle (the reference on the inputs cast to float32) is at most twice the reference's own
fp16 error against it, plus one fp16 ulp of the values (STYLE.md)."""
import os

import pytest
import torch

from layerroute_rt import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1")

# Odd sizes: hidden 53, head dim 12 (RoPE halves of 6, padded), 6 query / 2 KV heads,
# intermediate 45, vocabulary 101, LoRA rank 5 per projection.
D, H, HKV, HD, INTER, VOCAB, RANK = 53, 6, 2, 12, 45, 101, 5
QD, KVD = H * HD, HKV * HD
EPS = 1e-6


def _rand(*shape, scale=1.0, dtype=torch.float32, g=None):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def _weights(dtype, lora: bool, n_out: int, k_in: int, g, bias: bool = False):
    w = _rand(n_out, k_in, scale=k_in ** -0.5, dtype=dtype, g=g)
    b = _rand(n_out, scale=0.1, dtype=dtype, g=g) if bias else None
    A = _rand(3 * RANK, k_in, scale=k_in ** -0.5, g=g) if lora else None
    B = _rand(n_out, 3 * RANK, scale=0.2, g=g) if lora else None
    return w, b, A, B


def _row_list(n_rows: int, live: str, g):
    """A row list over n_rows rows: `live` 0, 1 or all of them, in a random order, -1 after."""
    k = {"0": 0, "1": 1, "all": n_rows}[live]
    index = torch.full((n_rows,), -1, dtype=torch.int32)
    index[:k] = torch.randperm(n_rows, generator=g)[:k].to(torch.int32)
    return index.to(DEVICE), torch.tensor([k], dtype=torch.int32, device=DEVICE)


def _fp32(args):
    return [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _close(kernel, ref, oracle, dtype, what):
    """kernel and ref outputs (same dtype), oracle float32."""
    kernel, ref, oracle = kernel.float(), ref.float(), oracle.float()
    if kernel.numel() == 0:
        assert ref.numel() == 0
        return
    if dtype == torch.float32:
        torch.testing.assert_close(kernel, ref, rtol=2e-5, atol=2e-5, msg=what)
        return
    ulp = torch.finfo(dtype).eps * oracle.abs().max().clamp(min=1e-3)
    bound = 2 * (ref - oracle).abs().max() + ulp
    err = (kernel - oracle).abs().max()
    assert err <= bound, f"{what}: error {err:.3g} against the fp32 oracle, bound {bound:.3g}"


def _cache(n_seq: int, slots: int, dtype):
    k = torch.zeros(n_seq, HKV, slots, HD, dtype=dtype, device=DEVICE)
    return k, torch.zeros_like(k), torch.zeros(n_seq, slots, dtype=torch.bool, device=DEVICE)


LAYOUTS = {"decode": (7, 1), "prefill": (3, 5)}     # (sequences, rows per sequence)


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")


# qkv_rope -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("live", ["0", "1", "all"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_qkv_rope(triton_backend, dtype, live, lora, layout):
    g = torch.Generator().manual_seed(0)
    n_seq, T = LAYOUTS[layout]
    N = n_seq * T
    h = _rand(N, D, dtype=dtype, g=g)
    norm = (torch.rand(D, generator=g) + 0.5).to(dtype).to(DEVICE)
    w, b, A, B = _weights(dtype, lora, QD + 2 * KVD, D, g, bias=True)
    positions = torch.randint(0, 3000, (N,), generator=g).to(DEVICE)
    inv_freq = ops.rope_inv_freq(HD, 1e6, DEVICE)
    index, count = _row_list(N, live, g)
    slot = torch.tensor([2], device=DEVICE)
    results = []
    for fn, dt in ((ops.qkv_rope, dtype), (ops.qkv_rope_ref, dtype), (ops.qkv_rope_ref, torch.float32)):
        k, v, valid = _cache(n_seq, T + 3, dt)
        q = torch.full((N, QD), 7.0, dtype=dt, device=DEVICE)
        args = [h, index, count, norm, EPS, w, b, A, B, 2.0, positions, inv_freq, k, v, valid,
                slot, T, q]
        fn(*(_fp32(args) if dt != dtype else args))
        results.append((q, k, v, valid))
    (q, k, v, valid), (rq, rk, rv, rvalid), (oq, ok, ov, _) = results
    n = int(count[0])
    assert torch.equal(valid, rvalid) and int(valid.sum()) == n
    assert (q[n:] == 7).all()                              # rows past the count: untouched
    for got, ref, oracle, what in ((q[:n], rq[:n], oq[:n], "q"), (k, rk, ok, "k"), (v, rv, ov, "v")):
        _close(got, ref, oracle, dtype, what)


# route_kv -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("routed", [True, False])
@pytest.mark.parametrize("compute_kv", [True, False])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("bias", [-9.0, 0.0, 9.0])          # every row skips / some / none
def test_route_kv(triton_backend, dtype, routed, compute_kv, lora, bias):
    g = torch.Generator().manual_seed(1)
    n_seq, T = LAYOUTS["decode"] if routed else LAYOUTS["prefill"]
    N = n_seq * T
    h = _rand(N, D, dtype=dtype, g=g)
    router_w = _rand(D, scale=D ** -0.5, g=g)
    router_b = torch.tensor([bias], device=DEVICE)
    norm = (torch.rand(D, generator=g) + 0.5).to(dtype).to(DEVICE)
    w, b, A, B = _weights(dtype, lora, QD + 2 * KVD, D, g, bias=True)
    positions = torch.randint(0, 3000, (N,), generator=g).to(DEVICE)
    inv_freq = ops.rope_inv_freq(HD, 1e6, DEVICE)
    run = None if routed else (torch.sigmoid(h.float() @ router_w + bias) >= 0.5)
    slot = torch.tensor([1], device=DEVICE)
    results = []
    for fn, dt in ((ops.route_kv, dtype), (ops.route_kv_ref, dtype), (ops.route_kv_ref, torch.float32)):
        k, v, valid = _cache(n_seq, T + 2, dt)
        out = dict(index=torch.zeros(N, dtype=torch.int32, device=DEVICE),
                   count=torch.zeros(1, dtype=torch.int32, device=DEVICE),
                   pred=torch.zeros((), dtype=torch.bool, device=DEVICE),
                   executed=torch.zeros(N, dtype=torch.bool, device=DEVICE)) if routed else \
            dict(index=None, count=None, pred=None, executed=None)
        args = [h, router_w if routed else None, router_b if routed else None, 0.5, run,
                out["index"], out["count"], out["pred"], out["executed"], norm, EPS, w, b, A, B,
                2.0, positions, inv_freq, k, v, valid, slot, T]
        fn(*(_fp32(args) if dt != dtype else args), compute_kv)
        results.append((out, k, v, valid))
    (out, k, v, valid), (rout, rk, rv, rvalid), (_, ok, ov, _) = results
    decided = out["executed"] if routed else run
    if routed:
        for name in ("index", "count", "pred", "executed"):
            assert torch.equal(out[name], rout[name]), name
        n = int(out["count"][0])
        assert n == {-9.0: 0, 9.0: N}.get(bias, n) and (bias != 0.0 or 0 < n < N)
        assert bool(out["pred"]) == (n > 0)
    assert torch.equal(valid, rvalid)
    # K/V written: with a router, of every row (no second decision); with given decisions, of
    # the rows they leave out
    written = (torch.ones_like(decided) if routed else ~decided) if compute_kv else torch.zeros_like(decided)
    assert torch.equal(valid[:, 1:1 + T].reshape(-1), written)
    _close(k, rk, ok, dtype, "k")
    _close(v, rv, ov, dtype, "v")


def test_route_kv_one_decision_per_row_at_p_equal_tau(triton_backend):
    """Rows whose router score sits at tau to the last bit (h tiny: p = sigmoid(z) for |z| of a
    few 1e-7 is 0.5 or one of its float32 neighbours): the row list, the count, the predicate
    and `executed` are one decision per row, and every row has its K/V whatever it decided."""
    g = torch.Generator().manual_seed(7)
    N = 13
    h = _rand(N, D, g=g) * 2e-7
    router_w = _rand(D, scale=D ** -0.5, g=g)
    w, b, _, _ = _weights(torch.float32, False, QD + 2 * KVD, D, g, bias=True)
    k, v, valid = _cache(N, 3, torch.float32)
    out = dict(index=torch.zeros(N, dtype=torch.int32, device=DEVICE),
               count=torch.zeros(1, dtype=torch.int32, device=DEVICE),
               pred=torch.zeros((), dtype=torch.bool, device=DEVICE),
               executed=torch.zeros(N, dtype=torch.bool, device=DEVICE))
    ops.route_kv(h, router_w, torch.zeros(1, device=DEVICE), 0.5, None, out["index"], out["count"], out["pred"],
                 out["executed"], torch.ones(D, device=DEVICE), EPS, w, b, None, None, 1.0,
                 torch.arange(N, device=DEVICE), ops.rope_inv_freq(HD, 1e6, DEVICE), k, v, valid,
                 torch.tensor([1], device=DEVICE), 1, True)
    ran = out["executed"]
    n = int(out["count"][0])
    assert n == int(ran.sum()) and bool(out["pred"]) == (n > 0)
    assert 0 < n < N                                               # the inputs straddle tau
    assert out["index"][:n].tolist() == ran.nonzero().flatten().tolist() and (out["index"][n:] == -1).all()
    assert valid[:, 1].all() and not valid[:, [0, 2]].any()        # every row's K/V, at its slot
    assert (k[:, :, 1].abs().sum((1, 2)) > 0).all()


# linear_scatter_add ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("live", ["0", "1", "all"])
@pytest.mark.parametrize("lora", [False, True])
def test_linear_scatter_add(triton_backend, dtype, live, lora):
    g = torch.Generator().manual_seed(2)
    N, K = 9, 37
    x = _rand(N, K, dtype=dtype, g=g)
    w, _, A, B = _weights(dtype, lora, D, K, g)
    residual = _rand(N, D, dtype=dtype, g=g)
    index, count = _row_list(N, live, g)
    outs = []
    for fn, dt in ((ops.linear_scatter_add, dtype), (ops.linear_scatter_add_ref, dtype),
                   (ops.linear_scatter_add_ref, torch.float32)):
        r = residual.clone().to(dt)
        args = [x, index, count, w, A, B, 2.0, r]
        fn(*(_fp32(args) if dt != dtype else args))
        outs.append(r)
    rows = index[: int(count[0])].long()
    untouched = torch.ones(N, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert torch.equal(outs[0][untouched], residual[untouched])
    _close(outs[0], outs[1], outs[2], dtype, "residual")


# norm_gate_up ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("live", ["0", "1", "all"])
@pytest.mark.parametrize("lora", [False, True])
def test_norm_gate_up(triton_backend, dtype, live, lora):
    g = torch.Generator().manual_seed(3)
    N = 9
    h = _rand(N, D, dtype=dtype, g=g)
    norm = (torch.rand(D, generator=g) + 0.5).to(dtype).to(DEVICE)
    w, _, A, B = _weights(dtype, lora, 2 * INTER, D, g)
    index, count = _row_list(N, live, g)
    outs = []
    for fn, dt in ((ops.norm_gate_up, dtype), (ops.norm_gate_up_ref, dtype),
                   (ops.norm_gate_up_ref, torch.float32)):
        out = torch.full((N, INTER), 7.0, dtype=dt, device=DEVICE)
        args = [h, index, count, norm, EPS, w, A, B, 2.0, out]
        fn(*(_fp32(args) if dt != dtype else args))
        outs.append(out)
    n = int(count[0])
    assert (outs[0][n:] == 7).all()
    _close(outs[0][:n], outs[1][:n], outs[2][:n], dtype, "act")


# norm_linear ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [0, 1, 5])
def test_norm_linear(triton_backend, dtype, rows):
    g = torch.Generator().manual_seed(4)
    h = _rand(rows, D, dtype=dtype, g=g)
    norm = (torch.rand(D, generator=g) + 0.5).to(dtype).to(DEVICE)
    w = _rand(VOCAB, D, scale=D ** -0.5, dtype=dtype, g=g)
    outs = []
    for fn, dt in ((ops.norm_linear, dtype), (ops.norm_linear_ref, dtype),
                   (ops.norm_linear_ref, torch.float32)):
        out = torch.zeros(rows, VOCAB, device=DEVICE)
        args = [h, norm, EPS, w, out]
        fn(*(_fp32(args) if dt != dtype else args))
        outs.append(out)
    _close(outs[0], outs[1], outs[2], dtype, "logits")


# argument checks ------------------------------------------------------------------------------


def test_stage_argument_checks():
    h = torch.zeros(4, D)
    index = torch.zeros(4, dtype=torch.int32)
    count = torch.zeros(1, dtype=torch.int32)
    w = torch.zeros(D, 37)
    with pytest.raises(ValueError, match=r"linear_scatter_add: `x` must have M = 4 rows"):
        ops.linear_scatter_add(torch.zeros(3, 37), index, count, w, None, None, 1.0, h)
    with pytest.raises(TypeError, match=r"norm_linear: `out` must be torch.float32"):
        ops.norm_linear(h, torch.ones(D), EPS, torch.zeros(7, D), torch.zeros(4, 7, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"norm_gate_up: `weight` must be \[2 I, D\]"):
        ops.norm_gate_up(h, index, count, torch.ones(D), EPS, torch.zeros(5, D), None, None, 1.0,
                         torch.zeros(4, 2))
    k, v, valid = torch.zeros(4, HKV, 3, HD), torch.zeros(4, HKV, 3, HD), torch.zeros(4, 3, dtype=torch.bool)
    args = dict(h=h, index=index, count=count, norm_weight=torch.ones(D), eps=EPS,
                weight=torch.zeros(QD + 2 * KVD, D), bias=torch.zeros(QD + 2 * KVD), lora_A=None,
                lora_B=None, scale=1.0, positions=torch.zeros(4, dtype=torch.long),
                inv_freq=ops.rope_inv_freq(HD, 1e6, "cpu"), k_cache=k, v_cache=v, valid=valid,
                slot=torch.zeros(1, dtype=torch.long), rows_per_seq=1, q_out=torch.zeros(4, QD))
    ops.qkv_rope(**args)
    with pytest.raises(ValueError, match=r"qkv_rope: `positions` must be int64 \[4\]"):
        ops.qkv_rope(**{**args, "positions": torch.zeros(4, dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"qkv_rope: `weight` must have H x 12"):
        ops.qkv_rope(**{**args, "weight": torch.zeros(QD + KVD, D), "bias": torch.zeros(QD + KVD)})
    with pytest.raises(ValueError, match=r"route_kv: pass either a router"):
        ops.route_kv(h, None, None, 0.5, None, None, None, None, None, torch.ones(D), EPS,
                     args["weight"], args["bias"], None, None, 1.0, args["positions"],
                     args["inv_freq"], k, v, valid, args["slot"], 1, True)
