"""The compiled ops torch.ops.layerroute.* against their torch references in layerroute_rt.ops,
and the dispatch between them (LAYERROUTE_BACKEND).

Results must equal the references bit for bit.
"""

import importlib
import os

import pytest
import torch

from layerroute_rt import ops
from layerroute_rt.ops import _dispatch

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
N_ROWS = [0, 1, 7, 769]
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
def test_opcheck(device):
    """Schema, fake impl and autograd registration of every op (torch.library.opcheck)."""
    mask = make_mask(19, "half", device, torch.Generator().manual_seed(0))
    torch.library.opcheck(torch.ops.layerroute.compact_rows.default, (mask,))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_compiled_graph_sees_through_ops(device):
    """The fake impl lets torch.compile trace the op without a graph break."""

    def skip_block(h, mask):
        index, count = ops.compact_rows(mask)
        return h * count, index

    gen = torch.Generator().manual_seed(1)
    h = randn((13, 8), torch.float32, device, gen)
    mask = make_mask(13, "half", device, gen)
    compiled = torch.compile(skip_block, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(h, mask), skip_block(h, mask)):
        assert torch.equal(got, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_replay_reads_count_on_device():
    """Captured once, the step follows each new mask: the count never leaves the device."""
    if ("compact_rows", "cuda") not in ops._COMPILED_KERNELS:
        pytest.skip("layerroute_rt._C was built without cuda kernels")
    n = 300
    gen = torch.Generator().manual_seed(3)
    mask = torch.ones(n, dtype=torch.bool, device="cuda")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.compact_rows(mask)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        index, count = ops.compact_rows(mask)
    for live in ["none", "one", "all", "half"]:
        mask.copy_(make_mask(n, live, "cuda", gen))
        graph.replay()
        ref_index, ref_count = ops.compact_rows_ref(mask)
        assert torch.equal(count, ref_count)
        assert torch.equal(index, ref_index)


class TestBackendSelection:
    def test_default_prefers_extension(self):
        assert ops.backend("compact_rows", torch.device("cpu")) == "cuda"

    def test_forced_torch_runs_reference(self, monkeypatch):
        calls = []
        monkeypatch.setattr(importlib.import_module("layerroute_rt.ops.compact_rows"), "compact_rows_ref", lambda m: calls.append(m) or (None, None))
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
        mask = torch.rand(11, generator=gen) < 0.5
        index, count = ops.compact_rows(mask)
        live = mask.nonzero().flatten().int()
        assert int(count) == live.numel()
        assert torch.equal(index[: live.numel()], live)
        assert (index[live.numel():] == -1).all()

    def test_forced_triton_says_no_kernel(self, monkeypatch):
        monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="cannot run compact_rows: no Triton kernel exists"):
            ops.compact_rows(torch.ones(3, dtype=torch.bool))

    def test_unknown_backend(self, monkeypatch):
        monkeypatch.setenv("LAYERROUTE_BACKEND", "tpu")
        with pytest.raises(ValueError, match="LAYERROUTE_BACKEND='tpu'"):
            ops.backend("compact_rows", torch.device("cpu"))

    def test_forced_cuda_without_kernel(self, monkeypatch):
        monkeypatch.setenv("LAYERROUTE_BACKEND", "cuda")
        monkeypatch.setattr(_dispatch, "_COMPILED_KERNELS", set())
        with pytest.raises(RuntimeError, match="cannot run compact_rows"):
            ops.backend("compact_rows", torch.device("cpu"))


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

