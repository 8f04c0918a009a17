"""route stage of a block at decode: the router, the decision, the row compaction, and under
kv_policy "compute" the K/V of the rows that skip the block (input RMSNorm, k/v projection
+ LoRA, bias, RoPE, cache write), one launch. A block that every row skips costs this launch
alone; its body (qkv_rope ... the down projection) is not run (docs/DESIGN.md section 4).

ROUTE (a router runs): p[r] = sigmoid(w . h[r] + b) in float32 and row r runs iff p >= tau;
program (0, 0) writes executed[r], the compacted rows (index, count, as compact_rows makes
them) and the predicate pred = count > 0 (the CUDA-graph IF node of the block body reads it).
Without ROUTE the decisions are given (`run`, sequence granularity or prefill).
KV: programs (row block, K/V head) write K/V and mark the slots valid: with ROUTE, of every
row (the rows that run get theirs again from the qkv stage, which overwrites them), so no KV
program reads or recomputes a decision: it is made once per row, by program (0, 0), and no row
can lose its K/V to two programs disagreeing near p = tau (the price: the k/v projection of
the running rows twice, about 1.7% of a block's FLOPs for them). Without ROUTE, of the rows
that `run` does not list (decisions given: they were made once, elsewhere).

Arguments are checked by layerroute_rt.ops.route_kv.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from python_kernels import stage_common as sc
from python_kernels.router import _compact_block, _row_dots


@triton.jit
def _route_kv_kernel(h_ptr, rw_ptr, rb_ptr, run_ptr, index_ptr, count_ptr, pred_ptr, exec_ptr,
                     nw_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, pos_ptr, freq_ptr,
                     k_ptr, v_ptr, valid_ptr, slot_ptr,
                     N, D, R, T, S, eps, scale, tau, Q_DIM,
                     HKV: tl.constexpr, HD: tl.constexpr, HALF_PAD: tl.constexpr,
                     HD_PAD: tl.constexpr, ROUTE: tl.constexpr, KV: tl.constexpr,
                     HAS_LORA: tl.constexpr, SPLIT_U: tl.constexpr, R_PAD: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    if ROUTE:
        if pid_m == 0 and head == 0:
            total = tl.zeros((), dtype=tl.int32)
            for start in range(0, N, BLOCK_M):
                r = start + tl.arange(0, BLOCK_M)
                in_r = r < N
                z = _row_dots(h_ptr, rw_ptr, r, in_r, D, BLOCK_M, BLOCK_D)
                run_r = (tl.sigmoid(z + tl.load(rb_ptr).to(tl.float32)) >= tau) & in_r
                tl.store(exec_ptr + r, run_r.to(tl.uint8), mask=in_r)
                total = _compact_block(index_ptr, r, run_r, N, total)
            tl.store(count_ptr, total)
            tl.store(pred_ptr, (total > 0).to(tl.uint8))
    if KV:
        r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        need = r < N
        if not ROUTE:
            need = need & (tl.load(run_ptr + r, mask=need, other=1) == 0)
        if tl.sum(need.to(tl.int32), axis=0) > 0:
            rows = r.to(tl.int64)
            rstd = sc.inv_rms(h_ptr, rows, need, D, eps, BLOCK_M, BLOCK_K)
            if head < HKV:
                o1, o2, j, j_ok = sc.rope_head(h_ptr, rows, need, D, rstd, nw_ptr, w_ptr,
                                               bias_ptr, Q_DIM + head * HD, a_ptr, b_ptr, R,
                                               scale, pos_ptr, freq_ptr, HD, HAS_LORA, SPLIT_U,
                                               R_PAD, PRECISION, BLOCK_M, HALF_PAD, BLOCK_K)
                sc.store_kv_head(o1, o2, o1, j, j_ok, rows, need, head, k_ptr, v_ptr, valid_ptr,
                                 slot_ptr, T, S, True, HKV, HD)
            else:
                y, jv, jv_ok = sc.plain_head(h_ptr, rows, need, D, rstd, nw_ptr, w_ptr, bias_ptr,
                                           Q_DIM + head * HD, a_ptr, b_ptr, R, scale, HD,
                                           HAS_LORA, SPLIT_U, R_PAD, PRECISION, BLOCK_M, HD_PAD,
                                           BLOCK_K)
                sc.store_kv_head(y, y, y, jv, jv_ok, rows, need, head - HKV, k_ptr, v_ptr,
                                 valid_ptr, slot_ptr, T, S, False, HKV, HD)


def route_kv(h, router_w, router_b, tau, run, index, count, pred, executed, norm_weight, eps,
             weight, bias, lora_A, lora_B, scale, positions, inv_freq, k_cache, v_cache, valid,
             slot, rows_per_seq, compute_kv: bool) -> None:
    n, d = h.shape
    _, hkv, s, hd = k_cache.shape
    route = router_w is not None
    if n == 0 or not (route or compute_kv):
        return
    rank = 0 if lora_A is None else lora_A.shape[0]
    bm = sc.block_m(n)
    q_dim = weight.shape[0] - 2 * hkv * hd
    block_d = min(triton.next_power_of_2(max(d, 1)), 1024 if not sc.INTERPRET else 64)
    unused = h
    grid = (triton.cdiv(n, bm), 2 * hkv) if compute_kv else (1, 1)
    u8 = lambda t: unused if t is None else t.view(torch.uint8)  # noqa: E731
    _route_kv_kernel[grid](
        h, unused if router_w is None else router_w, unused if router_b is None else router_b,
        u8(run), unused if index is None else index, unused if count is None else count,
        u8(pred), u8(executed), norm_weight, weight, bias,
        unused if lora_A is None else lora_A, unused if lora_B is None else lora_B,
        positions, inv_freq, k_cache, v_cache, valid.view(torch.uint8), slot,
        n, d, rank, rows_per_seq, s, eps, scale, float(tau), q_dim,
        HKV=hkv, HD=hd, HALF_PAD=max(16, triton.next_power_of_2(hd // 2)),
        HD_PAD=max(16, triton.next_power_of_2(hd)), ROUTE=route, KV=compute_kv,
        HAS_LORA=lora_A is not None, SPLIT_U=h.dtype != torch.float32, R_PAD=sc.r_pad(rank),
        PRECISION=sc.precision(h.dtype), BLOCK_M=bm, BLOCK_K=sc.block_k(d, h.dtype, n), BLOCK_D=block_d,
        num_warps=4, num_stages=sc.STAGES)
