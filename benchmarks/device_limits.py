"""The device's measured limits, against which every benchmark states its figures, and the
CUDA-graph helper the microbenchmarks time with.

copy_bandwidth_gbs(): device-to-device copy of a 1 GiB buffer (read + write bytes / time).
matmul_peak_tflops(dtype): a large square matmul (8192^3), the achievable dense peak.
Both are measured once per process with CUDA events and cached.
"""
from __future__ import annotations

import functools

import torch


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


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def graphed(fn, reps: int) -> torch.cuda.CUDAGraph:
    """fn run reps times, captured in a CUDA graph after a warm-up on a side stream (which
    compiles and autotunes the kernels), so a replay times the kernels and not the launches."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return graph
