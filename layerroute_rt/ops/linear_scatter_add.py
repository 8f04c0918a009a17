"""linear_scatter_add, a block stage: residual[index[i]] += x[i] W^T (+ LoRA), the o_proj and
down_proj of the listed rows added back into the residual (row lists: the package docstring). Inference only."""

from __future__ import annotations

from ._checks import _check_device, _check_index_count, _check_lora_pair, _check_rows, _check_weight, _listed_rows
from ._dispatch import _TRITON_KERNELS, _custom_op, backend
from .lora_linear import _lora_linear_torch


try:
    from python_kernels import linear_scatter_add as _linear_scatter_add_triton

    _TRITON_KERNELS.add("linear_scatter_add")
except ImportError:  # no Triton: the reference runs
    _linear_scatter_add_triton = None


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
