"""qkv stage of a block: input RMSNorm (prologue) -> fused q/k/v projection (+ LoRA) -> bias,
RoPE, K/V cache write (epilogue), one launch.

For the rows i < count of a row list (row i reads h[index[i]]), or every row of h:

    xn = RMSNorm(h[r]) * norm1;  [q | k | v] = xn Wqkv^T + bqkv + scale (xn A^T) B^T
    q_out[i] = RoPE(q, pos[r]);  k_cache[r // T, :, slot0 + r % T] = RoPE(k, pos[r]);
    v_cache[r // T, :, slot0 + r % T] = v;  valid[r // T, slot0 + r % T] = True

One program per (BLOCK_M rows, head), heads being the H query heads, then the HKV key heads,
then the HKV value heads: a q or k program computes the two halves of its head (two column
tiles of HD / 2) so that rotate-half RoPE is elementwise in registers. T is the rows per
sequence (1 at decode, the prompt width at prefill). Arguments are checked by
layerroute_rt.ops.qkv_rope.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from python_kernels import stage_common as sc


@triton.jit
def _qkv_rope_kernel(h_ptr, index_ptr, count_ptr, nw_ptr, w_ptr, bias_ptr, a_ptr, b_ptr,
                     pos_ptr, freq_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, q_ptr,
                     M, X_ROWS, D, R, T, S, eps, scale,
                     H: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr,
                     HALF_PAD: tl.constexpr, HD_PAD: tl.constexpr, HAS_INDEX: tl.constexpr,
                     HAS_LORA: tl.constexpr, SPLIT_U: tl.constexpr, R_PAD: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    if pid_m * BLOCK_M >= sc.live_rows(count_ptr, M, HAS_INDEX):
        return
    i, rows, ok = sc.load_rows(index_ptr, count_ptr, pid_m, M, X_ROWS, HAS_INDEX, BLOCK_M)
    rstd = sc.inv_rms(h_ptr, rows, ok, D, eps, BLOCK_M, BLOCK_K)
    if head < H + HKV:
        o1, o2, j, j_ok = sc.rope_head(h_ptr, rows, ok, D, rstd, nw_ptr, w_ptr, bias_ptr,
                                       head * HD, a_ptr, b_ptr, R, scale, pos_ptr, freq_ptr,
                                       HD, HAS_LORA, SPLIT_U, R_PAD, PRECISION, BLOCK_M,
                                       HALF_PAD, BLOCK_K)
        if head < H:
            at = i.to(tl.int64)[:, None] * (H * HD) + head * HD + j[None, :]
            m = ok[:, None] & j_ok[None, :]
            tl.store(q_ptr + at, o1.to(q_ptr.dtype.element_ty), mask=m)
            tl.store(q_ptr + at + HD // 2, o2.to(q_ptr.dtype.element_ty), mask=m)
        else:
            sc.store_kv_head(o1, o2, o1, j, j_ok, rows, ok, head - H, k_ptr, v_ptr, valid_ptr,
                             slot_ptr, T, S, True, HKV, HD)
    else:
        y, jv, jv_ok = sc.plain_head(h_ptr, rows, ok, D, rstd, nw_ptr, w_ptr, bias_ptr, head * HD,
                                   a_ptr, b_ptr, R, scale, HD, HAS_LORA, SPLIT_U, R_PAD,
                                   PRECISION, BLOCK_M, HD_PAD, BLOCK_K)
        sc.store_kv_head(y, y, y, jv, jv_ok, rows, ok, head - H - HKV, k_ptr, v_ptr, valid_ptr,
                         slot_ptr, T, S, False, HKV, HD)


def qkv_rope(h, index, count, norm_weight, eps, weight, bias, lora_A, lora_B, scale, positions,
             inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, q_out) -> None:
    """Launch wrapper (see the module docstring); q_out [M, H HD], M the rows of the row list
    (or of h)."""
    M = q_out.shape[0]
    x_rows, d = h.shape
    _, hkv, s, hd = k_cache.shape
    n_heads = q_out.shape[1] // hd
    if M == 0:
        return
    rank = 0 if lora_A is None else lora_A.shape[0]
    bm = sc.block_m(M)
    unused = h
    _qkv_rope_kernel[(triton.cdiv(M, bm), n_heads + 2 * hkv)](
        h, unused if index is None else index, unused if count is None else count, norm_weight,
        weight, bias, unused if lora_A is None else lora_A, unused if lora_B is None else lora_B,
        positions, inv_freq, k_cache, v_cache, valid.view(torch.uint8), slot, q_out,
        M, x_rows, d, rank, rows_per_seq, s, eps, scale,
        H=n_heads, HKV=hkv, HD=hd, HALF_PAD=max(16, triton.next_power_of_2(hd // 2)),
        HD_PAD=max(16, triton.next_power_of_2(hd)), HAS_INDEX=index is not None,
        HAS_LORA=lora_A is not None, SPLIT_U=h.dtype != torch.float32, R_PAD=sc.r_pad(rank),
        PRECISION=sc.precision(h.dtype), BLOCK_M=bm, BLOCK_K=sc.block_k(d, h.dtype, M),
        num_warps=4, num_stages=sc.STAGES)
