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


# Ops with a Triton kernel (python_kernels/<op>.py), registered by _triton_op at import.
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


def _check_rows(op: str, t: torch.Tensor, name: str) -> None:
    if t.dtype not in _ROW_DTYPES:
        raise TypeError(f"{op}: `{name}` must be float32, float16 or bfloat16, got {t.dtype}")
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
    if backend("gather_rows", x.device) == "cuda":
        torch.ops.layerroute.gather_rows(x, index, count, out)
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
    if backend("scatter_add_rows", residual.device) == "cuda":
        torch.ops.layerroute.scatter_add_rows(residual, src, index, count)
    else:
        scatter_add_rows_ref(residual, src, index, count)
