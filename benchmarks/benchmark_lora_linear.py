"""The fused LoRA linear (ops.lora_linear, Triton) against the unfused torch expression
x @ W.T + ((x @ A.T) @ B.T) * s and against the base GEMM x @ W.T alone, at Qwen2.5-0.5B
shapes (K = 896: N = 896 q/o, 128 k/v, 4864 MLP up; K = 4864, N = 896 MLP down), bf16,
rank 8, with bf16 adapters and with fp32 ones (as trained on a bf16 model; the unfused
expression then casts them on every call, as ops' torch path does).

    pytest benchmarks/benchmark_lora_linear.py --benchmark-only

Forward at decode (1, 8, 64 rows) and prefill (2048, 4096, 16384 rows) sizes; forward +
backward (dx, dA, dB) at the prefill sizes. A forward round replays a CUDA graph of
max(REPS, copies) calls, as the decode step runs captured (no host launch overhead); a
forward + backward round runs as many eager calls. Each round ends with a synchronize.

Cold and hot: every operand of a call (x, W, bias, A, B, dy, and out for the row list) has
device_limits.cold_copies(bytes) copies and call i uses copy i % copies, so W, x and the
adapters come from HBM, not from L2, as in the model where each layer has its own weights
(a decode step's weights are far larger than L2). Outputs and the backward's temporaries are
allocated per call (the graph pool or the caching allocator) and may be L2-hot.

extra_info holds the time per call, the achieved GB/s (bytes of W + A + B + x + y, and of
W + dy + dx for the backward) and TFLOP/s, and both as fractions of the device's measured
copy bandwidth and bf16 matmul peak (device_limits). "triton-count0" is the row-list variant
with a count of 0: the cost of a skipped block's projection. Targets: at 1 row, triton within
1.05x of base and >= 2x faster than unfused; at 4096 rows, forward + backward >= 1.3x faster
than unfused.
"""

import pytest
import torch

import device_limits
from layerroute_rt import ops

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif("lora_linear" not in ops._TRITON_KERNELS, reason="Triton is not importable"),
]

RANK, SCALE, DTYPE = 8, 2.0, torch.bfloat16
SHAPES = [(896, 896), (896, 128), (896, 4864), (4864, 896)]  # (K, N)
DECODE_ROWS, PREFILL_ROWS = [1, 8, 64], [2048, 4096, 16384]
REPS = 20  # calls per round, at least


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")


def make_operands(rows: int, k: int, n: int, adapter_dtype: torch.dtype = DTYPE,
                  requires_grad: bool = False) -> dict:
    """Random operands on the GPU (never zeros: B is random as after training)."""
    g = torch.Generator(device="cuda").manual_seed(rows * n + k)

    def randn(*shape, std=1.0, dtype=DTYPE, grad=False):
        t = (torch.randn(shape, generator=g, device="cuda") * std).to(dtype)
        return t.requires_grad_(grad)

    return dict(
        x=randn(rows, k, grad=requires_grad),
        weight=randn(n, k, std=k**-0.5),
        bias=randn(n, std=0.1),
        lora_A=randn(RANK, k, std=k**-0.5, dtype=adapter_dtype, grad=requires_grad),
        lora_B=randn(n, RANK, std=0.05, dtype=adapter_dtype, grad=requires_grad),
    )


def cold_copies(args: dict) -> list[dict]:
    """Enough copies of the operands that each call reads them from HBM (device_limits)."""
    copies = device_limits.cold_copies(sum(t.nbytes for t in args.values()))
    return [args] + [
        {name: t.detach().clone().requires_grad_(t.requires_grad) for name, t in args.items()}
        for _ in range(copies - 1)
    ]


def unfused(x, weight, bias, lora_A, lora_B):
    return x @ weight.T + bias + ((x @ lora_A.to(x.dtype).T) @ lora_B.to(x.dtype).T) * SCALE


def base(x, weight, bias, lora_A, lora_B):
    return x @ weight.T + bias


def fused(x, weight, bias, lora_A, lora_B):
    return ops.lora_linear(x, weight, bias, lora_A, lora_B, SCALE)


def flops(rows: int, k: int, n: int, impl: str, backward: bool) -> int:
    """Matmul FLOPs of one call: the base GEMM, plus the rank-r factors unless `base`."""
    fwd = 2 * rows * k * n + (0 if impl == "base" else 2 * rows * RANK * (k + n))
    if not backward:
        return fwd
    # dx = dy W (+ s (dy B) A); dA = s (dy B)^T x and dB = s dy^T (x A^T) for the LoRA ones.
    bwd = 2 * rows * n * k + (0 if impl == "base" else 2 * rows * RANK * (2 * n + 2 * k))
    return fwd + bwd


def bytes_moved(args: dict, impl: str, backward: bool) -> int:
    """W + x + y bytes (+ A + B unless `base`), twice with the backward (W + dy + dx)."""
    (rows, k), n = args["x"].shape, args["weight"].shape[0]
    adapters = 0 if impl == "base" else args["lora_A"].nbytes + args["lora_B"].nbytes
    return ((n * k + rows * k + rows * n) * DTYPE.itemsize * (2 if backward else 1)
            + adapters)


def record(benchmark, args: dict, impl: str, backward: bool, reps: int) -> None:
    seconds = benchmark.stats.stats.median / reps
    benchmark.extra_info.update(device=device_limits.device_name(), us_per_call=seconds * 1e6)
    if impl == "triton-count0":
        return  # no rows computed: only the time means something
    (rows, k), n = args["x"].shape, args["weight"].shape[0]
    gbs = bytes_moved(args, impl, backward) / seconds / 1e9
    tflops = flops(rows, k, n, impl, backward) / seconds / 1e12
    benchmark.extra_info.update(
        gbs=gbs,
        bandwidth_fraction=gbs / device_limits.copy_bandwidth_gbs(),
        tflops=tflops,
        peak_fraction=tflops / device_limits.matmul_peak_tflops(DTYPE),
    )


IMPLS = {"triton": fused, "unfused": unfused, "base": base}


ADAPTERS = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("rows", DECODE_ROWS + PREFILL_ROWS)
@pytest.mark.parametrize("impl", [*IMPLS, "triton-count0"])
def test_forward(benchmark, impl, rows, k, n, adapter):
    if adapter == "fp32" and impl in ("base", "triton-count0"):
        pytest.skip("reads no adapter: the bf16 case times it")
    copies = cold_copies(make_operands(rows, k, n, ADAPTERS[adapter]))
    if impl == "triton-count0":
        index = torch.arange(rows, dtype=torch.int32, device="cuda")
        count = torch.zeros(1, dtype=torch.int32, device="cuda")
        outs = [torch.empty(rows, n, dtype=DTYPE, device="cuda") for _ in copies]

        def call(i):
            ops.lora_linear(**copies[i % len(copies)], scale=SCALE, index=index, count=count,
                            out=outs[i % len(copies)])
    else:
        fn = IMPLS[impl]

        def call(i):
            fn(**copies[i % len(copies)])

    reps = max(REPS, len(copies))
    with torch.no_grad():
        graph = device_limits.graphed(call, reps)
    benchmark.group = f"lora_linear forward rows={rows} K={k} N={n} adapter={adapter}"

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=50, warmup_rounds=3)
    record(benchmark, copies[0], impl, backward=False, reps=reps)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("rows", PREFILL_ROWS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, impl, rows, k, n):
    args = make_operands(rows, k, n, requires_grad=True)
    args_dy = dict(args, dy=torch.randn(rows, n, device="cuda", dtype=DTYPE))
    copies = cold_copies(args_dy)
    fn = IMPLS[impl]
    names = ["x"] if impl == "base" else ["x", "lora_A", "lora_B"]
    reps = max(REPS, len(copies))

    def step():
        for i in range(reps):
            c = copies[i % len(copies)]
            inputs = {name: t for name, t in c.items() if name != "dy"}
            torch.autograd.grad(fn(**inputs), [c[name] for name in names], c["dy"])
        torch.cuda.synchronize()

    benchmark.group = f"lora_linear forward+backward rows={rows} K={k} N={n}"
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    record(benchmark, args, impl, backward=True, reps=reps)
