"""Test-wide set-up. Triton kernels run under the interpreter when no CUDA device is present;
TRITON_INTERPRET must be set before any @triton.jit function is defined, hence here."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random Qwen2 checkpoint directory and the transformers model it was saved from."""
    from qwen_factory import save_random_qwen2

    path = tmp_path_factory.mktemp("tiny")
    return path, save_random_qwen2(path)
