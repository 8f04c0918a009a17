"""The static, preallocated KV cache shared by the reference path and the inference engine."""
from __future__ import annotations

import torch

from ..config import BackboneConfig


class KVCache:
    """K and V per layer with per-layer key validity, allocated once.

    k, v: [layers, batch, kv_heads, max_len, head_dim], so that k[l] is the [B, Hkv, S, hd] operand
    attention reads without a copy. Slot s of sequence b holds the s-th token fed to the model
    (padding included). valid[l, b, s] says whether layer l may attend to it: False for padding,
    for slots not yet written, and under kv_policy "drop" for a token that skipped layer l.
    seen[b] counts the real tokens of sequence b so far (the next RoPE position).
    seq_exec[l, b] holds the per-sequence decisions of `sequence` granularity, fixed at prefill.
    layers[l] is (k[l], v[l], valid[l]), the views a block's stages take, made once.
    """

    def __init__(self, cfg: BackboneConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KVCache: batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(cfg.num_hidden_layers, batch_size, max_len, dtype=torch.bool,
                                 device=device)
        self.layers = [(self.k[i], self.v[i], self.valid[i]) for i in range(cfg.num_hidden_layers)]
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.seq_exec: torch.Tensor | None = None
        self._seq_buffer = torch.zeros(cfg.num_hidden_layers, batch_size, dtype=torch.bool,
                                       device=device)
        self.length = 0
        self.dtype, self.device = dtype, self.k.device
        self.max_len = max_len
        self.batch_size = batch_size

    def reset(self) -> None:
        """Empty the cache for a new batch, keeping its buffers (stale K/V are masked by valid)."""
        self.valid.zero_()
        self.seen.zero_()
        self.seq_exec = None
        self.length = 0

    def decide_sequences(self) -> torch.Tensor:
        """A zeroed [layers, batch] buffer for new sequence decisions, made seq_exec. It is the
        same tensor every time, so a captured CUDA graph that reads seq_exec stays valid."""
        self._seq_buffer.zero_()
        self.seq_exec = self._seq_buffer
        return self.seq_exec

    def new_step(self) -> None:
        """Under `sequence` granularity, let the next call decide again (a new step begins);
        otherwise the decisions of the first call on this cache hold."""
        self.seq_exec = None
