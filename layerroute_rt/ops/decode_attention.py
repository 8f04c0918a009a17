"""Decode attention over listed rows (docs/DESIGN.md section 4): one query token per row, each row a
sequence of the KV cache; count and length stay on the device. Triton kernel in
python_kernels/decode_attention.py."""

from __future__ import annotations

import torch

from ._checks import _ROW_DTYPES, _check_device, _listed_rows
from ._dispatch import _TRITON_KERNELS, _custom_op, backend


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
