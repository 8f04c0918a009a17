"""o_proj / down_proj stage: a projection (+ LoRA) whose epilogue adds its output into the
residual at the listed rows, one launch:

    residual[index[i]] += x[i] W^T + scale (x[i] A^T) B^T      for i < count

x [M, K] in gathered space (row i belongs to residual row index[i]); the product is rounded
to the residual's dtype, then added in float32 and rounded once (the reference's two ops).
Rows of index[:count] are unique (compact_rows makes them so), so each residual element has
one writer: no atomics. One program per (BLOCK_M rows, BLOCK_N columns). Arguments are checked
by layerroute_rt.ops.linear_scatter_add.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from python_kernels import stage_common as sc


@triton.jit
def _linear_scatter_add_kernel(x_ptr, index_ptr, count_ptr, w_ptr, a_ptr, b_ptr, res_ptr,
                               M, RES_ROWS, N, K, R, scale,
                               HAS_LORA: tl.constexpr, SPLIT_U: tl.constexpr,
                               R_PAD: tl.constexpr, PRECISION: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= sc.live_rows(count_ptr, M, True):
        return
    i, rows, ok = sc.load_rows(index_ptr, count_ptr, pid_m, M, RES_ROWS, True, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = sc.lora_tile(x_ptr, i.to(tl.int64), ok, K, ok, w_ptr, w_ptr, cols, col_ok, a_ptr, b_ptr,
                       R, scale, False, HAS_LORA, SPLIT_U, R_PAD, PRECISION, BLOCK_M, BLOCK_N,
                       BLOCK_K)
    dt = res_ptr.dtype.element_ty
    at = res_ptr + rows[:, None] * N + cols[None, :]
    m = ok[:, None] & col_ok[None, :]
    total = tl.load(at, mask=m, other=0.0).to(tl.float32) + sc.rounded(acc, dt)
    tl.store(at, total.to(dt), mask=m)


def linear_scatter_add(x, index, count, weight, lora_A, lora_B, scale, residual) -> None:
    M, k = x.shape
    n = weight.shape[0]
    if M == 0:
        return
    rank = 0 if lora_A is None else lora_A.shape[0]
    bm, bn = sc.block_m(M), sc.block_n(n, M)
    _linear_scatter_add_kernel[(triton.cdiv(M, bm), triton.cdiv(n, bn))](
        x, index, count, weight, x if lora_A is None else lora_A, x if lora_B is None else lora_B,
        residual, M, residual.shape[0], n, k, rank, scale,
        HAS_LORA=lora_A is not None, SPLIT_U=x.dtype != torch.float32, R_PAD=sc.r_pad(rank),
        PRECISION=sc.precision(x.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=sc.block_k(k, x.dtype, M),
        num_warps=4, num_stages=sc.STAGES)
