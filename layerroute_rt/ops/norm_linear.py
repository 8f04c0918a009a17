"""norm_linear: the final RMSNorm and a linear layer without bias (the lm_head) over every row
of h [N, D] (docs/DESIGN.md section 4). Inference only."""

from __future__ import annotations

import torch

from ._checks import _check_norm, _check_out, _check_rows, _check_weight
from ._dispatch import _TRITON_KERNELS, _custom_op, backend
from .reference import rms_norm_ref


try:
    from python_kernels import norm_linear as _norm_linear_triton

    _TRITON_KERNELS.add("norm_linear")
except ImportError:  # no Triton: the reference runs
    _norm_linear_triton = None


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
