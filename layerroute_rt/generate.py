"""Prefill, decode and sampling over the model's reference path, with skip statistics.

This is the CPU path of `generate()`: the model's reference forward (gather / run / scatter per
block) with a static KV cache; prompts of different lengths are left-padded into one batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .flops import flops_report
from .model import KVCache, LayerRouteModel


@dataclass
class GenerateOutput:
    tokens: list[list[int]]              # the new tokens of each sequence (EOS included if hit)
    executed: torch.Tensor               # [L, B, prompt + new] bool: who ran which block
    valid: torch.Tensor                  # [B, prompt + new] bool: real tokens (no padding)
    stats: dict = field(default_factory=dict)


def _as_batch(prompts, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] (no padding) or a list of token-id lists -> left-padded ids and mask."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise ValueError(f"generate: input_ids must be [batch, seq_len], got shape {list(prompts.shape)}")
        prompts = prompts.tolist()
    if not prompts or not all(isinstance(p, (list, tuple)) for p in prompts):
        raise ValueError("generate: expected input_ids [batch, seq_len] or a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty")
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = True
    return ids, mask


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from logits [B, vocab]: greedy at temperature 0, else top-k / top-p."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p   # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: LayerRouteModel, input_ids, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             tau: float | None = None, skip_layers=None, seed: int | None = None) -> GenerateOutput:
    """Generate up to `max_new_tokens` per sequence; each stops on its own at `eos_token_id`.

    stats: prefill_ms, decode_ms_per_token, skip_rate_per_layer (fraction of real tokens that
    skipped each block, prompt and new tokens), block_flops_skipped_pct, total_flops_skipped_pct.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not temperature >= 0.0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be an integer >= 1, got {top_k!r}")
    device = model.model.embed_tokens.weight.device
    ids, mask = _as_batch(input_ids, model.config.vocab_size)
    ids, mask = ids.to(device), mask.to(device)
    B, T = ids.shape
    if T + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"generate: prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's max_position_embeddings ({model.config.max_position_embeddings})")
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = KVCache(model.config, B, T + max_new_tokens, model.model.embed_tokens.weight.dtype, device)

    t0 = time.perf_counter()
    logits, executed = model(ids, tau=tau, skip_layers=skip_layers, attention_mask=mask,
                             cache=cache, return_executed=True)
    prefill_ms = 1e3 * (time.perf_counter() - t0)
    all_exec, all_valid = [executed], [mask]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new = []
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        nxt = sample(logits[:, -1], temperature, top_k, top_p, generator)
        new.append(torch.where(done, -1, nxt))
        if eos_token_id is not None:
            done |= nxt == eos_token_id
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        live = ~done
        logits, executed = model(nxt[:, None], tau=tau, skip_layers=skip_layers,
                                 attention_mask=live[:, None], cache=cache, return_executed=True)
        all_exec.append(executed)
        all_valid.append(live[:, None])
    decode_steps = len(all_exec) - 1
    decode_ms = 1e3 * (time.perf_counter() - t0) / max(decode_steps, 1)

    executed, valid = torch.cat(all_exec, dim=2).cpu(), torch.cat(all_valid, dim=1).cpu()
    tokens = [[t for t in row if t >= 0] for row in torch.stack(new, 1).tolist()]
    report = flops_report(model.config, model.lr_config, executed, valid.long().cumsum(1), valid)
    n_real = valid.sum().clamp(min=1)
    stats = {
        "prefill_ms": prefill_ms,
        "decode_ms_per_token": decode_ms if decode_steps else None,
        "skip_rate_per_layer": (1.0 - (executed & valid).sum((1, 2)) / n_real).tolist(),
        "block_flops_skipped_pct": report.block_skipped_pct,
        "total_flops_skipped_pct": report.total_skipped_pct,
    }
    return GenerateOutput(tokens, executed, valid, stats)
