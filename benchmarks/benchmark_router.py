"""The token router (ops.route_tokens, Triton: scores, decisions and the compacted row list
with its count, all on the device) against the plain torch expression
sigmoid(h @ w + b) >= tau followed by nonzero, at Qwen2.5-0.5B width (D = 896), bf16.

    pytest benchmarks/benchmark_router.py --benchmark-only

Decode (1, 8, 64 rows) and prefill (2048, 4096, 16384 rows) sizes. A Triton round replays a
CUDA graph of REPS calls, as the decode step runs captured (no host launch overhead); the torch
expression cannot be captured (nonzero reads the count on the host), so its round runs REPS
eager calls. Each round ends with a synchronize. extra_info holds the time per call and the
achieved GB/s (h read, p and index written), also as a fraction of the device's measured copy
bandwidth (device_limits). Target: 4096 rows under 10 us on an H100 (`meets_target`).
"""

import pytest
import torch

import device_limits
from layerroute_rt import ops

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif("route_tokens" not in ops._TRITON_KERNELS,
                       reason="Triton is not importable"),
]

D, DTYPE, TAU = 896, torch.bfloat16, 0.5
ROWS = [1, 8, 64, 2048, 4096, 16384]
REPS = 20  # calls per round
TARGET_ROWS, TARGET_US = 4096, 10.0


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_route_tokens(benchmark, impl, rows):
    g = torch.Generator(device="cuda").manual_seed(rows)
    h = torch.randn(rows, D, generator=g, device="cuda").to(DTYPE)
    weight = torch.randn(D, generator=g, device="cuda") * (2 / D**0.5)  # p spread around tau
    bias = torch.zeros(1, device="cuda")

    if impl == "triton":
        graph = device_limits.graphed(lambda: ops.route_tokens(h, weight, bias, TAU), REPS)

        def round_():
            graph.replay()
            torch.cuda.synchronize()
    else:
        weight_h = weight.to(DTYPE)

        def round_():
            for _ in range(REPS):
                p = torch.sigmoid((h @ weight_h).float() + bias)
                torch.nonzero(p >= TAU)
            torch.cuda.synchronize()

    benchmark.group = f"route_tokens rows={rows} D={D}"
    with torch.no_grad():
        benchmark.pedantic(round_, rounds=50, warmup_rounds=3)
    seconds = benchmark.stats.stats.median / REPS
    gbs = (rows * D * DTYPE.itemsize + rows * 8) / seconds / 1e9  # h; p and index (4 B each)
    benchmark.extra_info.update(
        device=device_limits.device_name(),
        us_per_call=seconds * 1e6,
        gbs=gbs,
        bandwidth_fraction=gbs / device_limits.copy_bandwidth_gbs(),
    )
    if rows == TARGET_ROWS:
        benchmark.extra_info.update(target_us=TARGET_US, meets_target=seconds * 1e6 < TARGET_US)
