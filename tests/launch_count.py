"""Counting the launches of one decode step from outside (issue 13), on the CPU device path.

Every Triton launch (under the interpreter) and every torch op that would launch a kernel on
CUDA: the aten ops a TorchDispatchMode sees, less views, metadata and bare allocations (which
launch nothing); a compiled (C++ / CUDA) op counts one; a Python custom op of layerroute_rt.ops
(ops.PYTHON_OPS) counts what its implementation launches. Ops run inside a Triton launch (the interpreter's own host copies) are not
counted. A host read of a tensor (aten._local_scalar_dense) launches no kernel either; the
CPU path reads each block's predicate this way, standing in for a CUDA graph's IF node.

Per block costs come from steps of models with 2 and 3 blocks whose blocks all sit in one
category: cost per block = C(3) - C(2), fixed cost = C(2) - 2 x (cost per block).

Run `python tests/launch_count.py` (TRITON_INTERPRET=1 is set) to print the table.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# Ops that launch no kernel: allocations without a fill, metadata, host reads.
_NO_LAUNCH = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
    "lift_fresh", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "resize_",
    "set_", "is_nonzero", "_to_copy_meta", "record_stream", "_has_compatible_shallow_copy_type",
}


class _LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.aten: list[str] = []
        self.triton: list[str] = []
        self.in_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from layerroute_rt import ops

        impl = ops.PYTHON_OPS.get(func._schema.name)
        if impl is not None and not self.in_triton:
            with self:            # a Python custom op: count what its implementation launches
                return impl(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if self.in_triton:
            return out
        name = func.overloadpacket.__name__
        if func.namespace == "aten" and not func.is_view and name not in _NO_LAUNCH:
            self.aten.append(str(func))
        elif func.namespace not in ("aten", "prim"):
            self.aten.append(str(func))           # a compiled (C++ / CUDA) op: one kernel
        return out


@contextlib.contextmanager
def count_launches():
    """Yields a counter: .aten (ops that would launch) and .triton (kernel names)."""
    from triton.runtime import interpreter

    counter = _LaunchCounter()
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            counter.triton.append(self.fn.__name__)
        counter.in_triton += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            counter.in_triton -= 1

    interpreter.InterpretedFunction.run = run
    try:
        with counter:
            yield counter
    finally:
        interpreter.InterpretedFunction.run = original


def _model(path, layers: int, granularity: str, kv_policy: str, bias: float):
    """The tiny model with `layers` blocks, LoRA (random, unmerged-able) and routers that run
    (bias > 0) or skip (bias < 0) every token."""
    import layerroute_rt as lr
    from qwen_factory import save_random_qwen2

    d = path / f"l{layers}"
    if not d.exists():
        save_random_qwen2(d, num_hidden_layers=layers)
    model = lr.load(d)
    model.randomize_adapter(seed=1)
    with torch.no_grad():
        for b in model.blocks:
            b.router.weight.zero_()
            b.router.bias.fill_(bias)
    model.lr_config = dataclasses.replace(model.lr_config, granularity=granularity,
                                          kv_policy=kv_policy)
    return model


def step_launches(model, tau: float = 0.5, skip_layers=(), merge: bool = True) -> int:
    """Launches of one decode step (and its greedy argmax) at batch 1 after a prefill, every op
    on its Triton kernel, host_counts=False."""
    import layerroute_rt as lr

    engine = lr.InferenceModel(model, merge=merge, host_counts=False)
    skip = engine.skip_set(list(skip_layers))
    ids = torch.tensor([[5, 9, 200, 3]])
    cache = engine.new_cache(1, 8)
    logits, _ = engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), cache, tau, skip)
    state = engine.decode_state(cache)
    state.tokens.copy_(logits.argmax(-1))
    nxt = torch.zeros(1, dtype=torch.long)
    old = os.environ.get("LAYERROUTE_BACKEND")
    os.environ["LAYERROUTE_BACKEND"] = "triton"
    try:
        with count_launches() as c:
            engine.decode_step(state, cache, tau, skip)
            torch.argmax(state.logits, -1, out=nxt)
    finally:
        if old is None:
            os.environ.pop("LAYERROUTE_BACKEND")
        else:
            os.environ["LAYERROUTE_BACKEND"] = old
    return len(c.aten) + len(c.triton)


CATEGORIES = {
    # name: (granularity, kv_policy, router bias, tau, all blocks in skip_layers)
    "running block (token router)": ("token", "compute", 10.0, 0.5, False),
    "running block (tau 0, no router)": ("token", "compute", 10.0, 0.0, False),
    "router-skipped block (token, compute)": ("token", "compute", -10.0, 0.5, False),
    "router-skipped block (token, drop)": ("token", "drop", -10.0, 0.5, False),
    "skipped block (sequence, compute)": ("sequence", "compute", -10.0, 0.5, False),
    "skipped block (sequence, drop)": ("sequence", "drop", -10.0, 0.5, False),
    "running block (sequence)": ("sequence", "compute", 10.0, 0.5, False),
    "skip_layers block": ("token", "compute", 10.0, 0.5, True),
}


def measure(path, name: str, merge: bool = True) -> tuple[int, int]:
    """(launches per block, fixed launches per step) of a category."""
    granularity, kv_policy, bias, tau, skip_all = CATEGORIES[name]
    counts = {}
    for layers in (2, 3):
        model = _model(path, layers, granularity, kv_policy, bias)
        counts[layers] = step_launches(model, tau, range(layers) if skip_all else (), merge)
    per_block = counts[3] - counts[2]
    return per_block, counts[2] - 2 * per_block


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as tmp:
        for merge in (True, False):
            for name in CATEGORIES:
                per_block, fixed = measure(Path(tmp), name, merge)
                print(f"merge={merge!s:5} {name:40s} per block {per_block:3d}   fixed {fixed:3d}")
