"""One dispatch point per op: compiled extension (layerroute_rt._C) > Triton > torch reference.

Each op has a plain-torch reference `<op>_ref`, the oracle of every kernel test and the
fallback where no kernel exists. `LAYERROUTE_BACKEND=torch|triton|cuda`, read on every call,
forces one backend; `cuda` means the compiled extension, whatever the device. The compiled ops
are `torch.ops.layerroute.*`, declared in csrc/torch_bindings.cpp; their fake (meta) impls are
registered here, so torch.compile and CUDA-graph capture see through them.

Adding an op: its schema and kernels in csrc/, then a section below with the argument checks,
the reference, the fake impl and the dispatching function.
"""

from __future__ import annotations

import os

import torch

from .config import check_tau

BACKENDS = ("torch", "triton", "cuda")

try:
    from layerroute_rt import _C  # noqa: F401  (loading it registers torch.ops.layerroute.*)

    _EXTENSION_ERROR: str | None = None
except ImportError as exc:
    _EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

# Dispatch keys of the device types the extension can have kernels for.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
# (op, device type) pairs with a compiled kernel, filled by _compiled_op at import so that
# dispatch is a set lookup torch.compile can trace.
_COMPILED_KERNELS: set[tuple[str, str]] = set()


def extension_error() -> str | None:
    """Why `layerroute_rt._C` failed to import, or None when it is loaded."""
    return _EXTENSION_ERROR


# Ops with a Triton kernel (python_kernels/<op>.py): each op's section below adds its name
# when its kernel module imports (that is, when Triton is installed).
_TRITON_KERNELS: set[str] = set()


def _triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "") == "1"


def backend(op: str, device: torch.device) -> str:
    """The backend that runs `op` on `device`: LAYERROUTE_BACKEND if set, else the best one
    (compiled extension > Triton > torch reference)."""
    forced = os.environ.get("LAYERROUTE_BACKEND", "").strip().lower()
    compiled = (op, device.type) in _COMPILED_KERNELS
    triton_ok = op in _TRITON_KERNELS and _triton_runs_on(device)
    if not forced:
        return "cuda" if compiled else "triton" if triton_ok and device.type == "cuda" else "torch"
    if forced not in BACKENDS:
        raise ValueError(f"LAYERROUTE_BACKEND={forced!r}: expected one of {', '.join(BACKENDS)}")
    if forced == "triton" and not triton_ok:
        why = (f"no Triton kernel exists for {op}" if op not in _TRITON_KERNELS else
               f"Triton runs on CUDA tensors, or on CPU only with TRITON_INTERPRET=1 (got {device})")
        raise RuntimeError(f"LAYERROUTE_BACKEND=triton: cannot run {op}: {why}")
    if forced == "cuda" and not compiled:
        why = _EXTENSION_ERROR or f"it has no {device.type} kernel for it (built without CUDA?)"
        raise RuntimeError(f"LAYERROUTE_BACKEND=cuda: layerroute_rt._C cannot run {op}: {why}")
    return forced


def _compiled_op(op: str):
    """Register the decorated function as the fake impl of layerroute::<op> and record the
    devices with a kernel for it; without the extension, only return the function."""

    def register(fake):
        if _EXTENSION_ERROR is None:
            torch.library.register_fake(f"layerroute::{op}")(fake)
            for device_type, key in _DISPATCH_KEYS.items():
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"layerroute::{op}", key):
                    _COMPILED_KERNELS.add((op, device_type))
        return fake

    return register


# ---------------------------------------------------------------------------------------------
# Row compaction, gather and scatter for per-token block skipping (DESIGN.md section 4).
# Shapes are fixed (the most rows a step can have) and the live row count stays on the device
# as an int32 tensor of shape [1]; kernels exit early past it, so nothing syncs with the host.
# The references read the count on the host: they are the oracle, not a hot path.
# Argument checks mirror csrc/checks.h: TypeError for a dtype, ValueError for the rest.

_ROW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_device(op: str, t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{op}: `{name}` must be on the same device as `{ref_name}` ({ref.device}), "
            f"got {t.device}"
        )


def _check_rows(op: str, t: torch.Tensor, name: str, dtypes=_ROW_DTYPES) -> None:
    if t.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        raise TypeError(f"{op}: `{name}` must be {', '.join(names[:-1])} or {names[-1]}, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{op}: `{name}` must be 2-D [rows, D], got shape {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: `{name}` must be contiguous")


def _check_index_count(
    op: str, index: torch.Tensor, count: torch.Tensor, ref: torch.Tensor, ref_name: str
) -> None:
    if index.dtype != torch.int32:
        raise TypeError(f"{op}: `index` must be int32, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{op}: `index` must be 1-D [M], got shape {list(index.shape)}")
    if not index.is_contiguous():
        raise ValueError(f"{op}: `index` must be contiguous")
    if count.dtype != torch.int32:
        raise TypeError(f"{op}: `count` must be int32, got {count.dtype}")
    if count.shape != (1,):
        raise ValueError(f"{op}: `count` must have shape [1], got {list(count.shape)}")
    _check_device(op, index, "index", ref, ref_name)
    _check_device(op, count, "count", ref, ref_name)


def _live_rows(
    op: str, index: torch.Tensor, count: torch.Tensor, n_rows: int, unique: bool
) -> torch.Tensor:
    """index[:count] as int64, checked as the compiled CPU ops check it (syncs with the host)."""
    live = int(count[0])
    if not 0 <= live <= index.shape[0]:
        raise ValueError(f"{op}: `count` is {live}, outside [0, M = {index.shape[0]}]")
    rows = index[:live].long()
    if live and not (0 <= int(rows.min()) and int(rows.max()) < n_rows):
        raise IndexError(f"{op}: index[0:count] has rows outside [0, {n_rows})")
    if unique and rows.unique().numel() != live:
        raise ValueError(f"{op}: a row appears twice in index[0:count]")
    return rows


# compact_rows ---------------------------------------------------------------------------------


def _check_compact_rows(mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"compact_rows: `mask` must be bool, got {mask.dtype}")
    if mask.dim() != 1:
        raise ValueError(f"compact_rows: `mask` must be 1-D [N], got shape {list(mask.shape)}")
    if not mask.is_contiguous():
        raise ValueError("compact_rows: `mask` must be contiguous")


def compact_rows_ref(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_compact_rows(mask)
    rows = mask.nonzero().flatten().to(torch.int32)
    index = torch.full(mask.shape, -1, dtype=torch.int32, device=mask.device)
    index[: rows.numel()] = rows
    return index, torch.tensor([rows.numel()], dtype=torch.int32, device=mask.device)


@_compiled_op("compact_rows")
def _compact_rows_fake(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_compact_rows(mask)
    return mask.new_empty(mask.shape, dtype=torch.int32), mask.new_empty((1,), dtype=torch.int32)


def compact_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows to run, from a bool mask [N]: (index int32 [N], count int32 [1]).

    index[:count] holds the positions where mask is true, ascending; index[count:] is -1.
    """
    if backend("compact_rows", mask.device) == "cuda":
        return torch.ops.layerroute.compact_rows(mask)
    return compact_rows_ref(mask)


# Triton versions of gather_rows and scatter_add_rows, and the fused row + RMSNorm ops below.
try:
    from python_kernels import rows as _rows_triton

    _TRITON_KERNELS.update(("gather_rows", "scatter_add_rows", "gather_rmsnorm", "add_rmsnorm"))
except ImportError:  # no Triton: the compiled ops or the references run
    _rows_triton = None


# gather_rows ----------------------------------------------------------------------------------


def _check_gather_rows(
    x: torch.Tensor, index: torch.Tensor, count: torch.Tensor, out: torch.Tensor
) -> None:
    op = "gather_rows"
    _check_rows(op, x, "x")
    _check_rows(op, out, "out")
    _check_index_count(op, index, count, x, "x")
    _check_device(op, out, "out", x, "x")
    if out.dtype != x.dtype:
        raise TypeError(f"{op}: `out` must have the dtype of `x` ({x.dtype}), got {out.dtype}")
    if out.shape != (index.shape[0], x.shape[1]):
        raise ValueError(
            f"{op}: `out` must have shape [M, D] = [{index.shape[0]}, {x.shape[1]}] "
            f"(M from `index`, D from `x`), got {list(out.shape)}"
        )


def gather_rows_ref(
    x: torch.Tensor, index: torch.Tensor, count: torch.Tensor, out: torch.Tensor
) -> None:
    _check_gather_rows(x, index, count, out)
    rows = _live_rows("gather_rows", index, count, x.shape[0], unique=False)
    out[: rows.numel()] = x[rows]


@_compiled_op("gather_rows")
def _gather_rows_fake(
    x: torch.Tensor, index: torch.Tensor, count: torch.Tensor, out: torch.Tensor
) -> None:
    _check_gather_rows(x, index, count, out)


def gather_rows(
    x: torch.Tensor, index: torch.Tensor, count: torch.Tensor, out: torch.Tensor
) -> None:
    """out[i] = x[index[i]] for i < count; rows of `out` past the count are left as they are.

    x [N, D], out [M, D] (same dtype, contiguous), index int32 [M], count int32 [1].
    """
    chosen = backend("gather_rows", x.device)
    if chosen == "cuda":
        torch.ops.layerroute.gather_rows(x, index, count, out)
    elif chosen == "triton":
        _check_gather_rows(x, index, count, out)
        _rows_triton.gather_rows(x, index, count, out)
    else:
        gather_rows_ref(x, index, count, out)


# scatter_add_rows -----------------------------------------------------------------------------


def _check_scatter_add_rows(
    residual: torch.Tensor, src: torch.Tensor, index: torch.Tensor, count: torch.Tensor
) -> None:
    op = "scatter_add_rows"
    _check_rows(op, residual, "residual")
    _check_rows(op, src, "src")
    _check_index_count(op, index, count, residual, "residual")
    _check_device(op, src, "src", residual, "residual")
    if src.dtype != residual.dtype:
        raise TypeError(
            f"{op}: `src` must have the dtype of `residual` ({residual.dtype}), got {src.dtype}"
        )
    if src.shape != (index.shape[0], residual.shape[1]):
        raise ValueError(
            f"{op}: `src` must have shape [M, D] = [{index.shape[0]}, {residual.shape[1]}] "
            f"(M from `index`, D from `residual`), got {list(src.shape)}"
        )


def scatter_add_rows_ref(
    residual: torch.Tensor, src: torch.Tensor, index: torch.Tensor, count: torch.Tensor
) -> None:
    _check_scatter_add_rows(residual, src, index, count)
    rows = _live_rows("scatter_add_rows", index, count, residual.shape[0], unique=True)
    summed = residual[rows].float() + src[: rows.numel()].float()
    residual[rows] = summed.to(residual.dtype)


@_compiled_op("scatter_add_rows")
def _scatter_add_rows_fake(
    residual: torch.Tensor, src: torch.Tensor, index: torch.Tensor, count: torch.Tensor
) -> None:
    _check_scatter_add_rows(residual, src, index, count)


def scatter_add_rows(
    residual: torch.Tensor, src: torch.Tensor, index: torch.Tensor, count: torch.Tensor
) -> None:
    """residual[index[i]] += src[i] for i < count, added in fp32 and rounded once.

    residual [N, D], src [M, D] (same dtype, contiguous), index int32 [M] with unique rows
    (as compact_rows makes them), count int32 [1].
    """
    chosen = backend("scatter_add_rows", residual.device)
    if chosen == "cuda":
        torch.ops.layerroute.scatter_add_rows(residual, src, index, count)
    elif chosen == "triton":
        _check_scatter_add_rows(residual, src, index, count)
        _rows_triton.scatter_add_rows(residual, src, index, count)
    else:
        scatter_add_rows_ref(residual, src, index, count)


# ---------------------------------------------------------------------------------------------
# lora_linear: a frozen linear layer with a LoRA adapter, y = x W^T + b + s (x A^T) B^T, fused
# in python_kernels/lora_linear.py (forward and backward). With a row list (index, count) it
# computes only the listed rows, the count staying on the device: inference only, as is out=.

try:
    from python_kernels import lora_linear as _lora_linear_triton

    _TRITON_KERNELS.add("lora_linear")
except ImportError:  # no Triton: the reference runs
    _lora_linear_triton = None


def _check_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scale: float,
    index: torch.Tensor | None,
    count: torch.Tensor | None,
    out: torch.Tensor | None,
) -> None:
    op = "lora_linear"
    _check_rows(op, x, "x", _ROW_DTYPES + (torch.float64,))
    if weight.dtype != x.dtype:
        raise TypeError(
            f"{op}: `weight` must have the dtype of `x` ({x.dtype}), got {weight.dtype}"
        )
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.shape[0] == 0:
        raise ValueError(
            f"{op}: `weight` must be 2-D [N, K] with N >= 1 and K = {x.shape[1]} (from `x`), "
            f"got shape {list(weight.shape)}"
        )
    if not weight.is_contiguous():
        raise ValueError(f"{op}: `weight` must be contiguous")
    _check_device(op, weight, "weight", x, "x")
    n_out, k_in = weight.shape
    if bias is not None:
        if bias.dtype != x.dtype:
            raise TypeError(
                f"{op}: `bias` must have the dtype of `x` ({x.dtype}), got {bias.dtype}"
            )
        if bias.shape != (n_out,):
            raise ValueError(
                f"{op}: `bias` must have shape [N] = [{n_out}], got {list(bias.shape)}"
            )
        if not bias.is_contiguous():
            raise ValueError(f"{op}: `bias` must be contiguous")
        _check_device(op, bias, "bias", x, "x")
    grad = torch.is_grad_enabled()
    for name, t in (("weight", weight), ("bias", bias)):
        if grad and t is not None and t.requires_grad:
            raise ValueError(
                f"{op}: `{name}` requires grad, but the base layer is frozen and gets no "
                f"gradient; call {name}.requires_grad_(False)"
            )
    if (lora_A is None) != (lora_B is None):
        raise ValueError(f"{op}: `lora_A` and `lora_B` must both be tensors or both be None")
    if lora_A is not None:
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if t.dtype not in _ROW_DTYPES and not (t.dtype == x.dtype == torch.float64):
                raise TypeError(
                    f"{op}: `{name}` must be float32, float16 or bfloat16 (or float64 with a "
                    f"float64 `x`), got {t.dtype}"
                )
            _check_device(op, t, name, x, "x")
        if lora_A.dim() != 2 or lora_A.shape[0] == 0 or lora_A.shape[1] != k_in:
            raise ValueError(
                f"{op}: `lora_A` must be 2-D [r, K] with r >= 1 and K = {k_in} (from `x`), "
                f"got shape {list(lora_A.shape)}"
            )
        if lora_B.shape != (n_out, lora_A.shape[0]):
            raise ValueError(
                f"{op}: `lora_B` must have shape [N, r] = [{n_out}, {lora_A.shape[0]}] "
                f"(N from `weight`, r from `lora_A`), got {list(lora_B.shape)}"
            )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: `scale` must be a Python float, got {type(scale).__name__}")
    if (index is None) != (count is None):
        raise ValueError(f"{op}: `index` and `count` must both be tensors or both be None")
    if index is not None:
        _check_index_count(op, index, count, x, "x")
    if grad and any(t is not None and t.requires_grad for t in (x, lora_A, lora_B)):
        for what, arg in (("the row-list variant (index, count)", index), ("out=", out)):
            if arg is not None:
                raise RuntimeError(
                    f"{op}: {what} is inference only and has no autograd, but an input "
                    f"requires grad; run it under torch.no_grad()"
                )
    if out is not None:
        _check_rows(op, out, "out")
        _check_device(op, out, "out", x, "x")
        if out.dtype != x.dtype:
            raise TypeError(f"{op}: `out` must have the dtype of `x` ({x.dtype}), got {out.dtype}")
        rows, rows_from = (x.shape[0], "x") if index is None else (index.shape[0], "index")
        if out.shape != (rows, n_out):
            raise ValueError(
                f"{op}: `out` must have shape [{rows}, {n_out}] (rows from `{rows_from}`, "
                f"N from `weight`), got {list(out.shape)}"
            )


def _lora_linear_torch(x, weight, bias, lora_A, lora_B, scale):
    """The unfused expression, in x's dtype: each matmul, the scaling and the sums round."""
    y = torch.nn.functional.linear(x, weight, bias)
    if lora_A is None:
        return y
    lora = torch.nn.functional.linear(
        torch.nn.functional.linear(x, lora_A.to(x.dtype)), lora_B.to(x.dtype)
    )
    return y + scale * lora


def lora_linear_ref(
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
    _check_lora_linear(x, weight, bias, lora_A, lora_B, scale, index, count, out)
    if index is None:
        y = _lora_linear_torch(x, weight, bias, lora_A, lora_B, scale)
        return y if out is None else out.copy_(y)
    rows = _live_rows("lora_linear", index, count, x.shape[0], unique=False)
    y = x.new_empty((index.shape[0], weight.shape[0])) if out is None else out
    y[: rows.numel()] = _lora_linear_torch(x[rows], weight, bias, lora_A, lora_B, scale)
    return y


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
    """y = x W^T + bias + scale (x A^T) B^T, the LoRA term absent when lora_A, lora_B are None.

    x [M, K] contiguous, float32, float16 or bfloat16 (or float64, which always takes the
    torch expression: for gradcheck); weight [N, K] contiguous and bias [N]
    (or None) in x's dtype, frozen (no grad); lora_A [r, K] and lora_B [N, r] in any of those
    dtypes (cast to x's: they are tiny); scale a Python float. Returns y [M, N] in x's dtype,
    differentiable in x, lora_A and lora_B (each grad in its input's dtype).

    With index (int32 [R]) and count (int32 [1]), both on x's device: y [R, N] with
    y[i] = f(x[index[i]]) for i < count; rows from count on are not written (uninitialised).
    Inference only (an error if autograd would be needed). The Triton kernel reads the count
    from device memory and reads no weights when it is 0; index[:count] must lie in [0, M).

    out (keyword, inference only): y is written into it and returned; with a row list its
    rows from count on keep their values.
    """
    _check_lora_linear(x, weight, bias, lora_A, lora_B, scale, index, count, out)
    if x.dtype != torch.float64 and backend("lora_linear", x.device) == "triton":
        return _lora_linear_triton.lora_linear(
            x, weight, bias, lora_A, lora_B, scale, index, count, out=out
        )
    return lora_linear_ref(x, weight, bias, lora_A, lora_B, scale, index, count, out=out)


# ---------------------------------------------------------------------------------------------
# Fused row + RMSNorm ops of the per-block skip path (DESIGN.md section 4), in gathered space;
# Triton kernels in python_kernels/rows.py. Inference only (no autograd). RMSNorm is Qwen2's:
# normalise in float32, cast to x's dtype, then multiply by the weight (model.RMSNorm).


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.RMSNorm's computation, for rows in float32, float16 or bfloat16."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _check_norm(op: str, norm_weight: torch.Tensor, eps: float, x: torch.Tensor) -> None:
    if norm_weight.dtype not in _ROW_DTYPES:
        raise TypeError(
            f"{op}: `norm_weight` must be float32, float16 or bfloat16, got {norm_weight.dtype}"
        )
    if norm_weight.shape != (x.shape[1],):
        raise ValueError(
            f"{op}: `norm_weight` must have shape [D] = [{x.shape[1]}] (D from `x`), "
            f"got {list(norm_weight.shape)}"
        )
    if not norm_weight.is_contiguous():
        raise ValueError(f"{op}: `norm_weight` must be contiguous")
    _check_device(op, norm_weight, "norm_weight", x, "x")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{op}: `eps` must be a number >= 0, got {eps!r}")


def _check_norm_width(op: str, x: torch.Tensor) -> None:
    """The Triton norm programs hold whole rows."""
    if x.shape[1] > _rows_triton.MAX_NORM_WIDTH:
        raise ValueError(
            f"{op}: the Triton kernel takes rows of at most {_rows_triton.MAX_NORM_WIDTH} "
            f"elements, got D = {x.shape[1]} in `x`"
        )


# gather_rmsnorm -------------------------------------------------------------------------------


def _check_gather_rmsnorm(
    x: torch.Tensor,
    index: torch.Tensor,
    count: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    out_rows: torch.Tensor,
    out_normed: torch.Tensor,
) -> None:
    op = "gather_rmsnorm"
    _check_rows(op, x, "x")
    _check_index_count(op, index, count, x, "x")
    _check_norm(op, norm_weight, eps, x)
    for name, out in (("out_rows", out_rows), ("out_normed", out_normed)):
        _check_rows(op, out, name)
        _check_device(op, out, name, x, "x")
        if out.dtype != x.dtype:
            raise TypeError(
                f"{op}: `{name}` must have the dtype of `x` ({x.dtype}), got {out.dtype}"
            )
        if out.shape != (index.shape[0], x.shape[1]):
            raise ValueError(
                f"{op}: `{name}` must have shape [M, D] = [{index.shape[0]}, {x.shape[1]}] "
                f"(M from `index`, D from `x`), got {list(out.shape)}"
            )


def gather_rmsnorm_ref(
    x: torch.Tensor,
    index: torch.Tensor,
    count: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    out_rows: torch.Tensor,
    out_normed: torch.Tensor,
) -> None:
    _check_gather_rmsnorm(x, index, count, norm_weight, eps, out_rows, out_normed)
    rows = _live_rows("gather_rmsnorm", index, count, x.shape[0], unique=False)
    out_rows[: rows.numel()] = x[rows]
    out_normed[: rows.numel()] = _rms_norm_ref(x[rows], norm_weight, eps)


def gather_rmsnorm(
    x: torch.Tensor,
    index: torch.Tensor,
    count: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    out_rows: torch.Tensor,
    out_normed: torch.Tensor,
) -> None:
    """out_rows[i] = x[index[i]] and out_normed[i] = RMSNorm(x[index[i]]) for i < count, from
    one read of each row (the executing rows of a block and their input_layernorm). Rows of the
    outputs past the count are left as they are.

    x [N, D]; out_rows, out_normed [M, D] (dtype of x, contiguous); index int32 [M];
    count int32 [1]; norm_weight [D] (float32, float16 or bfloat16); eps >= 0.
    """
    if backend("gather_rmsnorm", x.device) == "triton":
        _check_gather_rmsnorm(x, index, count, norm_weight, eps, out_rows, out_normed)
        _check_norm_width("gather_rmsnorm", x)
        _rows_triton.gather_rmsnorm(x, index, count, norm_weight, float(eps), out_rows, out_normed)
    else:
        gather_rmsnorm_ref(x, index, count, norm_weight, eps, out_rows, out_normed)


# add_rmsnorm ----------------------------------------------------------------------------------


def _check_add_rmsnorm(
    x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float, count: torch.Tensor
) -> None:
    op = "add_rmsnorm"
    _check_rows(op, x, "x")
    _check_rows(op, delta, "delta")
    _check_device(op, delta, "delta", x, "x")
    if delta.dtype != x.dtype:
        raise TypeError(f"{op}: `delta` must have the dtype of `x` ({x.dtype}), got {delta.dtype}")
    if delta.shape != x.shape:
        raise ValueError(
            f"{op}: `delta` must have the shape of `x` {list(x.shape)}, got {list(delta.shape)}"
        )
    _check_norm(op, norm_weight, eps, x)
    if count.dtype != torch.int32:
        raise TypeError(f"{op}: `count` must be int32, got {count.dtype}")
    if count.shape != (1,):
        raise ValueError(f"{op}: `count` must have shape [1], got {list(count.shape)}")
    _check_device(op, count, "count", x, "x")


def add_rmsnorm_ref(
    x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float, count: torch.Tensor
) -> torch.Tensor:
    _check_add_rmsnorm(x, delta, norm_weight, eps, count)
    live = int(count[0])
    if not 0 <= live <= x.shape[0]:
        raise ValueError(f"add_rmsnorm: `count` is {live}, outside [0, M = {x.shape[0]}]")
    x[:live] += delta[:live]
    normed = torch.empty_like(x)
    normed[:live] = _rms_norm_ref(x[:live], norm_weight, eps)
    return normed


def add_rmsnorm(
    x: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float, count: torch.Tensor
) -> torch.Tensor:
    """x[i] += delta[i] in place (rounded once to x's dtype) and normed[i] = RMSNorm(x[i]) for
    i < count: the residual add after o_proj and post_attention_layernorm, in gathered space.
    Returns normed [M, D], whose rows past the count are unset; those rows of x are untouched.

    x, delta [M, D] (same dtype, contiguous); norm_weight [D] (float32, float16 or bfloat16);
    eps >= 0; count int32 [1].
    """
    if backend("add_rmsnorm", x.device) == "triton":
        _check_add_rmsnorm(x, delta, norm_weight, eps, count)
        _check_norm_width("add_rmsnorm", x)
        return _rows_triton.add_rmsnorm(x, delta, norm_weight, float(eps), count)
    return add_rmsnorm_ref(x, delta, norm_weight, eps, count)


# ---------------------------------------------------------------------------------------------
# Routers (DESIGN.md section 1): p = sigmoid(w . h + b) per token, or per sequence on the mean
# of its valid rows, computed in float32 whatever h's dtype; the decision p >= tau; the rows
# that run, listed as compact_rows lists them, with their count written on the device.
# Triton kernels and autograd Functions in python_kernels/router.py; p is differentiable with
# respect to h, weight and bias, index and count are not.

try:
    from python_kernels import router as _router_triton

    _TRITON_KERNELS.update(("route_tokens", "route_sequences"))
except ImportError:  # no Triton: the references run
    _router_triton = None


def _check_router(
    op: str,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    tau: float,
    valid: torch.Tensor | None,
    h_shape: str,
) -> float:
    """Checks the router arguments; returns tau as a float."""
    if h.dtype not in _ROW_DTYPES:
        raise TypeError(f"{op}: `h` must be float32, float16 or bfloat16, got {h.dtype}")
    if h.dim() != h_shape.count(",") + 1:
        raise ValueError(
            f"{op}: `h` must be {h_shape.count(',') + 1}-D [{h_shape}], got shape {list(h.shape)}"
        )
    if not h.is_contiguous():
        raise ValueError(f"{op}: `h` must be contiguous")
    d = h.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.dtype not in _ROW_DTYPES:
            raise TypeError(f"{op}: `{name}` must be float32, float16 or bfloat16, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: `{name}` must be contiguous")
        _check_device(op, t, name, h, "h")
    if weight.shape not in ((d,), (1, d)):
        raise ValueError(
            f"{op}: `weight` must have shape [D] or [1, D] with D = {d} (from `h`), "
            f"got {list(weight.shape)}"
        )
    if bias.shape != (1,):
        raise ValueError(f"{op}: `bias` must have shape [1], got {list(bias.shape)}")
    if valid is not None:
        if valid.dtype != torch.bool:
            raise TypeError(f"{op}: `valid` must be bool, got {valid.dtype}")
        if valid.shape != h.shape[:-1]:
            raise ValueError(
                f"{op}: `valid` must have shape {list(h.shape[:-1])} (from `h`), "
                f"got {list(valid.shape)}"
            )
        if not valid.is_contiguous():
            raise ValueError(f"{op}: `valid` must be contiguous")
        _check_device(op, valid, "valid", h, "h")
    return check_tau(tau, f"{op}: `tau`")


# route_tokens ---------------------------------------------------------------------------------


def route_tokens_ref(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    tau: float,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tau = _check_router("route_tokens", h, weight, bias, tau, valid, "N, D")
    p = torch.sigmoid(h.float() @ weight.float().reshape(-1) + bias.float())
    run = p >= tau
    index, count = compact_rows_ref(run if valid is None else run & valid)
    return p, index, count


def route_tokens(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    tau: float,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token routing: (p float32 [N], index int32 [N], count int32 [1]) for h [N, D].

    p = sigmoid(w . h[r] + b); row r runs iff p[r] >= tau and valid[r] (valid bool [N], None:
    all rows); index and count list the rows that run as compact_rows does. weight [D] or
    [1, D], bias [1] (read on the device only), tau in [0, 1].
    """
    if backend("route_tokens", h.device) == "triton":
        tau = _check_router("route_tokens", h, weight, bias, tau, valid, "N, D")
        return _router_triton.RouteTokens.apply(h, weight, bias, tau, valid)
    return route_tokens_ref(h, weight, bias, tau, valid)


# route_sequences ------------------------------------------------------------------------------


def route_sequences_ref(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    tau: float,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tau = _check_router("route_sequences", h, weight, bias, tau, valid, "B, T, D")
    vf = torch.ones(h.shape[:-1], device=h.device) if valid is None else valid.float()
    mean = (h.float() * vf[..., None]).sum(1) / vf.sum(1, keepdim=True).clamp(min=1)
    p = torch.sigmoid(mean @ weight.float().reshape(-1) + bias.float())
    run = (p >= tau)[:, None] & (vf > 0)
    index, count = compact_rows_ref(run.reshape(-1))
    return p, index, count


def route_sequences(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    tau: float,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence routing: (p float32 [B], index int32 [B * T], count int32 [1]) for h [B, T, D].

    p[b] = sigmoid(w . mean of h[b, t] over the valid t + b) (mean 0 for a sequence with no
    valid row); the rows that run are the flattened rows b * T + t with valid[b, t] of the
    sequences with p[b] >= tau, listed as compact_rows does. valid bool [B, T] (None: all rows),
    weight [D] or [1, D], bias [1] (read on the device only), tau in [0, 1].
    """
    if backend("route_sequences", h.device) == "triton":
        tau = _check_router("route_sequences", h, weight, bias, tau, valid, "B, T, D")
        return _router_triton.RouteSequences.apply(h, weight, bias, tau, valid)
    return route_sequences_ref(h, weight, bias, tau, valid)


# ---------------------------------------------------------------------------------------------
# Decode attention over listed rows (DESIGN.md section 4): one query token per row, each row a
# sequence of the KV cache; count and length stay on the device. Triton kernel in
# python_kernels/decode_attention.py.

try:
    from python_kernels import decode_attention as _decode_attention_triton

    _TRITON_KERNELS.add("decode_attention")
except ImportError:  # no Triton: the reference runs
    _decode_attention_triton = None


def _check_decode_attention(q, k, v, valid, index, count, length, scale, out) -> None:
    op = "decode_attention"
    if q.dtype not in _ROW_DTYPES:
        raise TypeError(f"{op}: `q` must be float32, float16 or bfloat16, got {q.dtype}")
    if q.dim() != 3 or k.dim() != 4:
        raise ValueError(f"{op}: `q` must be [M, H, D] and `k` [B, HKV, S, D], got shapes "
                         f"{list(q.shape)} and {list(k.shape)}")
    M, H, D = q.shape
    B, HKV, S, Dk = k.shape
    if Dk != D or H % HKV:
        raise ValueError(f"{op}: `k` [B, HKV, S, D] = {list(k.shape)} must have D = {D} (from `q`) "
                         f"and HKV dividing H = {H}")
    if v.shape != k.shape:
        raise ValueError(f"{op}: `v` must have the shape of `k` {list(k.shape)}, got {list(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: `{name}` must have the dtype of `q` ({q.dtype}), got {t.dtype}")
    if valid.dtype != torch.bool or valid.shape != (B, S):
        raise ValueError(f"{op}: `valid` must be bool [B, S] = [{B}, {S}], got {valid.dtype} "
                         f"{list(valid.shape)}")
    if index.dtype != torch.int32 or index.shape != (M,):
        raise ValueError(f"{op}: `index` must be int32 [M] = [{M}], got {index.dtype} {list(index.shape)}")
    if count.dtype != torch.int32 or count.shape != (1,):
        raise ValueError(f"{op}: `count` must be int32 [1], got {count.dtype} {list(count.shape)}")
    if length.dtype not in (torch.int32, torch.int64) or length.shape != (1,):
        raise ValueError(f"{op}: `length` must be int32 or int64 [1], got {length.dtype} {list(length.shape)}")
    if not scale > 0:
        raise ValueError(f"{op}: `scale` must be > 0, got {scale!r}")
    tensors = [("q", q), ("k", k), ("v", v), ("valid", valid), ("index", index), ("count", count),
               ("length", length)] + ([("out", out)] if out is not None else [])
    for name, t in tensors:
        _check_device(op, t, name, q, "q")
        if not t.is_contiguous():
            raise ValueError(f"{op}: `{name}` must be contiguous")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError(f"{op}: `out` must be {q.dtype} {list(q.shape)}, got {out.dtype} {list(out.shape)}")


def decode_attention_math(q, k, v, valid, scale: float, n_keys: int, rows=None) -> torch.Tensor:
    """The reference's computation, unchecked: the rows of q [n, H, D] against sequences `rows`
    (int64 [n]; None: all B, in order) of k, v [B, HKV, S, D] over slots < n_keys, in float32,
    returned in q's dtype. The engine's CPU decode calls it directly when every row runs."""
    HKV = k.shape[1]
    n = q.shape[0]
    G = q.shape[1] // HKV
    if rows is None:
        kk, vv, seen = k[:, :, :n_keys], v[:, :, :n_keys], valid[:, :n_keys]
    else:
        kk, vv, seen = k[rows, :, :n_keys], v[rows, :, :n_keys], valid[rows, :n_keys]
    # The G query heads of a KV head side by side against its keys: no copy of K/V per head.
    qq = q.view(n, HKV, G, -1).to(torch.float32)
    scores = qq @ kk.to(torch.float32).transpose(-1, -2) * scale              # [n, HKV, G, L]
    vv = vv.to(torch.float32).masked_fill(~seen[:, None, :, None], 0.0)   # invisible: no 0 x NaN
    seen = seen[:, None, None, :]
    p = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)
    p = torch.where(seen.any(-1, keepdim=True), p, 0.0)                    # no visible key: zeros
    return (p @ vv).reshape(n, -1, q.shape[2]).to(q.dtype)


def decode_attention_ref(q, k, v, valid, index, count, length, scale, out=None) -> torch.Tensor:
    _check_decode_attention(q, k, v, valid, index, count, length, scale, out)
    rows = _live_rows("decode_attention", index, count, k.shape[0], unique=False)
    y = torch.empty_like(q) if out is None else out
    n = rows.numel()
    if n:
        y[:n] = decode_attention_math(q[:n], k, v, valid, scale, min(int(length[0]), k.shape[2]), rows)
    return y


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    index: torch.Tensor,
    count: torch.Tensor,
    length: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grouped-query attention of one query per listed row against its sequence's cache.

    q [M, H, D] in gathered space (row i < count is sequence index[i]); k, v [B, HKV, S, D] and
    valid bool [B, S] (a KVCache layer); index int32 [M], count int32 [1]; length int [1]: only
    slots s < length are read (the filled part of the cache). Returns out [M, H, D] (q's dtype)
    with, for i < count, out[i, h] = softmax over the visible slots s of
    scale * q[i, h] . k[index[i], h // (H / HKV), s], applied to v; zeros where no slot is
    visible; rows from count on are not written. Inference only.
    """
    if backend("decode_attention", q.device) == "triton":
        _check_decode_attention(q, k, v, valid, index, count, length, scale, out)
        return _decode_attention_triton.decode_attention(
            q, k, v, valid, index, count, length, float(scale),
            torch.empty_like(q) if out is None else out)
    return decode_attention_ref(q, k, v, valid, index, count, length, scale, out)
