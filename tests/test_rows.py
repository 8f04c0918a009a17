"""The stage references' RMS norm (layerroute_rt.ops.rms_norm_ref) against model.RMSNorm."""
import torch

from layerroute_rt import ops
from layerroute_rt.model import RMSNorm

EPS = 1e-6


def randn(shape, dtype, device, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def test_rms_norm_reference_is_the_model_norm():
    """The stage references normalise as model.RMSNorm does (same order of rounding, bit for
    bit)."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        norm = RMSNorm(130, EPS).to(dtype)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5, generator=gen)
        x = randn((67, 130), dtype, "cpu", gen)
        assert torch.equal(ops.rms_norm_ref(x, norm.weight.data, EPS), norm(x))
