"""The LayerRoute model: a frozen Qwen2 decoder whose blocks each get a router and LoRA adapters.

Two forward paths over the same modules, read top to bottom:

* `train_forward`: the autograd path. Every token computes every block (the gradient needs it)
  and a straight-through hard gate mixes the result in: g = 1[p >= tau] + p - p.detach(),
  h_out = h + g * (block(h) - h). So the forward value is exactly what inference runs.
* `forward` (what `model(input_ids)` calls): the reference inference path in plain torch with
  real skipping. Per block, only the executing tokens are gathered and fed to q_proj, attention,
  o_proj and the MLP; their outputs are scattered back. Under kv_policy "compute" a skipping token
  still writes its K/V (input norm, k_proj, v_proj, RoPE); under "drop" it is absent from that
  layer's keys. A static preallocated `KVCache` makes prefill + incremental decode equal the full
  forward. This path may synchronise with the host (it is the oracle, not the fast path).

Tensor names follow Hugging Face Qwen2 (`model.layers.3.self_attn.q_proj.weight`), so a checkpoint
loads with one `load_state_dict(assign=True)`. The trainable parameters, kept in float32 whatever
the backbone dtype, are `model.layers.{i}.router.{weight,bias}` and `...{proj}.lora_{A,B}`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, gguf_file
from .. import ops
from .cache import KVCache
from ..config import BackboneConfig, LayerRouteConfig, check_tau


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """t in float32, or float64 if it is float64: the precision norms, routers and losses use."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in float32 (float64 for a float64 model), cast back, then scale
    (the order HF uses)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm_ref(x, self.weight, self.eps)


class LoRALinear(nn.Module):
    """A frozen linear layer, optionally with a LoRA adapter: y = x W^T + b + s (x A^T) B^T.

    A [rank, in] and B [out, rank] are float32 trainable parameters; B starts at zero so that an
    untrained adapter changes nothing. `merge()` folds s B A into W for inference.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int | None, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.scale = scale
        self.adapter_enabled = True
        if rank is None:
            self.lora_A = self.lora_B = None
        else:
            self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=torch.float32))
            self.lora_B = nn.Parameter(torch.empty(out_features, rank, dtype=torch.float32))

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """A: PEFT's kaiming-uniform init, drawn on the CPU (so a CPU generator serves any
        device); B = 0."""
        if self.lora_A is not None:
            a = torch.empty(self.lora_A.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.lora_A.copy_(a)
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y over the last dim of x. With the adapter: ops.lora_linear (on CUDA the fused
        Triton kernel and its backward, elsewhere the unfused torch expression). Under autocast
        x and the frozen weight are cast to the autocast dtype, as F.linear's would be."""
        weight, bias = self.weight, self.bias
        if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if self.lora_A is None or not self.adapter_enabled:
            return F.linear(x, weight, bias)
        y = ops.lora_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias,
                            self.lora_A, self.lora_B, self.scale)
        return y.view(*x.shape[:-1], y.shape[-1])


class Block(nn.Module):
    """One Qwen2 decoder block plus its router (Linear(hidden, 1) on the block's input residual)."""

    def __init__(self, cfg: BackboneConfig, lr: LayerRouteConfig):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        shapes = cfg.linear_shapes()

        def proj(name, bias):
            out_f, in_f = shapes[name]
            return LoRALinear(in_f, out_f, bias, lr.rank if name in lr.targets else None, lr.scale)

        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self.self_attn, name, proj(name, bias=True))
        self.self_attn.o_proj = proj("o_proj", bias=False)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = nn.Module()
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self.mlp, name, proj(name, bias=False))
        self.router = nn.Linear(d, 1, dtype=torch.float32)

    def lora_layers(self) -> list[LoRALinear]:
        mods = [self.self_attn.q_proj, self.self_attn.k_proj, self.self_attn.v_proj,
                self.self_attn.o_proj, self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj]
        return [m for m in mods if m.lora_A is not None]

    def route_prob(self, h: torch.Tensor) -> torch.Tensor:
        """p = sigmoid(w . h + b) for every row of h [..., hidden] -> [...], in float32 at least
        (a bf16 router would flip decisions near tau)."""
        h = _at_least_fp32(h)
        with torch.autocast(h.device.type, enabled=False):     # autocast would run it in bf16
            return torch.sigmoid(F.linear(h, self.router.weight.to(h.dtype),
                                          self.router.bias.to(h.dtype))).squeeze(-1)

    def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.down_proj(F.silu(self.mlp.gate_proj(x)) * self.mlp.up_proj(x))


class Backbone(nn.Module):
    """Named like transformers' Qwen2Model so HF tensor names load as they are."""

    def __init__(self, cfg: BackboneConfig, lr: LayerRouteConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(cfg, lr) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainOutput:
    logits: torch.Tensor | None  # [B, T, vocab] (None with full_logits=False)
    loss: torch.Tensor | None   # ce + gate_lambda * gate_loss + agree_lambda * agree_loss (None without labels)
    ce: torch.Tensor | None     # next-token cross entropy over the loss mask
    gate_loss: torch.Tensor     # mean(p), or (mean(p) - target_rate)^2
    probs: torch.Tensor         # router probabilities [L, B, T] (sequence: broadcast over T)
    executed: torch.Tensor      # hard decisions [L, B, T] bool (padding: False)
    token_ce: torch.Tensor | None = None   # [B, T]: CE of the label at t (0 where not scored)
    scored_logits: torch.Tensor | None = None  # [N, vocab]: the logits of the N scored positions
    distill: torch.Tensor | None = None    # KL(teacher || model) over the scored positions
    agree_loss: torch.Tensor | None = None  # mean over blocks of the variance of p over the gated tokens


class LayerRouteModel(nn.Module):
    def __init__(self, cfg: BackboneConfig, lr: LayerRouteConfig):
        super().__init__()
        self.config = cfg
        self.lr_config = lr
        self.model = Backbone(cfg, lr)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            self.lm_head.weight.requires_grad_(False)

    # -- parameters ---------------------------------------------------------------------------

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors (routers and LoRA), by name, whatever their requires_grad."""
        return {n: p for n, p in self.named_parameters() if ".router." in n or ".lora_" in n}

    def reset_adapter(self, seed: int = 0) -> None:
        """Fresh routers (weight 0, bias router_init_bias: p starts near 1) and LoRA (A random
        from `seed`, B = 0), reproducible and without touching the global RNG."""
        g = torch.Generator().manual_seed(seed)
        for block in self.blocks:
            nn.init.zeros_(block.router.weight)
            nn.init.constant_(block.router.bias, self.lr_config.router_init_bias)
            for m in block.lora_layers():
                m.reset_adapter(g)

    @torch.no_grad()
    def randomize_adapter(self, seed: int = 0, lora_std: float = 0.05) -> None:
        """Random, untrained routers and LoRA, for demos, tests and benchmarks.

        Router weights are scaled to the embedding's RMS so that w . h ~ N(0, 1) at the first
        block: p spreads around 0.5 and tokens both run and skip. LoRA B is non-zero."""
        g = torch.Generator().manual_seed(seed)
        d = self.config.hidden_size
        rms = float(self.model.embed_tokens.weight.float().pow(2).mean().sqrt())
        for block in self.blocks:
            w = torch.randn(block.router.weight.shape, generator=g) / (d ** 0.5 * max(rms, 1e-6))
            block.router.weight.copy_(w)
            block.router.bias.copy_(torch.randn(1, generator=g) * 0.2)
            for m in block.lora_layers():
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) / m.lora_A.shape[1] ** 0.5)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * lora_std)

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Within the block, LoRA is off: the frozen base (with tau=0, the plain backbone)."""
        layers = [m for block in self.blocks for m in block.lora_layers()]
        for m in layers:
            m.adapter_enabled = False
        try:
            yield self
        finally:
            for m in layers:
                m.adapter_enabled = True

    def save_adapter(self, path) -> None:
        """Save routers + LoRA and both configs to the directory `path` (atomically)."""
        checkpoint.save_adapter(path, self.adapter_state_dict(), self.lr_config.to_dict(),
                                self.config.to_dict())

    def load_adapter(self, path) -> None:
        """Load routers + LoRA saved by `save_adapter` (backbone shape, rank, alpha, targets,
        tensor names and shapes checked)."""
        stored = checkpoint.read_adapter_config(path, self.config)
        diff = [f"{k}: adapter {stored.get(k)!r}, model {v!r}" for k, v in
                (("rank", self.lr_config.rank), ("alpha", self.lr_config.alpha),
                 ("targets", list(self.lr_config.targets))) if stored.get(k) != v]
        if diff:
            raise checkpoint.CheckpointError(
                f"{path}/{checkpoint.ADAPTER_CONFIG_FILE}: the adapter does not match this model's "
                f"LayerRouteConfig ({'; '.join(diff)})")
        expected = {n: tuple(p.shape) for n, p in self.adapter_state_dict().items()}
        tensors = checkpoint.load_adapter_tensors(path, expected)
        with torch.no_grad():
            for name, p in self.adapter_state_dict().items():
                p.copy_(tensors[name])

    def export_peft(self, path, base_model: str | None = None) -> None:
        """Write the LoRA part as a PEFT adapter that transformers + peft load (no routers)."""
        lora = {n: p for n, p in self.adapter_state_dict().items() if ".lora_" in n}
        lr = self.lr_config
        checkpoint.export_peft(path, lora, lr.rank, lr.alpha, lr.targets, base_model)

    # -- shared pieces ------------------------------------------------------------------------

    def _tau(self, tau: float | None) -> float:
        return self.lr_config.tau if tau is None else check_tau(tau)

    def _skip_set(self, skip_layers) -> frozenset[int]:
        if skip_layers is None:
            return frozenset()
        n = self.config.num_hidden_layers
        bad = [i for i in skip_layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
        if bad:
            raise ValueError(f"skip_layers: block indices must be integers in [0, {n}), got {bad}")
        return frozenset(skip_layers)

    def _check_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
                torch.int32, torch.int64):
            raise ValueError("input_ids must be an integer tensor of shape [batch, seq_len], got "
                             f"{getattr(input_ids, 'dtype', type(input_ids))} "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: seq_len must be >= 1")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids: token ids must lie in [0, {self.config.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal "
                             f"input_ids shape {tuple(input_ids.shape)}")
        return attention_mask.bool()

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.model.norm(h), self.head_weight())

    # -- training path ------------------------------------------------------------------------

    def train_forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                      route_mask: torch.Tensor | None = None, tau: float | None = None,
                      skip_layers=None, full_logits: bool = True,
                      teacher_logits: torch.Tensor | None = None,
                      distill_weight: float = 0.0,
                      label_weight: torch.Tensor | None = None) -> TrainOutput:
        """Autograd path: every token computes every block; straight-through hard gates.

        labels [B, T]: the next-token targets are labels[:, 1:] for logits[:, :-1]; loss_mask
        [B, T] marks the label positions that count (the step's own tokens; default: all
        attended). route_mask [B, T] marks the tokens whose mean feeds a `sequence` router and
        whose p counts in the gate term (default: attention_mask); under `sequence` each
        sequence counts once in the gate term. full_logits=False (with labels) computes the
        logits only where a label is scored: out.logits is then None, out.token_ce has the loss.
        out.scored_logits holds the logits of the scored positions (in order, row-major), so a
        no-grad call gives a teacher's: with teacher_logits [N, vocab] from such a call, the loss
        adds distill_weight x KL(softmax(teacher) || softmax(logits)), the mean over the scored
        positions (self-distillation, e.g. from the frozen dense model). label_weight [B, T]
        weighs each label position's KL in that mean (the sum of weight x KL over the scored
        positions, divided by their number; default: weight 1).
        """
        cfg, lr = self.config, self.lr_config
        tau, skip = self._tau(tau), self._skip_set(skip_layers)
        valid = self._check_ids(input_ids, attention_mask)
        route = valid if route_mask is None else (route_mask.bool() & valid)
        B, T = input_ids.shape
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        h = self.model.embed_tokens(input_ids)
        inv_freq = ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta, h.device)
        cos, sin = ops.rope_cos_sin(positions, inv_freq, h.dtype)
        route_f = route.float()
        # Every token a key at every layer (kv policy "compute", no padding): plain causal
        # attention, no mask (see _attention).
        causal_only = lr.kv_policy == "compute" and bool(valid.all())
        if not causal_only:
            causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
            eye = torch.eye(T, dtype=torch.bool, device=h.device)
        probs, executed = [], []
        for i, block in enumerate(self.blocks):
            if lr.granularity == "token":
                p = block.route_prob(h)                                         # [B, T]
            else:
                p = block.route_prob(_masked_mean(h, route))[:, None].expand(B, T)  # [B, T]
            hard = (p >= tau) & valid & (i not in skip)
            keys = valid if lr.kv_policy == "compute" else hard
            mask = None if causal_only else causal & (keys[:, None, :] | eye)   # [B, Tq, Tk]
            out = self._block_dense(block, h, cos, sin, mask)
            h = gate_mix(h, out, p, hard)
            probs.append(p)
            executed.append(hard)
        probs_t, executed_t = torch.stack(probs), torch.stack(executed)
        # the gated p of each block: every gated token's, or each sequence's once
        p_l, w = (probs_t, route_f) if lr.granularity == "token" else (probs_t[:, :, 0], route.any(1).float())
        n = w.sum().clamp(min=1)
        mean_l = (p_l * w).flatten(1).sum(1) / n                               # [L]
        mean_p = mean_l.mean()
        gate_loss = mean_p if lr.target_rate is None else (mean_p - lr.target_rate) ** 2
        agree_loss = (((p_l - mean_l.view(-1, *[1] * (p_l.dim() - 1))) ** 2 * w).flatten(1).sum(1) / n).mean()
        ce = loss = token_ce = scored = distill = None
        logits = self._logits(h) if full_logits or labels is None else None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            ignored = labels == -100                                 # the HF convention
            lmask = (valid if loss_mask is None else (loss_mask.bool() & valid)) & ~ignored
            bad = lmask & ((labels < 0) | (labels >= cfg.vocab_size))
            if bad.any():
                raise ValueError(f"labels: ids must lie in [0, {cfg.vocab_size}) or be -100, got "
                                 f"{labels[bad][:5].tolist()}")
            tgt_mask = lmask[:, 1:] & valid[:, :-1]        # positions predicting a scored label
            scored = logits[:, :-1][tgt_mask] if logits is not None else self._logits(h[:, :-1][tgt_mask])
            ce_sel = F.cross_entropy(_at_least_fp32(scored), labels[:, 1:][tgt_mask], reduction="none")
            token_ce = torch.zeros(B, T, dtype=ce_sel.dtype, device=h.device)
            token_ce[:, 1:][tgt_mask] = ce_sel
            ce = ce_sel.sum() / tgt_mask.sum().clamp(min=1)
            loss = ce + lr.gate_lambda * gate_loss
            if lr.agree_lambda > 0:
                loss = loss + lr.agree_lambda * agree_loss
            if teacher_logits is not None:
                if teacher_logits.shape != scored.shape:
                    raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must equal the "
                                     f"scored logits' {tuple(scored.shape)} (one row per scored position)")
                kl = F.kl_div(F.log_softmax(_at_least_fp32(scored), -1),
                              F.log_softmax(_at_least_fp32(teacher_logits), -1),
                              log_target=True, reduction="none").sum(-1)        # [N]
                if label_weight is not None:
                    if label_weight.shape != labels.shape:
                        raise ValueError(f"label_weight shape {tuple(label_weight.shape)} must equal "
                                         f"labels shape {tuple(labels.shape)}")
                    kl = kl * label_weight[:, 1:][tgt_mask].to(kl.dtype)
                distill = kl.sum() / max(kl.numel(), 1)
                loss = loss + distill_weight * distill
        return TrainOutput(logits, loss, ce, gate_loss, probs_t, executed_t, token_ce,
                           None if labels is None else scored, distill, agree_loss)

    def _block_dense(self, block: Block, h, cos, sin, mask) -> torch.Tensor:
        """The whole block on every token of h [B, T, D]; mask [B, Tq, Tk] says who sees whom
        (None: causal)."""
        cfg = self.config
        B, T, _ = h.shape
        x = block.input_layernorm(h)
        attn = block.self_attn
        q = ops.rope_ref(attn.q_proj(x).view(B, T, cfg.num_attention_heads, cfg.head_dim), cos, sin)
        k = ops.rope_ref(attn.k_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim), cos, sin)
        v = attn.v_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim)
        o = _attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                       None if mask is None else mask[:, None])
        h = h + attn.o_proj(o.transpose(1, 2).reshape(B, T, cfg.q_dim))
        return h + block.mlp_forward(block.post_attention_layernorm(h))

    # -- reference inference path -------------------------------------------------------------

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, tau: float | None = None, skip_layers=None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                route_mask: torch.Tensor | None = None, return_executed: bool = False):
        """Logits [B, T, vocab] with real skipping (gather the executing rows, run, scatter back).

        With a `cache`, the tokens are appended after those already cached (prefill, then one
        or more tokens per decode call); without one, a temporary cache holds just this call.
        attention_mask [B, T] marks real tokens (False: padding, e.g. left padding of a batch).
        `sequence` granularity decides at the first call on a cache (or after cache.new_step()),
        from the mean over route_mask's tokens (default: the call's real tokens), as
        train_forward does; the decisions hold for the calls that follow. A prompt is therefore
        prefilled in one call. With return_executed, also returns the decisions [L, B, T].
        """
        cfg, lr = self.config, self.lr_config
        tau, skip = self._tau(tau), self._skip_set(skip_layers)
        valid = self._check_ids(input_ids, attention_mask)
        B, T = input_ids.shape
        h = self.model.embed_tokens(input_ids)
        if cache is None:
            cache = KVCache(cfg, B, T, h.dtype, h.device)
        if cache.batch_size != B:
            raise ValueError(f"cache: built for batch {cache.batch_size}, called with batch {B}")
        if cache.dtype != h.dtype or cache.device != h.device:
            raise ValueError(f"cache: built for {cache.dtype} on {cache.device}, the model runs "
                             f"{h.dtype} on {h.device}")
        if cache.length + T > cache.max_len:
            raise ValueError(f"cache: {cache.length} cached + {T} new tokens exceed max_len {cache.max_len}")
        route = valid if route_mask is None else (route_mask.bool() & valid)
        if lr.granularity == "sequence" and cache.seq_exec is None:
            cache.decide_sequences()
            decide_sequences = True
        else:
            decide_sequences = False
        start = cache.length
        slots = torch.arange(start, start + T, device=h.device)
        positions = cache.seen[:, None] + valid.long().cumsum(1) - 1                  # [B, T]
        inv_freq = ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta, h.device)
        cos, sin = ops.rope_cos_sin(positions.clamp(min=0), inv_freq, h.dtype)
        cache.valid[:, :, start:start + T] = False

        flat = h.reshape(B * T, -1)
        cos, sin, valid_f = cos.reshape(B * T, -1), sin.reshape(B * T, -1), valid.reshape(-1)
        batch_of = torch.arange(B, device=h.device).repeat_interleave(T)
        slot_of = slots.repeat(B)
        executed = []
        for i, block in enumerate(self.blocks):
            if lr.granularity == "token":
                run = (block.route_prob(flat) >= tau) & valid_f
            else:
                if decide_sequences:
                    cache.seq_exec[i] = block.route_prob(_masked_mean(h, route)) >= tau
                run = cache.seq_exec[i][batch_of] & valid_f
            if i in skip:
                run = torch.zeros_like(run)
            executed.append(run.view(B, T))
            rows = run.nonzero().squeeze(1)                                            # gather list
            kv_rows = valid_f.nonzero().squeeze(1) if lr.kv_policy == "compute" else rows
            flat = self._block_rows(i, block, flat, rows, kv_rows, cos, sin, batch_of, slot_of,
                                    cache, end=start + T)
            h = flat.view(B, T, -1)
        cache.length += T
        cache.seen += valid.long().sum(1)
        logits = self._logits(flat.view(B, T, -1))
        return (logits, torch.stack(executed)) if return_executed else logits

    def _block_rows(self, i, block, flat, rows, kv_rows, cos, sin, batch_of, slot_of, cache, end):
        """Block i on the listed rows only; kv_rows (all real rows under "compute", else the
        same rows) write K/V. Queries see cache slots [0, end) that are valid and not later."""
        cfg, attn = self.config, block.self_attn
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        x_kv = block.input_layernorm(flat[kv_rows])
        k = ops.rope_ref(attn.k_proj(x_kv).view(-1, nkv, hd), cos[kv_rows], sin[kv_rows])
        v = attn.v_proj(x_kv).view(-1, nkv, hd)
        b_kv, s_kv = batch_of[kv_rows], slot_of[kv_rows]
        cache.k[i][b_kv, :, s_kv] = k
        cache.v[i][b_kv, :, s_kv] = v
        cache.valid[i, b_kv, s_kv] = True
        if rows.numel() == 0:
            return flat
        x = x_kv if rows is kv_rows else block.input_layernorm(flat[rows])
        q = ops.rope_ref(attn.q_proj(x).view(-1, nh, hd), cos[rows], sin[rows])
        b_q, s_q = batch_of[rows], slot_of[rows]
        o = torch.empty_like(q)
        for b in b_q.unique().tolist():                        # one attention call per sequence
            sel = (b_q == b).nonzero().squeeze(1)
            keys = cache.valid[i, b, :end][None, :] & (torch.arange(end, device=q.device)[None, :]
                                                       <= s_q[sel][:, None])
            kb, vb = cache.k[i, b, :, :end], cache.v[i, b, :, :end]
            o[sel] = _attention(q[sel].transpose(0, 1)[None], kb[None], vb[None],
                                keys[None, None])[0].transpose(0, 1)
        h = flat[rows] + attn.o_proj(o.reshape(-1, cfg.q_dim))
        h = h + block.mlp_forward(block.post_attention_layernorm(h))
        return flat.index_copy(0, rows, h)                      # scatter back


class _StraightThroughMix(torch.autograd.Function):
    """h_out = h + g (out - h) with the straight-through gate g = 1[hard] + p - stop_grad(p).

    Forward: exactly out where hard, h elsewhere (no 0 * inf when a skipped token's block
    overflows). Backward, from h_out = h + g (out - h) with g's value = hard:
        dL/dout = hard * dL/dh_out
        dL/dh   = (1 - hard) * dL/dh_out
        dL/dp   = sum over hidden of (out - h) * dL/dh_out      (dg/dp = 1)
    """

    @staticmethod
    def forward(ctx, h, out, p, hard):
        ctx.save_for_backward(h, out, hard)
        ctx.p_dtype = p.dtype
        return torch.where(hard[..., None], out, h)

    @staticmethod
    def backward(ctx, grad):
        h, out, hard = ctx.saved_tensors
        run = hard[..., None]
        grad_p = (_at_least_fp32(grad) * (_at_least_fp32(out) - _at_least_fp32(h))).sum(-1)
        return (torch.where(run, 0, grad), torch.where(run, grad, 0), grad_p.to(ctx.p_dtype), None)


def gate_mix(h: torch.Tensor, out: torch.Tensor, p: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """The block's output under the straight-through hard gate (see _StraightThroughMix).
    h, out [B, T, D]; p [B, T] (router probability); hard [B, T] bool (the decision)."""
    return _StraightThroughMix.apply(h, out, p, hard)


def _masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of h [B, T, D] over the tokens where mask [B, T] is True (at least fp32) -> [B, D]."""
    m = mask.to(_at_least_fp32(h).dtype)
    return (_at_least_fp32(h) * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)


def _attention(q, k, v, mask=None):
    """Grouped-query attention. q [B, H, Tq, hd], k/v [B, Hkv, Tk, hd] (H a multiple of Hkv);
    mask broadcast to [B, 1, Tq, Tk] (True: attend), or None for causal attention (Tq == Tk,
    query t sees keys 0..t).

    Without a mask SDPA takes the KV heads as they are (enable_gqa: no K/V copies, and on CUDA
    flash attention, with no [Tq, Tk] mask or scores in memory). With a mask, K/V are repeated
    to the H query heads and the mask is broadcast over them: CUDA's memory-efficient kernel,
    the one that takes a mask, does not take fewer KV heads (SDPA would fall back to its math
    kernel, [Tq, Tk] scores per head)."""
    groups = q.shape[1] // k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def load(backbone_dir, adapter=None, config: LayerRouteConfig | None = None,
         device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LayerRouteModel:
    """Load a Hugging Face Qwen2 checkpoint directory, or a Qwen2 GGUF file (dequantized to
    `dtype`), as a frozen LayerRoute backbone.

    The module is built on the meta device and the checkpoint's tensors are assigned into it, read
    one at a time from the memory-mapped files (no full-precision copy of the model). Routers and
    LoRA (float32) are fresh (dense start, B = 0) unless `adapter` names a directory written by
    `save_adapter`. With both `adapter` and `config`, they must agree on rank, alpha and targets;
    the other fields of `config` (tau, granularity, kv_policy, ...) then apply.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"load: dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    if config is not None and not isinstance(config, LayerRouteConfig):
        raise TypeError(f"load: config must be a LayerRouteConfig, got {type(config).__name__}")
    from_gguf = gguf_file.is_gguf(backbone_dir)
    cfg = (gguf_file.read_backbone_config if from_gguf else checkpoint.read_backbone_config)(backbone_dir)
    if adapter is not None:
        stored = LayerRouteConfig.from_dict(checkpoint.read_adapter_config(adapter, cfg),
                                            source=f"{adapter}/{checkpoint.ADAPTER_CONFIG_FILE}")
        if config is None:
            config = stored
        else:
            diff = [f"{k}: adapter {getattr(stored, k)!r}, config {getattr(config, k)!r}"
                    for k in ("rank", "alpha", "targets") if getattr(stored, k) != getattr(config, k)]
            if diff:
                raise ValueError(f"load: config does not match the adapter in {adapter} ({'; '.join(diff)})")
    config = config or LayerRouteConfig()
    with torch.device("meta"):
        model = LayerRouteModel(cfg, config)
    expected = checkpoint.expected_backbone_shapes(cfg)
    if from_gguf:
        tensors = gguf_file.load_tensors(backbone_dir, expected, dtype, device)
    else:
        tensors = checkpoint.load_backbone_tensors(backbone_dir, expected, dtype, device,
                                                   cfg.tie_word_embeddings)
    model.load_state_dict(tensors, strict=False, assign=True)
    # Materialise the trainable parameters (still on meta) in float32 on the device.
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            assert p.requires_grad, f"backbone tensor {name} was not loaded"
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr,
                    nn.Parameter(torch.empty(p.shape, dtype=torch.float32, device=device)))
    model.reset_adapter()
    model.source_dir = Path(backbone_dir)       # where generate() finds the tokenizer (dir or .gguf)
    if adapter is not None:
        model.load_adapter(adapter)
    return model.eval()
