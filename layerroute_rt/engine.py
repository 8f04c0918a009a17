"""The inference engine: fused (and by default LoRA-merged) weights, true skipping at prefill and
at decode, and a decode step that on CUDA never reads a count on the host, so it can be captured
in one CUDA graph and replayed.

Weights, per block, built once from a LayerRouteModel:
  qkv [q_dim + 2 kv_dim, D] (+ bias), o [D, q_dim], gate_up [2 I, D], down [D, I], and the router
  (float32). With merge=True (the default) each LoRA is folded in, W + scale B A, computed in
  float32 and rounded once; with merge=False the base stays as loaded and the LoRA factors ride
  along stacked (A of q, k and v side by side, B block-diagonal), run by the fused LoRA kernel.
  `InferenceModel.with_adapter(dir)` builds another unmerged engine over the same base tensors,
  so several adapters share one copy of the backbone.

Prefill (`prefill`, host synchronisation allowed): per block, route every real token, gather
the executing ones, run norm -> qkv -> attention -> o_proj -> MLP on them only, scatter back.
Under kv_policy "compute" every real token still writes its K and V (the kv rows of qkv).

Decode (`decode_step`; on CUDA static shapes and no host reads): per block, the router writes the
rows that run and their count on the device; K/V are written for every row under "compute"
(only the rows that run become visible under "drop"); q, attention, o_proj and the MLP are
count-aware kernels (ops.lora_linear with a row list, ops.decode_attention) that read no weights
and no K/V when the count is 0, and attention reads only the filled slots of the cache. The
residual gets the block's output by scatter-adds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint, ops
from .cache import KVCache
from .config import LayerRouteConfig
from .model import LayerRouteModel, LoRALinear, _attention, apply_rope


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


def _lora_of(m: LoRALinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The projection's (A, B) when it has a LoRA that is enabled, else None."""
    return (m.lora_A, m.lora_B) if m.lora_A is not None and m.adapter_enabled else None


def _stacked_lora(parts: list[LoRALinear], dtype: torch.dtype):
    """LoRA of projections fused along the output dim: A stacked [n r, K], B block-diagonal
    [sum N, n r], so x A^T B^T gives each projection its own update. None if none has a LoRA."""
    pairs = [_lora_of(m) for m in parts]
    live = [p for p in pairs if p is not None]
    if not live:
        return None
    r = live[0][0].shape[0]
    A = torch.cat([a for a, _ in live]).to(dtype).contiguous()
    B = torch.zeros(sum(m.weight.shape[0] for m in parts), r * len(live), dtype=dtype,
                    device=A.device)
    row, col = 0, 0
    for m, pair in zip(parts, pairs):
        n = m.weight.shape[0]
        if pair is not None:
            B[row:row + n, col:col + r] = pair[1].to(dtype)
            col += r
        row += n
    return A, B


def _merged(m: LoRALinear) -> torch.Tensor:
    """W + scale B A in float32, rounded once to W's dtype."""
    if _lora_of(m) is None:
        return m.weight
    return (m.weight.float() + m.scale * (m.lora_B.float() @ m.lora_A.float())).to(m.weight.dtype)


def _fuse_block(block, merge: bool, base: FusedBlock | None = None) -> FusedBlock:
    attn, mlp = block.self_attn, block.mlp
    qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
    dtype = attn.q_proj.weight.dtype
    if base is not None:             # another adapter over the same base tensors
        weights = dict(qkv_w=base.qkv_w, qkv_b=base.qkv_b, o_w=base.o_w,
                       gate_up_w=base.gate_up_w, down_w=base.down_w)
    else:
        w = _merged if merge else (lambda m: m.weight)
        weights = dict(qkv_w=torch.cat([w(m) for m in qkv]).contiguous(),
                       qkv_b=torch.cat([m.bias for m in qkv]).contiguous(),
                       o_w=w(attn.o_proj).contiguous(),
                       gate_up_w=torch.cat([w(m) for m in gate_up]).contiguous(),
                       down_w=w(mlp.down_proj).contiguous())
    lora = {}
    if not merge:
        lora = dict(qkv_lora=_stacked_lora(qkv, dtype), o_lora=_stacked_lora([attn.o_proj], dtype),
                    gate_up_lora=_stacked_lora(gate_up, dtype),
                    down_lora=_stacked_lora([mlp.down_proj], dtype))
    return FusedBlock(norm1=block.input_layernorm.weight, norm2=block.post_attention_layernorm.weight,
                      router_w=block.router.weight.detach().reshape(-1).float().clone(),
                      router_b=block.router.bias.detach().float().clone(), **weights, **lora)


@dataclass
class DecodeState:
    """The static buffers one decode step reads and writes (fixed addresses for CUDA graphs)."""
    tokens: torch.Tensor        # [B] long: the tokens fed in this step
    positions: torch.Tensor     # [B] long: their RoPE positions
    slot: torch.Tensor          # [1] long: the cache slot they are written to
    logits: torch.Tensor        # [B, vocab] float32: the step's output
    executed: torch.Tensor      # [L, B] bool: who ran which block in this step
    ramp: torch.Tensor          # [B] int32: 0..B-1, the row list of gathered space
    all_rows: torch.Tensor      # [1] int32: B, the count when every row runs
    seq_rows: list | None       # sequence granularity: per block (index, count) fixed at prefill


class InferenceModel:
    """A LayerRouteModel's weights laid out for inference (see the module docstring).

    merge: fold the LoRA into the frozen weights (default), or keep it unmerged and fused.
    max_cache_len: the longest prompt + new tokens a cache may hold (default: the model's
    max_position_embeddings).
    use_cuda_graphs: on CUDA, capture the decode step in a CUDA graph (generate()).
    host_counts: how decode_step learns which rows run (see there); None: read on the host
    except on CUDA. False on CPU runs CUDA's device-count path through the CPU ops.
    """

    def __init__(self, model: LayerRouteModel, merge: bool = True, max_cache_len: int | None = None,
                 use_cuda_graphs: bool = True, host_counts: bool | None = None,
                 _base: "InferenceModel | None" = None):
        if not isinstance(model, LayerRouteModel):
            raise TypeError(f"InferenceModel: expected a LayerRouteModel, got {type(model).__name__}")
        cfg = model.config
        self.source = model
        self.config, self.lr_config, self.merged = cfg, model.lr_config, merge
        limit = cfg.max_position_embeddings
        self.max_cache_len = limit if max_cache_len is None else int(max_cache_len)
        if not 1 <= self.max_cache_len <= limit:
            raise ValueError(f"InferenceModel: max_cache_len must be in [1, {limit}] "
                             f"(max_position_embeddings), got {max_cache_len}")
        with torch.no_grad():
            bases = _base.blocks if _base is not None else [None] * len(model.blocks)
            self.blocks = [_fuse_block(b, merge, base) for b, base in zip(model.blocks, bases)]
        self.embed = model.model.embed_tokens.weight
        self.final_norm = model.model.norm.weight
        self.head = model.head_weight()
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.eps = cfg.rms_norm_eps
        self.attn_scale = 1.0 / math.sqrt(cfg.head_dim)
        self.scale = model.lr_config.scale
        hd = cfg.head_dim
        self.inv_freq = 1.0 / cfg.rope_theta ** (
            torch.arange(0, hd, 2, device=self.device, dtype=torch.int64).float() / hd)
        self.tokenizer_dir = getattr(model, "source_dir", None)
        self.use_cuda_graphs = use_cuda_graphs
        self.host_counts = self.device.type != "cuda" if host_counts is None else host_counts

    def skip_set(self, skip_layers) -> frozenset[int]:
        """skip_layers checked: block indices in [0, layers)."""
        return self.source._skip_set(skip_layers)

    def with_adapter(self, adapter_dir) -> "InferenceModel":
        """An unmerged engine for another adapter of the same backbone (checked as load_adapter
        checks it, run with the adapter's own tau, granularity and kv_policy), sharing this
        engine's base tensors: this engine must be unmerged, since merged weights hold its own
        adapter."""
        if self.merged:
            raise ValueError("with_adapter: this engine has its LoRA merged into the weights; "
                             "build it with merge=False to share the base between adapters")
        model = self.source
        stored = LayerRouteConfig.from_dict(
            checkpoint.read_adapter_config(adapter_dir, model.config),
            source=f"{adapter_dir}/{checkpoint.ADAPTER_CONFIG_FILE}")
        saved = {n: p.detach().clone() for n, p in model.adapter_state_dict().items()}
        own = model.lr_config
        try:
            model.load_adapter(Path(adapter_dir))
            model.lr_config = stored               # its tau, granularity and kv_policy
            return InferenceModel(model, merge=False, max_cache_len=self.max_cache_len,
                                  use_cuda_graphs=self.use_cuda_graphs,
                                  host_counts=self.host_counts, _base=self)
        finally:
            model.lr_config = own
            with torch.no_grad():
                for n, p in model.adapter_state_dict().items():
                    p.copy_(saved[n])

    # -- small pieces ---------------------------------------------------------------------------

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * w

    def _rope(self, positions: torch.Tensor):
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _linear(self, x, w, b, lora, index=None, count=None, out=None):
        A, B = lora if lora is not None else (None, None)
        return ops.lora_linear(x, w, b, A, B, self.scale, index, count, out=out)

    def _kv_rows(self, blk: FusedBlock):
        """The k and v rows of the fused qkv weight (a contiguous view) and their LoRA."""
        qd = self.config.q_dim
        lora = None
        if blk.qkv_lora is not None:
            lora = (blk.qkv_lora[0], blk.qkv_lora[1][qd:])
        return blk.qkv_w[qd:], blk.qkv_b[qd:], lora

    def _q_rows(self, blk: FusedBlock):
        qd = self.config.q_dim
        lora = None
        if blk.qkv_lora is not None:
            lora = (blk.qkv_lora[0], blk.qkv_lora[1][:qd])
        return blk.qkv_w[:qd], blk.qkv_b[:qd], lora

    def _mlp(self, x, blk: FusedBlock, ramp=None, count=None):
        """down(silu(gate) * up) on rows of x; with ramp (0..M-1) and count, rows < count only."""
        gu = self._linear(x, blk.gate_up_w, None, blk.gate_up_lora, ramp, count)
        inter = self.config.intermediate_size
        act = (F.silu(gu[:, :inter]) * gu[:, inter:]).contiguous()
        return self._linear(act, blk.down_w, None, blk.down_lora, ramp, count)

    def _ramp(self, n: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.int32, device=self.device)

    def _split_kv(self, kv: torch.Tensor, cos, sin):
        cfg = self.config
        k, v = kv.view(-1, 2, cfg.num_key_value_heads, cfg.head_dim).unbind(1)
        return apply_rope(k, cos, sin), v

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self._rms(h, self.final_norm), self.head).float()

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        if max_len > self.max_cache_len:
            raise ValueError(f"KV cache: {max_len} slots requested, the engine's max_cache_len is "
                             f"{self.max_cache_len}")
        return KVCache(self.config, batch_size, max_len, self.dtype, self.device)

    # -- prefill --------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, valid: torch.Tensor, cache: KVCache, tau: float,
                skip: frozenset[int] = frozenset()) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a left-padded batch of prompts into an empty cache. input_ids, valid [B, T].
        Returns the logits of each sequence's last position [B, vocab] (float32) and the
        decisions [L, B, T]. Under `sequence` granularity the decisions are made here, from
        the mean of each prompt's hidden states, and held in the cache for the decode steps."""
        cfg, lr = self.config, self.lr_config
        B, T = input_ids.shape
        if cache.length != 0:
            raise ValueError("prefill: the cache must be empty (call cache.reset())")
        if T > cache.max_len:
            raise ValueError(f"prefill: a prompt of {T} tokens does not fit a cache of {cache.max_len} slots")
        nh, hd, qd = cfg.num_attention_heads, cfg.head_dim, cfg.q_dim
        h = F.embedding(input_ids, self.embed).reshape(B * T, -1)
        valid_f = valid.reshape(-1)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        cos, sin = (t.reshape(B * T, -1) for t in self._rope(positions))
        batch_of = torch.arange(B, device=self.device).repeat_interleave(T)
        slot_of = torch.arange(T, device=self.device).repeat(B)
        real_rows = valid_f.nonzero().squeeze(1)
        # Per sequence: its number of real tokens if they are the last slots (left padding),
        # else -1. When all of them run a block, its attention is plain causal (no mask).
        n_real = valid.sum(1)
        tail = torch.arange(T, device=self.device)[None, :] >= T - n_real[:, None]
        prompt_len = torch.where((valid == tail).all(1), n_real, -1).tolist()
        if lr.granularity == "sequence":
            cache.decide_sequences()
        executed = torch.zeros(cfg.num_hidden_layers, B * T, dtype=torch.bool, device=self.device)
        for i, blk in enumerate(self.blocks):
            if lr.granularity == "token":
                _, index, count = ops.route_tokens(h, blk.router_w, blk.router_b, tau, valid_f)
            else:
                p, index, count = ops.route_sequences(h.view(B, T, -1), blk.router_w, blk.router_b,
                                                      tau, valid)
                cache.seq_exec[i] = p >= tau
            n = 0 if i in skip else int(count[0])                   # host sync: prefill only
            if i in skip and cache.seq_exec is not None:
                cache.seq_exec[i] = False
            rows = index[:n].long()
            executed[i, rows] = True
            kv_rows = real_rows if lr.kv_policy == "compute" else rows
            x_kv = self._rms(h[kv_rows], blk.norm1)
            w, b, lora = self._kv_rows(blk)
            k, v = self._split_kv(self._linear(x_kv, w, b, lora), cos[kv_rows], sin[kv_rows])
            cache.k[i][batch_of[kv_rows], :, slot_of[kv_rows]] = k
            cache.v[i][batch_of[kv_rows], :, slot_of[kv_rows]] = v
            cache.valid[i][batch_of[kv_rows], slot_of[kv_rows]] = True
            if n == 0:
                continue
            x = x_kv if n == kv_rows.numel() else self._rms(h[rows], blk.norm1)
            w, b, lora = self._q_rows(blk)
            q = apply_rope(self._linear(x, w, b, lora).view(n, nh, hd), cos[rows], sin[rows])
            o = torch.empty_like(q)
            per_seq = torch.bincount(batch_of[rows], minlength=B).tolist()
            start = 0
            for s, c in enumerate(per_seq):                        # rows are grouped by sequence
                if c == 0:
                    continue
                sel = slice(start, start + c)
                qs = q[sel].transpose(0, 1)[None]                  # [1, H, c, hd]
                if c == prompt_len[s]:
                    # Every token of the prompt runs, so its keys are exactly its slots
                    # [T - c, T): plain causal attention, no mask.
                    o_s = _attention(qs, cache.k[i, s:s + 1, :, T - c:T], cache.v[i, s:s + 1, :, T - c:T])
                else:
                    keys = cache.valid[i, s, :T][None, :] & (
                        torch.arange(T, device=self.device)[None, :] <= slot_of[rows[sel]][:, None])
                    o_s = _attention(qs, cache.k[i, s:s + 1, :, :T], cache.v[i, s:s + 1, :, :T],
                                     keys[None, None])
                o[sel] = o_s[0].transpose(0, 1)
                start += c
            a = self._linear(o.reshape(n, qd), blk.o_w, None, blk.o_lora)
            mid = h[rows] + a
            h[rows] = mid + self._mlp(self._rms(mid, blk.norm2), blk)
        cache.length = T
        cache.seen.copy_(valid.long().sum(1))
        last = h.view(B, T, -1)[:, -1]
        return self.logits(last), executed.view(-1, B, T)

    # -- decode ---------------------------------------------------------------------------------

    def _attend_cache(self, q, cache: KVCache, i: int, index, count, length) -> torch.Tensor:
        """q [M, H, head_dim] (RoPE applied; row j < count is sequence index[j]) against layer
        i's cache slots below `length` -> [M, q_dim]; count-aware, no host reads."""
        cfg = self.config
        M = q.shape[0]
        o = ops.decode_attention(q.reshape(M, cfg.num_attention_heads, cfg.head_dim).contiguous(),
                                 cache.k[i], cache.v[i], cache.valid[i], index, count, length,
                                 self.attn_scale)
        return o.reshape(M, cfg.q_dim)

    def _block_all_rows(self, h, q, blk: FusedBlock, cos, sin, cache: KVCache, i: int,
                        state: DecodeState, length, n_keys: int | None):
        """Block i on every row of h [B, D], given their q [B, q_dim] (before RoPE). n_keys: the
        filled slots when the host knows them (then the reference's attention math runs
        directly, without its checks and host reads)."""
        cfg = self.config
        B, nh, hd = h.shape[0], cfg.num_attention_heads, cfg.head_dim
        q = apply_rope(q.reshape(B, nh, hd), cos, sin)
        if n_keys is None:
            o = self._attend_cache(q, cache, i, state.ramp, state.all_rows, length)
        else:
            o = ops.decode_attention_math(q, cache.k[i], cache.v[i], cache.valid[i], self.attn_scale,
                                          n_keys).reshape(B, cfg.q_dim)
        mid = h + self._linear(o, blk.o_w, None, blk.o_lora)
        return mid + self._mlp(self._rms(mid, blk.norm2), blk)

    def _block_listed_rows(self, h, x, blk: FusedBlock, cos, sin, cache: KVCache, i: int,
                           index, count, ramp, length) -> None:
        """Block i on the rows index[:count] of h [B, D] (x: their input norm), in place, with
        count-aware kernels and no host reads. Gathered space: row j < count is sequence
        index[j]; its rows past the count hold garbage that is never scattered back."""
        cfg = self.config
        B, nh, hd = h.shape[0], cfg.num_attention_heads, cfg.head_dim
        hg = torch.empty_like(h)
        ops.gather_rows(h, index, count, hg)
        w, b, lora = self._q_rows(blk)
        q = self._linear(x, w, b, lora, index, count)
        safe = index.clamp(min=0).long()
        q = apply_rope(q.view(B, nh, hd), cos[safe], sin[safe])
        o = self._attend_cache(q, cache, i, index, count, length)
        a = self._linear(o, blk.o_w, None, blk.o_lora, ramp, count)
        xn = ops.add_rmsnorm(hg, a, blk.norm2, self.eps, count)            # hg += a
        ops.scatter_add_rows(h, a, index, count)        # two adds, rounded as the reference
        ops.scatter_add_rows(h, self._mlp(xn, blk, ramp, count), index, count)  # rounds them

    def decode_state(self, cache: KVCache) -> DecodeState:
        """Static buffers for decoding after `prefill` on `cache`."""
        cfg, B = self.config, cache.batch_size
        seq_rows = None
        if self.lr_config.granularity == "sequence":
            seq_rows = [ops.compact_rows(cache.seq_exec[i].contiguous()) for i in range(len(self.blocks))]
        return DecodeState(
            tokens=torch.zeros(B, dtype=torch.long, device=self.device),
            positions=cache.seen.clone(),
            slot=torch.full((1,), cache.length, dtype=torch.long, device=self.device),
            logits=torch.zeros(B, cfg.vocab_size, dtype=torch.float32, device=self.device),
            executed=torch.zeros(cfg.num_hidden_layers, B, dtype=torch.bool, device=self.device),
            ramp=self._ramp(B), all_rows=torch.full((1,), B, dtype=torch.int32, device=self.device),
            seq_rows=seq_rows)

    @torch.no_grad()
    def decode_step(self, state: DecodeState, cache: KVCache, tau: float,
                    skip: frozenset[int] = frozenset(), host_counts: bool | None = None) -> None:
        """One token per sequence: state.tokens in, state.logits and state.executed out; the
        cache, positions and slot advance. Every sequence of the batch is fed a token.

        A block in `skip` runs for no row, and at tau 0 every block runs for every row, with no
        router (both known on the host). Otherwise the router decides; host_counts (None: the
        engine's) says how the step learns the rows it picked. False (the default on CUDA):
        static shapes and no host reads of device values (the counts stay on the device and the
        listed rows run), so that the step can be captured in a CUDA graph. True (the default
        elsewhere, where reading a count costs nothing): each block reads its count once and
        runs all rows without gathering when all run, nothing when none does, and the listed
        rows otherwise. cache.length keeps the prefill length (a captured graph cannot move a
        Python int); state.slot is the next slot."""
        cfg, lr = self.config, self.lr_config
        B = cache.batch_size
        if host_counts is None:
            host_counts = self.host_counts
        h = F.embedding(state.tokens, self.embed)                            # [B, D]
        cos, sin = self._rope(state.positions)
        length = state.slot + 1                         # the filled cache slots, this one included
        n_keys = int(length[0]) if host_counts else None
        for i, blk in enumerate(self.blocks):
            index = count = None
            if i in skip:
                run, rows = torch.zeros(B, dtype=torch.bool, device=self.device), "none"
            elif tau == 0.0:                            # p >= 0 always: every row runs, no router
                run, rows = torch.ones(B, dtype=torch.bool, device=self.device), "all"
            else:
                if lr.granularity == "token":
                    p, index, count = ops.route_tokens(h, blk.router_w, blk.router_b, tau)
                    run = p >= tau
                else:
                    (index, count), run = state.seq_rows[i], cache.seq_exec[i]
                rows = "listed"
                if host_counts:
                    n = int(count[0])
                    rows = "all" if n == B else "none" if n == 0 else "listed"
            state.executed[i].copy_(run)
            visible = torch.ones_like(run) if lr.kv_policy == "compute" else run
            cache.valid[i].index_copy_(1, state.slot, visible[:, None])
            x = self._rms(h, blk.norm1)
            if rows == "all":                           # one fused qkv matmul
                q, kv = self._linear(x, blk.qkv_w, blk.qkv_b, blk.qkv_lora).split(
                    [cfg.q_dim, 2 * cfg.kv_dim], dim=-1)
            else:
                w, b, lora = self._kv_rows(blk)
                kv = self._linear(x, w, b, lora)                             # every row's K/V
            k, v = self._split_kv(kv, cos, sin)
            cache.k[i].index_copy_(2, state.slot, k[:, :, None])
            cache.v[i].index_copy_(2, state.slot, v[:, :, None])
            if rows == "all":
                h = self._block_all_rows(h, q, blk, cos, sin, cache, i, state, length, n_keys)
            elif rows == "listed":
                self._block_listed_rows(h, x, blk, cos, sin, cache, i, index, count, state.ramp, length)
        state.logits.copy_(self.logits(h))
        state.positions += 1
        state.slot += 1
