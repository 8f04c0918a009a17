"""Decode attention over listed rows (one query token per row), grouped-query, in gathered space:

    out[i, h] = softmax_s(scale * q[i, h] . k[b, h // G, s]) v[b, h // G, s],  b = index[i],

over the key slots s < length whose valid[b, s] is set, for i < count. count (int32 [1]) and
length (int [1], the filled part of the cache) are read from device memory: a program whose row
lies past the count exits before loading anything, and no slot past the length is read, so a
block whose rows all skipped reads no K/V and the host never reads either value (the decode
step can be captured in a CUDA graph). A row with no visible key gets zeros.

Split over the slots, as flash-decoding does: at batch 1 there are only (rows x KV heads) = 2
(row, head) pairs, far too few programs to fill a GPU, so the cache's S slots are cut into
`splits` ranges of whole BLOCK_S blocks, one program per (row, KV head, range); each keeps an
online softmax in float32 for the G query heads of its KV head (padded to 16, tl.dot's minimum)
and writes its partial max, sum and weighted values; a second kernel merges the ranges that lie
below the length. The number of ranges depends only on the static shapes (a captured graph
keeps it), chosen so that the programs cover the GPU's multiprocessors twice over.

Layouts: q, out [M, H, D]; k, v [B, HKV, S, D] (the KVCache layer slice); valid [B, S].
Arguments are checked by layerroute_rt.ops.decode_attention.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from python_kernels import device as device_info

BLOCK_S = 64
MIN_RANGE = 2 * BLOCK_S    # slots a range holds at least: its partials cost G x D floats


@triton.jit
def _partial_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, index_ptr, count_ptr, length_ptr,
                    m_ptr, l_ptr, acc_ptr, S, scale, SPLIT_LEN,
                    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                    SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_S: tl.constexpr, IEEE: tl.constexpr):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if row >= tl.load(count_ptr):
        return
    n_keys = tl.minimum(tl.load(length_ptr).to(tl.int32), S)
    first = split * SPLIT_LEN
    if first >= n_keys:                     # past the filled slots: the merge skips this range
        return
    last = tl.minimum(first + SPLIT_LEN, n_keys)
    b = tl.load(index_ptr + row).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head_ok = g < G
    dim_ok = d < D
    q_at = (row.to(tl.int64) * H + kv_head * G + g)[:, None] * D + d[None, :]
    q = tl.load(q_ptr + q_at, mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
    kv_base = (b * HKV + kv_head) * S * D
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)        # finite: a fully masked block is safe
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(first, last, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        s_ok = s < last
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
        v = tl.load(v_ptr + at, mask=kv_ok & visible[:, None], other=0.0)   # 0 x NaN is NaN
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    part = (row.to(tl.int64) * HKV + kv_head) * SPLITS + split        # only the G real heads
    tl.store(m_ptr + part * G + g, m_i, mask=head_ok)
    tl.store(l_ptr + part * G + g, l_i, mask=head_ok)
    tl.store(acc_ptr + (part * G + g)[:, None] * D + d[None, :], acc,
             mask=head_ok[:, None] & dim_ok[None, :])


@triton.jit
def _merge_kernel(m_ptr, l_ptr, acc_ptr, count_ptr, length_ptr, out_ptr, S, SPLIT_LEN,
                  H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                  SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    if row >= tl.load(count_ptr):
        return
    n_keys = tl.minimum(tl.load(length_ptr).to(tl.int32), S)
    used = tl.cdiv(n_keys, SPLIT_LEN)                     # the ranges the partial kernel wrote
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head_ok = g < G
    ok = head_ok[:, None] & (d < D)[None, :]
    m = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    base = (row.to(tl.int64) * HKV + kv_head) * SPLITS
    for split in range(0, used):
        part = base + split
        m_s = tl.load(m_ptr + part * G + g, mask=head_ok, other=-1.0e30)
        m_new = tl.maximum(m, m_s)
        alpha, beta = tl.exp(m - m_new), tl.exp(m_s - m_new)
        l = l * alpha + tl.load(l_ptr + part * G + g, mask=head_ok, other=0.0) * beta
        acc = acc * alpha[:, None] + beta[:, None] * tl.load(
            acc_ptr + (part * G + g)[:, None] * D + d[None, :], mask=ok, other=0.0)
        m = m_new
    out = tl.where(l[:, None] > 0, acc / tl.maximum(l, 1e-30)[:, None], 0.0)
    out_at = (row.to(tl.int64) * H + kv_head * G + g)[:, None] * D + d[None, :]
    tl.store(out_ptr + out_at, out.to(out_ptr.dtype.element_ty), mask=ok)


def _stages(q: torch.Tensor, block_g: int, block_d: int) -> int:
    """Pipeline stages of the slot loop: 3, or 2 where 3 may not fit the device's shared memory
    (fp32 at head dim 128 on a 99 KB part). The kernel's use is bounded by (stages - 1) K and V
    tiles, the q tile, the scores in fp32 and 8 KiB; tests/triton_sm_compile.py checks that the
    compiled kernels fit sm_80, sm_89 and sm_90."""
    limit = device_info.shared_memory_limit(q.device)
    e = q.element_size()
    kv, rest = 2 * BLOCK_S * block_d * e, block_g * block_d * e + block_g * BLOCK_S * 4 + 8192
    return 3 if limit is None or 2 * kv + rest <= limit else 2


def split_count(rows: int, kv_heads: int, slots: int, device: torch.device) -> int:
    """Slot ranges per (row, KV head): enough programs for twice the multiprocessors, each range
    at least MIN_RANGE slots."""
    blocks = triton.cdiv(max(slots, 1), MIN_RANGE)
    wanted = triton.cdiv(2 * device_info.multiprocessors(device), rows * kv_heads)
    return max(1, min(blocks, wanted))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                     index: torch.Tensor, count: torch.Tensor, length: torch.Tensor, scale: float,
                     out: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    M, H, D = q.shape
    _, HKV, S, _ = k.shape
    G = H // HKV
    splits = splits or split_count(M, HKV, S, q.device)
    split_len = triton.cdiv(triton.cdiv(S, splits), BLOCK_S) * BLOCK_S   # whole blocks a range
    splits = triton.cdiv(S, split_len)
    block_g, block_d = max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(D))
    m = torch.empty(M, HKV, splits, G, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(M, HKV, splits, G, D, dtype=torch.float32, device=q.device)
    shapes = dict(H=H, HKV=HKV, G=G, D=D, SPLITS=splits, BLOCK_G=block_g, BLOCK_D=block_d)
    _partial_kernel[(M, HKV, splits)](
        q, k, v, valid.view(torch.uint8), index, count, length, m, l, acc, S, scale, split_len,
        BLOCK_S=BLOCK_S, IEEE=q.dtype == torch.float32, num_warps=4,
        num_stages=_stages(q, block_g, block_d), **shapes)
    _merge_kernel[(M, HKV)](m, l, acc, count, length, out, S, split_len, num_warps=4, **shapes)
    return out
