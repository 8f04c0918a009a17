"""One dispatch point per op: compiled extension (layerroute_rt._C) > Triton > torch reference.

Each op has a plain-torch reference `<op>_ref`, the oracle of every kernel test and the
fallback where no kernel exists. `LAYERROUTE_BACKEND=torch|triton|cuda`, read on every call,
forces one backend; `cuda` means the compiled extension, whatever the device. The compiled ops
are `torch.ops.layerroute.*`, declared in csrc/torch_bindings.cpp; their fake (meta) impls are
registered here, so torch.compile and CUDA-graph capture see through them. The decode-step ops
(the block stages and decode_attention) are torch.library custom ops `layerroute::<op>`
defined here (`_custom_op`: explicit schema, fake impl), whose implementation picks the Triton
kernel or the torch reference; the public function checks the arguments, then calls the op.
lora_linear, route_tokens and route_sequences, which return new tensors and are trained
through, are functional custom ops (`_functional_op`: fake impl and autograd formula); in
eager mode their public function takes the kernels' own autograd path.

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
    if not forced:          # unforced, Triton serves CUDA tensors only: one environment read
        triton_ok = device.type == "cuda" and op in _TRITON_KERNELS
        return "cuda" if compiled else "triton" if triton_ok else "torch"
    triton_ok = op in _TRITON_KERNELS and _triton_runs_on(device)
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


# Ops defined here as torch.library custom ops (layerroute::<op>, each with a fake impl), by
# qualified name: their Python implementation (the dispatch to the Triton kernel or the torch
# reference). tests/launch_count.py runs these directly to count the launches inside them.
PYTHON_OPS: dict[str, object] = {}


def _custom_op(name: str, schema: str, mutates: tuple[str, ...]):
    """Register the decorated function as the custom op layerroute::<name> (explicit schema:
    the same on every torch version), with a fake impl that returns nothing (these ops only
    write into their arguments). Returns a caller that goes through the op while torch.compile
    traces (so that the graph holds it, opaque) and runs the function itself in eager mode: the
    torch.library dispatch costs tens of microseconds a call, which a CPU decode step (six ops
    per block) would pay about 150 times. The op is torch.ops.layerroute.<name>."""

    def register(fn):
        op = torch.library.custom_op(f"layerroute::{name}", fn, mutates_args=mutates, schema=schema)
        op.register_fake(lambda *args, **kwargs: None)
        PYTHON_OPS[f"layerroute::{name}"] = fn

        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else fn(*args)

        return call

    return register


def _functional_op(name: str, schema: str, fake, backward, setup_context):
    """Register the decorated function (which returns new tensors, inference only: autograd
    stays above it) as the custom op layerroute::<name>, with its fake impl and its autograd
    formula (torch.library.register_autograd: `backward` in torch ops, so that torch.compile
    and AOT autograd trace it); returns the function. The public function calls the op while
    torch.compile traces, and in eager mode its own autograd path (the Triton kernels'
    autograd.Function, or the torch reference's graph), without the dispatch's cost."""

    def register(fn):
        op = torch.library.custom_op(f"layerroute::{name}", fn, mutates_args=(), schema=schema)
        op.register_fake(fake)
        op.register_autograd(backward, setup_context=setup_context)
        PYTHON_OPS[f"layerroute::{name}"] = fn
        return fn

    return register


# ---------------------------------------------------------------------------------------------
# Row compaction for per-token block skipping (docs/DESIGN.md section 4), and the row-list checks
# the ops below share. Shapes are fixed (the most rows a step can have) and the live row count
# stays on the device as an int32 tensor of shape [1]; kernels exit early past it, so nothing
# syncs with the host. The references read the count on the host: they are the oracle (and
# the CPU path). Argument checks, as in csrc/checks.h: TypeError for a dtype, ValueError for
# the rest.

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
    op: str, index: torch.Tensor, count: torch.Tensor, n_rows: int, unique: bool,
    live: int | None = None,
) -> torch.Tensor:
    """index[:count] as int64, checked: count in [0, M], rows in [0, n_rows), with `unique` no
    row twice (syncs with the host; `live`: the count, already read). One row is left to
    torch's own bounds check."""
    live = count.item() if live is None else live
    if not 0 <= live <= index.shape[0]:
        raise ValueError(f"{op}: `count` is {live}, outside [0, M = {index.shape[0]}]")
    rows = index[:live].long()
    if live == 1:
        return rows
    if live and not (0 <= int(rows.min()) and int(rows.max()) < n_rows):
        raise IndexError(f"{op}: index[0:count] has rows outside [0, {n_rows})")
    if unique and rows.unique().numel() != live:
        raise ValueError(f"{op}: a row appears twice in index[0:count]")
    return rows


def _listed_rows(
    op: str, index: torch.Tensor, count: torch.Tensor, n_rows: int, unique: bool
) -> tuple[int, torch.Tensor | None]:
    """(count, rows) for the block-stage references: rows as _live_rows gives them, or None when
    the list is every one of the n_rows rows in order (at decode, whenever every sequence runs
    the block): the references then read and write whole tensors, no gather and no scatter."""
    live = count.item()
    if not 0 <= live <= index.shape[0]:
        raise ValueError(f"{op}: `count` is {live}, outside [0, M = {index.shape[0]}]")
    head = index[:live]
    if live == n_rows and live and (head.item() == 0 if live == 1 else torch.equal(
            head, torch.arange(live, dtype=head.dtype, device=head.device))):
        return live, None
    return live, _live_rows(op, index, count, n_rows, unique, live)


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
    if torch.compiler.is_compiling():
        if out is not None:
            raise ValueError("lora_linear: out= is for eager inference; under torch.compile use the "
                             "returned tensor")
        return torch.ops.layerroute.lora_linear(x, weight, bias, lora_A, lora_B, scale, index, count)
    if x.dtype != torch.float64 and backend("lora_linear", x.device) == "triton":
        return _lora_linear_triton.lora_linear(
            x, weight, bias, lora_A, lora_B, scale, index, count, out=out
        )
    return lora_linear_ref(x, weight, bias, lora_A, lora_B, scale, index, count, out=out)


def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scale, index, count):
    return x.new_empty((x.shape[0] if index is None else index.shape[0], weight.shape[0]))


def _lora_linear_setup(ctx, inputs, output):
    x, weight, _bias, lora_A, lora_B, scale, _index, _count = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B)
    ctx.scale = scale


def _lora_linear_backward(ctx, dy):
    """python_kernels/lora_linear.py's LoRALinearFunction formula in torch ops: dx = dY W +
    s (dY B) A, dA = s (dY B)^T x, dB = s dY^T (x A^T); W and b are frozen."""
    x, weight, A, B = ctx.saved_tensors
    s = ctx.scale
    dx = dy @ weight
    dA = dB = None
    if A is not None:
        g = dy @ B.to(dy.dtype)
        dx = dx + s * (g @ A.to(dy.dtype))
        dA = (s * (g.t() @ x)).to(A.dtype)
        dB = (s * (dy.t() @ (x @ A.to(x.dtype).t()))).to(B.dtype)
    return dx, None, None, dA, dB, None, None, None


@_functional_op("lora_linear", "(Tensor x, Tensor weight, Tensor? bias, Tensor? lora_A, Tensor? lora_B, "
                "float scale, Tensor? index, Tensor? count) -> Tensor",
                _lora_linear_fake, _lora_linear_backward, _lora_linear_setup)
def _lora_linear_op(x, weight, bias, lora_A, lora_B, scale, index, count):
    with torch.no_grad():
        if x.dtype != torch.float64 and backend("lora_linear", x.device) == "triton":
            return _lora_linear_triton.lora_linear(x, weight, bias, lora_A, lora_B, scale, index, count)
        return lora_linear_ref(x, weight, bias, lora_A, lora_B, scale, index, count)


# ---------------------------------------------------------------------------------------------
# RMSNorm as Qwen2 computes it: normalise in float32 (float64 for a float64 input), cast to
# x's dtype, then multiply by the weight. The one reference: model.RMSNorm runs it, the
# block-stage references below use it, and the stage kernels compute the same in their
# prologues.


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
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


# ---------------------------------------------------------------------------------------------
# Routers (docs/DESIGN.md section 1): p = sigmoid(w . h + b) per token, or per sequence on the mean
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
    tau = _check_router("route_tokens", h, weight, bias, tau, valid, "N, D")
    if torch.compiler.is_compiling():
        return torch.ops.layerroute.route_tokens(h, weight, bias, tau, valid)
    if backend("route_tokens", h.device) == "triton":
        return _router_triton.RouteTokens.apply(h, weight, bias, tau, valid)
    return route_tokens_ref(h, weight, bias, tau, valid)


def _router_fake(h, weight, bias, tau, valid):
    """p [N] per row of h [N, D] or per sequence of h [B, T, D]; index over every row."""
    rows = h.shape[0] if h.dim() == 2 else h.shape[0] * h.shape[1]
    return (h.new_empty((h.shape[0],), dtype=torch.float32), h.new_empty((rows,), dtype=torch.int32),
            h.new_empty((1,), dtype=torch.int32))


def _router_setup(ctx, inputs, output):
    h, weight, bias, _tau, valid = inputs
    ctx.save_for_backward(h, weight, valid, output[0])
    ctx.bias_dtype = bias.dtype


def _router_backward(ctx, grad_p, _grad_index, _grad_count):
    """The routers' gradient (python_kernels/router.py's autograd Functions derive it), with
    c = dL/dz = g p (1 - p) per score and c_r its share of row r (c / n_b on each valid row of
    a sequence): dh_r = c_r w, dw = sum_r c_r h_r, db = sum c."""
    h, weight, valid, p = ctx.saved_tensors
    c = grad_p * p * (1 - p)
    if h.dim() == 2:
        c_rows = c
    else:
        vf = torch.ones(h.shape[:-1], device=h.device) if valid is None else valid.float()
        c_rows = vf * (c / vf.sum(1).clamp(min=1))[:, None]
    w = weight.float().reshape(-1)
    dh = (c_rows[..., None] * w).to(h.dtype)
    dw = (c_rows.reshape(-1) @ h.float().reshape(-1, h.shape[-1])).view(weight.shape).to(weight.dtype)
    return dh, dw, c.sum().view(1).to(ctx.bias_dtype), None, None


@_functional_op("route_tokens", "(Tensor h, Tensor weight, Tensor bias, float tau, Tensor? valid) "
                "-> (Tensor, Tensor, Tensor)", _router_fake, _router_backward, _router_setup)
def _route_tokens_op(h, weight, bias, tau, valid):
    if backend("route_tokens", h.device) == "triton":
        return _router_triton.token_scores(h, weight.reshape(-1), bias, tau, valid)
    with torch.no_grad():
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
    tau = _check_router("route_sequences", h, weight, bias, tau, valid, "B, T, D")
    if torch.compiler.is_compiling():
        return torch.ops.layerroute.route_sequences(h, weight, bias, tau, valid)
    if backend("route_sequences", h.device) == "triton":
        return _router_triton.RouteSequences.apply(h, weight, bias, tau, valid)
    return route_sequences_ref(h, weight, bias, tau, valid)


@_functional_op("route_sequences", "(Tensor h, Tensor weight, Tensor bias, float tau, Tensor? valid) "
                "-> (Tensor, Tensor, Tensor)", _router_fake, _router_backward, _router_setup)
def _route_sequences_op(h, weight, bias, tau, valid):
    if backend("route_sequences", h.device) == "triton":
        return _router_triton.sequence_scores(h, weight.reshape(-1), bias, tau, valid)
    with torch.no_grad():
        return route_sequences_ref(h, weight, bias, tau, valid)


# ---------------------------------------------------------------------------------------------
# Decode attention over listed rows (docs/DESIGN.md section 4): one query token per row, each row a
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
    returned in q's dtype: softmax over the visible slots (valid), zeros where none is."""
    HKV = k.shape[1]
    n = q.shape[0]
    G = q.shape[1] // HKV
    if rows is None:
        kk, vv, seen = k[:, :, :n_keys], v[:, :, :n_keys], valid[:, :n_keys]
    else:
        kk, vv, seen = k[rows, :, :n_keys], v[rows, :, :n_keys], valid[rows, :n_keys]
    # The G query heads of a KV head side by side against its keys: no copy of K/V per head.
    qq = q.view(n, HKV, G, -1).to(torch.float32)
    if n_keys and bool(seen.all()):    # every slot visible: one fused call, no mask, no copy
        o = torch.nn.functional.scaled_dot_product_attention(
            qq, kk.to(torch.float32), vv.to(torch.float32), scale=scale)
        return o.reshape(n, -1, q.shape[2]).to(q.dtype)
    scores = qq @ kk.to(torch.float32).transpose(-1, -2) * scale              # [n, HKV, G, L]
    vv = vv.to(torch.float32).masked_fill(~seen[:, None, :, None], 0.0)   # invisible: no 0 x NaN
    seen = seen[:, None, None, :]
    p = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1)
    p = torch.where(seen.any(-1, keepdim=True), p, 0.0)                    # no visible key: zeros
    return (p @ vv).reshape(n, -1, q.shape[2]).to(q.dtype)


def decode_attention_ref(q, k, v, valid, index, count, length, scale, out=None, *, check=True) -> torch.Tensor:
    if check:
        _check_decode_attention(q, k, v, valid, index, count, length, scale, out)
    n, rows = _listed_rows("decode_attention", index, count, k.shape[0], unique=False)
    y = torch.empty_like(q) if out is None else out
    if n:
        n_keys = min(length.item(), k.shape[2])
        y[:n] = decode_attention_math(q[:n], k, v, valid, scale, n_keys, rows)
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
    *,
    check: bool = True,
) -> torch.Tensor:
    """Grouped-query attention of one query per listed row against its sequence's cache.

    q [M, H, D] in gathered space (row i < count is sequence index[i]); k, v [B, HKV, S, D] and
    valid bool [B, S] (a KVCache layer); index int32 [M], count int32 [1]; length int [1]: only
    slots s < length are read (the filled part of the cache). Returns out [M, H, D] (q's dtype)
    with, for i < count, out[i, h] = softmax over the visible slots s of
    scale * q[i, h] . k[index[i], h // (H / HKV), s], applied to v; zeros where no slot is
    visible; rows from count on are not written. Inference only.
    """
    if check:
        _check_decode_attention(q, k, v, valid, index, count, length, scale, out)
    out = torch.empty_like(q) if out is None else out
    _decode_attention_op(q, k, v, valid, index, count, length, float(scale), out)
    return out


@_custom_op("decode_attention", "(Tensor q, Tensor k, Tensor v, Tensor valid, Tensor index, "
            "Tensor count, Tensor length, float scale, Tensor(a!) out) -> ()", ("out",))
def _decode_attention_op(q, k, v, valid, index, count, length, scale, out) -> None:
    if backend("decode_attention", q.device) == "triton":
        _decode_attention_triton.decode_attention(q, k, v, valid, index, count, length, scale, out)
    else:
        decode_attention_ref(q, k, v, valid, index, count, length, scale, out, check=False)


# ---------------------------------------------------------------------------------------------
# Fused block stages (docs/DESIGN.md section 4; issue 13): the kernels layerroute_rt.block runs a
# block with, at prefill and at decode. Each reads its row list and count from device memory
# (python_kernels/<op>.py); the references below read the count on the host (the oracle and the
# CPU path) and, for a list of every row in order (every sequence runs the block), read and write
# whole tensors (_listed_rows: no gather, no scatter). Inference only. Row spaces: h is the
# residual [N, D]; a row list (index int32 [M], count int32 [1]) names the rows of h that run,
# and the stages' intermediate tensors (q, the attention output, the MLP activation) are in
# gathered space (row i < count is h's index[i]).
# RoPE angles are positions x inv_freq in float32 (rope_inv_freq: the engine's one table);
# a row r of h caches its K/V at sequence r // rows_per_seq, slot slot[0] + r % rows_per_seq.

try:
    from python_kernels import linear_scatter_add as _linear_scatter_add_triton
    from python_kernels import norm_gate_up as _norm_gate_up_triton
    from python_kernels import norm_linear as _norm_linear_triton
    from python_kernels import qkv_rope as _qkv_rope_triton
    from python_kernels import route_kv as _route_kv_triton

    _TRITON_KERNELS.update(("route_kv", "qkv_rope", "linear_scatter_add", "norm_gate_up",
                            "norm_linear"))
except ImportError:  # no Triton: the references run
    _route_kv_triton = _qkv_rope_triton = _linear_scatter_add_triton = None
    _norm_gate_up_triton = _norm_linear_triton = None


def rope_inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    """RoPE's inverse frequencies float32 [head_dim / 2], computed as HF computes them: the
    one table the model and the engine use."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float()
                           / head_dim)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., hd] in `dtype` at integer positions [...], the angles in float32."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [..., heads, hd] with cos and sin [..., hd] from rope_cos_sin
    (broadcast over the heads): the one reference, which model.py runs too."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _check_lora_pair(op, lora_A, lora_B, n_out: int, k_in: int, x: torch.Tensor) -> None:
    if (lora_A is None) != (lora_B is None):
        raise ValueError(f"{op}: `lora_A` and `lora_B` must both be tensors or both be None")
    if lora_A is None:
        return
    if lora_A.dim() != 2 or lora_A.shape[1] != k_in or lora_A.shape[0] == 0:
        raise ValueError(f"{op}: `lora_A` must be [r, {k_in}] with r >= 1, got {list(lora_A.shape)}")
    if lora_B.shape != (n_out, lora_A.shape[0]):
        raise ValueError(f"{op}: `lora_B` must be [{n_out}, {lora_A.shape[0]}], got {list(lora_B.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in _ROW_DTYPES:
            raise TypeError(f"{op}: `{name}` must be float32, float16 or bfloat16, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: `{name}` must be contiguous")
        _check_device(op, t, name, x, "h")


def _check_weight(op, weight, k_in: int, x: torch.Tensor, rows: int | None = None) -> None:
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: `weight` must have the dtype of `h` ({x.dtype}), got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[1] != k_in or (rows is not None and weight.shape[0] != rows):
        want = f"[{rows if rows is not None else 'N'}, {k_in}]"
        raise ValueError(f"{op}: `weight` must be {want}, got {list(weight.shape)}")
    if not weight.is_contiguous():
        raise ValueError(f"{op}: `weight` must be contiguous")
    _check_device(op, weight, "weight", x, "h")


def _check_out(op, name, out, shape, dtype, x) -> None:
    if out.dtype != dtype:
        raise TypeError(f"{op}: `{name}` must be {dtype}, got {out.dtype}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{op}: `{name}` must have shape {list(shape)}, got {list(out.shape)}")
    if not out.is_contiguous():
        raise ValueError(f"{op}: `{name}` must be contiguous")
    _check_device(op, out, name, x, "h")


def _check_kv_write(op, h, weight, bias, positions, inv_freq, k_cache, v_cache, valid, slot,
                    rows_per_seq, n_heads: int | None) -> None:
    """The K/V write of qkv_rope and route_kv: weight [H hd + 2 HKV hd, D] with H = n_heads
    (None: any), bias, positions int64 [N], the cache layer and its slot."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: `k_cache` and `v_cache` must be [B, HKV, S, hd] alike, got "
                         f"{list(k_cache.shape)} and {list(v_cache.shape)}")
    B, hkv, S, hd = k_cache.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != h.dtype or not t.is_contiguous():
            raise ValueError(f"{op}: `{name}` must be contiguous in h's dtype ({h.dtype})")
        _check_device(op, t, name, h, "h")
    if hd % 2:
        raise ValueError(f"{op}: the head dim must be even for RoPE, got {hd}")
    n_q = weight.shape[0] - 2 * hkv * hd if weight.dim() == 2 else -1
    if n_q < 0 or n_q % hd or (n_heads is not None and n_q != n_heads * hd):
        raise ValueError(f"{op}: `weight` must have H x {hd} + 2 x {hkv} x {hd} rows (q, k, v; "
                         f"hd and HKV from `k_cache`), got {list(weight.shape)}")
    _check_weight(op, weight, h.shape[1], h)
    if bias is None or bias.shape != (weight.shape[0],) or bias.dtype != h.dtype:
        raise ValueError(f"{op}: `bias` must be [{weight.shape[0]}] in h's dtype")
    if positions.dtype != torch.int64 or positions.shape != (h.shape[0],):
        raise ValueError(f"{op}: `positions` must be int64 [{h.shape[0]}] (one per row of h), got "
                         f"{positions.dtype} {list(positions.shape)}")
    if inv_freq.dtype != torch.float32 or inv_freq.shape != (hd // 2,):
        raise ValueError(f"{op}: `inv_freq` must be float32 [{hd // 2}], got {inv_freq.dtype} "
                         f"{list(inv_freq.shape)}")
    if valid.dtype != torch.bool or valid.shape != (B, S) or not valid.is_contiguous():
        raise ValueError(f"{op}: `valid` must be contiguous bool [{B}, {S}], got {valid.dtype} "
                         f"{list(valid.shape)}")
    if slot.dtype != torch.int64 or slot.shape != (1,):
        raise ValueError(f"{op}: `slot` must be int64 [1], got {slot.dtype} {list(slot.shape)}")
    if isinstance(rows_per_seq, bool) or not isinstance(rows_per_seq, int) or rows_per_seq < 1 \
            or h.shape[0] > B * rows_per_seq:
        raise ValueError(f"{op}: `rows_per_seq` must be an int >= 1 with rows of h "
                         f"({h.shape[0]}) <= B x rows_per_seq (B = {B}), got {rows_per_seq!r}")
    for name, t in (("positions", positions), ("inv_freq", inv_freq), ("valid", valid), ("slot", slot)):
        _check_device(op, t, name, h, "h")


def _write_kv_ref(h_rows, rows, weight, bias, lora_A, lora_B, scale, positions, inv_freq,
                  k_cache, v_cache, valid, slot, rows_per_seq, norm_weight, eps, q_too: bool):
    """The reference's norm -> projection -> RoPE -> cache write for the rows (int64; None:
    every row of h, in order) of h; returns q [n, H, hd] (RoPE applied) when q_too."""
    B, hkv, S, hd = k_cache.shape
    kv_dim = hkv * hd
    q_dim = weight.shape[0] - 2 * kv_dim
    n = h_rows.shape[0]
    x = rms_norm_ref(h_rows, norm_weight, eps)
    if q_too:
        y = _lora_linear_torch(x, weight, bias, lora_A, lora_B, scale)
    else:   # the k and v rows of the fused weight and of the LoRA's B
        y = _lora_linear_torch(x, weight[q_dim:], bias[q_dim:], lora_A,
                               None if lora_B is None else lora_B[q_dim:], scale)
    cos, sin = rope_cos_sin(positions if rows is None else positions[rows], inv_freq, y.dtype)
    rotated = y.shape[1] - kv_dim            # [q |] k: one RoPE for both
    qk = rope_ref(y[:, :rotated].reshape(n, -1, hd), cos, sin)
    k = qk[:, qk.shape[1] - hkv:]
    v = y[:, rotated:].reshape(n, hkv, hd)
    s0 = slot.item()
    if rows is None and n == B * rows_per_seq and 0 <= s0 <= S - rows_per_seq:
        # Every row, in order: sequence b's rows fill its slots s0 .. s0 + rows_per_seq - 1.
        k_cache[:, :, s0:s0 + rows_per_seq] = k.view(B, rows_per_seq, hkv, hd).transpose(1, 2)
        v_cache[:, :, s0:s0 + rows_per_seq] = v.view(B, rows_per_seq, hkv, hd).transpose(1, 2)
        valid[:, s0:s0 + rows_per_seq].fill_(True)
    else:
        if rows is None:
            rows = torch.arange(n, device=h_rows.device)
        b = rows // rows_per_seq
        s = s0 + rows % rows_per_seq
        k_cache[b, :, s] = k
        v_cache[b, :, s] = v
        valid[b, s] = True
    return qk[:, :qk.shape[1] - hkv] if q_too else None


# route_kv -------------------------------------------------------------------------------------


def _check_route_kv(h, router_w, router_b, tau, run, index, count, pred, executed, norm_weight,
                    eps, weight, bias, lora_A, lora_B, scale, positions, inv_freq, k_cache,
                    v_cache, valid, slot, rows_per_seq, compute_kv) -> None:
    op = "route_kv"
    _check_rows(op, h, "h")
    n = h.shape[0]
    if (router_w is None) == (run is None):
        raise ValueError(f"{op}: pass either a router (`router_w`, `router_b`) or the "
                         "decisions `run`, not both or neither")
    if router_w is not None:
        if router_b is None:
            raise ValueError(f"{op}: `router_b` is None but `router_w` is given")
        for name, t in (("router_w", router_w), ("router_b", router_b)):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise TypeError(f"{op}: `{name}` must be contiguous float32, got {t.dtype}")
            _check_device(op, t, name, h, "h")
        if router_w.shape != (h.shape[1],) or router_b.shape != (1,):
            raise ValueError(f"{op}: `router_w` must be [{h.shape[1]}] and `router_b` [1], got "
                             f"{list(router_w.shape)} and {list(router_b.shape)}")
        if index is None or count is None or pred is None or executed is None:
            raise ValueError(f"{op}: a router needs `index`, `count`, `pred` and `executed` to "
                             "write its decisions into")
        _check_out(op, "index", index, (n,), torch.int32, h)
        _check_out(op, "count", count, (1,), torch.int32, h)
        _check_out(op, "pred", pred, (), torch.bool, h) if pred.dim() == 0 else \
            _check_out(op, "pred", pred, (1,), torch.bool, h)
        _check_out(op, "executed", executed, (n,), torch.bool, h)
        tau = check_tau(tau, f"{op}: `tau`")
    else:
        _check_out(op, "run", run, (n,), torch.bool, h)
    if not isinstance(compute_kv, bool):
        raise TypeError(f"{op}: `compute_kv` must be a bool, got {type(compute_kv).__name__}")
    if compute_kv:
        _check_norm(op, norm_weight, eps, h)
        _check_kv_write(op, h, weight, bias, positions, inv_freq, k_cache, v_cache, valid, slot,
                        rows_per_seq, None)
        _check_lora_pair(op, lora_A, lora_B, weight.shape[0], h.shape[1], h)


def route_kv_ref(h, router_w, router_b, tau, run, index, count, pred, executed, norm_weight, eps,
                 weight, bias, lora_A, lora_B, scale, positions, inv_freq, k_cache, v_cache, valid,
                 slot, rows_per_seq, compute_kv: bool, *, check=True) -> None:
    if check:
        _check_route_kv(h, router_w, router_b, tau, run, index, count, pred, executed,
                        norm_weight, eps, weight, bias, lora_A, lora_B, scale, positions,
                        inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, compute_kv)
    N = h.shape[0]
    if router_w is not None:    # the row list as compact_rows lists it: rows in order, then -1
        decided = torch.sigmoid(h.float() @ router_w + router_b) >= tau
        executed.copy_(decided)
        listed = decided.nonzero().flatten()
        n_run = listed.numel()
        index[:n_run] = listed
        index[n_run:].fill_(-1)
        count.fill_(n_run)
        pred.fill_(n_run > 0)
    if compute_kv and N:
        # with a router, every row (no second reading of the decision); else the rows `run` leaves out
        rows = None if router_w is not None else (~run).nonzero().flatten()
        if rows is not None and rows.numel() == N:
            rows = None                          # whole tensors
        if rows is None or rows.numel():
            _write_kv_ref(h if rows is None else h[rows], rows, weight, bias, lora_A, lora_B,
                          scale, positions, inv_freq, k_cache, v_cache, valid, slot,
                          rows_per_seq, norm_weight, eps, False)


def route_kv(h, router_w, router_b, tau, run, index, count, pred, executed, norm_weight, eps,
             weight, bias, lora_A, lora_B, scale, positions, inv_freq, k_cache, v_cache, valid,
             slot, rows_per_seq, compute_kv: bool, *, check: bool = True) -> None:
    """The route stage. With a router (router_w float32 [D], router_b [1], tau): row r of h
    [N, D] runs iff sigmoid(router_w . h[r] + router_b) >= tau; writes executed bool [N], index
    int32 [N] and count int32 [1] as compact_rows makes them, and pred bool (count > 0).
    Without one, `run` bool [N] gives the decisions. With compute_kv, K and V are written: with
    a router, of every row (the decision is made once per row; the body's qkv stage overwrites
    the running rows' K/V with its own), without one, of the rows `run` leaves out (input
    RMSNorm with norm_weight, the k/v rows of the fused qkv `weight`
    [q_dim + 2 kv_dim, D] and `bias`, LoRA A/B stacked as the engine stacks them, RoPE) written
    to the cache layer (k_cache, v_cache [B, HKV, S, hd], valid [B, S]) at slot[0] + r %
    rows_per_seq of sequence r // rows_per_seq. One launch on the Triton path."""
    if check:
        _check_route_kv(h, router_w, router_b, tau, run, index, count, pred, executed,
                        norm_weight, eps, weight, bias, lora_A, lora_B, scale, positions,
                        inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, compute_kv)
    tau = 0.0 if tau is None else float(tau)
    _route_kv_op(h, router_w, router_b, tau, run, index, count, pred, executed, norm_weight,
                 float(eps), weight, bias, lora_A, lora_B, float(scale), positions, inv_freq,
                 k_cache, v_cache, valid, slot, rows_per_seq, compute_kv)


@_custom_op("route_kv", "(Tensor h, Tensor? router_w, Tensor? router_b, float tau, Tensor? run, "
            "Tensor(a!)? index, Tensor(b!)? count, Tensor(c!)? pred, Tensor(d!)? executed, "
            "Tensor norm_weight, float eps, Tensor weight, Tensor bias, Tensor? lora_A, "
            "Tensor? lora_B, float scale, Tensor positions, Tensor inv_freq, Tensor(e!) k_cache, "
            "Tensor(f!) v_cache, Tensor(g!) valid, Tensor slot, int rows_per_seq, bool compute_kv) -> ()",
            ("index", "count", "pred", "executed", "k_cache", "v_cache", "valid"))
def _route_kv_op(h, router_w, router_b, tau, run, index, count, pred, executed, norm_weight, eps,
                 weight, bias, lora_A, lora_B, scale, positions, inv_freq, k_cache, v_cache,
                 valid, slot, rows_per_seq, compute_kv) -> None:
    if backend("route_kv", h.device) == "triton":
        _route_kv_triton.route_kv(h, router_w, router_b, tau, run, index, count, pred, executed,
                                  norm_weight, float(eps), weight, bias, lora_A, lora_B,
                                  float(scale), positions, inv_freq, k_cache, v_cache, valid,
                                  slot, rows_per_seq, compute_kv)
    else:
        route_kv_ref(h, router_w, router_b, tau, run, index, count, pred, executed, norm_weight,
                     eps, weight, bias, lora_A, lora_B, scale, positions, inv_freq, k_cache,
                     v_cache, valid, slot, rows_per_seq, compute_kv, check=False)


# qkv_rope -------------------------------------------------------------------------------------


def _check_qkv_rope(h, index, count, norm_weight, eps, weight, bias, lora_A, lora_B, scale,
                    positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, q_out):
    op = "qkv_rope"
    _check_rows(op, h, "h")
    _check_index_count(op, index, count, h, "h")
    _check_norm(op, norm_weight, eps, h)
    hd = k_cache.shape[-1] if k_cache.dim() == 4 else 1
    if q_out.dim() != 2 or q_out.shape[0] != index.shape[0] or q_out.shape[1] % hd:
        raise ValueError(f"{op}: `q_out` must be [M, H x hd] = [{index.shape[0]}, H x {hd}] (M "
                         f"from `index`), got {list(q_out.shape)}")
    _check_out(op, "q_out", q_out, tuple(q_out.shape), h.dtype, h)
    _check_kv_write(op, h, weight, bias, positions, inv_freq, k_cache, v_cache, valid, slot,
                    rows_per_seq, q_out.shape[1] // hd)
    _check_lora_pair(op, lora_A, lora_B, weight.shape[0], h.shape[1], h)


def qkv_rope_ref(h, index, count, norm_weight, eps, weight, bias, lora_A, lora_B, scale,
                 positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, q_out, *, check=True) -> None:
    if check:
        _check_qkv_rope(h, index, count, norm_weight, eps, weight, bias, lora_A, lora_B, scale,
                        positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, q_out)
    n, rows = _listed_rows("qkv_rope", index, count, h.shape[0], unique=False)
    if n:
        q = _write_kv_ref(h if rows is None else h[rows], rows, weight, bias, lora_A, lora_B,
                          scale, positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq,
                          norm_weight, eps, True)
        q_out[:n] = q.reshape(n, -1)


def qkv_rope(h, index, count, norm_weight, eps, weight, bias, lora_A, lora_B, scale, positions,
             inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, q_out, *,
             check: bool = True) -> None:
    """The qkv stage: for i < count, row r = index[i] of h [N, D]: xn = RMSNorm(h[r]) with
    norm_weight; [q | k | v] = xn weight^T + bias + scale (xn A^T) B^T; q_out[i] = RoPE(q) at
    positions[r] ([M, H hd]); K = RoPE(k) and V = v written to the cache layer at slot
    slot[0] + r % rows_per_seq of sequence r // rows_per_seq, whose valid entry is set. Rows of
    q_out from count on are not written. One launch on the Triton path."""
    if check:
        _check_qkv_rope(h, index, count, norm_weight, eps, weight, bias, lora_A, lora_B, scale,
                        positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, q_out)
    _qkv_rope_op(h, index, count, norm_weight, float(eps), weight, bias, lora_A, lora_B,
                 float(scale), positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq,
                 q_out)


@_custom_op("qkv_rope", "(Tensor h, Tensor index, Tensor count, Tensor norm_weight, float eps, "
            "Tensor weight, Tensor bias, Tensor? lora_A, Tensor? lora_B, float scale, "
            "Tensor positions, Tensor inv_freq, Tensor(a!) k_cache, Tensor(b!) v_cache, "
            "Tensor(c!) valid, Tensor slot, int rows_per_seq, Tensor(d!) q_out) -> ()",
            ("k_cache", "v_cache", "valid", "q_out"))
def _qkv_rope_op(h, index, count, norm_weight, eps, weight, bias, lora_A, lora_B, scale,
                 positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, q_out) -> None:
    if backend("qkv_rope", h.device) == "triton":
        _qkv_rope_triton.qkv_rope(h, index, count, norm_weight, float(eps), weight, bias, lora_A,
                                  lora_B, float(scale), positions, inv_freq, k_cache, v_cache,
                                  valid, slot, rows_per_seq, q_out)
    else:
        qkv_rope_ref(h, index, count, norm_weight, eps, weight, bias, lora_A, lora_B, scale,
                     positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, q_out,
                     check=False)


# linear_scatter_add ---------------------------------------------------------------------------


def _check_linear_scatter_add(x, index, count, weight, lora_A, lora_B, scale, residual):
    op = "linear_scatter_add"
    _check_rows(op, x, "x")
    _check_rows(op, residual, "residual")
    _check_index_count(op, index, count, residual, "residual")
    if x.shape[0] != index.shape[0]:
        raise ValueError(f"{op}: `x` must have M = {index.shape[0]} rows (from `index`), got "
                         f"{x.shape[0]}")
    if residual.dtype != x.dtype:
        raise TypeError(f"{op}: `residual` must have the dtype of `x` ({x.dtype}), got "
                        f"{residual.dtype}")
    _check_device(op, x, "x", residual, "residual")
    _check_weight(op, weight, x.shape[1], x, residual.shape[1])
    _check_lora_pair(op, lora_A, lora_B, weight.shape[0], x.shape[1], x)


def linear_scatter_add_ref(x, index, count, weight, lora_A, lora_B, scale, residual, *, check=True) -> None:
    if check:
        _check_linear_scatter_add(x, index, count, weight, lora_A, lora_B, scale, residual)
    n, rows = _listed_rows("linear_scatter_add", index, count, residual.shape[0], unique=True)
    if n:
        y = _lora_linear_torch(x[:n], weight, None, lora_A, lora_B, scale)
        if rows is None:
            residual.add_(y)
        else:
            residual[rows] = residual[rows] + y


def linear_scatter_add(x, index, count, weight, lora_A, lora_B, scale, residual, *,
                       check: bool = True) -> None:
    """residual[index[i]] += x[i] weight^T + scale (x[i] A^T) B^T for i < count (o_proj and
    down_proj with the residual add in the epilogue). x [M, K] in gathered space, weight
    [D, K], residual [N, D] (x's dtype); index[:count] unique rows of the residual. The product
    is rounded to the residual's dtype, then the sum. One launch on the Triton path."""
    if check:
        _check_linear_scatter_add(x, index, count, weight, lora_A, lora_B, scale, residual)
    _linear_scatter_add_op(x, index, count, weight, lora_A, lora_B, float(scale), residual)


@_custom_op("linear_scatter_add", "(Tensor x, Tensor index, Tensor count, Tensor weight, "
            "Tensor? lora_A, Tensor? lora_B, float scale, Tensor(a!) residual) -> ()", ("residual",))
def _linear_scatter_add_op(x, index, count, weight, lora_A, lora_B, scale, residual) -> None:
    if backend("linear_scatter_add", x.device) == "triton":
        _linear_scatter_add_triton.linear_scatter_add(x, index, count, weight, lora_A, lora_B,
                                                      float(scale), residual)
    else:
        linear_scatter_add_ref(x, index, count, weight, lora_A, lora_B, scale, residual,
                               check=False)


# norm_gate_up ---------------------------------------------------------------------------------


def _check_norm_gate_up(h, index, count, norm_weight, eps, weight, lora_A, lora_B, scale, out):
    op = "norm_gate_up"
    _check_rows(op, h, "h")
    _check_index_count(op, index, count, h, "h")
    _check_norm(op, norm_weight, eps, h)
    _check_weight(op, weight, h.shape[1], h)
    if weight.shape[0] % 2:
        raise ValueError(f"{op}: `weight` must be [2 I, D] (gate rows, then up rows), got "
                         f"{list(weight.shape)}")
    _check_out(op, "out", out, (index.shape[0], weight.shape[0] // 2), h.dtype, h)
    _check_lora_pair(op, lora_A, lora_B, weight.shape[0], h.shape[1], h)


def norm_gate_up_ref(h, index, count, norm_weight, eps, weight, lora_A, lora_B, scale, out, *, check=True) -> None:
    if check:
        _check_norm_gate_up(h, index, count, norm_weight, eps, weight, lora_A, lora_B, scale, out)
    n, rows = _listed_rows("norm_gate_up", index, count, h.shape[0], unique=False)
    if n:
        gu = _lora_linear_torch(rms_norm_ref(h if rows is None else h[rows], norm_weight, eps),
                                weight, None, lora_A, lora_B, scale)
        inter = out.shape[1]
        torch.mul(torch.nn.functional.silu(gu[:, :inter]), gu[:, inter:], out=out[:n])


def norm_gate_up(h, index, count, norm_weight, eps, weight, lora_A, lora_B, scale, out, *,
                 check: bool = True) -> None:
    """out[i] = silu(g) * u with [g | u] = xn weight^T + scale (xn A^T) B^T and xn =
    RMSNorm(h[index[i]]) with norm_weight, for i < count (post_attention_layernorm, gate_proj,
    up_proj and the activation). weight [2 I, D] (gate rows first); out [M, I] in h's dtype,
    rows from count on not written. One launch on the Triton path."""
    if check:
        _check_norm_gate_up(h, index, count, norm_weight, eps, weight, lora_A, lora_B, scale, out)
    _norm_gate_up_op(h, index, count, norm_weight, float(eps), weight, lora_A, lora_B,
                     float(scale), out)


@_custom_op("norm_gate_up", "(Tensor h, Tensor index, Tensor count, Tensor norm_weight, "
            "float eps, Tensor weight, Tensor? lora_A, Tensor? lora_B, float scale, "
            "Tensor(a!) out) -> ()", ("out",))
def _norm_gate_up_op(h, index, count, norm_weight, eps, weight, lora_A, lora_B, scale, out) -> None:
    if backend("norm_gate_up", h.device) == "triton":
        _norm_gate_up_triton.norm_gate_up(h, index, count, norm_weight, float(eps), weight,
                                          lora_A, lora_B, float(scale), out)
    else:
        norm_gate_up_ref(h, index, count, norm_weight, eps, weight, lora_A, lora_B, scale, out,
                         check=False)


# norm_linear ----------------------------------------------------------------------------------


def _check_norm_linear(h, norm_weight, eps, weight, out):
    op = "norm_linear"
    _check_rows(op, h, "h")
    _check_norm(op, norm_weight, eps, h)
    _check_weight(op, weight, h.shape[1], h)
    _check_out(op, "out", out, (h.shape[0], weight.shape[0]), torch.float32, h)


def norm_linear_ref(h, norm_weight, eps, weight, out, *, check=True) -> torch.Tensor:
    if check:
        _check_norm_linear(h, norm_weight, eps, weight, out)
    out.copy_(torch.nn.functional.linear(rms_norm_ref(h, norm_weight, eps), weight))
    return out


def norm_linear(h, norm_weight, eps, weight, out, *, check: bool = True) -> torch.Tensor:
    """out = float32(RMSNorm(h) weight^T) (the final norm and the lm_head; the product rounded to
    h's dtype first, as F.linear in h's dtype). h [N, D], weight [V, D], out float32 [N, V].
    One launch on the Triton path."""
    if check:
        _check_norm_linear(h, norm_weight, eps, weight, out)
    _norm_linear_op(h, norm_weight, float(eps), weight, out)
    return out


@_custom_op("norm_linear", "(Tensor h, Tensor norm_weight, float eps, Tensor weight, "
            "Tensor(a!) out) -> ()", ("out",))
def _norm_linear_op(h, norm_weight, eps, weight, out) -> None:
    if backend("norm_linear", h.device) == "triton":
        _norm_linear_triton.norm_linear(h, norm_weight, float(eps), weight, out)
    else:
        norm_linear_ref(h, norm_weight, eps, weight, out, check=False)
