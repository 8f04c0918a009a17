"""One block in stages over the fused kernels (docs/DESIGN.md section 4), the only block forward of
the runtime outside model.py's plain-torch oracle: prefill and the decode step both call it.

A block on the rows of the residual h [N, D] that run it (a row list index int32 [M] and its
count int32 [1], on the device) is

    route      ops.route_kv          the router, the decision, the row list; the K/V of the
                                     rows that skip (kv_policy "compute")
    qkv        ops.qkv_rope          input RMSNorm -> q/k/v (+ LoRA) -> bias, RoPE, K/V cache write
    attention  ops.decode_attention  (decode: 2 launches) or SDPA per sequence (prefill)
    o_proj     ops.linear_scatter_add     h[index[i]] += o[i] Wo^T
    mlp        ops.norm_gate_up      post-attention RMSNorm -> gate/up -> SiLU(gate) x up
               ops.linear_scatter_add     h[index[i]] += act[i] Wdown^T

Every stage reads the count from device memory (Triton path), so nothing here reads a device
value on the host; the body after the route stage runs only when its predicate (some row runs
the block) holds, a CUDA-graph IF node on the GPU (see engine.InferenceModel.decode_step).
The stages skip the ops' argument checks (check=False): every tensor they pass is one the engine
laid out once (fused weights, caches, decode buffers), and on the CPU, where a decode step runs
these calls eagerly, the checks cost 2-3% of a 0.5B step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..model.cache import KVCache
from ..config import BackboneConfig


QUERY_CHUNK = 1024      # prefill queries per masked attention call (bounds the score matrix)


@dataclass
class FusedBlock:
    """One block's tensors in the engine's layout (LoRA factors None when merged or absent)."""
    norm1: torch.Tensor
    norm2: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    o_w: torch.Tensor
    gate_up_w: torch.Tensor
    down_w: torch.Tensor
    router_w: torch.Tensor          # float32 [D]
    router_b: torch.Tensor          # float32 [1]
    qkv_lora: tuple[torch.Tensor, torch.Tensor] | None = None     # A [n r, D], B [N, n r]
    o_lora: tuple[torch.Tensor, torch.Tensor] | None = None
    gate_up_lora: tuple[torch.Tensor, torch.Tensor] | None = None
    down_lora: tuple[torch.Tensor, torch.Tensor] | None = None


def _ab(lora):
    return (None, None) if lora is None else lora


class Stages:
    """The block stages for one backbone shape: the RoPE table (the runtime's only one), eps,
    the LoRA scale and the attention scale."""

    def __init__(self, cfg: BackboneConfig, lora_scale: float, device):
        self.cfg = cfg
        self.eps = cfg.rms_norm_eps
        self.scale = lora_scale
        self.attn_scale = 1.0 / math.sqrt(cfg.head_dim)
        self.inv_freq = ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta, device)

    # -- stages ---------------------------------------------------------------------------------

    def route(self, blk: FusedBlock, h, cache: KVCache, i: int, positions, slot, rows_per_seq: int,
              compute_kv: bool, tau: float = 0.0, run=None, index=None, count=None, pred=None,
              executed=None) -> None:
        """The route stage: with `run` None the router decides (writing index, count, pred and
        executed); else `run` (bool [N]) is the decision. compute_kv: the rows that do not run
        get their K/V here."""
        A, B = _ab(blk.qkv_lora)
        routed = run is None
        ops.route_kv(h, blk.router_w if routed else None, blk.router_b if routed else None, tau,
                     run, index, count, pred, executed, blk.norm1, self.eps, blk.qkv_w, blk.qkv_b,
                     A, B, self.scale, positions, self.inv_freq, *cache.layers[i], slot,
                     rows_per_seq, compute_kv, check=False)

    def qkv(self, blk: FusedBlock, h, index, count, cache: KVCache, i: int, positions, slot,
            rows_per_seq: int) -> torch.Tensor:
        """q [M, q_dim] (RoPE applied, gathered space); K/V of the listed rows cached."""
        q = h.new_empty(index.shape[0], self.cfg.q_dim)
        A, B = _ab(blk.qkv_lora)
        ops.qkv_rope(h, index, count, blk.norm1, self.eps, blk.qkv_w, blk.qkv_b, A, B, self.scale,
                     positions, self.inv_freq, *cache.layers[i], slot, rows_per_seq, q,
                     check=False)
        return q

    def attend_decode(self, q, cache: KVCache, i: int, index, count, length) -> torch.Tensor:
        """One query per listed row against its sequence's cache slots below `length`."""
        cfg = self.cfg
        M = q.shape[0]
        o = ops.decode_attention(q.view(M, cfg.num_attention_heads, cfg.head_dim),
                                 *cache.layers[i], index, count, length, self.attn_scale,
                                 check=False)
        return o.view(M, cfg.q_dim)

    def attend_prefill(self, q, cache: KVCache, i: int, rows: torch.Tensor, T: int,
                       prompt_len: list[int], start: int = 0) -> torch.Tensor:
        """The listed rows (int64 [n], flattened b * T + t at slot start + t, grouped by
        sequence) of a prefill against the cache: plain causal attention where every token of a
        left-padded prompt runs (prompt_len[b] of them, nothing cached before: start 0), else a
        mask of the valid earlier slots, built for QUERY_CHUNK queries at a time."""
        from ..model.modeling import _attention

        cfg = self.cfg
        n = rows.numel()
        nh, hd = cfg.num_attention_heads, cfg.head_dim
        q = q[:n].view(n, nh, hd)
        o = torch.empty(q.shape[0] if n else 0, nh * hd, dtype=q.dtype, device=q.device)
        batch_of, slot_of = rows // T, start + rows % T
        per_seq = torch.bincount(batch_of, minlength=cache.batch_size).tolist()
        end = start + T
        k, v = cache.k[i, :, :, :end], cache.v[i, :, :, :end]
        slots = torch.arange(end, device=q.device)
        first = 0
        for s, c in enumerate(per_seq):
            if c == 0:
                continue
            if c == prompt_len[s]:
                qs = q[first:first + c].transpose(0, 1)[None]                        # [1, H, c, hd]
                o_s = _attention(qs, k[s:s + 1, :, T - c:], v[s:s + 1, :, T - c:])
                o[first:first + c] = o_s[0].transpose(0, 1).reshape(c, nh * hd)
            else:
                for c0 in range(first, first + c, QUERY_CHUNK):
                    sel = slice(c0, min(c0 + QUERY_CHUNK, first + c))
                    qs = q[sel].transpose(0, 1)[None]
                    keys = cache.valid[i, s, :end][None, :] & (slots[None, :] <= slot_of[sel][:, None])
                    o_s = _attention(qs, k[s:s + 1], v[s:s + 1], keys[None, None])
                    o[sel] = o_s[0].transpose(0, 1).reshape(-1, nh * hd)
            first += c
        return o

    def finish(self, blk: FusedBlock, h, o, index, count) -> None:
        """o_proj with the residual add, then the MLP with its residual add, in place on h."""
        A, B = _ab(blk.o_lora)
        ops.linear_scatter_add(o, index, count, blk.o_w, A, B, self.scale, h, check=False)
        act = h.new_empty(index.shape[0], self.cfg.intermediate_size)
        A, B = _ab(blk.gate_up_lora)
        ops.norm_gate_up(h, index, count, blk.norm2, self.eps, blk.gate_up_w, A, B, self.scale, act,
                         check=False)
        A, B = _ab(blk.down_lora)
        ops.linear_scatter_add(act, index, count, blk.down_w, A, B, self.scale, h, check=False)

    def embed(self, tokens, weight) -> torch.Tensor:
        return F.embedding(tokens, weight)

    def head(self, h, norm_weight, weight, out=None) -> torch.Tensor:
        """float32 logits [N, vocab] of the final RMSNorm and the lm_head."""
        if out is None:
            out = torch.empty(h.shape[0], weight.shape[0], dtype=torch.float32, device=h.device)
        return ops.norm_linear(h, norm_weight, self.eps, weight, out, check=False)
