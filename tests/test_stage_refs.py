"""The block-stage references' whole-tensor path: when a row list names every row in order
(at decode, whenever every sequence runs the block) they read and write whole tensors, with no
gather and no scatter, and decode attention is one fused SDPA call when every slot is visible.
Each is checked here, on CPU without Triton, against the same reference on the same inputs
forced onto its row-list path (gather, compute, scatter), and decode attention against a
per-row softmax oracle."""
import contextlib
import importlib

import pytest
import torch

from layerroute_rt import ops
from layerroute_rt.ops import _checks

# The op modules whose references take the whole-tensor path through _checks._listed_rows.
STAGE_MODULES = [m for m in map(importlib.import_module, (
    "layerroute_rt.ops.decode_attention", "layerroute_rt.ops.route_kv", "layerroute_rt.ops.qkv_rope",
    "layerroute_rt.ops.linear_scatter_add", "layerroute_rt.ops.norm_gate_up",
    "layerroute_rt.ops.norm_linear")) if hasattr(m, "_listed_rows")]

D, H, HKV, HD, INTER, RANK = 53, 6, 2, 12, 45, 5
QD, KVD = H * HD, HKV * HD
EPS = 1e-6
LAYOUTS = {"decode": (7, 1), "prefill": (3, 5), "batch1": (1, 1)}   # (sequences, rows each)


def _rand(*shape, scale=1.0, g=None):
    return torch.randn(*shape, generator=g) * scale


def _ramp(n: int):
    return torch.arange(n, dtype=torch.int32), torch.tensor([n], dtype=torch.int32)


@pytest.fixture
def whole_path(monkeypatch):
    """Records, per op, whether _listed_rows sent it down the whole-tensor path."""
    taken = []
    real = _checks._listed_rows

    def spy(op, index, count, n_rows, unique):
        n, rows = real(op, index, count, n_rows, unique)
        taken.append((op, rows is None))
        return n, rows
    for module in STAGE_MODULES:
        monkeypatch.setattr(module, "_listed_rows", spy)
    return taken


@pytest.fixture
def row_list_path(monkeypatch):
    """A context in which the references take their row-list path whatever the list."""
    @contextlib.contextmanager
    def forced():
        with monkeypatch.context() as m:
            for module in STAGE_MODULES:
                m.setattr(module, "_listed_rows", lambda op, index, count, n_rows, unique: (
                    int(count[0]), _checks._live_rows(op, index, count, n_rows, unique)))
            yield
    return forced


def _close(a, b, what):
    tol = dict(rtol=1e-5, atol=1e-6) if a.dtype == torch.float32 else {}
    torch.testing.assert_close(a, b, msg=what, **tol)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qkv_rope_whole_tensor_path(whole_path, row_list_path, layout, lora, dtype):
    g = torch.Generator().manual_seed(0)
    n_seq, T = LAYOUTS[layout]
    N = n_seq * T
    h = _rand(N, D, g=g).to(dtype)
    norm = (torch.rand(D, generator=g) + 0.5).to(dtype)
    w = _rand(QD + 2 * KVD, D, scale=D ** -0.5, g=g).to(dtype)
    b = _rand(QD + 2 * KVD, scale=0.1, g=g).to(dtype)
    A = _rand(3 * RANK, D, scale=D ** -0.5, g=g) if lora else None
    B = _rand(QD + 2 * KVD, 3 * RANK, scale=0.2, g=g) if lora else None
    positions = torch.randint(0, 3000, (N,), generator=g)
    inv_freq = ops.rope_inv_freq(HD, 1e6, "cpu")
    index, count = _ramp(N)

    def once():
        k = torch.zeros(n_seq, HKV, T + 3, HD, dtype=dtype)
        v, valid = torch.zeros_like(k), torch.zeros(n_seq, T + 3, dtype=torch.bool)
        q = torch.zeros(N, QD, dtype=dtype)
        ops.qkv_rope_ref(h, index, count, norm, EPS, w, b, A, B, 2.0, positions, inv_freq, k, v,
                         valid, torch.tensor([2]), T, q)
        return q, k, v, valid

    q0, k0, v0, valid0 = once()
    assert whole_path == [("qkv_rope", True)]
    with row_list_path():
        q1, k1, v1, valid1 = once()
    assert torch.equal(valid0, valid1) and int(valid0.sum()) == N and valid0[:, 2:2 + T].all()
    for a, c, what in ((q0, q1, "q"), (k0, k1, "k"), (v0, v1, "v")):
        _close(a, c, what)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_route_kv_every_row_skips(row_list_path, layout):
    """Every row skips: route_kv writes the K/V of all of them as whole tensors, equal to those
    qkv_rope writes for the same rows on its row-list path."""
    g = torch.Generator().manual_seed(1)
    n_seq, T = LAYOUTS[layout]
    N = n_seq * T
    h = _rand(N, D, g=g)
    norm = torch.rand(D, generator=g) + 0.5
    w, b = _rand(QD + 2 * KVD, D, scale=D ** -0.5, g=g), _rand(QD + 2 * KVD, scale=0.1, g=g)
    positions = torch.randint(0, 3000, (N,), generator=g)
    inv_freq = ops.rope_inv_freq(HD, 1e6, "cpu")
    caches = [(torch.zeros(n_seq, HKV, T + 3, HD), torch.zeros(n_seq, HKV, T + 3, HD),
               torch.zeros(n_seq, T + 3, dtype=torch.bool)) for _ in range(2)]
    (k0, v0, valid0), (k1, v1, valid1) = caches
    ops.route_kv_ref(h, None, None, None, torch.zeros(N, dtype=torch.bool), None, None, None,
                     None, norm, EPS, w, b, None, None, 1.0, positions, inv_freq, k0, v0, valid0,
                     torch.tensor([1]), T, True)
    with row_list_path():
        ops.qkv_rope_ref(h, *_ramp(N), norm, EPS, w, b, None, None, 1.0, positions, inv_freq,
                         k1, v1, valid1, torch.tensor([1]), T, torch.zeros(N, QD))
    assert torch.equal(valid0, valid1) and int(valid0.sum()) == N
    _close(k0, k1, "k")
    _close(v0, v1, "v")


@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.parametrize("lora", [False, True])
def test_linear_scatter_add_and_norm_gate_up_whole_tensor_path(whole_path, row_list_path, n, lora):
    g = torch.Generator().manual_seed(2)
    x, h = _rand(n, D, g=g), _rand(n, D, g=g)
    w = _rand(D, D, scale=D ** -0.5, g=g)
    gu = _rand(2 * INTER, D, scale=D ** -0.5, g=g)
    norm = torch.rand(D, generator=g) + 0.5
    A = _rand(RANK, D, scale=D ** -0.5, g=g) if lora else None
    B = _rand(D, RANK, scale=0.2, g=g) if lora else None
    A2 = _rand(RANK, D, scale=D ** -0.5, g=g) if lora else None
    B2 = _rand(2 * INTER, RANK, scale=0.2, g=g) if lora else None
    index, count = _ramp(n)

    def once():
        r = h.clone()
        ops.linear_scatter_add_ref(x, index, count, w, A, B, 2.0, r)
        act = torch.zeros(n, INTER)
        ops.norm_gate_up_ref(h, index, count, norm, EPS, gu, A2, B2, 2.0, act)
        return r, act

    r0, act0 = once()
    assert whole_path == [("linear_scatter_add", True), ("norm_gate_up", True)]
    with row_list_path():
        r1, act1 = once()
    _close(r0, r1, "residual")
    _close(act0, act1, "act")


def _attention_oracle(q, k, v, valid, n_keys, scale):
    """Row b, head j: softmax over the visible slots of sequence b's KV head j // G."""
    G = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for j in range(q.shape[1]):
            keys = valid[b, :n_keys]
            if keys.any():
                s = (k[b, j // G, :n_keys][keys] @ q[b, j]) * scale
                out[b, j] = torch.softmax(s, 0) @ v[b, j // G, :n_keys][keys]
    return out


@pytest.mark.parametrize("n_seq", [1, 5])
@pytest.mark.parametrize("hole", [False, True])
def test_decode_attention_whole_tensor_path(whole_path, row_list_path, n_seq, hole):
    """Every slot visible: one SDPA call; a slot invisible (hole): the masked math. Both, with
    the list in order and on the row-list path, equal the per-row oracle."""
    g = torch.Generator().manual_seed(3)
    S, length = 9, 7
    q = _rand(n_seq, H, HD, g=g)
    k, v = _rand(n_seq, HKV, S, HD, g=g), _rand(n_seq, HKV, S, HD, g=g)
    k[:, :, length:] = float("nan")                     # past the length: never read
    valid = torch.zeros(n_seq, S, dtype=torch.bool)
    valid[:, :length] = True
    if hole:
        valid[0, 3] = False
    oracle = _attention_oracle(q, k, v, valid, length, 0.3)
    whole = ops.decode_attention_ref(q, k, v, valid, *_ramp(n_seq), torch.tensor([length]), 0.3)
    assert whole_path == [("decode_attention", True)]
    with row_list_path():
        listed = ops.decode_attention_ref(q, k, v, valid, *_ramp(n_seq), torch.tensor([length]), 0.3)
    _close(whole, oracle, "whole")
    _close(listed, oracle, "row list")
