"""The bundled demo model (layerroute_rt/assets/demo) and the script that builds it."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import layerroute_rt
from layerroute_rt import data

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "layerroute_rt" / "assets" / "demo"
SCRIPT = ROOT / "scripts" / "build_demo_model.py"

needs_demo = pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="demo model not built")


def _script():
    spec = importlib.util.spec_from_file_location("build_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_demo
def test_demo_weights_at_most_10_mb_and_qwen2():
    assert (DEMO / "model.safetensors").stat().st_size <= 10 * 1024 * 1024
    assert json.loads((DEMO / "config.json").read_text())["model_type"] == "qwen2"


@needs_demo
def test_demo_loads_with_adapter_and_tokenizer():
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(DEMO, local_files_only=True)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    for t in ("<|im_start|>", "<tool_call>", "</tool_call>", "<tool_response>"):
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    model = layerroute_rt.load(DEMO, adapter=DEMO / "adapter")
    assert model.config.vocab_size >= len(tok)
    traj = data.generate_trajectories(1, seed=123)[0]
    messages = data.to_chat_messages(traj.steps[:2])
    text = tok.apply_chat_template(messages, tools=list(traj.tools), tokenize=False, add_generation_prompt=True)
    assert text == data.render_chatml(messages, traj.tools, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    logits, executed = model(ids, return_executed=True)
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    assert executed.shape == (model.config.num_hidden_layers, 1, ids.shape[1])


@needs_demo
def test_demo_eval_files_parse():
    report = json.loads((DEMO / "eval" / "eval.json").read_text())
    assert len(report["seeds"]) >= 3
    assert set(report["summary"]) == {"heldout", "length_matched"}
    for split in report["summary"].values():
        assert {"tool_call", "planning"} <= set(split["by_type"])
        assert split["differential"]["total_flops_skipped_pct"]["n"] == len(report["seeds"])
    md = (DEMO / "eval" / "eval.md").read_text()
    assert "heldout split" in md and "length_matched split" in md and "Skip differential" in md
    assert (DEMO / "eval" / "skip_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((DEMO / "build_info.json").read_text())
    assert info["pretrain"]["steps"] > 0


def test_build_script_tiny_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["build_demo_model.py"])
    threads = torch.get_num_threads()
    try:
        info = _script().main(["--out", str(tmp_path), "--tiny", "--seeds", "0", "1",
                               "--pretrain-steps", "8", "--trajectories", "30"])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    assert info["pretrain"]["steps"] == 8
    model = layerroute_rt.load(tmp_path, adapter=tmp_path / "adapter")
    assert model.config.num_hidden_layers == 2
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["seeds"] == [0, 1] and set(report["summary"]) == {"heldout", "length_matched"}
    for f in ("eval.md", "skip_heatmap.png"):
        assert (tmp_path / "eval" / f).is_file()
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tok.eos_token == "<|im_end|>"
