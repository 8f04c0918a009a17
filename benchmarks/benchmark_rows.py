"""The row ops of the skip path (python_kernels/rows.py, Triton) against plain torch, at
Qwen2.5-0.5B width (D = 896), bf16:

    gather_rows        vs index_select (and the compiled extension's kernel, if built)
    scatter_add_rows   vs index_add_ (and the compiled extension's kernel, if built)
    gather_rmsnorm     vs index_select then the model's RMSNorm (two passes over the rows)
    add_rmsnorm        vs x += delta then the model's RMSNorm

    pytest benchmarks/benchmark_rows.py --benchmark-only

Decode (1, 8, 64 rows) and prefill (2048, 4096, 16384 rows) sizes: that many rows are live,
every other row of a [2 rows, D] residual. The torch versions get the row list as an int64
tensor made beforehand (they would need nonzero, a host sync, to make it). A round replays a
CUDA graph of REPS calls (no host launch overhead) and synchronizes. extra_info holds the time
per call and the achieved GB/s (each row read and written once: the floor of the op), also as
a fraction of the device's measured copy bandwidth (device_limits).
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
REPS = 20  # calls per round
IMPLS = ["triton", "cuda", "torch"]  # cuda: the compiled extension (gather / scatter only)


def operands(rows: int) -> dict:
    """A residual of 2 * rows random rows, the live list (every other row) and its count."""
    g = torch.Generator(device="cuda").manual_seed(rows)

    def randn(*shape):
        return torch.randn(shape, generator=g, device="cuda").to(DTYPE)

    index = torch.arange(0, 2 * rows, 2, dtype=torch.int32, device="cuda")
    norm = RMSNorm(D, EPS).to("cuda", DTYPE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
    return dict(residual=randn(2 * rows, D), rows=randn(rows, D), delta=randn(rows, D),
                out=torch.empty(rows, D, dtype=DTYPE, device="cuda"),
                index=index, index_long=index.long(), norm=norm,
                count=torch.tensor([rows], dtype=torch.int32, device="cuda"))


def run(benchmark, monkeypatch, op: str, impl: str, rows: int, call, bytes_moved: int) -> None:
    """Time REPS graphed calls of `call` per round and record the figures."""
    if impl == "cuda" and (op, "cuda") not in ops._COMPILED_KERNELS:
        pytest.skip(f"layerroute_rt._C has no CUDA kernel for {op}")
    if impl != "torch":
        monkeypatch.setenv("LAYERROUTE_BACKEND", impl)
    with torch.no_grad():
        graph = device_limits.graphed(call, REPS)

    def round_():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.group = f"{op} rows={rows} D={D}"
    benchmark.pedantic(round_, rounds=50, warmup_rounds=3)
    seconds = benchmark.stats.stats.median / REPS
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
    a = operands(rows)
    if impl == "torch":
        def call():
            torch.index_select(a["residual"], 0, a["index_long"], out=a["out"])
    else:
        def call():
            ops.gather_rows(a["residual"], a["index"], a["count"], a["out"])
    run(benchmark, monkeypatch, "gather_rows", impl, rows, call, 2 * rows * ROW_BYTES)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("impl", IMPLS)
def test_scatter_add_rows(benchmark, monkeypatch, impl, rows):
    a = operands(rows)
    if impl == "torch":
        def call():
            a["residual"].index_add_(0, a["index_long"], a["rows"])
    else:
        def call():
            ops.scatter_add_rows(a["residual"], a["rows"], a["index"], a["count"])
    run(benchmark, monkeypatch, "scatter_add_rows", impl, rows, call, 3 * rows * ROW_BYTES)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gather_rmsnorm(benchmark, monkeypatch, impl, rows):
    a = operands(rows)
    if impl == "torch":
        def call():
            a["norm"](torch.index_select(a["residual"], 0, a["index_long"], out=a["out"]))
    else:
        normed = torch.empty_like(a["out"])

        def call():
            ops.gather_rmsnorm(a["residual"], a["index"], a["count"], a["norm"].weight, EPS,
                               a["out"], normed)
    run(benchmark, monkeypatch, "gather_rmsnorm", impl, rows, call, 3 * rows * ROW_BYTES)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_add_rmsnorm(benchmark, monkeypatch, impl, rows):
    a = operands(rows)
    if impl == "torch":
        def call():
            a["rows"].add_(a["delta"])
            a["norm"](a["rows"])
    else:
        def call():
            ops.add_rmsnorm(a["rows"], a["delta"], a["norm"].weight, EPS, a["count"])
    run(benchmark, monkeypatch, "add_rmsnorm", impl, rows, call, 4 * rows * ROW_BYTES)
