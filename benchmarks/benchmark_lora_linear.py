"""The fused LoRA linear (ops.lora_linear, Triton) against the unfused torch expression
x @ W.T + ((x @ A.T) @ B.T) * s and against the base GEMM x @ W.T alone, at Qwen2.5-0.5B
shapes (K = 896; N = 896 q/o, 128 k/v, 4864 MLP up), bf16, rank 8.

    pytest benchmarks/benchmark_lora_linear.py --benchmark-only

Forward at decode (1, 8, 64 rows) and prefill (2048, 4096, 16384 rows) sizes; forward +
backward (dx, dA, dB) at the prefill sizes. A forward round replays a CUDA graph of REPS calls,
as the decode step runs captured (no host launch overhead); a forward + backward round runs
REPS eager calls. Each round ends with a synchronize. extra_info holds the time per call, the
achieved GB/s (bytes of W + x + y, and of W + dy + dx for the backward) and TFLOP/s, and both
as fractions of the device's measured copy bandwidth and bf16 matmul peak (device_limits).
"triton-count0" is the row-list variant with a count of 0: the cost of a skipped block's
projection. Targets: at 1 row, triton within 1.05x of base and >= 2x faster than unfused;
at 4096 rows, forward + backward >= 1.3x faster than unfused.
"""

import pytest
import torch

import device_limits
from layerroute_rt import ops

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif("lora_linear" not in ops._TRITON_KERNELS, reason="Triton is not importable"),
]

K, RANK, SCALE, DTYPE = 896, 8, 2.0, torch.bfloat16
WIDTHS = [896, 128, 4864]
DECODE_ROWS, PREFILL_ROWS = [1, 8, 64], [2048, 4096, 16384]
REPS = 20  # calls per round


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")


def make_operands(rows: int, n: int, requires_grad: bool = False) -> dict:
    """Random bf16 operands on the GPU (never zeros: B is random as after training)."""
    g = torch.Generator(device="cuda").manual_seed(rows * n)

    def randn(*shape, std=1.0, grad=False):
        t = (torch.randn(shape, generator=g, device="cuda") * std).to(DTYPE)
        return t.requires_grad_(grad)

    return dict(
        x=randn(rows, K, grad=requires_grad),
        weight=randn(n, K, std=K**-0.5),
        bias=randn(n, std=0.1),
        lora_A=randn(RANK, K, std=K**-0.5, grad=requires_grad),
        lora_B=randn(n, RANK, std=0.05, grad=requires_grad),
    )


def unfused(x, weight, bias, lora_A, lora_B):
    return x @ weight.T + bias + ((x @ lora_A.T) @ lora_B.T) * SCALE


def base(x, weight, bias, lora_A, lora_B):
    return x @ weight.T + bias


def fused(x, weight, bias, lora_A, lora_B):
    return ops.lora_linear(x, weight, bias, lora_A, lora_B, SCALE)


def flops(rows: int, n: int, impl: str, backward: bool) -> int:
    """Matmul FLOPs of one call: the base GEMM, plus the rank-r factors unless `base`."""
    fwd = 2 * rows * K * n + (0 if impl == "base" else 2 * rows * RANK * (K + n))
    if not backward:
        return fwd
    # dx = dy W (+ s (dy B) A); dA = s (dy B)^T x and dB = s dy^T (x A^T) for the LoRA ones.
    bwd = 2 * rows * n * K + (0 if impl == "base" else 2 * rows * RANK * (2 * n + 2 * K))
    return fwd + bwd


def bytes_moved(rows: int, n: int, backward: bool) -> int:
    """W + x + y bytes, twice with the backward (W + dy + dx)."""
    return (n * K + rows * K + rows * n) * DTYPE.itemsize * (2 if backward else 1)


def record(benchmark, rows: int, n: int, impl: str, backward: bool) -> None:
    seconds = benchmark.stats.stats.median / REPS
    benchmark.extra_info.update(device=device_limits.device_name(), us_per_call=seconds * 1e6)
    if impl == "triton-count0":
        return  # no rows computed: only the time means something
    gbs = bytes_moved(rows, n, backward) / seconds / 1e9
    tflops = flops(rows, n, impl, backward) / seconds / 1e12
    benchmark.extra_info.update(
        gbs=gbs,
        bandwidth_fraction=gbs / device_limits.copy_bandwidth_gbs(),
        tflops=tflops,
        peak_fraction=tflops / device_limits.matmul_peak_tflops(DTYPE),
    )


IMPLS = {"triton": fused, "unfused": unfused, "base": base}


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("rows", DECODE_ROWS + PREFILL_ROWS)
@pytest.mark.parametrize("impl", [*IMPLS, "triton-count0"])
def test_forward(benchmark, impl, rows, n):
    args = make_operands(rows, n)
    if impl == "triton-count0":
        index = torch.arange(rows, dtype=torch.int32, device="cuda")
        count = torch.zeros(1, dtype=torch.int32, device="cuda")
        out = torch.empty(rows, n, dtype=DTYPE, device="cuda")

        def call():
            ops.lora_linear(**args, scale=SCALE, index=index, count=count, out=out)
    else:
        fn = IMPLS[impl]

        def call():
            fn(**args)

    with torch.no_grad():
        graph = device_limits.graphed(call, REPS)
    benchmark.group = f"lora_linear forward rows={rows} N={n}"

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=50, warmup_rounds=3)
    record(benchmark, rows, n, impl, backward=False)


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("rows", PREFILL_ROWS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, impl, rows, n):
    args = make_operands(rows, n, requires_grad=True)
    leaves = [args["x"]] if impl == "base" else [args["x"], args["lora_A"], args["lora_B"]]
    dy = torch.randn(rows, n, device="cuda", dtype=DTYPE)
    fn = IMPLS[impl]

    def step():
        for _ in range(REPS):
            torch.autograd.grad(fn(**args), leaves, dy)
        torch.cuda.synchronize()

    benchmark.group = f"lora_linear forward+backward rows={rows} N={n}"
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    record(benchmark, rows, n, impl, backward=True)
