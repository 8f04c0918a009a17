"""gate_up stage of the MLP: post-attention RMSNorm (prologue) -> fused gate/up projection
(+ LoRA) -> SiLU(gate) x up (epilogue), one launch:

    xn = RMSNorm(h[index[i]]) * norm2;  out[i] = silu(xn Wg^T) * (xn Wu^T)     for i < count

with weight = [Wg; Wu] [2 I, D] (and the LoRA's B stacked the same way). A program holds
BLOCK_N columns of the gate and the same columns of up, so the product is elementwise in
registers; the projections, the SiLU and the product are rounded to h's dtype one at a time, as
the reference rounds them. Arguments are checked by layerroute_rt.ops.norm_gate_up.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from python_kernels import stage_common as sc


@triton.jit
def _norm_gate_up_kernel(h_ptr, index_ptr, count_ptr, nw_ptr, w_ptr, a_ptr, b_ptr, out_ptr,
                         M, X_ROWS, I, D, R, eps, scale,
                         HAS_LORA: tl.constexpr, SPLIT_U: tl.constexpr, R_PAD: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= sc.live_rows(count_ptr, M, True):
        return
    i, rows, ok = sc.load_rows(index_ptr, count_ptr, pid_m, M, X_ROWS, True, BLOCK_M)
    rstd = sc.inv_rms(h_ptr, rows, ok, D, eps, BLOCK_M, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    g = sc.lora_tile(h_ptr, rows, ok, D, rstd, nw_ptr, w_ptr, cols, col_ok, a_ptr, b_ptr, R,
                     scale, True, HAS_LORA, SPLIT_U, R_PAD, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    u = sc.lora_tile(h_ptr, rows, ok, D, rstd, nw_ptr, w_ptr, cols + I, col_ok, a_ptr, b_ptr, R,
                     scale, True, HAS_LORA, SPLIT_U, R_PAD, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    dt = h_ptr.dtype.element_ty
    g = sc.rounded(g, dt)
    act = sc.rounded(sc.rounded(g * tl.sigmoid(g), dt) * sc.rounded(u, dt), dt)
    tl.store(out_ptr + i.to(tl.int64)[:, None] * I + cols[None, :], act.to(dt),
             mask=ok[:, None] & col_ok[None, :])


def norm_gate_up(h, index, count, norm_weight, eps, weight, lora_A, lora_B, scale, out) -> None:
    M, inter = out.shape
    x_rows, d = h.shape
    if M == 0:
        return
    rank = 0 if lora_A is None else lora_A.shape[0]
    bm, bn = sc.block_m(M), sc.block_n(inter, M)
    _norm_gate_up_kernel[(triton.cdiv(M, bm), triton.cdiv(inter, bn))](
        h, index, count, norm_weight, weight, h if lora_A is None else lora_A,
        h if lora_B is None else lora_B, out, M, x_rows, inter, d, rank, eps, scale,
        HAS_LORA=lora_A is not None, SPLIT_U=h.dtype != torch.float32, R_PAD=sc.r_pad(rank),
        PRECISION=sc.precision(h.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=sc.block_k(d, h.dtype, M),
        num_warps=4, num_stages=sc.STAGES)
