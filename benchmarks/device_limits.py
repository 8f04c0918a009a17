"""The device's measured limits, against which every benchmark states its figures, and the
CUDA-graph helper the microbenchmarks time with.

copy_bandwidth_gbs(): device-to-device copy of a 1 GiB buffer (read + write bytes / time).
matmul_peak_tflops(dtype): a large square matmul (8192^3), the achievable dense peak.
Both are measured once per process with CUDA events and cached.

cold_copies(nbytes): how many copies of a call's operands a benchmark rotates through so that
they are not in L2 when a call reads them: the copies together span at least twice the L2 size
(torch's L2_cache_size, 50 MB where unknown), at most MAX_COPIES of them (below
2 L2 / MAX_COPIES bytes a call, about 100 KB, part of the operands stays in L2; such calls
are latency-bound).
"""
from __future__ import annotations

import functools

import torch

L2_FALLBACK_BYTES = 50 << 20
MAX_COPIES = 1024


def _time_ms(fn, iters: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@functools.cache
def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


@functools.cache
def matmul_peak_tflops(dtype: torch.dtype = torch.bfloat16) -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = _time_ms(lambda: a @ b, iters=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def l2_cache_bytes() -> int:
    size = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
    return size or L2_FALLBACK_BYTES


def cold_copies(nbytes: int) -> int:
    """Copies of a working set of nbytes whose sum is >= 2x the L2 size (at most MAX_COPIES)."""
    return max(1, min(MAX_COPIES, -(-2 * l2_cache_bytes() // max(1, nbytes))))


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def graphed(fn, reps: int) -> torch.cuda.CUDAGraph:
    """fn(0), ..., fn(reps - 1) captured in a CUDA graph after a warm-up on a side stream
    (which compiles and autotunes the kernels), so a replay times the kernels and not the
    launches. fn(i) uses operand copy i % copies: see cold_copies."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    return graph


def time_graphed(benchmark, call, copies: int, reps: int = 20, rounds: int = 50) -> float:
    """Seconds per call of call(i) (i: the operand copy, i % copies), timed by pytest-benchmark
    as replays of one CUDA graph of max(reps, copies) calls, each followed by a synchronise."""
    reps = max(reps, copies)
    with torch.no_grad():
        graph = graphed(lambda i: call(i % copies), reps)

    def round_():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(round_, rounds=rounds, warmup_rounds=3)
    return benchmark.stats.stats.median / reps

