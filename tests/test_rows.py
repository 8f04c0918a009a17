"""The row kernels (python_kernels/rows.py), through the dispatch in layerroute_rt.ops with
LAYERROUTE_BACKEND=triton, against their torch references.

Copies and the float32 residual adds must equal the references bit for bit. Rows past the
count must keep a sentinel. On CPU the kernels run
under the Triton interpreter (tests/conftest.py); bf16 and Qwen2.5-0.5B shapes only on CUDA.
"""
import re

import pytest
import torch

from layerroute_rt import ops
from layerroute_rt.model import RMSNorm

pytest.importorskip("triton")

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not ops._triton_runs_on(torch.device("cpu")),
        reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=CUDA),
]
DTYPES = [torch.float32, torch.float16]
N_ROWS = [0, 1, 5, 67, 300]
WIDTHS = [1, 7, 96, 130]
# How many rows are live: none, one, all, or a random half.
LIVE = ["none", "one", "all", "half"]
SENTINEL = 12345.0
EPS = 1e-6


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")


def randn(shape, dtype, device, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def make_rows(n: int, live: str, device, gen: torch.Generator):
    """(index, count) as compact_rows makes them, from a mask with `live` rows set."""
    mask = torch.zeros(n, dtype=torch.bool)
    if live == "one" and n:
        mask[torch.randint(n, (1,), generator=gen)] = True
    elif live == "all":
        mask[:] = True
    elif live == "half":
        mask = torch.rand(n, generator=gen) < 0.5
    return ops.compact_rows_ref(mask.to(device))


def assert_sentinel(t: torch.Tensor, start: int, what: str):
    assert (t[start:] == SENTINEL).all(), f"{what}: rows past the count were written"


# gather_rows / scatter_add_rows ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", N_ROWS)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("live", LIVE)
def test_gather_rows(device, dtype, n, d, live):
    gen = torch.Generator().manual_seed(n * 10007 + d)
    x = randn((n, d), dtype, device, gen)
    index, count = make_rows(n, live, device, gen)
    out = torch.full((n, d), SENTINEL, dtype=dtype, device=device)
    expected = out.clone()
    ops.gather_rows_ref(x, index, count, expected)
    ops.gather_rows(x, index, count, out)
    assert torch.equal(out, expected)
    assert_sentinel(out, int(count), "out")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [7, 130])
def test_gather_rows_any_order_more_rows_than_x(device, d):
    """Indices in any order with repeats, M > count > N (the output has spare rows)."""
    gen = torch.Generator().manual_seed(d)
    n, live, m = 37, 50, 61
    x = randn((n, d), torch.float32, device, gen)
    index = torch.full((m,), -1, dtype=torch.int32)
    index[:live] = torch.randint(n, (live,), generator=gen, dtype=torch.int32)
    index, count = index.to(device), torch.tensor([live], dtype=torch.int32, device=device)
    out = torch.full((m, d), SENTINEL, device=device)
    ops.gather_rows(x, index, count, out)
    assert torch.equal(out[:live], x[index[:live].long()])
    assert_sentinel(out, live, "out")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", N_ROWS)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("live", LIVE)
def test_scatter_add_rows(device, dtype, n, d, live):
    """Added in float32 and rounded once: bit-equal to the reference, other rows untouched."""
    gen = torch.Generator().manual_seed(n * 10007 + d)
    residual = randn((n, d), dtype, device, gen)
    src = randn((n, d), dtype, device, gen)
    index, count = make_rows(n, live, device, gen)
    src[int(count):] = SENTINEL  # rows of src past the count must not be added
    out = residual.clone()
    expected = residual.clone()
    ops.scatter_add_rows_ref(expected, src, index, count)
    ops.scatter_add_rows(out, src, index, count)
    assert torch.equal(out, expected)


def test_rms_norm_reference_is_the_model_norm():
    """The stage references normalise as model.RMSNorm does (same order of rounding, bit for
    bit)."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        norm = RMSNorm(130, EPS).to(dtype)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5, generator=gen)
        x = randn((67, 130), dtype, "cpu", gen)
        assert torch.equal(ops._rms_norm_ref(x, norm.weight.data, EPS), norm(x))


# GPU: bf16, Qwen2.5-0.5B shapes, CUDA-graph capture -------------------------------------------


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 64, 2048, 16384])
@pytest.mark.parametrize("d", [896, 4864])
def test_row_ops_qwen_shapes_cuda(dtype, n, d):
    gen = torch.Generator().manual_seed(n + d)
    x = randn((n, d), dtype, "cuda", gen)
    index, count = make_rows(n, "half", "cuda", gen)
    live_n = int(count)
    rows = index[:live_n].long()

    out = torch.full((n, d), SENTINEL, dtype=dtype, device="cuda")
    ops.gather_rows(x, index, count, out)
    assert torch.equal(out[:live_n], x[rows])
    assert_sentinel(out, live_n, "gather_rows out")

    residual, src = x.clone(), randn((n, d), dtype, "cuda", gen)
    expected = residual.clone()
    ops.scatter_add_rows_ref(expected, src, index, count)
    ops.scatter_add_rows(residual, src, index, count)
    assert torch.equal(residual, expected)


@CUDA
def test_skip_path_replays_in_cuda_graph(monkeypatch):
    """route_tokens + gather_rows + scatter_add_rows captured once, replayed on new inputs:
    the count stays on the device, so each replay runs the rows its own router picked."""
    monkeypatch.delenv("LAYERROUTE_BACKEND")  # best backend per op (compiled or Triton)
    n, d, dtype = 256, 896, torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    h = randn((n, d), dtype, "cuda", gen)
    residual = torch.empty_like(h)
    router_w = (2 * torch.randn(d, generator=gen) / d**0.5).cuda()
    router_b = torch.tensor([0.0], device="cuda")
    out_rows = torch.empty_like(h)

    def step():
        p, index, count = ops.route_tokens(h, router_w, router_b, 0.5)
        ops.gather_rows(h, index, count, out_rows)
        ops.scatter_add_rows(residual, out_rows, index, count)  # the block output stand-in
        return count

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        step()  # compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        count = step()

    counts = set()
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        h.copy_(randn((n, d), dtype, "cuda", g))
        residual.copy_(randn((n, d), dtype, "cuda", g))
        before = residual.clone()
        _, ref_index, ref_count = ops.route_tokens_ref(h, router_w, router_b, 0.5)
        ref_rows = torch.empty_like(h)
        ops.gather_rows_ref(h, ref_index, ref_count, ref_rows)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(count, ref_count)
        live = int(ref_count)
        assert torch.equal(out_rows[:live], ref_rows[:live])
        expected = before.clone()
        ops.scatter_add_rows_ref(expected, ref_rows, ref_index, ref_count)
        assert torch.equal(residual, expected)
        counts.add(int(ref_count))
    assert len(counts) > 1, "the replays should route different numbers of rows"


# dispatch and argument checks -----------------------------------------------------------------


def test_dispatch_backend(monkeypatch):
    """LAYERROUTE_BACKEND=triton runs the kernels (the interpreter on CPU), =torch the
    references."""
    if not ops._triton_runs_on(torch.device("cpu")):
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(0)
    x, delta = randn((5, 7), torch.float32, "cpu", gen), randn((5, 7), torch.float32, "cpu", gen)
    index, count = make_rows(5, "half", "cpu", gen)
    out = torch.empty_like(x)
    names = ("gather_rows", "scatter_add_rows")

    def run_all():
        ops.gather_rows(x, index, count, out)
        ops.scatter_add_rows(x.clone(), delta, index, count)

    def refuse(*args, **kwargs):
        raise AssertionError("the wrong backend ran")

    with monkeypatch.context() as m:
        m.setenv("LAYERROUTE_BACKEND", "triton")
        for name in names:
            m.setattr(ops, f"{name}_ref", refuse)
        run_all()
    with monkeypatch.context() as m:
        m.setenv("LAYERROUTE_BACKEND", "torch")
        for name in names:
            m.setattr(ops._rows_triton, name, refuse)
        run_all()
