"""Sampling and text: the next token from logits, the checkpoint's tokenizer, and incremental
detokenization of a stream (what generate() and the scheduler share)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..model import gguf_file


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from logits [B, vocab]: greedy at temperature 0, else top-k / top-p."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.double()           # float64: finite for any temperature > 0 (1e-300 too)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p          # keep the smallest set reaching top_p
        drop[:, 0] = False                 # and the top token always (rounding of a tiny top_p)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def checkpoint_tokenizer(directory):
    """The tokenizer a checkpoint directory ships (transformers, local files only), or a GGUF
    file's, or None."""
    if directory is not None and gguf_file.is_gguf(directory):
        return gguf_file.tokenizer(directory)
    if directory is None or not any((Path(directory) / f).exists()
                                    for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _no_tokenizer(engine) -> str:
    if engine.tokenizer_dir is None:
        return "the model was not loaded from a checkpoint directory (layerroute_rt.load)"
    return f"{engine.tokenizer_dir} has none (tokenizer.json or tokenizer_config.json)"


def load_tokenizer(engine):
    """The engine's checkpoint tokenizer, loaded once and cached on the engine (or None)."""
    if not hasattr(engine, "_tokenizer"):
        engine._tokenizer = checkpoint_tokenizer(engine.tokenizer_dir)
    return engine._tokenizer


class TextDeltas:
    """Incremental detokenization of each sequence (a window of recent tokens decoded, as vLLM
    and TGI do): a token's text is given once it decodes to whole characters."""

    def __init__(self, tok, batch: int):
        self.tok = tok
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.prefix = [0] * batch          # the window's start
        self.read = [0] * batch            # tokens whose text was given

    def push(self, b: int, token: int, final: bool) -> str:
        ids = self.ids[b]
        ids.append(token)
        before = self.tok.decode(ids[self.prefix[b]:self.read[b]], skip_special_tokens=True)
        text = self.tok.decode(ids[self.prefix[b]:], skip_special_tokens=True)
        if len(text) > len(before) and (final or not text.endswith("\ufffd")):
            self.prefix[b], self.read[b] = self.read[b], len(ids)
            return text[len(before):]
        return ""
