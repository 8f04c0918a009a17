"""Decode attention over listed rows (one query token per row), grouped-query, in gathered space:

    out[i, h] = softmax_s(scale * q[i, h] . k[b, h // G, s]) v[b, h // G, s],  b = index[i],

over the key slots s < length whose valid[b, s] is set, for i < count. count (int32 [1]) and
length (int [1], the filled part of the cache) are read from device memory: a program whose row
lies past the count exits before loading anything, and no slot past the length is read, so a
block whose rows all skipped reads no K/V and the host never reads either value (the decode
step can be captured in a CUDA graph). A row with no visible key gets zeros.

One program per (row, KV head) holds the G query heads of that KV head (padded to 16, tl.dot's
minimum) and walks the cache in BLOCK_S slots with an online softmax in float32 (as in
FlashAttention / flash-decoding), so each K/V slot is read once for the G heads that share it.
Layouts: q, out [M, H, D]; k, v [B, HKV, S, D] (the KVCache layer slice); valid [B, S].
Arguments are checked by layerroute_rt.ops.decode_attention.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_S = 64


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, index_ptr, count_ptr, length_ptr,
                             out_ptr, S, scale,
                             H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                             IEEE: tl.constexpr):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    if row >= tl.load(count_ptr):
        return
    b = tl.load(index_ptr + row).to(tl.int64)
    n_keys = tl.minimum(tl.load(length_ptr).to(tl.int32), S)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head_ok = g < G
    dim_ok = d < D
    q_rows = (row.to(tl.int64) * H + kv_head * G + g)[:, None] * D + d[None, :]
    q = tl.load(q_ptr + q_rows, mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
    kv_base = (b * HKV + kv_head) * S * D
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)        # finite: a fully masked block is safe
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(0, n_keys, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        s_ok = s < n_keys
        visible = tl.load(valid_ptr + b * S + s, mask=s_ok, other=0) != 0
        at = kv_base + s.to(tl.int64)[:, None] * D + d[None, :]
        kv_ok = s_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + at, mask=kv_ok, other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(visible[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + at, mask=kv_ok, other=0.0)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
    tl.store(out_ptr + q_rows, out.to(out_ptr.dtype.element_ty),
             mask=head_ok[:, None] & dim_ok[None, :])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                     index: torch.Tensor, count: torch.Tensor, length: torch.Tensor, scale: float,
                     out: torch.Tensor) -> torch.Tensor:
    M, H, D = q.shape
    _, HKV, S, _ = k.shape
    G = H // HKV
    _decode_attention_kernel[(M, HKV)](
        q, k, v, valid.view(torch.uint8), index, count, length, out, S, scale,
        H=H, HKV=HKV, G=G, D=D, BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_S=BLOCK_S,
        IEEE=q.dtype == torch.float32, num_warps=4)
    return out
