"""Backbone reading (round trips, sharding, every error case) and the atomic writers."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from layerroute_rt.model import checkpoint as ckpt
from layerroute_rt.model.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    atomic_dir,
    atomic_save_safetensors,
    atomic_write_json,
    expected_backbone_shapes,
    load_backbone_tensors,
    read_backbone_config,
)
from layerroute_rt.config import BackboneConfig

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def _save_hf(directory: Path, tied: bool, **save_kwargs) -> dict[str, torch.Tensor]:
    """Save a tiny random Qwen2 with transformers; return its state dict."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(**SMALL, tie_word_embeddings=tied)
    model = transformers.Qwen2ForCausalLM(cfg)
    model.save_pretrained(directory, **save_kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """Pristine checkpoints (tied, untied, sharded); tests that break one work on a copy."""
    root = tmp_path_factory.mktemp("hf")
    return {"tied": (root / "tied", _save_hf(root / "tied", True)),
            "untied": (root / "untied", _save_hf(root / "untied", False)),
            "sharded": (root / "sharded", _save_hf(root / "sharded", False, max_shard_size="40KB"))}


@pytest.fixture
def tied_copy(hf_dirs, tmp_path) -> Path:
    return Path(shutil.copytree(hf_dirs["tied"][0], tmp_path / "ckpt"))


def _load(directory: Path, dtype=torch.float32, **overrides) -> dict[str, torch.Tensor]:
    cfg = read_backbone_config(directory)
    expected = expected_backbone_shapes(cfg)
    expected.update(overrides)
    return load_backbone_tensors(directory, expected, dtype, "cpu", cfg.tie_word_embeddings)


# --- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tied", "untied", "sharded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip(hf_dirs, kind, dtype):
    directory, state = hf_dirs[kind]
    cfg = read_backbone_config(directory)
    assert cfg.tie_word_embeddings == (kind == "tied")
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim) == (64, 2, 16)
    loaded = _load(directory, dtype)
    expected_names = set(state) - ({"lm_head.weight"} if kind == "tied" else set())
    assert set(loaded) == expected_names
    for name, tensor in loaded.items():
        assert tensor.dtype == dtype and tensor.device.type == "cpu"
        assert torch.equal(tensor, state[name].to(dtype)), name


def test_sharded_checkpoint_has_an_index(hf_dirs):
    directory = hf_dirs["sharded"][0]
    assert not (directory / "model.safetensors").exists()
    assert len(set(json.loads((directory / "model.safetensors.index.json").read_text())
                   ["weight_map"].values())) > 1


def test_matching_dtype_is_not_copied(hf_dirs, monkeypatch):
    directory = hf_dirs["untied"][0]
    read = []
    original = ckpt._guarded

    def spy(file, what, fn, *args):
        out = original(file, what, fn, *args)
        if what.startswith("reading model.norm"):
            read.append(out)
        return out

    monkeypatch.setattr(ckpt, "_guarded", spy)
    loaded = _load(directory, torch.float32)
    assert loaded["model.norm.weight"].data_ptr() == read[0].data_ptr()


def test_stored_tied_lm_head_and_inv_freq_are_ignored(hf_dirs, tmp_path):
    directory = Path(shutil.copytree(hf_dirs["tied"][0], tmp_path / "ckpt"))
    file = directory / "model.safetensors"
    tensors = load_file(file)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, file)
    assert "lm_head.weight" not in _load(directory)


def test_qwen25_05b_parameter_count():
    cfg = BackboneConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True)
    shapes = expected_backbone_shapes(cfg)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 494_032_768
    assert "lm_head.weight" not in shapes
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (128, 896)
    assert "model.layers.0.self_attn.o_proj.bias" not in shapes


def test_shapes_match_transformers(hf_dirs):
    for kind in ("tied", "untied"):
        directory, state = hf_dirs[kind]
        shapes = expected_backbone_shapes(read_backbone_config(directory))
        hf = {k: tuple(v.shape) for k, v in state.items()}
        if kind == "tied":
            del hf["lm_head.weight"]
        assert shapes == hf


# --- config errors ----------------------------------------------------------------------------

def test_missing_dir(tmp_path):
    for fn in (read_backbone_config, lambda p: _load(p)):
        with pytest.raises(CheckpointNotFoundError, match=re.escape(str(tmp_path / "nope"))):
            fn(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):  # catchable as the builtin too
        read_backbone_config(tmp_path / "nope")


def test_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="file: not a directory"):
        read_backbone_config(tmp_path / "file")


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"config\.json: missing"):
        read_backbone_config(tmp_path)


def test_bad_json(tied_copy):
    (tied_copy / "config.json").write_text('{"model_type": "qwen2",\n  "vocab_size": }')
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON .* line 2 column"):
        read_backbone_config(tied_copy)


def test_unsupported_model_type(tied_copy):
    cfg = json.loads((tied_copy / "config.json").read_text())
    (tied_copy / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported model_type 'llama'"):
        read_backbone_config(tied_copy)


def test_missing_config_field(tied_copy):
    cfg = json.loads((tied_copy / "config.json").read_text())
    del cfg["hidden_size"]
    (tied_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: missing field.*hidden_size"):
        read_backbone_config(tied_copy)


# --- tensor errors ----------------------------------------------------------------------------

def _rewrite(file: Path, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_no_weights(tied_copy):
    (tied_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError,
                       match=r"no weights .*model\.safetensors or model\.safetensors\.index\.json"):
        _load(tied_copy)


def test_missing_tensor(tied_copy):
    _rewrite(tied_copy / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing 1 tensor\(s\): "
                       r"model\.layers\.1\.mlp\.up_proj\.weight"):
        _load(tied_copy)


def test_many_missing_tensors_are_summarised(tied_copy):
    with pytest.raises(CheckpointError,
                       match=r"missing 7 tensor\(s\): extra\.0; .*extra\.4; \.\.\. and 2 more$"):
        _load(tied_copy, **{f"extra.{i}": (1,) for i in range(7)})


def test_unexpected_tensor(tied_copy):
    _rewrite(tied_copy / "model.safetensors", lambda t: t.update(stray=torch.zeros(3)))
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: 1 unexpected tensor.*stray \(in model\.safetensors\)"):
        _load(tied_copy)


def test_untied_lm_head_is_unexpected_for_a_tied_load(hf_dirs):
    directory = hf_dirs["untied"][0]
    expected = expected_backbone_shapes(read_backbone_config(directory))
    del expected["lm_head.weight"]
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*lm_head\.weight"):
        load_backbone_tensors(directory, expected, torch.float32, "cpu", tied_embeddings=False)


def test_shape_mismatch(tied_copy):
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 1 tensor.*model\.norm\.weight in "
                       r"model\.safetensors has shape \(64,\), expected \(65,\)"):
        _load(tied_copy, **{"model.norm.weight": (65,)})


def test_non_floating_dtype(tied_copy):
    _rewrite(tied_copy / "model.safetensors",
             lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError,
                       match=r"model\.norm\.weight in model\.safetensors has non-floating dtype I32"):
        _load(tied_copy)


def test_missing_shard(hf_dirs, tmp_path):
    directory = Path(shutil.copytree(hf_dirs["sharded"][0], tmp_path / "ckpt"))
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["model.norm.weight"]
    (directory / shard).unlink()
    with pytest.raises(CheckpointNotFoundError,
                       match=rf"index\.json: shard file {re.escape(shard)} \(which should hold .*\) does not exist"):
        _load(directory)


def test_sharded_errors_name_index_and_shard(hf_dirs, tmp_path):
    directory = Path(shutil.copytree(hf_dirs["sharded"][0], tmp_path / "ckpt"))
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    _rewrite(directory / shard, lambda t: t.update(stray=torch.zeros(1)))
    with pytest.raises(CheckpointError,
                       match=rf"index\.json: 1 unexpected tensor.*stray \(in {re.escape(shard)}\)"):
        _load(directory)
    _rewrite(directory / shard, lambda t: (t.pop("stray"), t.pop("model.norm.weight")))
    with pytest.raises(CheckpointError, match=r"index\.json: missing 1 tensor\(s\): model\.norm\.weight"):
        _load(directory)


@pytest.mark.parametrize("cut", ["half", "last_bytes"])
def test_truncated_file(tied_copy, cut):
    file = tied_copy / "model.safetensors"
    size = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(size // 2 if cut == "half" else size - 3)
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: truncated or corrupt safetensors file"):
        _load(tied_copy)


def test_data_cut_short_behind_a_valid_header(tied_copy, monkeypatch):
    """safetensors 0.8 checks the data length when it opens a file; if a read still fails
    (the file shrinks after opening, or a laxer safetensors), the error names the tensor."""
    class Handle:
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def get_tensor(self, name):
            raise ckpt.SafetensorError("unexpected end of data")

    @contextlib.contextmanager
    def broken_open(*args, **kwargs):
        with safe_open(*args, **kwargs) as real:
            yield Handle(real)

    monkeypatch.setattr(ckpt, "safe_open", broken_open)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt safetensors "
                       r"file \(reading model\.embed_tokens\.weight"):
        _load(tied_copy)


def test_garbage_header(tied_copy):
    (tied_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json, no....")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt .*header"):
        _load(tied_copy)


# --- atomic writes ----------------------------------------------------------------------------

def _listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_atomic_writes_round_trip(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    atomic_save_safetensors(tmp_path / "a.safetensors", {"w": torch.arange(4.0)}, {"k": "v"})
    with safe_open(tmp_path / "a.safetensors", "pt") as f:
        assert f.metadata() == {"k": "v"} and torch.equal(f.get_tensor("w"), torch.arange(4.0))
    assert _listing(tmp_path) == ["a.json", "a.safetensors"]


def test_failing_safetensors_write_leaves_nothing(tmp_path):
    a = torch.zeros(4)
    with pytest.raises(Exception):  # shared storage: safetensors refuses
        atomic_save_safetensors(tmp_path / "w.safetensors", {"a": a, "b": a})
    assert _listing(tmp_path) == []
    (tmp_path / "w.safetensors").write_bytes(b"old")
    with pytest.raises(Exception):
        atomic_save_safetensors(tmp_path / "w.safetensors", {"a": a, "b": a})
    assert _listing(tmp_path) == ["w.safetensors"]
    assert (tmp_path / "w.safetensors").read_bytes() == b"old"


def test_failing_json_write_keeps_old_file(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"old": True})
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "a.json", {"bad": object()})
    assert _listing(tmp_path) == ["a.json"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"old": True}


def test_failing_replace_leaves_no_temp(tmp_path, monkeypatch):
    atomic_write_json(tmp_path / "a.json", {"old": True})

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_json(tmp_path / "a.json", {"new": True})
    with pytest.raises(OSError, match="disk on fire"):
        atomic_save_safetensors(tmp_path / "b.safetensors", {"w": torch.zeros(2)})
    assert _listing(tmp_path) == ["a.json"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"old": True}


def test_atomic_dir(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as d:
        assert d.parent == tmp_path and d != target and not target.exists()
        atomic_write_json(d / "config.json", {"v": 1})
    assert _listing(tmp_path) == ["adapter"] and _listing(target) == ["config.json"]

    with atomic_dir(target) as d:  # replaces an existing directory
        atomic_write_json(d / "config.json", {"v": 2})
        (d / "sub").mkdir()
        (d / "sub" / "x.bin").write_bytes(b"x")
    assert _listing(tmp_path) == ["adapter"] and _listing(target) == ["config.json", "sub"]
    assert json.loads((target / "config.json").read_text()) == {"v": 2}


def test_atomic_dir_failure_keeps_old(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as d:
        atomic_write_json(d / "config.json", {"v": 1})
    with pytest.raises(RuntimeError, match="mid-save"):
        with atomic_dir(target) as d:
            atomic_write_json(d / "config.json", {"v": 2})
            raise RuntimeError("mid-save")
    assert _listing(tmp_path) == ["adapter"]
    assert json.loads((target / "config.json").read_text()) == {"v": 1}


def test_atomic_dir_failing_rename_restores_old(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    with atomic_dir(target) as d:
        atomic_write_json(d / "config.json", {"v": 1})
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.endswith(".tmp") and Path(dst) == target:
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_dir(target) as d:
            (d / "x").write_text("new")
    assert _listing(tmp_path) == ["adapter"]
    assert json.loads((target / "config.json").read_text()) == {"v": 1}


def test_atomic_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError):
        with atomic_dir(tmp_path / "f"):
            pass
    assert _listing(tmp_path) == ["f"]
