"""The head: final RMSNorm (prologue) -> lm_head, logits in float32, one launch:

    out[r] = float32(round(RMSNorm(h[r]) * norm W^T))     for every row r of h

the product rounded to h's dtype first, as the reference (F.linear in h's dtype, then
.float()). One program per (BLOCK_M rows, BLOCK_N vocabulary columns). Arguments are checked
by layerroute_rt.ops.norm_linear.
"""
from __future__ import annotations

import triton
import triton.language as tl

from python_kernels import stage_common as sc


@triton.jit
def _norm_linear_kernel(h_ptr, nw_ptr, w_ptr, out_ptr, M, N, D, eps,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    i, rows, ok = sc.load_rows(h_ptr, h_ptr, pid_m, M, M, False, BLOCK_M)
    rstd = sc.inv_rms(h_ptr, rows, ok, D, eps, BLOCK_M, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = sc.lora_tile(h_ptr, rows, ok, D, rstd, nw_ptr, w_ptr, cols, col_ok, h_ptr, h_ptr, 0,
                       1.0, True, False, False, 16, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    y = sc.rounded(acc, h_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], y, mask=ok[:, None] & col_ok[None, :])


def norm_linear(h, norm_weight, eps, weight, out) -> None:
    M, d = h.shape
    n = weight.shape[0]
    if M == 0:
        return
    bm, bn = sc.block_m(M), sc.block_n(n, M)
    _norm_linear_kernel[(triton.cdiv(M, bm), triton.cdiv(n, bn))](
        h, norm_weight, weight, out, M, n, d, eps, PRECISION=sc.precision(h.dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=sc.block_k(d, h.dtype, M),
        num_warps=4, num_stages=sc.STAGES)
