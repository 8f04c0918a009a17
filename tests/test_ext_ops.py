"""The compiled ops torch.ops.layerroute.* against their torch references in layerroute_rt.ops,
and the dispatch between them (LAYERROUTE_BACKEND).

CPU results must equal the references bit for bit. On CUDA, scatter_add may err at most twice
as much as torch does adding in the same dtype, both measured against fp32.
"""

import os

import pytest
import torch

from layerroute_rt import ops

EXT_ERROR = ops.extension_error()
# CI sets LAYERROUTE_REQUIRE_EXT=1: there a missing extension fails instead of skipping.
pytestmark = pytest.mark.skipif(
    EXT_ERROR is not None and os.environ.get("LAYERROUTE_REQUIRE_EXT") != "1",
    reason=f"layerroute_rt._C is not importable: {EXT_ERROR}",
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
N_ROWS = [0, 1, 7, 769]
WIDTHS = [1, 3, 4, 896, 4864]  # 4: 8-byte rows in fp16
# How many rows of the mask are live: none, one, all, or a random half.
LIVE = ["none", "one", "all", "half"]


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    """Each test starts with no forced backend."""
    monkeypatch.delenv("LAYERROUTE_BACKEND", raising=False)


@pytest.fixture
def device(request):
    """The device under test; CUDA also needs the extension's CUDA kernels."""
    dev = torch.device(request.param)
    if ("compact_rows", dev.type) not in ops._COMPILED_KERNELS:
        pytest.skip(f"layerroute_rt._C was built without {dev.type} kernels")
    return dev


def make_mask(n: int, live: str, device, gen: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    if live == "one" and n:
        mask[torch.randint(n, (1,), generator=gen)] = True
    elif live == "all":
        mask[:] = True
    elif live == "half":
        mask = torch.rand(n, generator=gen) < 0.5
    return mask.to(device)


def randn(shape, dtype, device, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def test_extension_is_built():
    """Runs (and fails) without the extension only under LAYERROUTE_REQUIRE_EXT=1."""
    assert EXT_ERROR is None, f"layerroute_rt._C did not import: {EXT_ERROR}"


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("n", [*N_ROWS, 4099, 65537])
@pytest.mark.parametrize("live", LIVE)
def test_compact_rows(device, n, live):
    mask = make_mask(n, live, device, torch.Generator().manual_seed(n))
    index, count = torch.ops.layerroute.compact_rows(mask)
    ref_index, ref_count = ops.compact_rows_ref(mask)
    assert index.dtype == count.dtype == torch.int32
    assert index.device == count.device == mask.device
    assert index.shape == (n,) and count.shape == (1,)
    assert torch.equal(count, ref_count)
    assert torch.equal(index, ref_index)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", N_ROWS)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("live", LIVE)
def test_gather_rows(device, dtype, n, d, live):
    gen = torch.Generator().manual_seed(n * 10007 + d)
    x = randn((n, d), dtype, device, gen)
    index, count = ops.compact_rows_ref(make_mask(n, live, device, gen))
    out = torch.full((n, d), 12345.0, dtype=dtype, device=device)  # rows past count keep it
    expected = out.clone()
    ops.gather_rows_ref(x, index, count, expected)
    torch.ops.layerroute.gather_rows(x, index, count, out)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", WIDTHS)
def test_gather_rows_any_order_and_spare_rows(device, dtype, d):
    """Indices in any order (repeats allowed), M > count > N, misaligned base addresses."""
    gen = torch.Generator().manual_seed(d)
    n, live, m = 37, 50, 61
    x = randn((n * d + 1,), dtype, device, gen)[1:].view(n, d)  # not 16-byte aligned
    index = torch.full((m,), -1, dtype=torch.int32)
    index[:live] = torch.randint(n, (live,), generator=gen, dtype=torch.int32)
    index, count = index.to(device), torch.tensor([live], dtype=torch.int32, device=device)
    out = randn((m * d + 1,), dtype, device, gen)[1:].view(m, d)
    expected = out.clone()
    ops.gather_rows_ref(x, index, count, expected)
    torch.ops.layerroute.gather_rows(x, index, count, out)
    assert torch.equal(out, expected)


def assert_scatter_add_close(out, residual, src, index, count):
    """Bit-equal to the reference on CPU; on CUDA, error vs fp32 <= 2x torch's own in dtype."""
    expected = residual.clone()
    ops.scatter_add_rows_ref(expected, src, index, count)
    live = int(count)
    if out.device.type == "cpu" or out.dtype == torch.float32 or live == 0:
        assert torch.equal(out, expected)
        return
    rows = index[:live].long()
    exact = residual[rows].float() + src[:live].float()
    torch_err = (residual[rows] + src[:live]).float().sub(exact).abs().max()
    kernel_err = out[rows].float().sub(exact).abs().max()
    assert kernel_err <= 2 * torch_err
    unwritten = torch.ones(residual.shape[0], dtype=torch.bool, device=out.device)
    unwritten[rows] = False
    assert torch.equal(out[unwritten], residual[unwritten])


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", N_ROWS)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("live", LIVE)
def test_scatter_add_rows(device, dtype, n, d, live):
    gen = torch.Generator().manual_seed(n * 10007 + d)
    residual = randn((n, d), dtype, device, gen)
    src = randn((n, d), dtype, device, gen)
    index, count = ops.compact_rows_ref(make_mask(n, live, device, gen))
    out = residual.clone()
    torch.ops.layerroute.scatter_add_rows(out, src, index, count)
    assert_scatter_add_close(out, residual, src, index, count)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", WIDTHS)
def test_scatter_add_rows_any_order_and_spare_rows(device, dtype, d):
    """Unique indices in any order, M > count, misaligned base addresses."""
    gen = torch.Generator().manual_seed(d)
    n, live, m = 53, 29, 41
    residual = randn((n * d + 1,), dtype, device, gen)[1:].view(n, d)
    src = randn((m * d + 1,), dtype, device, gen)[1:].view(m, d)
    index = torch.full((m,), -1, dtype=torch.int32)
    index[:live] = torch.randperm(n, generator=gen)[:live].int()
    index, count = index.to(device), torch.tensor([live], dtype=torch.int32, device=device)
    out = residual.clone()
    torch.ops.layerroute.scatter_add_rows(out, src, index, count)
    assert_scatter_add_close(out, residual, src, index, count)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    """Schema, fake impl and autograd registration of every op (torch.library.opcheck)."""
    gen = torch.Generator().manual_seed(0)
    n, d = 19, 24
    mask = make_mask(n, "half", device, gen)
    index, count = ops.compact_rows_ref(mask)
    x = randn((n, d), dtype, device, gen)
    torch.library.opcheck(torch.ops.layerroute.compact_rows.default, (mask,))
    torch.library.opcheck(
        torch.ops.layerroute.gather_rows.default, (x, index, count, torch.zeros_like(x))
    )
    torch.library.opcheck(
        torch.ops.layerroute.scatter_add_rows.default, (x.clone(), x, index, count)
    )


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_compiled_graph_sees_through_ops(device):
    """The fake impls let torch.compile trace the three ops without a graph break."""

    def skip_block(h, mask):
        index, count = ops.compact_rows(mask)
        rows = torch.zeros_like(h)
        ops.gather_rows(h, index, count, rows)
        ops.scatter_add_rows(h, rows * 2, index, count)
        return h

    gen = torch.Generator().manual_seed(1)
    h = randn((13, 8), torch.float32, device, gen)
    mask = make_mask(13, "half", device, gen)
    compiled = torch.compile(skip_block, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(h.clone(), mask), skip_block(h.clone(), mask))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_replay_reads_count_on_device():
    """Captured once, the step follows each new mask: the count never leaves the device."""
    if ("compact_rows", "cuda") not in ops._COMPILED_KERNELS:
        pytest.skip("layerroute_rt._C was built without cuda kernels")
    n, d = 300, 64
    gen = torch.Generator().manual_seed(3)
    h0 = randn((n, d), torch.float32, "cuda", gen)
    h, mask, rows = h0.clone(), torch.ones(n, dtype=torch.bool, device="cuda"), torch.empty_like(h0)

    def step():
        index, count = ops.compact_rows(mask)
        ops.gather_rows(h, index, count, rows)
        ops.scatter_add_rows(h, rows, index, count)  # doubles the live rows

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for live in ["none", "one", "all", "half"]:
        mask.copy_(make_mask(n, live, "cuda", gen))
        h.copy_(h0)
        graph.replay()
        assert torch.equal(h, torch.where(mask[:, None], 2 * h0, h0))


class TestBackendSelection:
    def test_default_prefers_extension(self):
        assert ops.backend("gather_rows", torch.device("cpu")) == "cuda"

    def test_forced_torch_runs_reference(self, monkeypatch):
        calls = []
        monkeypatch.setattr(ops, "compact_rows_ref", lambda m: calls.append(m) or (None, None))
        monkeypatch.setenv("LAYERROUTE_BACKEND", "torch")
        ops.compact_rows(torch.ones(3, dtype=torch.bool))
        assert len(calls) == 1
        monkeypatch.setenv("LAYERROUTE_BACKEND", "cuda")
        index, count = ops.compact_rows(torch.ones(3, dtype=torch.bool))
        assert len(calls) == 1 and int(count) == 3

    @pytest.mark.parametrize("backend", ["torch", "cuda"])
    def test_forced_backends_agree(self, monkeypatch, backend):
        monkeypatch.setenv("LAYERROUTE_BACKEND", backend)
        gen = torch.Generator().manual_seed(2)
        h = torch.randn(11, 6, generator=gen)
        index, count = ops.compact_rows(torch.rand(11, generator=gen) < 0.5)
        rows = torch.zeros_like(h)
        ops.gather_rows(h, index, count, rows)
        ops.scatter_add_rows(h, rows, index, count)
        live = index[: int(count)].long()
        expected = torch.randn(11, 6, generator=torch.Generator().manual_seed(2))
        expected[live] *= 2
        assert torch.equal(h, expected)

    def test_forced_triton_says_no_kernel(self, monkeypatch):
        monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="cannot run compact_rows: no Triton kernel exists"):
            ops.compact_rows(torch.ones(3, dtype=torch.bool))

    def test_unknown_backend(self, monkeypatch):
        monkeypatch.setenv("LAYERROUTE_BACKEND", "tpu")
        with pytest.raises(ValueError, match="LAYERROUTE_BACKEND='tpu'"):
            ops.backend("gather_rows", torch.device("cpu"))

    def test_forced_cuda_without_kernel(self, monkeypatch):
        monkeypatch.setenv("LAYERROUTE_BACKEND", "cuda")
        monkeypatch.setattr(ops, "_COMPILED_KERNELS", set())
        with pytest.raises(RuntimeError, match="cannot run gather_rows"):
            ops.backend("gather_rows", torch.device("cpu"))


def _valid_args(device="cpu"):
    x = torch.randn(5, 4, device=device)
    mask = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool, device=device)
    index, count = ops.compact_rows_ref(mask)
    return x, index, count


BAD_GATHER = {
    "x dtype": (TypeError, "`x` must be float32", lambda x, i, c: (x.double(), i, c, x.double())),
    "x dims": (ValueError, "`x` must be 2-D", lambda x, i, c: (x[None], i, c, x)),
    "x contiguous": (ValueError, "`x` must be contiguous", lambda x, i, c: (x.t(), i, c, x.t())),
    "index dtype": (TypeError, "`index` must be int32", lambda x, i, c: (x, i.long(), c, x)),
    "count shape": (ValueError, "`count` must have shape", lambda x, i, c: (x, i, c.repeat(2), x)),
    "out shape": (ValueError, "`out` must have shape", lambda x, i, c: (x, i, c, x[:3])),
    "out dtype": (TypeError, "`out` must have the dtype", lambda x, i, c: (x, i, c, x.half())),
    "count range": (ValueError, "`count` is 6", lambda x, i, c: (x, i, c + 3, x.clone())),
    "index range": (IndexError, "outside \\[0, 5\\)", lambda x, i, c: (x, i * 5, c, x.clone())),
}


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("case", BAD_GATHER, ids=list(BAD_GATHER))
def test_gather_rows_rejects_bad_input(monkeypatch, backend, case):
    monkeypatch.setenv("LAYERROUTE_BACKEND", backend)
    error, message, make = BAD_GATHER[case]
    with pytest.raises(error, match=message):
        ops.gather_rows(*make(*_valid_args()))


BAD_SCATTER = {
    "residual dtype": (
        TypeError, "`residual` must be float32", lambda x, i, c: (x.int(), x.int(), i, c)
    ),
    "src shape": (
        ValueError, "`src` must have shape", lambda x, i, c: (x, x[:, :2].contiguous(), i, c)
    ),
    "src dtype": (TypeError, "`src` must have the dtype", lambda x, i, c: (x, x.bfloat16(), i, c)),
    "count dtype": (TypeError, "`count` must be int32", lambda x, i, c: (x, x, i, c.long())),
    "repeated row": (ValueError, "appears twice", lambda x, i, c: (x, x, i.fill_(2), c)),
}


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("case", BAD_SCATTER, ids=list(BAD_SCATTER))
def test_scatter_add_rows_rejects_bad_input(monkeypatch, backend, case):
    monkeypatch.setenv("LAYERROUTE_BACKEND", backend)
    error, message, make = BAD_SCATTER[case]
    with pytest.raises(error, match=message):
        ops.scatter_add_rows(*make(*_valid_args()))


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize(
    "mask, error, message",
    [
        (torch.ones(3, dtype=torch.int32), TypeError, "`mask` must be bool"),
        (torch.ones(2, 3, dtype=torch.bool), ValueError, "`mask` must be 1-D"),
        (torch.ones(6, dtype=torch.bool)[::2], ValueError, "`mask` must be contiguous"),
    ],
)
def test_compact_rows_rejects_bad_input(monkeypatch, backend, mask, error, message):
    monkeypatch.setenv("LAYERROUTE_BACKEND", backend)
    with pytest.raises(error, match=message):
        ops.compact_rows(mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_rejects_mixed_devices():
    if ("gather_rows", "cuda") not in ops._COMPILED_KERNELS:
        pytest.skip("layerroute_rt._C was built without cuda kernels")
    x, index, count = _valid_args("cuda")
    with pytest.raises(ValueError, match="`index` must be on the same device as `x`"):
        torch.ops.layerroute.gather_rows(x, index.cpu(), count, torch.empty_like(x))
