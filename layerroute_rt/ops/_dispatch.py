"""The dispatch machinery every op shares (docs/DESIGN.md section 4): the backend choice
(compiled extension > Triton > torch reference, or LAYERROUTE_BACKEND), and the registration of
the compiled ops' fakes and of the torch.library custom ops defined in Python."""

from __future__ import annotations

import os

import torch


BACKENDS = ("torch", "triton", "cuda")


try:
    from layerroute_rt import _C  # noqa: F401  (loading it registers torch.ops.layerroute.*)

    _EXTENSION_ERROR: str | None = None
except ImportError as exc:
    _EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"


# Dispatch keys of the device types the extension can have kernels for.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


# (op, device type) pairs with a compiled kernel, filled by _compiled_op at import so that
# dispatch is a set lookup torch.compile can trace.
_COMPILED_KERNELS: set[tuple[str, str]] = set()


def extension_error() -> str | None:
    """Why `layerroute_rt._C` failed to import, or None when it is loaded."""
    return _EXTENSION_ERROR


# Ops with a Triton kernel (python_kernels/<op>.py): each op module adds its name
# when its kernel module imports (that is, when Triton is installed).
_TRITON_KERNELS: set[str] = set()


def _triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "") == "1"


def backend(op: str, device: torch.device) -> str:
    """The backend that runs `op` on `device`: LAYERROUTE_BACKEND if set, else the best one
    (compiled extension > Triton > torch reference)."""
    forced = os.environ.get("LAYERROUTE_BACKEND", "").strip().lower()
    compiled = (op, device.type) in _COMPILED_KERNELS
    if not forced:          # unforced, Triton serves CUDA tensors only: one environment read
        triton_ok = device.type == "cuda" and op in _TRITON_KERNELS
        return "cuda" if compiled else "triton" if triton_ok else "torch"
    triton_ok = op in _TRITON_KERNELS and _triton_runs_on(device)
    if forced not in BACKENDS:
        raise ValueError(f"LAYERROUTE_BACKEND={forced!r}: expected one of {', '.join(BACKENDS)}")
    if forced == "triton" and not triton_ok:
        why = (f"no Triton kernel exists for {op}" if op not in _TRITON_KERNELS else
               f"Triton runs on CUDA tensors, or on CPU only with TRITON_INTERPRET=1 (got {device})")
        raise RuntimeError(f"LAYERROUTE_BACKEND=triton: cannot run {op}: {why}")
    if forced == "cuda" and not compiled:
        why = _EXTENSION_ERROR or f"it has no {device.type} kernel for it (built without CUDA?)"
        raise RuntimeError(f"LAYERROUTE_BACKEND=cuda: layerroute_rt._C cannot run {op}: {why}")
    return forced


def _compiled_op(op: str):
    """Register the decorated function as the fake impl of layerroute::<op> and record the
    devices with a kernel for it; without the extension, only return the function."""

    def register(fake):
        if _EXTENSION_ERROR is None:
            torch.library.register_fake(f"layerroute::{op}")(fake)
            for device_type, key in _DISPATCH_KEYS.items():
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"layerroute::{op}", key):
                    _COMPILED_KERNELS.add((op, device_type))
        return fake

    return register


# Ops defined here as torch.library custom ops (layerroute::<op>, each with a fake impl), by
# qualified name: their Python implementation (the dispatch to the Triton kernel or the torch
# reference). tests/launch_count.py runs these directly to count the launches inside them.
PYTHON_OPS: dict[str, object] = {}


def _custom_op(name: str, schema: str, mutates: tuple[str, ...]):
    """Register the decorated function as the custom op layerroute::<name> (explicit schema:
    the same on every torch version), with a fake impl that returns nothing (these ops only
    write into their arguments). Returns a caller that goes through the op while torch.compile
    traces (so that the graph holds it, opaque) and runs the function itself in eager mode: the
    torch.library dispatch costs tens of microseconds a call, which a CPU decode step (six ops
    per block) would pay about 150 times. The op is torch.ops.layerroute.<name>."""

    def register(fn):
        op = torch.library.custom_op(f"layerroute::{name}", fn, mutates_args=mutates, schema=schema)
        op.register_fake(lambda *args, **kwargs: None)
        PYTHON_OPS[f"layerroute::{name}"] = fn

        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else fn(*args)

        return call

    return register


def _functional_op(name: str, schema: str, fake, backward, setup_context):
    """Register the decorated function (which returns new tensors, inference only: autograd
    stays above it) as the custom op layerroute::<name>, with its fake impl and its autograd
    formula (torch.library.register_autograd: `backward` in torch ops, so that torch.compile
    and AOT autograd trace it); returns the function. The public function calls the op while
    torch.compile traces, and in eager mode its own autograd path (the Triton kernels'
    autograd.Function, or the torch reference's graph), without the dispatch's cost."""

    def register(fn):
        op = torch.library.custom_op(f"layerroute::{name}", fn, mutates_args=(), schema=schema)
        op.register_fake(fake)
        op.register_autograd(backward, setup_context=setup_context)
        PYTHON_OPS[f"layerroute::{name}"] = fn
        return fn

    return register
