"""Test-wide set-up. Triton kernels run under the interpreter when no CUDA device is present;
TRITON_INTERPRET must be set before any @triton.jit function is defined, hence here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
