"""Fused LoRA linear: y = x W^T + b + s (x A^T) B^T in one launch, and its backward.

x [M, K], W [N, K] (frozen), b [N], A [r, K], B [N, r], s a float. An optional row list
(index int32 [R], count int32 [1] on the device) computes y[i] = f(x[index[i]]) for i < count
only; the kernel reads the count from device memory, so nothing syncs with the host and the
launch can sit in a CUDA graph.

Design
------
One kernel, `_lora_linear_kernel`, tiles y into [BLOCK_M, BLOCK_N] blocks, one per program.
Its K loop loads each x tile once and feeds it to two dots: x W^T into the [BLOCK_M, BLOCK_N]
accumulator and x A^T into a [BLOCK_M, R_PAD] one (r padded to a power of 2 >= 16, the
smallest tl.dot); after the loop a [BLOCK_M, R_PAD] x [R_PAD, BLOCK_N] dot adds s (x A^T) B^T,
then the bias, and y is rounded once. The LoRA term thus costs no extra pass over x or y and
no extra launch; its loads (A: r x K, B: BLOCK_N x r) are tiny and stay in L2. A and B are
read in their own dtype (fp32 adapters on a bf16 model) and cast on load, which spares the
two cast launches a wrapper-side A.to(x.dtype) would add to every decode call.

- Decode (1-64 rows) is weight streaming: every program has all the rows (one BLOCK_M of 16,
  32 or 64) and a narrow slice of N (16-64 columns), so W is read once, split across many
  programs, with deep K pipelining (BLOCK_K 128-256). Each program recomputes the r values of
  x A^T per row instead of a first stage writing them: r x K reads from L2 are cheaper than a
  second launch at this size.
- Prefill and training (thousands of rows) is a tiled GEMM (Triton-tutorial configs, grouped
  program order for L2 reuse of W); the LoRA dots add R_PAD/BLOCK_N (x A^T, recomputed by
  each column block) + 2 R_PAD/K (the B dots) to the tensor-core work, about 16% at
  BLOCK_N = 128, K = 896, where the unfused expression spends extra passes over x and y.
- The configs are autotuned on the GPU, keyed by (rows rounded up to a power of 2, N, K, W's
  layout, row list or not, LoRA or not and its padded rank) and pruned to the decode or
  prefill set by the row count. W's layout (stride_wk: 1 for W, N for the backward's W^T view)
  keeps the dx launch of a square weight from reusing the forward's tuning. A row-list launch is tuned on all its rows whatever its
  first call's count (a count of 0 would time empty launches): the tuning hooks set the count
  to R for the timed runs and restore count and y after each. Autotuning runs on the first
  call of each shape: warm up before capturing a CUDA graph.
  The pruning also drops the configs that may not fit the device's shared memory (an upper
  bound per config, checked against the compiled kernels for sm_80, sm_89 and sm_90 by
  tests/triton_sm_compile.py), or keeps one small fallback config where none may fit (fp32
  on a part with 99 KB a program), so the first config of a set always fits.
  LAYERROUTE_TRITON_AUTOTUNE=0 skips the tuning: each shape takes the first config of its
  pruned set (for test runs, which would otherwise compile every config of every shape). Under
  TRITON_INTERPRET=1 there is one config, as autotuning in the interpreter would be slow.
- fp32 inputs use IEEE-precision dots (no TF32), to match torch's fp32 matmul; fp16 and bf16
  use tensor cores with fp32 accumulation and y is rounded once, where the unfused expression
  rounds five times. The rank-r intermediate u = x A^T (fp32) enters the B dot as two halves
  in the input dtype, u_hi = round(u) and round(u - u_hi): a second [BLOCK_M, R_PAD] x
  [R_PAD, BLOCK_N] dot (R_PAD/K more work, under 2% at K = 896) that removes the error of
  rounding u, which would otherwise be as large as the output's own rounding.
- With a row list, programs whose rows all lie past the count return before any load, so a
  count of 0 reads no weights; rows of y past the count are not written (left uninitialised).
  An entry of index outside [0, rows of x) is skipped: its row of y is not written either,
  so a bad index cannot read out of bounds.

Backward: dx = dy W + s (dy B) A has the forward's shape with W^T, B^T and A^T in the roles of
W, A and B, so it is the same kernel launched on transposed views, and it stores dy B [M, r]
on the side. dA = s (dy B)^T x and dB = s dy^T (x A^T) are reductions over the M rows into
r x K and N x r: torch matmuls (cuBLAS) on the saved [M, r] factors, each one pass over x or
dy. A Triton kernel would do the same pass; fusing them into the dx kernel would need atomics
across row blocks (non-deterministic, and a zeroed fp32 buffer), for no saving in bytes.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from python_kernels import device as device_info

_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
# Row counts up to this take the decode (weight-streaming) configs.
_DECODE_ROWS = 64


def _decode_configs(block_m: int) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1},
                      num_warps=4, num_stages=stages)
        for bn in (16, 32, 64) for bk in (128, 256) for stages in (3, 4)
    ]


_DECODE_CONFIGS = {block_m: _decode_configs(block_m) for block_m in (16, 32, 64)}
_PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                  num_warps=warps, num_stages=stages)
    for bm, bn, bk, warps, stages in (
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
    )
]
# Where no config of a set may fit the device's shared memory (fp32 on a 99 KB part, a large
# rank): a small one, by row count as the sets are, its BLOCK_K halved until it fits.
_FALLBACK_CONFIGS = {
    block_m: triton.Config({"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 1},
                           num_warps=4, num_stages=2)
    for block_m in (16, 32, 64)
} | {"prefill": triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8},
                              num_warps=4, num_stages=2)}
# The interpreter's one config: small blocks, so the tests' odd sizes span several blocks.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})


def _shared_bound(config: triton.Config, elem_bytes: int, r_pad: int) -> int:
    """An upper bound of a config's shared memory: num_stages buffers of the x and W tiles and
    twice the A tile's, plus 8 KiB (barriers, the B tile; sm_90 kernels use up to 6 KiB more
    than the tiles). Checked against every compiled config by tests/triton_sm_compile.py."""
    kw = config.kwargs
    tiles = (kw["BLOCK_M"] + kw["BLOCK_N"] + 2 * r_pad) * kw["BLOCK_K"] * elem_bytes
    return config.num_stages * tiles + 8192


def _fallback(kind, bound, limit: int) -> triton.Config:
    """The set's fallback config, with BLOCK_K halved (down to 16) until its bound fits."""
    config = _FALLBACK_CONFIGS[kind]
    while bound(config) > limit and config.kwargs["BLOCK_K"] > 16:
        config = triton.Config({**config.kwargs, "BLOCK_K": config.kwargs["BLOCK_K"] // 2},
                               num_warps=config.num_warps, num_stages=config.num_stages)
    return config


def _prune_configs(configs, named_args, **kwargs) -> list[triton.Config]:
    """The decode configs (BLOCK_M covering all the rows) or the prefill ones, less those that
    may not fit the device's shared memory (a small fallback config if none is sure to); only
    the first of them with LAYERROUTE_TRITON_AUTOTUNE=0."""
    rows = named_args["M_BUCKET"]
    kind = max(16, rows) if rows <= _DECODE_ROWS else "prefill"
    pruned = _PREFILL_CONFIGS if kind == "prefill" else _DECODE_CONFIGS[kind]
    limit = device_info.shared_memory_limit(named_args["x_ptr"].device)
    if limit is not None:
        bound = functools.partial(_shared_bound, elem_bytes=named_args["x_ptr"].element_size(),
                                  r_pad=kwargs.get("R_PAD", 64))
        pruned = [c for c in pruned if bound(c) <= limit] or [_fallback(kind, bound, limit)]
    return pruned[:1] if os.environ.get("LAYERROUTE_TRITON_AUTOTUNE", "1") == "0" else pruned


def _tuning_pre_hook(nargs, reset_only=False):
    """Before each timed run of a row-list launch: keep count and y, and set the count to all
    R rows, so the tuning does not depend on the first call's count."""
    if nargs["HAS_INDEX"] and not reset_only:
        nargs["saved"] = nargs["count_ptr"].clone(), nargs["y_ptr"].clone()
        nargs["count_ptr"].fill_(nargs["M"])


def _tuning_post_hook(nargs, exception):
    """After each timed run: count and y as they were (rows of out= past the count kept)."""
    if "saved" in nargs:
        count, y = nargs.pop("saved")
        nargs["count_ptr"].copy_(count)
        nargs["y_ptr"].copy_(y)


@triton.autotune(
    configs=[_INTERPRETER_CONFIG] if _INTERPRET else
    [c for cs in _DECODE_CONFIGS.values() for c in cs] + _PREFILL_CONFIGS,
    key=["M_BUCKET", "N", "K", "stride_wk", "HAS_INDEX", "HAS_LORA", "R_PAD"],
    prune_configs_by=None if _INTERPRET else {"early_config_prune": _prune_configs},
    pre_hook=_tuning_pre_hook,
    post_hook=_tuning_post_hook,
)
@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _lora_linear_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, u_ptr, index_ptr, count_ptr,
    M, N, K, R, X_ROWS, M_BUCKET, scale,
    stride_xm, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_um,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_INDEX: tl.constexpr,
    STORE_U: tl.constexpr, SPLIT_U: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[i] = x[row i] W^T + bias + scale (x[row i] A^T) B^T for the M output rows i, row i
    being index[i] (HAS_INDEX, only i < count and 0 <= index[i] < X_ROWS, x's row count;
    other rows of y are not written) or i. A and B may have another float dtype:
    their tiles are cast to x's on load. STORE_U also writes u[i] = x[row i] A^T,
    rounded to x's dtype; SPLIT_U (half inputs) keeps u's full fp32 value for the B dot.
    PRECISION is the dots' input precision: "ieee" for fp32 (no TF32), else the default.
    x rows are contiguous; W, A, B are addressed through their strides (the backward passes
    transposed views). M_BUCKET only keys the autotuning; neither it nor M is specialised on
    (no recompilation as the decode row count varies). Weight offsets are int64 (N K may
    exceed 2^31)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks sweep the columns together, sharing W tiles in L2.
    group_size = GROUP_M * num_pid_n
    first_pid_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    if HAS_INDEX:
        n_rows = tl.minimum(tl.load(count_ptr), M)
    else:
        n_rows = M
    if pid_m * BLOCK_M >= n_rows:
        return  # past the count: no loads at all

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < n_rows
    n_mask = offs_n < N
    if HAS_INDEX:
        rows = tl.load(index_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        m_mask = m_mask & (rows >= 0) & (rows < X_ROWS)  # skip out-of-range entries
    else:
        rows = offs_m.to(tl.int64)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        r_mask = offs_r < R
        a_ptrs = a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak  # A^T tile
        u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if HAS_LORA:
            a = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            u = tl.dot(x, a.to(x.dtype), u, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    if HAS_LORA:
        u_hi = u.to(x_ptr.dtype.element_ty)
        if STORE_U:
            if pid_n == 0:
                u_ptrs = u_ptr + offs_m.to(tl.int64)[:, None] * stride_um + offs_r[None, :]
                tl.store(u_ptrs, u_hi, mask=m_mask[:, None] & r_mask[None, :])
        b_ptrs = b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn  # B^T tile
        b = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(u_hi.dtype)
        lora = tl.dot(u_hi, b, input_precision=PRECISION)
        if SPLIT_U:  # half inputs: u_hi's rounding error, in a second dot
            lora = tl.dot((u - u_hi.to(tl.float32)).to(u_hi.dtype), b, lora,
                          input_precision=PRECISION)
        acc += scale * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scale: float,
    index: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    store_u: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One launch of the kernel: (y, u) with y = x W^T + bias + scale (x A^T) B^T (written
    into `out` if given) and, when store_u, u = x A^T [rows, r] (else None), in x's dtype.
    All tensors are on x's device and all but A and B have x's dtype; x and y rows are
    contiguous, W, A and B may be strided views. No argument checks: ops.lora_linear's."""
    rows = x.shape[0] if index is None else index.shape[0]
    n_out, k_in = weight.shape
    rank = 0 if lora_A is None else lora_A.shape[0]
    y = x.new_empty((rows, n_out)) if out is None else out
    u = x.new_empty((rows, rank)) if store_u else None
    if rows == 0:
        return y, u
    # Pointer arguments that a disabled feature never reads.
    unused = x
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),
    )
    _lora_linear_kernel[grid](
        x, weight, unused if bias is None else bias,
        unused if lora_A is None else lora_A, unused if lora_B is None else lora_B,
        y, unused if u is None else u,
        unused if index is None else index, unused if count is None else count,
        rows, n_out, k_in, rank, x.shape[0], triton.next_power_of_2(rows), float(scale),
        x.stride(0), weight.stride(0), weight.stride(1),
        *(lora_A.stride() if rank else (0, 0)), *(lora_B.stride() if rank else (0, 0)),
        y.stride(0), u.stride(0) if store_u else 0,
        HAS_BIAS=bias is not None, HAS_LORA=rank > 0, HAS_INDEX=index is not None,
        STORE_U=store_u, SPLIT_U=x.dtype != torch.float32,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        R_PAD=max(16, triton.next_power_of_2(rank)),
    )
    return y, u


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T, differentiable in x, A and B (W and b are frozen).

    Shapes: x [M, K], W [N, K], b [N], A [r, K], B [N, r], y [M, N]; u = x A^T [M, r].
    With dY = dL/dy [M, N], the chain rule gives

        dx = dY W + s (dY B) A          [M, K]   one kernel launch (the forward kernel on
                                                  W^T, B^T, A^T), which also stores g = dY B
        dA = s (dY B)^T x = s g^T x     [r, K]
        dB = s dY^T (x A^T) = s dY^T u  [N, r]   u stored by the forward kernel

    and no dW, db. A and B keep their dtype (fp32 adapters on a bf16 layer, say): the kernels
    cast their tiles to x's dtype on load, as A.to(x.dtype) would round them. dA and dB are
    computed in x's dtype and returned in A's and B's.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale):
        y, u = _launch(x, weight, bias, lora_A, lora_B, scale, store_u=lora_A is not None)
        ctx.save_for_backward(x, weight, lora_A, lora_B, u)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, A, B, u = ctx.saved_tensors
        s = ctx.scale
        need_dx, _, _, need_dA, need_dB, _ = ctx.needs_input_grad
        dy = dy.contiguous()
        dx = dA = dB = g = None
        if need_dx:
            Bt, At = (B.t(), A.t()) if A is not None else (None, None)
            dx, g = _launch(dy, weight.t(), None, Bt, At, s, store_u=A is not None)
        if need_dA:
            g = dy @ B.to(dy.dtype) if g is None else g
            dA = g.new_empty(A.shape).addmm_(g.t(), x, beta=0, alpha=s).to(A.dtype)
        if need_dB:
            dB = u.new_empty(B.shape).addmm_(dy.t(), u, beta=0, alpha=s).to(B.dtype)
        return dx, None, None, dA, dB, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scale: float,
    index: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton path of ops.lora_linear (arguments checked there): through autograd when a
    graph is being built, else (inference, a row list or out=) one plain launch."""
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lora_A, lora_B)
    ):  # the checks have ruled out a row list and out= here
        return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scale)
    return _launch(x, weight, bias, lora_A, lora_B, scale, index, count, out)[0]
