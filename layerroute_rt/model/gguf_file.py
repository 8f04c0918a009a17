"""Qwen2-architecture GGUF files (llama.cpp's format): config, tensors and tokenizer.

`read_config(path)` gives the Hugging Face `config.json` fields from the file's metadata,
`load_tensors(path, cfg, ...)` dequantizes the tensors (with the `gguf` package) under their
Hugging Face names, `tokenizer(path)` builds the tokenizer with its chat template (transformers'
GGUF tokenizer conversion), and `convert(path, out_dir)` writes a Hugging Face directory (bf16
safetensors, config, tokenizer, generation config) atomically.

GGUF stores a matrix [out, in] with its dims listed innermost first ([in, out]); the dequantized
rows come out as [out, in], the layout torch and Hugging Face use. Qwen2's q/k weights are stored
as they are in the HF checkpoint (llama.cpp permutes them for llama only).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, CheckpointNotFoundError, atomic_dir, atomic_save_safetensors, \
    atomic_write_json
from ..config import BackboneConfig

# Tensor types we dequantize (the gguf package has numpy dequantizers for all of them).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_0", "Q5_1", "Q5_K", "Q4_0", "Q4_1",
                   "Q4_K", "Q3_K", "Q2_K")

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm.weight": "input_layernorm.weight",
                "ffn_norm.weight": "post_attention_layernorm.weight",
                "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
                "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
                "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
                "attn_output.weight": "self_attn.o_proj.weight",
                "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
                "ffn_down.weight": "mlp.down_proj.weight"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


def is_gguf(path) -> bool:
    """Whether `path` names a GGUF file (by its suffix; the contents are checked when read)."""
    return str(path).lower().endswith(".gguf")


def hf_name(name: str) -> str | None:
    """The Hugging Face Qwen2 name of a GGUF tensor name (None for one we do not know)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def _reader(path):
    """A gguf.GGUFReader over `path`, with clear errors for a missing, foreign or truncated file."""
    import gguf

    file = Path(path)
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file}: no such GGUF file")
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{file}: not a GGUF file (its first bytes are {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as e:   # numpy/struct errors from a file cut short inside its header
        raise CheckpointError(f"{file}: truncated or corrupt GGUF file ({type(e).__name__}: {e})") from e
    size = file.stat().st_size
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise CheckpointError(f"{file}: truncated GGUF file ({size:,} bytes; its tensors need {end:,})")
    return reader


def _field(reader, key: str, required: bool = True, file=None):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise CheckpointError(f"{file}: GGUF metadata field {key!r} is missing")
        return None
    return field.contents()


def _config_dict(reader, file) -> dict:
    arch = _field(reader, "general.architecture", file=file)
    if arch != "qwen2":
        raise CheckpointError(f"{file}: GGUF architecture {arch!r} is not supported (expected 'qwen2')")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise CheckpointError(f"{file}: GGUF tensor 'token_embd.weight' is missing")
    hidden = int(_field(reader, "qwen2.embedding_length", file=file))
    heads = int(_field(reader, "qwen2.attention.head_count", file=file))
    vocab = int(names["token_embd.weight"].shape[-1])
    cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
           "vocab_size": vocab, "hidden_size": hidden,
           "intermediate_size": int(_field(reader, "qwen2.feed_forward_length", file=file)),
           "num_hidden_layers": int(_field(reader, "qwen2.block_count", file=file)),
           "num_attention_heads": heads,
           "num_key_value_heads": int(_field(reader, "qwen2.attention.head_count_kv", required=False)
                                      or heads),
           "rope_theta": float(_field(reader, "qwen2.rope.freq_base", required=False) or 1e6),
           # stored as float32 (9.9999997e-07): rounded back to the value the HF config holds
           "rms_norm_eps": float(f"{_field(reader, 'qwen2.attention.layer_norm_rms_epsilon', file=file):.6g}"),
           "max_position_embeddings": int(_field(reader, "qwen2.context_length", required=False) or 32768),
           "tie_word_embeddings": "output.weight" not in names,
           "use_sliding_window": False, "torch_dtype": "bfloat16"}
    for key, hf in (("tokenizer.ggml.bos_token_id", "bos_token_id"),
                    ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        value = _field(reader, key, required=False)
        if value is not None:
            cfg[hf] = int(value)
    return cfg


def read_config(path) -> dict:
    """The Hugging Face config.json fields of a Qwen2 GGUF file, from its metadata."""
    return _config_dict(_reader(path), Path(path))


def read_backbone_config(path) -> BackboneConfig:
    try:
        return BackboneConfig.from_dict(read_config(path), source=str(path))
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def load_tensors(path, expected: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Exactly the tensors of `expected` (HF name -> shape), dequantized to `dtype` on `device`.

    Names, shapes and tensor types are all checked before any tensor is dequantized."""
    import gguf

    file = Path(path)
    reader = _reader(file)
    _config_dict(reader, file)                      # the architecture check
    by_name, unknown = {}, []
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            unknown.append(t.name)
        else:
            by_name[name] = t
    unexpected = unknown + [f"{t.name} (as {n})" for n, t in by_name.items() if n not in expected]
    if unexpected:
        raise CheckpointError(f"{file}: {len(unexpected)} unexpected GGUF tensor(s) for this Qwen2 config: "
                              f"{'; '.join(unexpected[:5])}")
    missing = [n for n in expected if n not in by_name]
    if missing:
        raise CheckpointError(f"{file}: missing {len(missing)} tensor(s): {'; '.join(missing[:5])}")
    problems = []
    for name, shape in expected.items():
        t = by_name[name]
        stored = tuple(int(s) for s in reversed(t.shape.tolist()))
        if stored != tuple(shape):
            problems.append(f"{t.name} ({name}) has shape {stored}, expected {tuple(shape)}")
        if t.tensor_type.name not in SUPPORTED_TYPES:
            problems.append(f"{t.name} has quantization type {t.tensor_type.name}, which is not "
                            f"supported (supported: {', '.join(SUPPORTED_TYPES)})")
    if problems:
        raise CheckpointError(f"{file}: {len(problems)} tensor(s) cannot be loaded: {'; '.join(problems[:5])}")
    out = {}
    for name, shape in expected.items():
        t = by_name[name]
        array = gguf.dequantize(t.data, t.tensor_type).reshape(shape)
        if not array.flags.writeable:                 # F32/F16 come as views of the memmap
            array = array.copy()
        out[name] = torch.from_numpy(array).to(device=device, dtype=dtype)
    return out


def tokenizer(path):
    """The file's tokenizer (transformers' conversion of its GGUF vocabulary and merges), with
    the chat template its metadata carries."""
    import transformers

    file = Path(path)
    _reader(file)
    return transformers.AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)


def convert(path, out_dir, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a Hugging Face Qwen2 directory for the GGUF file at `path`: config.json,
    model.safetensors (`dtype`, bf16 by default), the tokenizer files and generation_config.json.
    The directory appears complete or not at all (atomic_dir)."""
    file, out = Path(path), Path(out_dir)
    cfg_dict = read_config(file)
    cfg = read_backbone_config(file)
    from .checkpoint import expected_backbone_shapes

    tensors = load_tensors(file, expected_backbone_shapes(cfg), dtype)
    tok = tokenizer(file)
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "config.json", cfg_dict)
        atomic_save_safetensors(tmp / "model.safetensors", tensors, metadata={"format": "pt"})
        tok.save_pretrained(str(tmp))
        eos = sorted({cfg_dict.get("eos_token_id"), tok.convert_tokens_to_ids("<|endoftext|>")} - {None})
        atomic_write_json(tmp / "generation_config.json",
                          {"bos_token_id": cfg_dict.get("bos_token_id"), "eos_token_id": eos,
                           "pad_token_id": tok.pad_token_id, "source_gguf": os.fspath(file.name)})
    return out
