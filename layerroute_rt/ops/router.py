"""Routers (docs/DESIGN.md section 1): p = sigmoid(w . h + b) per token, or per sequence on the mean
of its valid rows, computed in float32 whatever h's dtype; the decision p >= tau; the rows
that run, listed as compact_rows lists them, with their count written on the device.
Triton kernels and autograd Functions in python_kernels/router.py; p is differentiable with
respect to h, weight and bias, index and count are not."""

from __future__ import annotations

import torch

from ..config import check_tau
from ._checks import _ROW_DTYPES, _check_device
from ._dispatch import _TRITON_KERNELS, _functional_op, backend
from .compact_rows import compact_rows_ref


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
