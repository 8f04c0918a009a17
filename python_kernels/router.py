"""Router kernels: p = sigmoid(w . h + b) per row (or per sequence), the hard decision
p >= tau, and the compacted list of rows that run with its count, all written on the device.

Launch plan (no host read anywhere; every size below is a shape, known on the host):

* route_tokens: `_token_scores_kernel`, one program per tile of BLOCK_N rows, writes p. The
  compaction needs a prefix sum over the decisions in row order, so a second, single-program
  kernel (`_compact_kernel`) rereads p and scans it, up to 4096 decisions a step.
  When one tile holds every row (decode at small batch: up to 8 rows at D = 896) the score
  program compacts itself and the second launch is skipped.
  Why not one kernel with a decoupled look-back: each program would spin on its
  predecessor's flag, which relies on programs being scheduled in order (Triton promises no
  forward progress), needs a flag workspace reset between CUDA-graph replays, and needs
  memory-ordering care that the interpreter cannot test. The second launch is one more
  kernel node in the captured step, and the scan itself reads 4 bytes a row against the
  2 * D bytes of h the scores read.
* route_sequences: `_seq_partial_kernel`, one program per (tile of BLOCK_T rows, sequence),
  writes the tile's sum of w . h over its valid rows and their number; `_seq_finish_kernel`
  (one program) adds the partial sums per sequence, p_b = sigmoid(sum / n_b + b), and compacts
  the rows of the sequences that run. w . mean(h) is computed as mean(w . h) (linearity), so
  the rows of one sequence spread over many programs: a long prefill sequence is not read by
  one program alone. The two differ by fp32 rounding only.

Everything is computed in float32 whatever h's dtype. The backward of both variants is one
kernel (`_rows_backward_kernel`), given the per-row coefficient c_r = dL/dz_r:
dh_r = c_r w, and per-tile partial sums of dw = sum_r c_r h_r, which a torch sum then adds
in a fixed order (deterministic: no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of h one score program holds at a time, and the widest chunk of a row it loads.
_TILE = 8192
_MAX_BLOCK_D = 1024
# Most decisions one scan step handles (the single compaction program loops over them).
_SCAN_BLOCK = 4096
# Tile of the backward kernel: rows x columns.
_BWD_BLOCK_N, _BWD_BLOCK_D = 64, 128


def _scan_block(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of a compaction program over n decisions."""
    block = min(triton.next_power_of_2(max(n, 1)), _SCAN_BLOCK)
    return block, 16 if block >= 4096 else 8 if block >= 2048 else 4


def _score_blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) of a score program for rows of width d."""
    block_d = min(triton.next_power_of_2(max(d, 1)), _MAX_BLOCK_D)
    block_n = max(1, _TILE // block_d)
    return block_n, block_d, 8 if block_n * block_d >= _TILE else 4


@triton.jit
def _row_dots(h_ptr, w_ptr, rows, row_ok, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """w . h[r] in float32 for each of BLOCK_N rows; 0 where row_ok is false."""
    cols = tl.arange(0, BLOCK_D)
    row_start = h_ptr + rows.to(tl.int64)[:, None] * D
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        col_ok = c < D
        w = tl.load(w_ptr + c, mask=col_ok, other=0.0).to(tl.float32)
        x = tl.load(row_start + c[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += x.to(tl.float32) * w[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _compact_block(index_ptr, rows, run, N, trues_before):
    """Place one block of rows (ascending, contiguous) in the compacted index.

    A running row goes to index[trues before it]; a skipped row writes -1 to
    index[N - 1 - skipped rows before it], so the tail [count, N) fills in the same pass and
    each entry is written exactly once. Returns trues_before plus the block's running rows.
    """
    ran = run.to(tl.int32)
    before = trues_before + tl.cumsum(ran, axis=0) - ran
    dest = tl.where(run, before, N - 1 - (rows - before))
    tl.store(index_ptr + dest, tl.where(run, rows, -1), mask=rows < N)
    return trues_before + tl.sum(ran, axis=0)


@triton.jit
def _compact_rows(p_ptr, valid_ptr, index_ptr, count_ptr, N, rows_per_p, tau,
                  HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
    """Row r runs iff p[r // rows_per_p] >= tau and valid[r]: write index and count."""
    total = tl.zeros((), dtype=tl.int32)
    for start in range(0, N, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        in_range = rows < N
        run = (tl.load(p_ptr + rows // rows_per_p, mask=in_range, other=0.0) >= tau) & in_range
        if HAS_VALID:
            run = run & (tl.load(valid_ptr + rows, mask=in_range, other=0) != 0)
        total = _compact_block(index_ptr, rows, run, N, total)
    tl.store(count_ptr, total)


@triton.jit
def _token_scores_kernel(h_ptr, w_ptr, b_ptr, valid_ptr, p_ptr, index_ptr, count_ptr, N, D, tau,
                         HAS_VALID: tl.constexpr, COMPACT: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """p[r] = sigmoid(w . h[r] + b) for one tile of rows; with COMPACT (a single program holds
    every row) also the index and count."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    z = _row_dots(h_ptr, w_ptr, rows, in_range, D, BLOCK_N, BLOCK_D)
    p = tl.sigmoid(z + tl.load(b_ptr).to(tl.float32))
    tl.store(p_ptr + rows, p, mask=in_range)
    if COMPACT:
        run = (p >= tau) & in_range
        if HAS_VALID:
            run = run & (tl.load(valid_ptr + rows, mask=in_range, other=0) != 0)
        tl.store(count_ptr, _compact_block(index_ptr, rows, run, N, tl.zeros((), dtype=tl.int32)))


@triton.jit
def _compact_kernel(p_ptr, valid_ptr, index_ptr, count_ptr, N, tau,
                    HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
    """Single program: compact the token decisions (p >= tau) & valid."""
    _compact_rows(p_ptr, valid_ptr, index_ptr, count_ptr, N, 1, tau, HAS_VALID, BLOCK)


@triton.jit
def _seq_partial_kernel(h_ptr, w_ptr, valid_ptr, partial_ptr, n_valid_ptr, T, D, n_tiles,
                        HAS_VALID: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """For the tile program_id(0) of sequence program_id(1): sum of w . h[b, t] over its valid
    rows, and their number, at [b, tile] of partial / n_valid ([B, n_tiles])."""
    tile, b = tl.program_id(0), tl.program_id(1)
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = b * T + t
    ok = t < T
    if HAS_VALID:
        ok = ok & (tl.load(valid_ptr + rows, mask=ok, other=0) != 0)
    z = _row_dots(h_ptr, w_ptr, rows, ok, D, BLOCK_T, BLOCK_D)
    tl.store(partial_ptr + b * n_tiles + tile, tl.sum(z, axis=0))
    tl.store(n_valid_ptr + b * n_tiles + tile, tl.sum(ok.to(tl.int32), axis=0))


@triton.jit
def _seq_finish_kernel(partial_ptr, n_valid_ptr, b_ptr, valid_ptr, p_ptr, index_ptr, count_ptr,
                       B, T, n_tiles, tau, HAS_VALID: tl.constexpr, BLOCK_B: tl.constexpr,
                       BLOCK_J: tl.constexpr, BLOCK: tl.constexpr):
    """Single program: p_b = sigmoid(sum of partials / max(n_b, 1) + bias) (a sequence with no
    valid row has mean 0), then compact the rows b * T + t that are valid in running sequences."""
    bias = tl.load(b_ptr).to(tl.float32)
    for b0 in range(0, B, BLOCK_B):
        seqs = b0 + tl.arange(0, BLOCK_B)
        z = tl.zeros((BLOCK_B,), dtype=tl.float32)
        n = tl.zeros((BLOCK_B,), dtype=tl.int32)
        for j0 in range(0, n_tiles, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            at = seqs[:, None] * n_tiles + j[None, :]
            ok = (seqs < B)[:, None] & (j < n_tiles)[None, :]
            z += tl.sum(tl.load(partial_ptr + at, mask=ok, other=0.0), axis=1)
            n += tl.sum(tl.load(n_valid_ptr + at, mask=ok, other=0), axis=1)
        p = tl.sigmoid(z / tl.maximum(n, 1).to(tl.float32) + bias)
        tl.store(p_ptr + seqs, p, mask=seqs < B)
    tl.debug_barrier()  # the scan below rereads p, written by other threads of this program
    _compact_rows(p_ptr, valid_ptr, index_ptr, count_ptr, B * T, T, tau, HAS_VALID, BLOCK)


@triton.jit
def _rows_backward_kernel(c_ptr, h_ptr, w_ptr, dh_ptr, dw_partial_ptr, N, D,
                          WRITE_DH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """For one [BLOCK_N, BLOCK_D] tile: dh = c w (if WRITE_DH), and the tile's sum over rows of
    c h into row program_id(0) of dw_partial [n_row_tiles, D]."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < N, cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    at = rows.to(tl.int64)[:, None] * D + cols[None, :]
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
    if WRITE_DH:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(dh_ptr + at, (c[:, None] * w[None, :]).to(dh_ptr.dtype.element_ty), mask=ok)
    x = tl.load(h_ptr + at, mask=ok, other=0.0).to(tl.float32)
    tl.store(dw_partial_ptr + tl.program_id(0) * D + cols, tl.sum(c[:, None] * x, axis=0),
             mask=col_ok)


# Launch wrappers. Arguments are checked by the dispatch functions in layerroute_rt.ops:
# h contiguous [N, D] (or [B, T, D]), w contiguous [D], bias [1], valid contiguous bool or None.


def token_scores(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, tau: float,
                 valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p float32 [N], index int32 [N], count int32 [1]) for h [N, D]; see route_tokens."""
    n, d = h.shape
    p = torch.empty(n, dtype=torch.float32, device=h.device)
    index = torch.empty(n, dtype=torch.int32, device=h.device)
    count = torch.empty(1, dtype=torch.int32, device=h.device)
    block_n, block_d, warps = _score_blocks(d)
    tiles = max(1, triton.cdiv(n, block_n))
    _token_scores_kernel[(tiles,)](h, w, bias, valid, p, index, count, n, d, tau,
                                   HAS_VALID=valid is not None, COMPACT=tiles == 1,
                                   BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    if tiles > 1:
        block, scan_warps = _scan_block(n)
        _compact_kernel[(1,)](p, valid, index, count, n, tau, HAS_VALID=valid is not None,
                              BLOCK=block, num_warps=scan_warps)
    return p, index, count


def sequence_scores(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, tau: float,
                    valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p float32 [B], index int32 [B * T], count int32 [1]) for h [B, T, D]; see
    route_sequences."""
    b, t, d = h.shape
    block_t, block_d, warps = _score_blocks(d)
    n_tiles = triton.cdiv(t, block_t)
    partial = torch.empty(b, n_tiles, dtype=torch.float32, device=h.device)
    n_valid = torch.empty(b, n_tiles, dtype=torch.int32, device=h.device)
    p = torch.empty(b, dtype=torch.float32, device=h.device)
    index = torch.empty(b * t, dtype=torch.int32, device=h.device)
    count = torch.empty(1, dtype=torch.int32, device=h.device)
    if b and t:
        _seq_partial_kernel[(n_tiles, b)](h, w, valid, partial, n_valid, t, d, n_tiles,
                                          HAS_VALID=valid is not None, BLOCK_T=block_t,
                                          BLOCK_D=block_d, num_warps=warps)
    block, scan_warps = _scan_block(b * t)
    _seq_finish_kernel[(1,)](partial, n_valid, bias, valid, p, index, count, b, t, n_tiles, tau,
                             HAS_VALID=valid is not None, BLOCK_B=16, BLOCK_J=64,
                             BLOCK=block, num_warps=scan_warps)
    return p, index, count


def rows_backward(c: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                  need_dh: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(dh = c[:, None] w in h's dtype, or None; dw = sum_r c_r h_r in float32 [D]) for
    h [N, D] and c float32 [N]."""
    n, d = h.shape
    row_tiles = triton.cdiv(n, _BWD_BLOCK_N)
    dh = torch.empty_like(h) if need_dh else None
    dw_partial = torch.empty(row_tiles, d, dtype=torch.float32, device=h.device)
    if n and d:
        _rows_backward_kernel[(row_tiles, triton.cdiv(d, _BWD_BLOCK_D))](
            c, h, w, dh, dw_partial, n, d, WRITE_DH=need_dh,
            BLOCK_N=_BWD_BLOCK_N, BLOCK_D=_BWD_BLOCK_D, num_warps=8)
    return dh, dw_partial.sum(0)


class RouteTokens(torch.autograd.Function):
    """p = sigmoid(z), z_r = w . h_r + b, per row of h [N, D]; index and count as compact_rows
    makes them from (p >= tau) & valid (not differentiable).

    Backward, with g = dL/dp and dp/dz = p (1 - p), so c_r = dL/dz_r = g_r p_r (1 - p_r):
        dh_r = c_r w,    dw = sum_r c_r h_r,    db = sum_r c_r.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, tau, valid):
        p, index, count = token_scores(h, weight.reshape(-1), bias, tau, valid)
        ctx.save_for_backward(h, weight, bias, p)
        ctx.mark_non_differentiable(index, count)
        return p, index, count

    @staticmethod
    def backward(ctx, grad_p, _grad_index, _grad_count):
        h, weight, bias, p = ctx.saved_tensors
        c = (grad_p * p * (1 - p)).contiguous()
        dh, dw = rows_backward(c, h, weight.reshape(-1), need_dh=ctx.needs_input_grad[0])
        return (dh, dw.view(weight.shape).to(weight.dtype), c.sum().view(bias.shape).to(bias.dtype),
                None, None)


class RouteSequences(torch.autograd.Function):
    """p_b = sigmoid(z_b), z_b = w . m_b + b with m_b the mean of h[b, t] over the valid t of
    sequence b (0 when it has none); index lists the valid rows b * T + t of the sequences with
    p_b >= tau, and count their number (not differentiable).

    Backward, with g = dL/dp, n_b the valid rows of b and c_b = dL/dz_b = g_b p_b (1 - p_b):
        dh[b, t] = (c_b / n_b) w for valid t, else 0,
        dw = sum_b c_b m_b = sum_{b, valid t} (c_b / n_b) h[b, t],    db = sum_b c_b.
    So the row kernel of RouteTokens serves, with the per-row coefficient
    c_r = valid_r c_b / max(n_b, 1).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, tau, valid):
        p, index, count = sequence_scores(h, weight.reshape(-1), bias, tau, valid)
        ctx.save_for_backward(h, weight, bias, p, valid)
        ctx.mark_non_differentiable(index, count)
        return p, index, count

    @staticmethod
    def backward(ctx, grad_p, _grad_index, _grad_count):
        h, weight, bias, p, valid = ctx.saved_tensors
        b, t, d = h.shape
        c_seq = grad_p * p * (1 - p)
        if valid is None:
            c_rows = (c_seq / max(t, 1))[:, None].expand(b, t)
        else:
            c_rows = valid * (c_seq / valid.sum(1).clamp(min=1))[:, None]
        dh, dw = rows_backward(c_rows.contiguous().view(-1), h.view(b * t, d), weight.reshape(-1),
                               need_dh=ctx.needs_input_grad[0])
        return (None if dh is None else dh.view(b, t, d), dw.view(weight.shape).to(weight.dtype),
                c_seq.sum().view(bias.shape).to(bias.dtype), None, None)
