"""The K/V write that qkv_rope and route_kv share: its checks and its torch reference (input
RMSNorm, projection, RoPE, cache write)."""

from __future__ import annotations

import torch

from ._checks import _check_device, _check_weight
from .lora_linear import _lora_linear_torch
from .reference import rms_norm_ref, rope_cos_sin, rope_ref


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
