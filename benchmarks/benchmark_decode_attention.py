"""Decode attention (python_kernels/decode_attention.py, Triton) against torch's
scaled_dot_product_attention at Qwen2.5-0.5B's attention shapes (14 query / 2 KV heads, head
dim 64), bf16, one query token per sequence:

    pytest benchmarks/benchmark_decode_attention.py --benchmark-only

Batch 1, 8, 32; a cache of 2,304 slots (prompt 2048 + 256 new) of which 384 or 2,304 are filled
(length); all, half or none of the rows live (count). The kernel reads K/V only for the live rows
and only below the length, split over slot ranges so that batch 1 fills the GPU; the torch
version (the engine's earlier dense decode attention: the query heads of a KV head folded into
the query length, a boolean mask over the whole cache) reads every row's whole cache. A round
replays a CUDA graph of calls; operands rotate through enough copies to be read cold
(device_limits.cold_copies).

extra_info: time per call, and GB/s of the K/V bytes the kernel needs (live rows x length x
2 KV heads x 64 x 2 tensors x 2 bytes) against the measured copy bandwidth.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import device_limits
from layerroute_rt import ops

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif("decode_attention" not in ops._TRITON_KERNELS, reason="Triton is not importable"),
]

H, HKV, D, S, DTYPE = 14, 2, 64, 2304, torch.bfloat16
SCALE = 1 / math.sqrt(D)


def operands(batch: int, length: int, live: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(batch * 7 + length)

    def randn(*shape):
        return torch.randn(shape, generator=g, device="cuda").to(DTYPE)

    valid = torch.zeros(batch, S, dtype=torch.bool, device="cuda")
    valid[:, :length] = True
    tensors = dict(q=randn(batch, H, D), k=randn(batch, HKV, S, D), v=randn(batch, HKV, S, D),
                   valid=valid, out=torch.empty(batch, H, D, dtype=DTYPE, device="cuda"),
                   index=torch.arange(batch, dtype=torch.int32, device="cuda"),
                   count=torch.tensor([live], dtype=torch.int32, device="cuda"),
                   length=torch.tensor([length], device="cuda"))
    copies = device_limits.cold_copies(sum(t.nbytes for t in tensors.values()))
    return [tensors] + [{n: t.clone() for n, t in tensors.items()} for _ in range(copies - 1)]


def sdpa(a):
    B = a["q"].shape[0]
    q = a["q"].view(B, HKV, H // HKV, D)                      # one query: heads fold, no copy
    return F.scaled_dot_product_attention(q, a["k"], a["v"], attn_mask=a["valid"][:, None, None])


@pytest.mark.parametrize("live", ["all", "half", "none"])
@pytest.mark.parametrize("length", [384, S])
@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_decode_attention(benchmark, monkeypatch, impl, batch, length, live):
    n_live = {"all": batch, "half": batch // 2, "none": 0}[live]
    if impl == "torch" and live != "all":
        pytest.skip("torch runs every row whatever the count")
    if live == "half" and batch == 1:
        pytest.skip("half of one row is the `none` case")
    copies = operands(batch, length, n_live)
    if impl == "triton":
        monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")

        def call(i):
            a = copies[i]
            ops.decode_attention(a["q"], a["k"], a["v"], a["valid"], a["index"], a["count"],
                                 a["length"], SCALE, out=a["out"])
    else:
        def call(i):
            sdpa(copies[i])
    benchmark.group = f"decode_attention batch={batch} length={length} live={live}"
    seconds = device_limits.time_graphed(benchmark, call, len(copies))
    needed = n_live * length * HKV * D * 2 * DTYPE.itemsize
    gbs = needed / seconds / 1e9
    benchmark.extra_info.update(device=device_limits.device_name(), us_per_call=seconds * 1e6,
                                kv_bytes_needed=needed, gbs=gbs,
                                bandwidth_fraction=gbs / device_limits.copy_bandwidth_gbs())
