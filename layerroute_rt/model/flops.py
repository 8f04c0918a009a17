"""Parameter and FLOPs accounting (docs/DESIGN.md section 1).

Matmul FLOPs per token per block = 2 x (block weight count) + attention 4 x context x q_dim
(QK^T and AV). A token that skips a block saves all of it except, under kv_policy "compute",
its k/v projections (2 x 2 x hidden x kv_dim), and it always pays its router (2 x hidden; under
`sequence` granularity the router runs once per sequence and block instead).
Total forward FLOPs add the lm_head (2 x hidden x vocab) for each token whose logits are
computed: every token of a teacher-forced forward, but one per sequence at prefill (its last
prompt token) and one per token a decode step feeds (`head`, with `last_tokens` for prefill).
LoRA is counted merged into the frozen weights (as the inference path runs it), so it adds no
FLOPs here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import BackboneConfig, LayerRouteConfig


def count_parameters(backbone, lr: LayerRouteConfig) -> dict[str, int]:
    """Parameter counts: routers, lora, trainable (their sum) and the frozen backbone.

    backbone: a BackboneConfig, or a transformers config of a Qwen2 model (e.g. a
    `transformers.Qwen2Config`, or `AutoConfig.from_pretrained(dir)`), read through its to_dict()."""
    if not isinstance(backbone, BackboneConfig):
        if not callable(getattr(backbone, "to_dict", None)):
            raise TypeError(f"count_parameters: backbone must be a BackboneConfig or a transformers "
                            f"config, got {type(backbone).__name__}")
        backbone = BackboneConfig.from_dict(backbone.to_dict(), source=type(backbone).__name__)
    shapes = backbone.linear_shapes()
    layers = backbone.num_hidden_layers
    d, v = backbone.hidden_size, backbone.vocab_size
    routers = layers * (d + 1)
    lora = layers * sum(lr.rank * (shapes[t][0] + shapes[t][1]) for t in lr.targets)
    # Linear weights, q/k/v biases and the two RMSNorm weights.
    block = sum(o * i for o, i in shapes.values()) + backbone.q_dim + 2 * backbone.kv_dim + 2 * d
    backbone_total = layers * block + v * d + d + (0 if backbone.tie_word_embeddings else v * d)
    return {"routers": routers, "lora": lora, "trainable": routers + lora, "backbone": backbone_total}


@dataclass
class FlopsReport:
    block_flops: float          # matmul FLOPs of all blocks if every token ran every block
    block_flops_run: float      # what ran (including routers and kept k/v projections)
    total_flops: float          # block_flops + lm_head, dense
    total_flops_run: float

    @property
    def block_skipped_pct(self) -> float:
        return 100.0 * (1.0 - self.block_flops_run / self.block_flops) if self.block_flops else 0.0

    @property
    def total_skipped_pct(self) -> float:
        return 100.0 * (1.0 - self.total_flops_run / self.total_flops) if self.total_flops else 0.0


def flops_report(backbone: BackboneConfig, lr: LayerRouteConfig, executed: torch.Tensor,
                 context: torch.Tensor, valid: torch.Tensor | None = None,
                 router_blocks: int | None = None, head: torch.Tensor | None = None) -> FlopsReport:
    """FLOPs of a forward pass given its decisions.

    executed [L, B, T] bool: token (b, t) ran block l. context [B, T]: how many keys the token
    attends to (its position + 1 for a causal model; under "drop" we still count the dense
    context, an upper bound on what a skipped token would have cost). valid [B, T]: real tokens
    (padding costs nothing); default all. router_blocks: how many blocks ran their router
    (default all; a decode step at tau 0 runs none, and none for a block in skip_layers).
    head [B, T] bool: the tokens whose logits the lm_head computes (default every valid token, as
    in a teacher-forced forward; prefill computes one per sequence: `last_tokens(valid)`).
    """
    shapes = backbone.linear_shapes()
    d = backbone.hidden_size
    weights = sum(o * i for o, i in shapes.values())
    valid = torch.ones_like(context, dtype=torch.bool) if valid is None else valid.bool()
    n_tokens = float(valid.sum())
    ctx = float((context.double() * valid).sum())
    layers = backbone.num_hidden_layers
    routed = layers if router_blocks is None else router_blocks
    per_block_dense = 2.0 * weights * n_tokens + 4.0 * backbone.q_dim * ctx
    if lr.granularity == "sequence":   # one decision per sequence and block, at its prefill
        router = 2.0 * d * float(valid.any(1).sum()) * routed
    else:
        router = 2.0 * d * n_tokens * routed
    kv_proj = 2.0 * 2 * d * backbone.kv_dim
    ran = executed.bool() & valid[None]
    ran_tokens = float(ran.sum())
    ran_ctx = float((context.double()[None] * ran).sum())
    skipped_tokens = layers * n_tokens - ran_tokens
    block_run = 2.0 * weights * ran_tokens + 4.0 * backbone.q_dim * ran_ctx + router
    if lr.kv_policy == "compute":
        block_run += kv_proj * skipped_tokens
    if head is not None and tuple(head.shape) != tuple(valid.shape):
        raise ValueError(f"flops_report: head must be a [B, T] mask like valid {tuple(valid.shape)}, "
                         f"got {tuple(head.shape)}")
    head_tokens = n_tokens if head is None else float((head.bool() & valid).sum())
    head = 2.0 * d * backbone.vocab_size * head_tokens
    block_dense = per_block_dense * layers
    return FlopsReport(block_dense, block_run, block_dense + head, block_run + head)


def last_tokens(valid: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: each row's last valid token (the one whose logits prefill computes); a row
    with no valid token has none."""
    valid = valid.bool()
    last = valid.shape[1] - 1 - valid.flip(1).long().argmax(1)
    out = torch.zeros_like(valid)
    out[torch.arange(valid.shape[0]), last] = True
    return out & valid
