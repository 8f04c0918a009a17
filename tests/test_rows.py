"""The one RMSNorm reference (layerroute_rt.ops.rms_norm_ref, which model.RMSNorm and the stage
references run) against transformers' Qwen2RMSNorm, bit for bit."""
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from layerroute_rt import ops
from layerroute_rt.model.modeling import RMSNorm

EPS = 1e-6


def test_rms_norm_reference_is_transformers_qwen2_norm():
    """Same order of rounding as transformers (normalise in float32, cast back, then scale), in
    float32, float16 and bfloat16; model.RMSNorm is the same function."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        hf = Qwen2RMSNorm(130, eps=EPS).to(dtype)
        with torch.no_grad():
            hf.weight.uniform_(0.5, 1.5, generator=gen)
        x = torch.randn((67, 130), generator=gen).to(dtype)
        ours = RMSNorm(130, EPS).to(dtype)
        ours.weight.data.copy_(hf.weight.data)
        assert torch.equal(ops.rms_norm_ref(x, hf.weight.data, EPS), hf(x))
        assert torch.equal(ours(x), hf(x))
