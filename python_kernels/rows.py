"""Row kernels of the per-block skip path (DESIGN.md section 4), in gathered space:

* gather_rows:      out[i] = x[index[i]]
* scatter_add_rows: residual[index[i]] += src[i] (added in float32, rounded once)

each for i < count, with count int32 [1] read from device memory: a program whose rows all lie
past it exits before loading anything else, and rows past it are left untouched, so the host
never reads the count and a whole step can be captured in a CUDA graph.

Arguments are checked by the dispatch functions in layerroute_rt.ops; all tensors here are
contiguous, rows of width D. (The block stages fuse their norms into the projections:
python_kernels/qkv_rope.py, norm_gate_up.py.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements a copy program moves at a time, and the widest chunk of a row it takes.
_COPY_TILE = 8192
_MAX_COPY_BLOCK_D = 1024


def _warps(tile: int) -> int:
    """Warps for a program holding `tile` elements (Liger-Kernel's calculate_settings rule)."""
    return 32 if tile >= 32768 else 16 if tile >= 8192 else 8 if tile >= 2048 else 4


def _copy_blocks(d: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D) of the gather / scatter programs, grid (M / BLOCK_M, D / BLOCK_D)."""
    block_d = min(triton.next_power_of_2(max(d, 1)), _MAX_COPY_BLOCK_D)
    return max(1, _COPY_TILE // block_d), block_d


@triton.jit
def _gather_rows_kernel(x_ptr, index_ptr, count_ptr, out_ptr, M, D,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    count = tl.load(count_ptr)
    first = tl.program_id(0) * BLOCK_M
    if first >= count:
        return
    i = first + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    live = (i < count) & (i < M)
    src = tl.load(index_ptr + i, mask=live, other=0).to(tl.int64)
    ok = live[:, None] & (cols < D)[None, :]
    row = tl.load(x_ptr + src[:, None] * D + cols[None, :], mask=ok)
    tl.store(out_ptr + i.to(tl.int64)[:, None] * D + cols[None, :], row, mask=ok)


@triton.jit
def _scatter_add_rows_kernel(residual_ptr, src_ptr, index_ptr, count_ptr, M, D,
                             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    count = tl.load(count_ptr)
    first = tl.program_id(0) * BLOCK_M
    if first >= count:
        return
    i = first + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    live = (i < count) & (i < M)
    dst = tl.load(index_ptr + i, mask=live, other=0).to(tl.int64)
    ok = live[:, None] & (cols < D)[None, :]
    at = residual_ptr + dst[:, None] * D + cols[None, :]
    add = tl.load(src_ptr + i.to(tl.int64)[:, None] * D + cols[None, :], mask=ok).to(tl.float32)
    total = tl.load(at, mask=ok).to(tl.float32) + add
    tl.store(at, total.to(residual_ptr.dtype.element_ty), mask=ok)


# Launch wrappers: x/out/residual/src/delta [rows, D], index int32 [M], count int32 [1].


def gather_rows(x: torch.Tensor, index: torch.Tensor, count: torch.Tensor,
                out: torch.Tensor) -> None:
    m, d = out.shape
    block_m, block_d = _copy_blocks(d)
    if m and d:
        _gather_rows_kernel[(triton.cdiv(m, block_m), triton.cdiv(d, block_d))](
            x, index, count, out, m, d, BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=_warps(block_m * block_d))


def scatter_add_rows(residual: torch.Tensor, src: torch.Tensor, index: torch.Tensor,
                     count: torch.Tensor) -> None:
    m, d = src.shape
    block_m, block_d = _copy_blocks(d)
    if m and d:
        _scatter_add_rows_kernel[(triton.cdiv(m, block_m), triton.cdiv(d, block_d))](
            residual, src, index, count, m, d, BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=_warps(block_m * block_d))
