"""lora_linear: a frozen linear layer with a LoRA adapter, y = x W^T + b + s (x A^T) B^T, fused
in python_kernels/lora_linear.py (forward and backward). With a row list (index, count) it
computes only the listed rows, the count staying on the device: inference only, as is out=."""

from __future__ import annotations

import torch

from ._checks import _ROW_DTYPES, _check_device, _check_index_count, _check_rows, _live_rows
from ._dispatch import _TRITON_KERNELS, _functional_op, backend


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
