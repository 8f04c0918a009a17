"""Argument checks shared by several ops, as in csrc/checks.h: TypeError for a dtype, ValueError
for the rest. Each names the op and the argument, and says what was expected.

Row lists (docs/DESIGN.md section 4): shapes are fixed (the most rows a step can have) and the
live row count stays on the device as an int32 tensor of shape [1]; kernels exit early past it,
so nothing syncs with the host. The references read the count on the host: they are the oracle
(and the CPU path)."""

from __future__ import annotations

import torch


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
