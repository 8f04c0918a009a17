"""What the launch wrappers ask of the device (cached per device). Not an op: the kernels' own
files size their launches with it."""
from __future__ import annotations

import functools

import torch

# Where there is no GPU (the interpreter): programs to aim for, so that tests see several.
CPU_MULTIPROCESSORS = 8


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (CPU_MULTIPROCESSORS elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_MULTIPROCESSORS


@functools.cache
def shared_memory_limit(device: torch.device) -> int | None:
    """Bytes of shared memory one program may use on a CUDA device (the opt-in maximum, the
    limit Triton checks a launch against); None elsewhere."""
    if device.type != "cuda":
        return None
    limit = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
    if limit is None:                               # an older torch: ask Triton's driver
        from triton.runtime import driver

        index = device.index if device.index is not None else torch.cuda.current_device()
        limit = driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return limit
