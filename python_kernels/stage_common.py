"""Shared pieces of the fused block-stage kernels (not an op): the jit helpers that the stage
kernels (route_kv, qkv_rope, linear_scatter_add, norm_gate_up, norm_linear) call, and their
launch sizes.

A stage kernel computes, for a tile of BLOCK_M rows and BLOCK_N output columns,

    acc = xn W[cols]^T + scale (xn A^T) B[cols]^T        (float32)

where the rows of x may be gathered through a row list (row i reads x[index[i]]) and xn is
x itself or its Qwen2 RMSNorm (normalise in float32, round to x's dtype, times the norm weight,
rounded: model.RMSNorm's order), computed in the prologue from a first pass over the row. The
LoRA term is the fused LoRA kernel's (python_kernels/lora_linear.py): u = xn A^T in float32,
entering the B dot as two halves in the input dtype for half inputs. Each stage adds its own
epilogue (bias, RoPE and the K/V cache write, SiLU x up, the residual scatter-add).

fp32 inputs use IEEE-precision dots (no TF32), to match torch's fp32 matmul.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


def precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def r_pad(rank: int) -> int:
    """The LoRA rank padded to a power of 2 >= 16 (tl.dot's smallest size)."""
    return max(16, triton.next_power_of_2(max(rank, 1)))


def block_m(rows: int) -> int:
    """Rows a program holds: all of them at decode (up to 64), else tiles of 64."""
    if INTERPRET:
        return 16
    return min(64, max(16, triton.next_power_of_2(max(rows, 1))))


def block_k(k: int, dtype: torch.dtype, rows: int) -> int:
    """The K step: 128 for half inputs at decode (16 rows), 64 for half inputs otherwise, 32
    for fp32, so that two pipeline stages of the x, W and LoRA tiles fit 99 KB of shared
    memory (sm_86 / sm_89) at BLOCK_M = BLOCK_N = 64 and R_PAD 64 (tests/triton_sm_compile.py)."""
    if INTERPRET:
        return 32
    step = 32 if dtype == torch.float32 else 128 if block_m(rows) <= 16 else 64
    return min(step, max(16, triton.next_power_of_2(k)))


STAGES = 2    # pipeline stages of the K loops


@triton.jit
def load_rows(index_ptr, count_ptr, pid_m, M, X_ROWS, HAS_INDEX: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """(i, rows, ok) of the program's BLOCK_M output rows: i their positions, rows the rows of
    x they read (index[i] with a row list, else i), ok those below the count (row list) or M
    whose row lies in [0, X_ROWS) (an entry outside is skipped, never read)."""
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if HAS_INDEX:
        n = tl.minimum(tl.load(count_ptr), M)
        ok = i < n
        rows = tl.load(index_ptr + i, mask=ok, other=0).to(tl.int64)
        ok = ok & (rows >= 0) & (rows < X_ROWS)
    else:
        ok = i < M
        rows = i.to(tl.int64)
    return i, rows, ok


@triton.jit
def live_rows(count_ptr, M, HAS_INDEX: tl.constexpr):
    """The rows a launch computes: the count (row list) or M."""
    if HAS_INDEX:
        return tl.minimum(tl.load(count_ptr), M)
    return M


@triton.jit
def inv_rms(x_ptr, rows, ok, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) in float32 for the rows of x [*, K] (contiguous)."""
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + rows[:, None] * K + kk[None, :], mask=ok[:, None] & (kk < K)[None, :],
                    other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    return tl.rsqrt(ss / K + eps)


@triton.jit
def lora_tile(x_ptr, rows, ok, K, rstd, nw_ptr, w_ptr, cols, col_ok, a_ptr, b_ptr, R, scale,
              HAS_NORM: tl.constexpr, HAS_LORA: tl.constexpr, SPLIT_U: tl.constexpr,
              R_PAD: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] float32 = xn W[cols]^T + scale (xn A^T) B[cols]^T for the rows
    of x [*, K] (contiguous); xn = RMSNorm(x) with weight nw (HAS_NORM, rstd from inv_rms) or
    x. W [*, K], A [R, K], B [*, R] contiguous; A and B are cast to x's dtype on load."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    cols64 = cols.to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(x_ptr + rows[:, None] * K + kk[None, :], mask=ok[:, None] & k_ok[None, :],
                    other=0.0)
        if HAS_NORM:
            nw = tl.load(nw_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            xn = (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32) * nw[None, :]
            x = xn.to(x.dtype)
        w = tl.load(w_ptr + cols64[None, :] * K + kk[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if HAS_LORA:
            a = tl.load(a_ptr + offs_r[None, :] * K + kk[:, None], mask=k_ok[:, None] & r_ok[None, :],
                        other=0.0)
            u = tl.dot(x, a.to(x.dtype), u, input_precision=PRECISION)
    if HAS_LORA:
        dt = x_ptr.dtype.element_ty
        b = tl.load(b_ptr + cols64[None, :] * R + offs_r[:, None], mask=r_ok[:, None] & col_ok[None, :],
                    other=0.0).to(dt)
        u_hi = u.to(dt)
        lora = tl.dot(u_hi, b, input_precision=PRECISION)
        if SPLIT_U:
            lora = tl.dot((u - u_hi.to(tl.float32)).to(dt), b, lora, input_precision=PRECISION)
        acc += scale * lora
    return acc


@triton.jit
def rounded(x, dt: tl.constexpr):
    """x rounded to dt and back to float32 (one torch op's rounding)."""
    return x.to(dt).to(tl.float32)


@triton.jit
def rope_head(x_ptr, rows, ok, K, rstd, nw_ptr, w_ptr, bias_ptr, col0, a_ptr, b_ptr, R, scale,
              pos_ptr, freq_ptr, HD: tl.constexpr, HAS_LORA: tl.constexpr, SPLIT_U: tl.constexpr,
              R_PAD: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
              HALF_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """One head of a projection with bias and RoPE (rotate-half), from the normed rows:
    (o1, o2, j, j_ok), the head's two halves [BLOCK_M, HALF_PAD] in float32 holding values of
    x's dtype, rounded as the reference rounds (the projection, cos and sin in x's dtype,
    x cos + rotate(x) sin one op at a time). Angles are pos * inv_freq in float32."""
    dt = x_ptr.dtype.element_ty
    j = tl.arange(0, HALF_PAD)
    j_ok = j < HD // 2
    c1 = col0 + j
    c2 = c1 + HD // 2
    y1 = lora_tile(x_ptr, rows, ok, K, rstd, nw_ptr, w_ptr, c1, j_ok, a_ptr, b_ptr, R, scale,
                   True, HAS_LORA, SPLIT_U, R_PAD, PRECISION, BLOCK_M, HALF_PAD, BLOCK_K)
    y2 = lora_tile(x_ptr, rows, ok, K, rstd, nw_ptr, w_ptr, c2, j_ok, a_ptr, b_ptr, R, scale,
                   True, HAS_LORA, SPLIT_U, R_PAD, PRECISION, BLOCK_M, HALF_PAD, BLOCK_K)
    y1 = rounded(y1 + tl.load(bias_ptr + c1, mask=j_ok, other=0.0).to(tl.float32)[None, :], dt)
    y2 = rounded(y2 + tl.load(bias_ptr + c2, mask=j_ok, other=0.0).to(tl.float32)[None, :], dt)
    pos = tl.load(pos_ptr + rows, mask=ok, other=0).to(tl.float32)
    ang = pos[:, None] * tl.load(freq_ptr + j, mask=j_ok, other=0.0)[None, :]
    cs = rounded(tl.cos(ang), dt)
    sn = rounded(tl.sin(ang), dt)
    o1 = rounded(rounded(y1 * cs, dt) - rounded(y2 * sn, dt), dt)
    o2 = rounded(rounded(y2 * cs, dt) + rounded(y1 * sn, dt), dt)
    return o1, o2, j, j_ok


@triton.jit
def plain_head(x_ptr, rows, ok, K, rstd, nw_ptr, w_ptr, bias_ptr, col0, a_ptr, b_ptr, R, scale,
               HD: tl.constexpr, HAS_LORA: tl.constexpr, SPLIT_U: tl.constexpr,
               R_PAD: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
               HD_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """One head of a projection with bias, no RoPE (the v heads): (y, j, j_ok)."""
    dt = x_ptr.dtype.element_ty
    j = tl.arange(0, HD_PAD)
    j_ok = j < HD
    c = col0 + j
    y = lora_tile(x_ptr, rows, ok, K, rstd, nw_ptr, w_ptr, c, j_ok, a_ptr, b_ptr, R, scale,
                  True, HAS_LORA, SPLIT_U, R_PAD, PRECISION, BLOCK_M, HD_PAD, BLOCK_K)
    return rounded(y + tl.load(bias_ptr + c, mask=j_ok, other=0.0).to(tl.float32)[None, :], dt), j, j_ok


@triton.jit
def store_kv_head(o1, o2, y, j, j_ok, rows, ok, kv_head, k_ptr, v_ptr, valid_ptr, slot_ptr, T, S,
                  IS_K: tl.constexpr, HKV: tl.constexpr, HD: tl.constexpr):
    """Write one K head (o1, o2: its halves) or V head (y) of the rows into the cache at
    (sequence rows // T, slot slot0 + rows % T); the first K head also marks the slots valid."""
    b = rows // T
    s = tl.load(slot_ptr).to(tl.int64) + rows % T
    base = ((b * HKV + kv_head) * S + s) * HD
    if IS_K:
        m = ok[:, None] & j_ok[None, :]
        tl.store(k_ptr + base[:, None] + j[None, :], o1.to(k_ptr.dtype.element_ty), mask=m)
        tl.store(k_ptr + base[:, None] + (j + HD // 2)[None, :], o2.to(k_ptr.dtype.element_ty), mask=m)
        if kv_head == 0:
            tl.store(valid_ptr + b * S + s, tl.full(rows.shape, 1, tl.uint8), mask=ok)
    else:
        tl.store(v_ptr + base[:, None] + j[None, :], y.to(v_ptr.dtype.element_ty),
                 mask=ok[:, None] & j_ok[None, :])


def block_n(n: int, rows: int) -> int:
    """Output columns a program holds: at decode (16 rows or fewer) the widest of 64, 32, 16
    that still gives 128 programs (weight streaming needs many programs: down_proj at D = 896
    would have 14 at 64), else 64."""
    if INTERPRET:
        return 32
    if block_m(rows) <= 16:
        for bn in (64, 32):
            if triton.cdiv(n, bn) >= 128:
                return bn
        return 16
    return 64
