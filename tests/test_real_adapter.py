"""The adapter shipped for the real model (layerroute_rt/assets/qwen2.5-coder-0.5b): it loads onto
the model, its pinned blocks never skip, and it skips blocks on a generated tool call that still
parses. Its BFCL numbers are in docs/experiments.md (layerroute eval --bfcl, too slow for CI)."""
import json
from pathlib import Path

import pytest
import torch

import layerroute_rt as lr
from layerroute_rt.data import bfcl
from layerroute_rt.runtime.generate import load_tokenizer
from layerroute_rt.model.real_model import fetch_bfcl
from layerroute_rt.runtime.toolcalls import parse_tool_calls

pytestmark = pytest.mark.real_model

ASSET = Path(lr.__file__).parent / "assets" / "qwen2.5-coder-0.5b"
TOOL = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city name, e.g. Paris"}}}}}


def test_shipped_adapter_routes_a_tool_call(real_model_dir):
    model = lr.load(real_model_dir, adapter=ASSET / "adapter", dtype=torch.float32)
    assert model.lr_config.granularity == "token" and model.lr_config.tau == 0.5
    engine = lr.InferenceModel(model)
    tok = load_tokenizer(engine)
    text = tok.apply_chat_template([{"role": "user", "content": "What's the weather in Paris?"}],
                                   tools=[TOOL], add_generation_prompt=True, tokenize=False)
    out = lr.generate(engine, [tok.encode(text, add_special_tokens=False)], max_new_tokens=40)
    calls = parse_tool_calls(out.text[0])
    assert [c.get("name") for c in calls] == ["get_current_weather"], out.text[0]
    assert out.stats["generated_total_flops_skipped_pct"] > 1.0         # the routers skip
    skip = out.stats["skip_rate_per_layer"]
    assert skip[0] == 0.0 and skip[-1] == 0.0                          # pinned to run
    record = json.loads((ASSET / "data_config.json").read_text())
    trained = set(record["trained_trajectories"])
    # Run h (like c): trained on the dense model's own answers shipped beside it (those that ended at EOS)
    calls = [json.loads(line) for line in (ASSET / "self_calls.jsonl").read_text().splitlines()]
    assert {r["id"] for r in calls if r["finish_reason"] == "stop"} <= trained
    for category, n in record["heldout"].items():        # docs/experiments.md's eval cases were held out
        held = bfcl.split_ids(bfcl.load_category(fetch_bfcl(), category), n, seed=0)[1]
        assert not trained & {c.id for c in held}, category
