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


@pytest.fixture(scope="session")
def real_model_dir():
    """The real model's Hugging Face directory (Qwen2.5-Coder-0.5B-Instruct, bf16), fetched and
    converted once into the cache (instant when cached)."""
    from layerroute_rt.model.real_model import fetch_model

    return fetch_model()


@pytest.fixture(scope="session")
def real_model(real_model_dir):
    """The real model loaded once per session in fp32, fresh adapter (LoRA off in effect: B = 0)."""
    import layerroute_rt as lr

    return lr.load(real_model_dir, dtype=torch.float32)
