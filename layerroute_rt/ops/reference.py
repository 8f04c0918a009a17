"""The one plain-torch RMSNorm and RoPE: the model (layerroute_rt.model.modeling.modeling) runs them, the
block-stage references use them, and the stage kernels compute the same in their prologues."""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Qwen2 computes it: normalise in float32 (float64 for a float64 input), cast to
    x's dtype, then multiply by the weight."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    """RoPE's inverse frequencies float32 [head_dim / 2], computed as HF computes them: the
    one table the model and the engine use."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float()
                           / head_dim)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., hd] in `dtype` at integer positions [...], the angles in float32."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [..., heads, hd] with cos and sin [..., hd] from rope_cos_sin
    (broadcast over the heads): the one reference, which the model runs too."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
