"""GGUF files: config from metadata, dequantized tensors under HF names, conversion, errors.

The files are tiny Qwen2 GGUFs written here with the gguf package (the real model's file is
covered by tests/test_real_model.py)."""
import numpy as np
import pytest
import torch

import layerroute_rt as lr
from layerroute_rt.model import checkpoint, gguf_file

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q, quants  # noqa: E402

D, F, L, V, H, KV = 64, 256, 3, 96, 4, 2   # F = 256: one K-quant super-block a row
HD = D // H


def _tensors(seed=0):
    """GGUF name -> float32 array [out, in] (HF layout) for a Qwen2 of the shapes above."""
    g = np.random.default_rng(seed)
    t = {"token_embd.weight": g.standard_normal((V, D)), "output_norm.weight": 1 + 0.1 * g.standard_normal(D),
         "output.weight": g.standard_normal((V, D))}
    for i in range(L):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": 1 + 0.1 * g.standard_normal(D),
                  p + "ffn_norm.weight": 1 + 0.1 * g.standard_normal(D),
                  p + "attn_q.weight": g.standard_normal((D, D)), p + "attn_q.bias": g.standard_normal(D),
                  p + "attn_k.weight": g.standard_normal((KV * HD, D)), p + "attn_k.bias": g.standard_normal(KV * HD),
                  p + "attn_v.weight": g.standard_normal((KV * HD, D)), p + "attn_v.bias": g.standard_normal(KV * HD),
                  p + "attn_output.weight": g.standard_normal((D, D)),
                  p + "ffn_gate.weight": g.standard_normal((F, D)), p + "ffn_up.weight": g.standard_normal((F, D)),
                  p + "ffn_down.weight": g.standard_normal((D, F))})
    return {k: (0.05 * v).astype(np.float32) for k, v in t.items()}


# One matrix per quantization type we can make with gguf's own quantizers; K-quants as random
# blocks of the right size (their scales are then random too: dequantize gives their values).
QTYPES = {"blk.0.attn_q.weight": Q.Q8_0, "blk.0.attn_output.weight": Q.Q5_0,
          "blk.0.ffn_gate.weight": Q.Q4_0, "blk.0.ffn_up.weight": Q.F16, "blk.1.ffn_up.weight": Q.BF16,
          "blk.1.attn_q.weight": Q.Q5_1, "blk.1.attn_output.weight": Q.Q4_1}
KQUANTS = {"blk.0.ffn_down.weight": Q.Q4_K, "blk.1.ffn_down.weight": Q.Q5_K, "blk.2.ffn_down.weight": Q.Q6_K}


def write_gguf(path, arch="qwen2", override=None, tied=False):
    """Write a tiny GGUF; returns {gguf name: the float32 values dequantize gives}."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(4096)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    expected = {}
    rng = np.random.default_rng(1)
    types = {**QTYPES, **KQUANTS, **(override or {})}
    for name, x in _tensors().items():
        if tied and name == "output.weight":
            continue
        q = types.get(name, Q.F32)
        if q == Q.F32:
            data = x
        elif q in KQUANTS.values() or q not in (Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q5_1, Q.Q4_1):
            block, size = gguf.GGML_QUANT_SIZES[q]
            data = rng.integers(0, 256, (x.shape[0], x.shape[1] // block * size), dtype=np.uint8)
            if q in KQUANTS.values():   # keep the fp16 super-block scales finite and small
                data = data.reshape(x.shape[0], -1, size)
                scale = np.full((x.shape[0], data.shape[1], 1), 0.01, np.float16).view(np.uint8)
                if q == Q.Q6_K:
                    data[..., -2:] = scale
                else:
                    data[..., 0:2], data[..., 2:4] = scale, scale
                data = data.reshape(x.shape[0], -1)
        else:
            data = quants.quantize(x, q)
        w.add_tensor(name, data, raw_dtype=None if q == Q.F32 else q)
        if q.name in gguf_file.SUPPORTED_TYPES:
            expected[name] = x if q == Q.F32 else quants.dequantize(data, q).reshape(x.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_config_and_tensors_under_hf_names(tmp_path):
    path = tmp_path / "tiny.gguf"
    expected = write_gguf(path)
    cfg = gguf_file.read_backbone_config(path)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps,
            cfg.tie_word_embeddings) == (D, F, L, H, KV, V, 1e6, 1e-6, False)
    shapes = checkpoint.expected_backbone_shapes(cfg)
    tensors = gguf_file.load_tensors(path, shapes, torch.float32)
    assert set(tensors) == set(shapes)
    for name, x in expected.items():
        hf = gguf_file.hf_name(name)
        assert tensors[hf].shape == shapes[hf]
        torch.testing.assert_close(tensors[hf], torch.from_numpy(np.ascontiguousarray(x)), rtol=0, atol=0)
    # Quantized values differ from the originals, F32 ones are exact: the types were really used.
    raw = _tensors()
    assert not np.array_equal(expected["blk.0.attn_q.weight"], raw["blk.0.attn_q.weight"])
    assert np.array_equal(expected["blk.0.attn_q.bias"], raw["blk.0.attn_q.bias"])


def test_load_gguf_equals_load_of_its_conversion(tmp_path, monkeypatch):
    """lr.load(file.gguf) and lr.load(convert(file.gguf)) in bf16 give the same logits."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    monkeypatch.setattr(gguf_file, "tokenizer", lambda p: _NoTokenizer())
    out = gguf_file.convert(path, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".hf.*"))                     # no temporary left behind
    ids = torch.tensor([[1, 5, 9, 33, 95]])
    a = lr.load(path, dtype=torch.bfloat16)(ids, tau=0.0)
    b = lr.load(out, dtype=torch.bfloat16)(ids, tau=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(a.float().std()) > 0


class _NoTokenizer:
    pad_token_id = 0

    def save_pretrained(self, d):
        pass

    def convert_tokens_to_ids(self, t):
        return None


def test_tied_embeddings_when_output_is_absent(tmp_path):
    path = tmp_path / "tied.gguf"
    write_gguf(path, tied=True)
    cfg = gguf_file.read_backbone_config(path)
    assert cfg.tie_word_embeddings
    assert "lm_head.weight" not in gguf_file.load_tensors(path, checkpoint.expected_backbone_shapes(cfg),
                                                          torch.float32)


def test_other_architecture_is_refused(tmp_path):
    path = tmp_path / "llama.gguf"
    write_gguf(path, arch="llama")
    with pytest.raises(lr.CheckpointError, match=r"llama\.gguf.*architecture 'llama'.*expected 'qwen2'"):
        lr.load(path)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "cut.gguf"
    write_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 1000])
    with pytest.raises(lr.CheckpointError, match=r"cut\.gguf: truncated"):
        lr.load(path)
    path.write_bytes(data[:40])                                 # cut inside the header
    with pytest.raises(lr.CheckpointError, match=r"cut\.gguf: truncated or corrupt"):
        lr.load(path)


def test_unsupported_quantization_is_refused(tmp_path):
    path = tmp_path / "iq.gguf"
    write_gguf(path, override={"blk.0.ffn_up.weight": Q.IQ4_NL})
    with pytest.raises(lr.CheckpointError, match=r"blk\.0\.ffn_up\.weight has quantization type IQ4_NL"):
        lr.load(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(lr.CheckpointError, match=r"x\.gguf: not a GGUF file"):
        lr.load(path)
    with pytest.raises(lr.CheckpointError, match="no such GGUF file"):
        lr.load(tmp_path / "missing.gguf")
