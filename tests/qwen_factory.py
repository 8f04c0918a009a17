"""Random Qwen2 checkpoints for tests: written with transformers' save_pretrained, read by our loader."""
from __future__ import annotations

import torch
import transformers


QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=32768)
TINY = dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
            rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=256)


def hf_config(**overrides) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(**{**TINY, **overrides})


def save_random_qwen2(path, seed: int = 0, **overrides) -> transformers.Qwen2ForCausalLM:
    """A randomly initialised HF Qwen2ForCausalLM saved to `path`; the model is returned too.

    Norm weights and biases are randomised as well (HF initialises them to 1 and 0, which would
    hide a mix-up between them)."""
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return model
