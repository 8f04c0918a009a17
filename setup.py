"""Build layerroute_rt._C: the CPU ops always, the CUDA kernels when they can be built.

CUDA is built when torch is a CUDA build and nvcc is found (CUDA_HOME or PATH), never based
on whether a GPU is present, so a build host needs no GPU. Environment knobs:
  LAYERROUTE_SKIP_CUDA=1   build the CPU ops only
  LAYERROUTE_FORCE_CUDA=1  fail unless the CUDA kernels are built
  MAX_JOBS                 parallel compile jobs (default: CPU count, at most 4)
  TORCH_CUDA_ARCH_LIST     GPU archs for the CUDA build (default "8.0;9.0")

The C++ standard is left to torch (its headers need C++20 from torch 2.10 on); the kernel
files under csrc/kernels are plain C++17 CUDA.
"""

import os
import sys
from pathlib import Path

import torch
from setuptools import setup
from torch.utils import cpp_extension

CSRC = Path("csrc")
CPU_SOURCES = [str(CSRC / "torch_bindings.cpp"), str(CSRC / "ops_cpu.cpp")]
CUDA_SOURCES = [str(CSRC / "ops_cuda.cpp"), *sorted(map(str, (CSRC / "kernels").glob("*.cu")))]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def _why_no_cuda() -> str | None:
    """None if the CUDA kernels can be built here, else the reason they cannot."""
    if _env_flag("LAYERROUTE_SKIP_CUDA"):
        return "LAYERROUTE_SKIP_CUDA is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    home = cpp_extension.CUDA_HOME
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return None


WHY_NO_CUDA = _why_no_cuda()
if WHY_NO_CUDA and _env_flag("LAYERROUTE_FORCE_CUDA"):
    sys.exit(f"layerroute_rt: LAYERROUTE_FORCE_CUDA is set but CUDA cannot be built: {WHY_NO_CUDA}")
os.environ.setdefault("MAX_JOBS", str(min(os.cpu_count() or 1, 4)))


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, first saying why the CUDA kernels are left out, if they are."""

    def run(self):
        if WHY_NO_CUDA:
            print(f"layerroute_rt: building the CPU ops only: {WHY_NO_CUDA}.", file=sys.stderr)
        super().run()


def _extension():
    # Absolute rpath to torch's libraries, so `import layerroute_rt._C` works before `import torch`.
    torch_lib = Path(torch.__file__).parent / "lib"
    common = dict(name="layerroute_rt._C", extra_link_args=[f"-Wl,-rpath,{torch_lib}"])
    if WHY_NO_CUDA:
        return cpp_extension.CppExtension(
            sources=CPU_SOURCES, extra_compile_args={"cxx": ["-O3"]}, **common
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return cpp_extension.CUDAExtension(
        sources=CPU_SOURCES + CUDA_SOURCES,
        define_macros=[("LAYERROUTE_WITH_CUDA", None)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
        **common,
    )


# LAYERROUTE_NO_EXTENSION=1: the Python package alone (the decode runs Triton kernels and torch;
# gpu_checks.sh quick installs so, to build nothing the decode does not use).
setup(ext_modules=[] if _env_flag("LAYERROUTE_NO_EXTENSION") else [_extension()],
      cmdclass={"build_ext": BuildExtension})
