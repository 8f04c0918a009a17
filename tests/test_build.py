"""Every CUDA kernel file compiles on its own with nvcc, for sm_80 (A100) and sm_90 (H100).

The kernel files include no torch headers, so this runs on machines without a CUDA torch or a
GPU; it skips only when nvcc is absent.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

KERNEL_DIR = Path(__file__).resolve().parents[1] / "csrc" / "kernels"
KERNELS = sorted(KERNEL_DIR.glob("*.cu"))


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return shutil.which("nvcc") or (str(candidate) if candidate.exists() else None)


NVCC = find_nvcc()


def test_kernel_files_exist():
    assert KERNELS, f"no .cu files under {KERNEL_DIR}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME or /usr/local/cuda)")
@pytest.mark.parametrize("source", KERNELS, ids=[p.name for p in KERNELS])
def test_kernel_compiles(source, tmp_path):
    cmd = [
        NVCC, "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o"),
        "-std=c++17", "-O3", "--Werror", "all-warnings",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}{result.stderr}"
