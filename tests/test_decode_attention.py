"""ops.decode_attention: the torch reference against scaled_dot_product_attention row by row, and
the Triton kernel against the reference (under the interpreter on CPU: float32 and float16; on
CUDA also bfloat16), on odd sizes, 0, 1 and all rows live, slots past the length never read."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from layerroute_rt import ops

TRITON = pytest.mark.skipif("decode_attention" not in ops._TRITON_KERNELS, reason="Triton is not importable")
CPU_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if CPU_INTERPRETER else []) + (["cuda"] if torch.cuda.is_available() else [])

# (B sequences, HKV, S slots, D, H, M rows)
SHAPES = [(3, 2, 70, 64, 14, 3), (1, 1, 5, 32, 1, 1), (4, 2, 130, 48, 4, 6), (2, 4, 64, 16, 28, 2)]


def case(B, HKV, S, D, H, M, count, length, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(M, H, D, generator=g).to(dtype)
    k = torch.randn(B, HKV, S, D, generator=g).to(dtype)
    v = torch.randn(B, HKV, S, D, generator=g).to(dtype)
    k[:, :, length:] = float("nan")                        # past the length: never read
    v[:, :, length:] = float("nan")
    valid = torch.rand(B, S, generator=g) > 0.3
    valid[:, 0] = True
    index = torch.randint(0, B, (M,), generator=g, dtype=torch.int32)
    to = dict(device=device)
    return (q.to(**to), k.to(**to), v.to(**to), valid.to(**to), index.to(**to),
            torch.tensor([count], dtype=torch.int32, **to), torch.tensor([length], **to))


def sdpa_oracle(q, k, v, valid, index, count, length, dtype=torch.float32):
    """Each live row through scaled_dot_product_attention with K/V repeated per query head,
    computed in `dtype` (float32: the oracle; half: what torch gets in that dtype)."""
    out = []
    n_keys = int(length[0])
    G = q.shape[1] // k.shape[1]
    for i in range(int(count[0])):
        b = int(index[i])
        kk = k[b, :, :n_keys].to(dtype).repeat_interleave(G, dim=0)
        vv = v[b, :, :n_keys].to(dtype).repeat_interleave(G, dim=0)
        o = F.scaled_dot_product_attention(q[i].to(dtype)[:, None], kk, vv,
                                           attn_mask=valid[b, :n_keys][None, None])
        out.append(o[:, 0].float())
    return torch.stack(out) if out else q.new_zeros(0, *q.shape[1:]).float()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("live", ["none", "one", "all"])
def test_reference_equals_sdpa(shape, live):
    B, HKV, S, D, H, M = shape
    count = {"none": 0, "one": 1, "all": M}[live]
    args = case(B, HKV, S, D, H, M, count, S - 3, torch.float32, "cpu")
    out = ops.decode_attention_ref(*args, scale=1 / math.sqrt(D))
    torch.testing.assert_close(out[:count].float(), sdpa_oracle(*args), rtol=1e-5, atol=1e-5)


def test_reference_row_without_visible_keys_is_zero():
    q, k, v, valid, index, count, length = case(3, 1, 8, 16, 2, 2, 2, 8, torch.float32, "cpu")
    index.copy_(torch.tensor([1, 2], dtype=torch.int32))
    valid[1] = False
    out = ops.decode_attention_ref(q, k, v, valid, index, count, length, 0.25)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].abs().sum() > 0


@TRITON
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("live", ["none", "one", "all"])
def test_triton_equals_reference(monkeypatch, device, dtype, shape, live):
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the CPU interpreter's tl.dot is wrong on bfloat16 operands")
    B, HKV, S, D, H, M = shape
    count = {"none": 0, "one": 1, "all": M}[live]
    args = case(B, HKV, S, D, H, M, count, S - 3, dtype, device, seed=1)
    ref = ops.decode_attention_ref(*args, scale=1 / math.sqrt(D))
    sentinel = torch.full_like(args[0], 7.0)
    monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")
    out = ops.decode_attention(*args, scale=1 / math.sqrt(D), out=sentinel)
    assert torch.all(out[count:] == 7.0)                  # rows past the count: not written
    if dtype == torch.float32:
        torch.testing.assert_close(out[:count], ref[:count], rtol=1e-5, atol=1e-5)
    elif count:            # flash-attention's bound: at most twice torch's error in the dtype
        exact = sdpa_oracle(*[t.cpu() for t in args])
        torch_err = (sdpa_oracle(*args, dtype=dtype).cpu() - exact).abs().max()
        kernel_err = (out[:count].float().cpu() - exact).abs().max()
        assert kernel_err <= 2 * torch_err + 1e-4, (float(kernel_err), float(torch_err))


@TRITON
@pytest.mark.parametrize("device", DEVICES)
def test_triton_row_without_visible_keys_is_zero(monkeypatch, device):
    q, k, v, valid, index, count, length = case(3, 2, 40, 32, 4, 2, 2, 40, torch.float32, device)
    index.copy_(torch.tensor([1, 2], dtype=torch.int32))
    valid[1] = False
    monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")
    out = ops.decode_attention(q, k, v, valid, index, count, length, 0.2)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].abs().sum() > 0


@pytest.mark.parametrize("bad, match", [
    (dict(valid=torch.ones(3, 70, dtype=torch.uint8)), "`valid` must be bool"),
    (dict(index=torch.zeros(3, dtype=torch.int64)), "`index` must be int32"),
    (dict(count=torch.tensor([1, 2], dtype=torch.int32)), r"`count` must be int32 \[1\]"),
    (dict(length=torch.tensor([1.0])), "`length` must be int32 or int64"),
    (dict(k=torch.zeros(3, 3, 70, 64)), "HKV dividing H = 14"),
    (dict(v=torch.zeros(3, 2, 71, 64)), "`v` must have the shape of `k`"),
    (dict(scale=0.0), "`scale` must be > 0"),
])
def test_errors(bad, match):
    q, k, v, valid, index, count, length = case(3, 2, 70, 64, 14, 3, 3, 70, torch.float32, "cpu")
    args = dict(q=q, k=k, v=v, valid=valid, index=index, count=count, length=length, scale=0.1) | bad
    with pytest.raises((ValueError, TypeError), match=match):
        ops.decode_attention(**args)


@TRITON
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 2, 3, 100])
@pytest.mark.parametrize("length", [1, 64, 65, 200])
def test_triton_slot_ranges_merge(device, dtype, splits, length):
    """The cache cut into 1, 2, 3 or as many ranges as blocks (flash-decoding), with the filled
    length inside a range, on a range boundary, or a single slot: the merge equals the reference."""
    from python_kernels import decode_attention as kernel

    args = case(2, 2, 200, 64, 14, 2, 2, length, dtype, device, seed=splits)
    ref = ops.decode_attention_ref(*args, scale=0.125)
    out = kernel.decode_attention(*args, scale=0.125, out=torch.empty_like(args[0]), splits=splits)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


def edge_case(name: str, device):
    """(args, the visible slots of each live row) for the named case, float32, 3 rows live."""
    q, k, v, valid, index, count, length = case(3, 2, 200, 32, 4, 3, 3, 200, torch.float32, device)
    if name == "masked block first":           # a whole 64-slot block invisible before visible keys
        valid[:, :130] = False
        valid[:, 0] = False
    elif name == "nan at invisible slots":     # what an uninitialised cache could hold
        valid[:, 10:20] = False
        k[:, :, 10:20] = float("nan")
        v[:, :, 10:20] = float("nan")
    elif name == "length past the cache":
        length = torch.tensor([1000], device=device)
    elif name == "length 0":
        length = torch.tensor([0], device=device)
    elif name == "int32 length":
        length = torch.tensor([150], dtype=torch.int32, device=device)
    return q, k, v, valid, index, count, length


CASES = ["masked block first", "nan at invisible slots", "length past the cache", "length 0",
         "int32 length"]


@pytest.mark.parametrize("name", CASES)
def test_reference_edge_cases(name):
    args = edge_case(name, "cpu")
    out = ops.decode_attention_ref(*args, scale=1 / math.sqrt(32))[:3]
    if name == "length 0":
        assert torch.equal(out, torch.zeros_like(out))
    else:
        q, k, v, valid, index, count, length = args
        n = min(int(length[0]), k.shape[2])
        clean = (q, torch.nan_to_num(k), torch.nan_to_num(v), valid, index, count,
                 torch.tensor([n]))
        oracle = sdpa_oracle(*clean) if valid[index.long(), :n].any(-1).all() else None
        assert torch.isfinite(out).all()
        if oracle is not None:
            torch.testing.assert_close(out, oracle, rtol=1e-5, atol=1e-5)


@TRITON
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CASES)
def test_triton_edge_cases(monkeypatch, device, name):
    args = edge_case(name, device)
    ref = ops.decode_attention_ref(*args, scale=0.2)
    monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")
    out = ops.decode_attention(*args, scale=0.2)
    torch.testing.assert_close(out[:3], ref[:3], rtol=1e-5, atol=1e-5)
