"""Every Triton kernel compiles for sm_80 (A100), sm_89 (L4, L40S, RTX 4090: 99 KB of shared
memory a program) and sm_90 (H100), on a machine without a GPU.

The kernel tests run under TRITON_INTERPRET=1 on CPU, and the interpreter accepts code that
Triton's compiler rejects (a loop-carried variable that changes type, for one). This test runs
tests/triton_sm_compile.py, which compiles (without launching) every kernel specialisation
the launch wrappers make at Qwen2-family shapes in bf16, fp32 and fp16, forward, row-list and
backward, with the first config of each autotuned set after its shared-memory pruning (what
LAYERROUTE_TRITON_AUTOTUNE=0 launches; the script compiles every config when run by hand). On
a machine with a GPU the CUDA tests compile and run the kernels themselves, so it skips there.
"""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parent / "triton_sm_compile.py"

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="a GPU is here: the CUDA kernel tests compile and run every kernel"),
    pytest.mark.skipif("nvidia" not in __import__("triton.backends", fromlist=["backends"]).backends,
                       reason="this Triton has no NVIDIA backend"),
]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"        # Triton 3.9's default, without its warning
    return env


def _report(result: subprocess.CompletedProcess) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report (exit {result.returncode}):\n{result.stdout}\n{result.stderr[-3000:]}"
    return json.loads(lines[-1])


# Kernels whose first tensor is the data (the others start with a float32 workspace).
DATA_KERNELS = ("_lora_linear_kernel", "_partial_kernel", "_token_scores_kernel", "_seq_partial_kernel")
# The fused block-stage kernels: compiled in bf16 and fp32 in CI (the slowest to compile).
STAGE_KERNELS = ("_qkv_rope_kernel", "_route_kv_kernel", "_linear_scatter_add_kernel",
                 "_norm_gate_up_kernel", "_norm_linear_kernel")


def test_every_kernel_compiles_for_sm80_sm89_and_sm90():
    procs = {arch: subprocess.Popen([sys.executable, str(SCRIPT), str(arch), "--first-config"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=_env())
             for arch in (80, 89, 90)}            # in parallel: CI has 2 cores
    try:
        deadline = time.monotonic() + 900
        outputs = {arch: proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                   for arch, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    for arch, proc in procs.items():
        out, err = outputs[arch]
        report = _report(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        assert not report["failures"], f"sm_{arch}:\n" + "\n\n".join(report["failures"])
        assert not report["oversized"], f"sm_{arch}: {report['oversized']}"
        assert not report["bound_violations"], f"sm_{arch}: {report['bound_violations']}"
        assert proc.returncode == 0, f"sm_{arch}: exit {proc.returncode}\n{err[-3000:]}"
        # Every case compiled something, in every dtype: all four kernel files, the autotuned
        # LoRA launches.
        assert report["cases"] >= 49 and report["kernels_compiled"] >= 82, report
        assert report["autotuned_launches"] >= 25, report
        for name in DATA_KERNELS:
            assert report["dtypes"].get(name) == ["bfloat16", "float16", "float32"], (name, report["dtypes"])
        for name in STAGE_KERNELS:
            assert report["dtypes"].get(name) == ["bfloat16", "float32"], (name, report["dtypes"])


def test_the_check_fails_on_code_only_the_interpreter_accepts(tmp_path):
    """A loop-carried variable that turns from int to float: the interpreter runs it, the
    compiler rejects it, and the check reports it as a failure."""
    script = tmp_path / "bad_kernel.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(SCRIPT.parent)!r})
        import torch, triton, triton.language as tl
        from triton_sm_compile import compile_cases

        @triton.jit
        def summed(x_ptr, y_ptr, N):
            acc = 0
            for i in range(N):
                acc += tl.load(x_ptr + i)
            tl.store(y_ptr, acc)

        x, y = torch.randn(16), torch.empty(1)
        print(json.dumps(compile_cases([("summed", lambda: summed[(1,)](x, y, 16))], 90)))
    """))
    report = _report(subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                                    env=_env(), timeout=300))
    assert len(report["failures"]) == 1 and "Loop-carried variable acc" in report["failures"][0], report
