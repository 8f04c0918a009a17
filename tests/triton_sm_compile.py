"""Compile every Triton kernel for a CUDA architecture, without a GPU: `python
tests/triton_sm_compile.py 90` (or 80) builds, through Triton's own compiler and its bundled
ptxas, each kernel specialisation that the launch wrappers of python_kernels/ make at
Qwen2-family shapes (0.5B, 1.5B, 7B head layouts): the forward launches, the row-list (decode)
launches and the autograd backward launches (float32 adapters on the layer's dtype, as in
training), plus odd sizes; every shape in bf16, a shorter list in fp32 and fp16.

Nothing runs: a stand-in driver reports the target, and every launch is turned into Triton's
warm-up (compile, no launch), so outputs are garbage and never read. Autotuned kernels compile
every config their pruning keeps for the launch (or only the first with --first-config, which
is what LAYERROUTE_TRITON_AUTOTUNE=0 runs); the pruning sees the architecture's shared memory,
and each compiled config is checked against the bound the pruning uses. The GPU's autotuner
drops a config that fails in ptxas or needs more shared memory than the device has, so such a
config is reported, not failed, unless no config of the launch is usable; a kernel that is not
autotuned must fit the device's shared memory itself.

This is the CPU machine's check that the kernels, written and tested under TRITON_INTERPRET=1,
also lower to PTX and SASS (the interpreter accepts code the compiler rejects). Prints one JSON
line with what was compiled and what failed; exits 1 on any failure. Run it without
TRITON_INTERPRET (tests/test_triton_compile.py starts it in a subprocess).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "") == "1":
    sys.exit("triton_sm_compile: run without TRITON_INTERPRET=1 (kernels must be compiled, not interpreted)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.compiler.errors import CompileTimeAssertionFailure  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.errors import OutOfResources, PTXASError  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Every stage-kernel shape in bf16 (slow to compile; the CI runs a subset).
ALL_STAGE_SHAPES = os.environ.get("LAYERROUTE_COMPILE_ALL_STAGES", "") == "1"
# Shared memory one block may use (opt-in maximum), by architecture.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# The errors for which Triton's autotuner drops a config (any other stops the launch).
SKIPPED_BY_AUTOTUNER = (OutOfResources, CompileTimeAssertionFailure, PTXASError)
# Streaming multiprocessors of a part of each architecture (A100, RTX 3090, RTX 4090, H100
# SXM): they set decode_attention's split count, a constexpr.
MULTIPROCESSORS = {80: 108, 86: 84, 89: 128, 90: 132}


class _TargetDriver:
    """Triton's active driver, reduced to what compiling (not launching) asks of it."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class Recorder:
    """Turns launches into compilations and records each compiled specialisation."""

    def __init__(self, arch: int, first_config: bool):
        self.arch, self.first_config = arch, first_config
        self.compiled: dict[str, dict] = {}   # kernel name + specialisation -> metadata
        self.oversized: list[str] = []        # non-autotuned kernels over the shared limit
        self.autotuned: list[dict] = []       # per autotuned launch: configs usable / not
        self.dtypes: dict[str, set[str]] = {}  # kernel name -> dtypes of its first tensor
        self.bound_violations: list[str] = []  # lora_linear configs over its shared-memory bound

    def install(self) -> None:
        from python_kernels import device as device_info, lora_linear

        triton_driver.set_active(_TargetDriver(self.arch))
        # What the wrappers would read from the device: its shared memory (the lora_linear
        # pruning, the decode attention's stages) and multiprocessors (the split count).
        device_info.shared_memory_limit = lambda device: MAX_SHARED[self.arch]
        device_info.multiprocessors = lambda device: MULTIPROCESSORS[self.arch]
        jit_run, recorder = JITFunction.run, self

        def run(fn, *args, grid, warmup, **kwargs):
            start = time.perf_counter()
            kernel = jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
            key = f"{fn.__name__}[{kernel.hash[:12]}]"
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is not None:
                recorder.dtypes.setdefault(fn.__name__, set()).add(str(first.dtype).removeprefix("torch."))
            if key not in recorder.compiled:
                recorder.compiled[key] = {"shared": kernel.metadata.shared,
                                          "warps": kernel.metadata.num_warps,
                                          "seconds": round(time.perf_counter() - start, 2)}
            return kernel

        def autotuned_run(tuner, *args, **kwargs):
            kwargs.pop("warmup", None)
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)
            if recorder.first_config:
                configs = configs[:1]
            usable, unusable = [], []
            for config in configs:
                label = str(config)
                try:
                    kernel = tuner.fn.run(*args, warmup=True, **kwargs, **config.all_kwargs())
                except SKIPPED_BY_AUTOTUNER as exc:      # the GPU's autotuner skips these too
                    unusable.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    continue
                bound = lora_linear._shared_bound(config, args[0].element_size(), kwargs["R_PAD"]) \
                    if tuner.fn.__name__ == "_lora_linear_kernel" else None
                if bound is not None and kernel.metadata.shared > bound:
                    recorder.bound_violations.append(f"{label}: {kernel.metadata.shared} > bound {bound}")
                if kernel.metadata.shared > MAX_SHARED[recorder.arch]:
                    unusable.append(f"{label}: {kernel.metadata.shared} bytes of shared memory")
                else:
                    usable.append(label)
            tuner.nargs = None
            recorder.autotuned.append({"kernel": tuner.fn.__name__, "usable": len(usable),
                                       "unusable": unusable})
            if not usable:
                raise RuntimeError(f"{tuner.fn.__name__}: no config compiles and fits sm_{recorder.arch}: "
                                   + "; ".join(unusable))

        JITFunction.run = run
        Autotuner.run = autotuned_run

    def check_shared(self, names_autotuned: set[str]) -> None:
        for key, meta in self.compiled.items():
            if key.split("[")[0] not in names_autotuned and meta["shared"] > MAX_SHARED[self.arch]:
                self.oversized.append(f"{key}: {meta['shared']} bytes of shared memory > "
                                      f"{MAX_SHARED[self.arch]}")


def _cases():
    """(name, thunk) for every launch configuration to compile: every shape in bf16 (the GPU's
    dtype), a shorter list in fp32 and fp16 (their own code paths: IEEE dots, no split u)."""
    cases = []
    for dt in (torch.bfloat16, torch.float32, torch.float16):
        cases += _dtype_cases(dt, every_shape=dt == torch.bfloat16)
    return cases


def _dtype_cases(dt: torch.dtype, every_shape: bool):
    from python_kernels import (decode_attention, linear_scatter_add, lora_linear, norm_gate_up,
                                norm_linear, qkv_rope, route_kv, router)

    tag = str(dt).removeprefix("torch.")
    cases = []

    def add(name, fn):
        cases.append((f"{name} {tag}", fn))

    def pick(shapes, short, every=None):
        if every_shape:
            return shapes if every is None else [shapes[i] for i in every]
        return [shapes[i] for i in short]

    def rnd(*shape, dtype=dt, grad=False):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    def idx(n, hi):
        return torch.randint(0, hi, (n,), dtype=torch.int32)

    one = torch.ones(1, dtype=torch.int32)

    # --- lora_linear: (K in, N out) of Qwen2.5-0.5B's fused qkv, o_proj, gate_up, down, and odd
    # sizes; rank 8, 24 (three adapters stacked on the fused qkv) and 3.
    for rows_m, k, n, rank, bias, listed in pick([
        (1, 896, 1152, 0, True, True),     # decode, merged LoRA, listed rows (q/k/v + bias)
        (1, 896, 1152, 24, True, True),    # decode, unmerged stacked LoRA on the fused qkv
        (24, 896, 896, 8, False, True),    # decode, o_proj
        (64, 896, 9728, 0, False, True),   # decode, gate_up at batch 64
        (8, 4864, 896, 8, False, False),   # decode, down_proj, every row (no list)
        (4096, 896, 1152, 8, True, False),  # prefill
        (37, 100, 75, 3, True, True),      # odd sizes
        (16, 896, 1152, 192, True, True),  # three stacked rank-64 adapters (the fallback config)
        (2048, 896, 896, 64, False, False),  # rank 64 at prefill
    ], short=(1, 5, 6, 8)):
        def launch(rows_m=rows_m, k=k, n=n, rank=rank, bias=bias, listed=listed):
            x = rnd(max(rows_m, 4), k)
            A = rnd(rank, k, dtype=torch.float32) if rank else None
            B = rnd(n, rank, dtype=torch.float32) if rank else None
            index = idx(rows_m, x.shape[0]) if listed else None
            lora_linear.lora_linear(x if listed else x[:rows_m], rnd(n, k), rnd(n) if bias else None,
                                    A, B, 2.0, index, one if listed else None)
        add(f"lora_linear M={rows_m} K={k} N={n} r={rank} bias={bias} listed={listed}", launch)
    # Training: float32 adapters on the layer's dtype (forward storing u, the dx launch on W^T).
    for rows_m, k, n, rank in pick([(2048, 896, 1152, 8), (2048, 896, 896, 16), (33, 100, 75, 3)],
                                   short=(0, 2)):
        def train(rows_m=rows_m, k=k, n=n, rank=rank):
            x = rnd(rows_m, k, grad=True)
            A = rnd(rank, k, dtype=torch.float32, grad=True)
            B = rnd(n, rank, dtype=torch.float32, grad=True)
            lora_linear.lora_linear(x, rnd(n, k), rnd(n), A, B, 2.0).sum().backward()
        add(f"lora_linear backward M={rows_m} K={k} N={n} r={rank}", train)

    # --- router: decode (one tile compacts itself), prefill (scores + scan), sequences, and the
    # backward of both.
    for n_rows, d, with_valid in pick([(1, 896, False), (8, 896, True), (4096, 896, True),
                                       (2048, 1536, False), (37, 100, True)], short=(1, 2, 4)):
        def tokens(n_rows=n_rows, d=d, with_valid=with_valid):
            valid = torch.rand(n_rows) > 0.3 if with_valid else None
            router.token_scores(rnd(n_rows, d), rnd(d), rnd(1), 0.5, valid)
        add(f"router tokens N={n_rows} D={d} valid={with_valid}", tokens)
    for b, t, d, with_valid in pick([(1, 1, 896, False), (4, 512, 896, True), (3, 37, 100, True)],
                                    short=(1, 2)):
        def sequences(b=b, t=t, d=d, with_valid=with_valid):
            valid = torch.rand(b, t) > 0.3 if with_valid else None
            router.sequence_scores(rnd(b, t, d), rnd(d), rnd(1), 0.5, valid)
        add(f"router sequences B={b} T={t} D={d} valid={with_valid}", sequences)
    for n_rows, d in pick([(2048, 896), (37, 100)], short=(0,)):
        def backward(n_rows=n_rows, d=d):
            h = rnd(n_rows, d, grad=True)
            w, bias = rnd(1, d, dtype=torch.float32, grad=True), rnd(1, dtype=torch.float32, grad=True)
            p, _, _ = router.RouteTokens.apply(h, w, bias, 0.5, None)
            p.sum().backward()
            hs = rnd(4, n_rows // 4 + 1, d, grad=True)
            p, _, _ = router.RouteSequences.apply(hs, w, bias, 0.5, torch.ones(hs.shape[:2], dtype=torch.bool))
            p.sum().backward()
        add(f"router backward N={n_rows} D={d}", backward)

    # --- decode attention: (rows, q heads, KV heads, head dim, slots) of Qwen2.5-0.5B, 1.5B and
    # 7B, and odd sizes.
    for m, h, hkv, hd, s in pick([(1, 14, 2, 64, 2304), (8, 14, 2, 64, 512), (32, 12, 2, 128, 4096),
                                  (1, 28, 4, 128, 300), (3, 6, 2, 24, 37)], short=(0, 2, 4)):
        def attention(m=m, h=h, hkv=hkv, hd=hd, s=s):
            batch = m + 1
            decode_attention.decode_attention(
                rnd(m, h, hd), rnd(batch, hkv, s, hd), rnd(batch, hkv, s, hd),
                torch.ones(batch, s, dtype=torch.bool), idx(m, batch), one,
                torch.full((1,), s, dtype=torch.int64), hd ** -0.5, rnd(m, h, hd))
        add(f"decode_attention M={m} H={h} HKV={hkv} D={hd} S={s}", attention)
    # --- fused block stages: (rows, D, H, HKV, head dim, I, LoRA rank) of Qwen2.5-0.5B at decode
    # (1 and 8 rows) and prefill, 7B at decode, odd sizes; rank 0 (merged) or 24 (q, k, v
    # stacked, unmerged); route_kv routed or not, with and without the K/V of skipping rows.
    # The stage kernels take long to compile: the CI compiles bf16 at 8 rows of 0.5B with an
    # unmerged LoRA and fp32 at odd sizes; LAYERROUTE_COMPILE_ALL_STAGES=1 every shape in every
    # dtype, both route_kv modes (by hand: `--match stages`).
    for m, d, h, hkv, hd, inter, rank in pick([
        (1, 896, 14, 2, 64, 4864, 0), (8, 896, 14, 2, 64, 4864, 24), (2048, 896, 14, 2, 64, 4864, 24),
        (1, 3584, 28, 4, 128, 18944, 0), (7, 53, 6, 2, 12, 45, 15)],
            short=(4,) if dt == torch.float32 or ALL_STAGE_SHAPES else (),
            every=(1,) if not ALL_STAGE_SHAPES else None):
        def stages(m=m, d=d, h=h, hkv=hkv, hd=hd, inter=inter, rank=rank):
            n_out = (h + 2 * hkv) * hd
            A = rnd(rank, d, dtype=torch.float32) if rank else None
            B = rnd(n_out, rank, dtype=torch.float32) if rank else None
            x, index, count = rnd(m, d), idx(m, m), torch.full((1,), m, dtype=torch.int32)
            positions = torch.zeros(m, dtype=torch.int64)
            inv_freq = torch.rand(hd // 2)
            k, v = rnd(m, hkv, 8, hd), rnd(m, hkv, 8, hd)
            valid, slot = torch.zeros(m, 8, dtype=torch.bool), torch.zeros(1, dtype=torch.int64)
            w, bias = rnd(n_out, d), rnd(n_out)
            qkv_rope.qkv_rope(x, index, count, rnd(d), 1e-6, w, bias, A, B, 2.0, positions,
                              inv_freq, k, v, valid, slot, 1, rnd(m, h * hd))
            for routed in (True, False) if ALL_STAGE_SHAPES else (True,):
                for kv in (True,):
                    route_kv.route_kv(
                        x, rnd(d, dtype=torch.float32) if routed else None,
                        rnd(1, dtype=torch.float32) if routed else None, 0.5,
                        None if routed else torch.zeros(m, dtype=torch.bool), index, count,
                        torch.zeros(1, dtype=torch.bool), torch.zeros(m, dtype=torch.bool),
                        rnd(d), 1e-6, w, bias, A, B, 2.0, positions, inv_freq, k, v, valid, slot,
                        1, kv)
            A2 = rnd(rank, inter, dtype=torch.float32) if rank else None
            B2 = rnd(d, rank, dtype=torch.float32) if rank else None
            linear_scatter_add.linear_scatter_add(rnd(m, inter), index, count, rnd(d, inter), A2,
                                                  B2, 2.0, rnd(m, d))
            A3 = rnd(rank, d, dtype=torch.float32) if rank else None
            B3 = rnd(2 * inter, rank, dtype=torch.float32) if rank else None
            norm_gate_up.norm_gate_up(x, index, count, rnd(d), 1e-6, rnd(2 * inter, d), A3, B3,
                                      2.0, rnd(m, inter))
            norm_linear.norm_linear(x, rnd(d), 1e-6, rnd(1000, d),
                                    torch.empty(m, 1000, dtype=torch.float32))
        add(f"stages M={m} D={d} H={h} HKV={hkv} hd={hd} I={inter} r={rank}", stages)
    return cases


def compile_cases(cases, arch: int, first_config: bool = False) -> dict:
    """Run each (name, thunk) case with launches turned into compilations for sm_<arch>; the
    report (see the module docstring) has the failures."""
    from python_kernels import lora_linear

    recorder = Recorder(arch, first_config)
    recorder.install()
    os.environ.pop("LAYERROUTE_TRITON_AUTOTUNE", None)   # the pruning keeps the GPU's set
    start, failures = time.perf_counter(), []
    for name, thunk in cases:
        try:
            thunk()
        except Exception:  # noqa: BLE001: reported, and the exit code says it
            failures.append(f"{name}: {traceback.format_exc(limit=-2)[-1500:]}")
    recorder.check_shared({lora_linear._lora_linear_kernel.fn.__name__})
    return {
        "arch": f"sm_{arch}", "triton": triton.__version__, "cases": len(cases),
        "kernels_compiled": len(recorder.compiled),
        "autotuned_launches": len(recorder.autotuned),
        "autotuned_configs_unusable": sum(len(a["unusable"]) for a in recorder.autotuned),
        "unusable_examples": sorted({u for a in recorder.autotuned for u in a["unusable"]})[:10],
        "dtypes": {name: sorted(d) for name, d in sorted(recorder.dtypes.items())},
        "oversized": recorder.oversized, "bound_violations": recorder.bound_violations,
        "failures": failures,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arch", type=int, choices=sorted(MAX_SHARED), help="compute capability, e.g. 90")
    ap.add_argument("--first-config", action="store_true",
                    help="autotuned kernels: compile only the first config their pruning keeps")
    ap.add_argument("--match", default="", help="only the cases whose name contains this")
    args = ap.parse_args(argv)
    cases = [(name, thunk) for name, thunk in _cases() if args.match in name]
    report = compile_cases(cases, args.arch, args.first_config)
    print(json.dumps(report))
    return 1 if report["failures"] or report["oversized"] or report["bound_violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
