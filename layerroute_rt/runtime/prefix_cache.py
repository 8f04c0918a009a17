"""The engine's prefix cache: K/V of earlier sequences, reused by prompts that start with them.

An entry is one sequence as the engine computed it: its tokens (prompt, then the generated tokens
a decode step fed back), and per layer their K and V, the cache validity of each (False where a
token skipped the layer under kv_policy "drop") and who ran the block. Entries are kept per key
(tau, skip set, granularity, kv_policy: what decides how a token's K/V came out; the adapter is
the engine's own), least recently used first, within a budget of tokens summed over entries.

Reuse is exact under `token` granularity (each token's decisions and K/V depend on its prefix
alone, so a cached token is what recomputing it would give). Under `sequence` granularity a
cached token keeps the decision of the step it was computed in, and the new tokens are routed as
a step of their own: the same as prefilling the cached tokens and then the new ones as
consecutive segments (model.forward with cache.new_step() between them).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

DEFAULT_TOKENS = 16384


@dataclass
class Entry:
    tokens: tuple[int, ...]
    k: torch.Tensor             # [L, Hkv, n, hd]
    v: torch.Tensor             # [L, Hkv, n, hd]
    valid: torch.Tensor         # [L, n] bool: the token's K/V are in layer l's keys
    executed: torch.Tensor      # [L, n] bool: the token ran block l (cpu)

    def __len__(self) -> int:
        return len(self.tokens)


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    """The length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = (torch.tensor(a[:n]) != torch.tensor(b[:n])).nonzero()
    return n if diff.numel() == 0 else int(diff[0, 0])


class PrefixCache:
    """Entries within `max_tokens` tokens (the K/V of a token at Qwen2.5-0.5B in float32 take
    24 KiB), evicted least recently used first. An entry longer than the budget is not kept."""

    def __init__(self, max_tokens: int = DEFAULT_TOKENS):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"PrefixCache: max_tokens must be an integer >= 1, got {max_tokens!r}")
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, tuple[tuple, Entry]] = OrderedDict()
        self._next_id = 0
        self.tokens_held = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.tokens_held = 0

    def lookup(self, key: tuple, tokens: list[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `tokens` under `key`, and how many of its
        tokens to reuse: at most len(tokens) - 1, so that one token is left to compute the
        logits from. (None, 0) on a miss. A hit becomes the most recently used entry."""
        best, best_n, best_id = None, 0, None
        for entry_id, (k, entry) in self._entries.items():
            if k != key:
                continue
            n = min(common_prefix(entry.tokens, tokens), len(tokens) - 1)
            if n > best_n:
                best, best_n, best_id = entry, n, entry_id
        if best_id is not None:
            self._entries.move_to_end(best_id)
        return best, best_n

    def store(self, key: tuple, entry: Entry) -> None:
        """Keep `entry` as the most recently used one, dropping the entries it extends (same key,
        their tokens a prefix of its own: it holds their K/V too) and then the least recently
        used ones until the budget holds."""
        if len(entry) == 0 or len(entry) > self.max_tokens:
            return
        for entry_id, (k, old) in list(self._entries.items()):
            if k == key and len(old) <= len(entry) and common_prefix(old.tokens, list(entry.tokens)) == len(old):
                self._drop(entry_id)
        while self._entries and self.tokens_held + len(entry) > self.max_tokens:
            self._drop(next(iter(self._entries)))
        self._entries[self._next_id] = (key, entry)
        self._next_id += 1
        self.tokens_held += len(entry)

    def _drop(self, entry_id: int) -> None:
        _, entry = self._entries.pop(entry_id)
        self.tokens_held -= len(entry)
