"""norm_gate_up, a block stage: post-attention RMSNorm, the fused gate/up projection with its
LoRA, and SiLU(gate) * up, over the listed rows (row lists: the package docstring). Inference only."""

from __future__ import annotations

import torch

from ._checks import _check_index_count, _check_lora_pair, _check_norm, _check_out, _check_rows, _check_weight, _listed_rows
from ._dispatch import _TRITON_KERNELS, _custom_op, backend
from .lora_linear import _lora_linear_torch
from .reference import rms_norm_ref


try:
    from python_kernels import norm_gate_up as _norm_gate_up_triton

    _TRITON_KERNELS.add("norm_gate_up")
except ImportError:  # no Triton: the reference runs
    _norm_gate_up_triton = None


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
