"""compact_rows: the row list of a bool mask [N], as the other ops take it: index int32 [N]
(the true rows in order, then -1) and count int32 [1] on the device (docs/DESIGN.md section 4).
The compiled extension has the kernel; its fake impl is registered here."""

from __future__ import annotations

import torch

from ._dispatch import _compiled_op, backend


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
