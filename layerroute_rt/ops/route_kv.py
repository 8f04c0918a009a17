"""route_kv, the first block stage: the router's decision per row, the row list of the rows that
run, and the K/V of the rows that skip (a skipped row still writes its cache) (row lists: the package docstring). Inference only."""

from __future__ import annotations

import torch

from ..config import check_tau
from ._checks import _check_device, _check_lora_pair, _check_norm, _check_out, _check_rows
from ._dispatch import _TRITON_KERNELS, _custom_op, backend
from ._kv_write import _check_kv_write, _write_kv_ref


try:
    from python_kernels import route_kv as _route_kv_triton

    _TRITON_KERNELS.add("route_kv")
except ImportError:  # no Triton: the reference runs
    _route_kv_triton = None


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
