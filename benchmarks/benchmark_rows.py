"""The row ops of the skip path (python_kernels/rows.py, Triton) against plain torch, at
Qwen2.5-0.5B width (D = 896), bf16:

    gather_rows        vs index_select (and the compiled extension's kernel, if built)
    scatter_add_rows   vs index_add_ (and the compiled extension's kernel, if built)

    pytest benchmarks/benchmark_rows.py --benchmark-only

Decode (1, 8, 64 rows) and prefill (2048, 4096, 16384 rows) sizes: that many rows are live,
every other row of a [2 rows, D] residual. The torch versions get the row list as an int64
tensor made beforehand (they would need nonzero, a host sync, to make it). A round replays a
CUDA graph of max(REPS, copies) calls (no host launch overhead) and synchronizes.

Cold and hot: the residual, the gathered rows, delta, out, index and count have
device_limits.cold_copies(bytes) copies and call i uses copy i % copies, so the rows come from
HBM, not from L2 (below about 100 KB a call, decode at 1 and 8 rows, part of them stays in L2:
device_limits.MAX_COPIES). The RMSNorm weight (D values) is shared and L2-hot, as it is tiny.

extra_info holds the time per call and the achieved GB/s (each row read and written once: the
floor of the op), also as a fraction of the device's measured copy bandwidth (device_limits).
"""

import pytest
import torch

import device_limits
from layerroute_rt import ops
from layerroute_rt.model import RMSNorm

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif("gather_rows" not in ops._TRITON_KERNELS, reason="Triton is not importable"),
]

D, DTYPE, EPS = 896, torch.bfloat16, 1e-6
ROWS = [1, 8, 64, 2048, 4096, 16384]
REPS = 20  # calls per round, at least
IMPLS = ["triton", "cuda", "torch"]  # cuda: the compiled extension (gather / scatter only)


def operands(rows: int) -> list[dict]:
    """A residual of 2 * rows random rows, the live list (every other row) and its count, in
    enough copies to be read cold (device_limits.cold_copies); the norm is shared."""
    g = torch.Generator(device="cuda").manual_seed(rows)

    def randn(*shape):
        return torch.randn(shape, generator=g, device="cuda").to(DTYPE)

    index = torch.arange(0, 2 * rows, 2, dtype=torch.int32, device="cuda")
    norm = RMSNorm(D, EPS).to("cuda", DTYPE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
    tensors = dict(residual=randn(2 * rows, D), rows=randn(rows, D), delta=randn(rows, D),
                   out=torch.empty(rows, D, dtype=DTYPE, device="cuda"),
                   index=index, index_long=index.long(),
                   count=torch.tensor([rows], dtype=torch.int32, device="cuda"))
    copies = device_limits.cold_copies(sum(t.nbytes for t in tensors.values()))
    return [dict(tensors, norm=norm)] + [
        dict({name: t.clone() for name, t in tensors.items()}, norm=norm)
        for _ in range(copies - 1)
    ]


def run(benchmark, monkeypatch, op: str, impl: str, rows: int, copies: list[dict], call,
        bytes_moved: int) -> None:
    """Time graphed calls call(copies[i % len(copies)]), max(REPS, len(copies)) a round, and
    record the figures."""
    if impl == "cuda" and (op, "cuda") not in ops._COMPILED_KERNELS:
        pytest.skip(f"layerroute_rt._C has no CUDA kernel for {op}")
    if impl != "torch":
        monkeypatch.setenv("LAYERROUTE_BACKEND", impl)
    benchmark.group = f"{op} rows={rows} D={D}"
    seconds = device_limits.time_graphed(benchmark, lambda i: call(copies[i]), len(copies), REPS)
    gbs = bytes_moved / seconds / 1e9
    benchmark.extra_info.update(
        device=device_limits.device_name(),
        us_per_call=seconds * 1e6,
        gbs=gbs,
        bandwidth_fraction=gbs / device_limits.copy_bandwidth_gbs(),
    )


ROW_BYTES = D * DTYPE.itemsize


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("impl", IMPLS)
def test_gather_rows(benchmark, monkeypatch, impl, rows):
    if impl == "torch":
        def call(a):
            torch.index_select(a["residual"], 0, a["index_long"], out=a["out"])
    else:
        def call(a):
            ops.gather_rows(a["residual"], a["index"], a["count"], a["out"])
    run(benchmark, monkeypatch, "gather_rows", impl, rows, operands(rows), call,
        2 * rows * ROW_BYTES)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("impl", IMPLS)
def test_scatter_add_rows(benchmark, monkeypatch, impl, rows):
    if impl == "torch":
        def call(a):
            a["residual"].index_add_(0, a["index_long"], a["rows"])
    else:
        def call(a):
            ops.scatter_add_rows(a["residual"], a["rows"], a["index"], a["count"])
    run(benchmark, monkeypatch, "scatter_add_rows", impl, rows, operands(rows), call,
        3 * rows * ROW_BYTES)
