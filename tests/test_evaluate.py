"""Evaluation by step type: numbers against direct computation, seeds, report files."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import layerroute_rt as lr
from layerroute_rt.data import Example, collate
from layerroute_rt.eval.evaluate import evaluate, run_seeds, summarize
from layerroute_rt.train.trainer import TrainConfig


def examples(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ctx = torch.randint(0, 257, (5 + i % 3,), generator=g).tolist()
        kind = "tool_call" if i % 2 else "planning"
        step = [10, 11, 12, 13] * 2 if kind == "tool_call" else torch.randint(0, 257, (8,), generator=g).tolist()
        out.append(Example(ctx + step, [-100] * len(ctx) + step, [False] * len(ctx) + [True] * len(step),
                           kind, len(step), f"t{i}", 1))
    return out


def test_metrics_match_direct_computation(tiny):
    path, hf = tiny
    model = lr.load(path)
    model.randomize_adapter(seed=5)
    ex = examples()
    res = evaluate(model, ex, collate, batch_size=5)
    assert set(res) == {"tool_call", "planning", "all"}
    for kind in ("tool_call", "planning"):
        chosen = [e for e in ex if e.step_type == kind]
        ce_base, ce_adapter, ran, n = 0.0, 0.0, 0.0, 0
        flops = [0.0, 0.0, 0.0, 0.0]
        for e in chosen:
            ids = torch.tensor([e.input_ids])
            mask = torch.tensor(e.loss_mask)
            with torch.no_grad():
                base = hf(ids).logits[0].double()
            logits, executed = model(ids, return_executed=True)
            for t in range(1, len(e.input_ids)):
                if mask[t]:
                    ce_base += float(F.cross_entropy(base[t - 1], ids[0, t]))
                    ce_adapter += float(F.cross_entropy(logits[0, t - 1].double(), ids[0, t]))
            ran += float(executed[:, 0, mask].float().sum())
            n += int(mask.sum())
            r = lr.flops_report(model.config, model.lr_config, executed,
                                torch.arange(1, len(e.input_ids) + 1)[None], mask[None])
            for k, v in enumerate((r.block_flops, r.block_flops_run, r.total_flops, r.total_flops_run)):
                flops[k] += v
        m = res[kind]
        assert m["n_tokens"] == n and m["n_steps"] == len(chosen)
        assert m["ppl_base"] == pytest.approx(math.exp(ce_base / n), rel=1e-4)
        assert m["ppl_adapter"] == pytest.approx(math.exp(ce_adapter / n), rel=1e-4)
        assert m["skip_rate"] == pytest.approx(1 - ran / (n * model.config.num_hidden_layers))
        assert m["block_flops_skipped_pct"] == pytest.approx(100 * (1 - flops[1] / flops[0]))
        assert m["total_flops_skipped_pct"] == pytest.approx(100 * (1 - flops[3] / flops[2]))
        assert 0 < m["total_flops_skipped_pct"] < m["block_flops_skipped_pct"]


def test_summarize_interval():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0
    assert s["ci95"] == pytest.approx([2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)])


def test_seeds_report_and_recompute_from_saved_adapter(tiny, tmp_path):
    path, _ = tiny
    ex = examples(24)
    splits = {"heldout": examples(8, seed=1), "length_matched": examples(6, seed=2)}
    cfg = TrainConfig(steps=4, batch_size=4, grad_accum=1, lr=1e-2, warmup_steps=1, checkpoint_every=4)
    report = run_seeds(path, ex, splits, collate, seeds=[0, 1, 2], out_dir=tmp_path, train_config=cfg,
                       progress=False)
    assert json.loads((tmp_path / "eval.json").read_text())["seeds"] == [0, 1, 2]
    assert (tmp_path / "skip_heatmap.png").stat().st_size > 1000
    md = (tmp_path / "eval.md").read_text()
    assert "### heldout split (3 seeds" in md and "Skip differential" in md
    d = report["summary"]["heldout"]["differential"]["total_flops_skipped_pct"]
    assert d["n"] == 3 and d["ci95"] == summarize(d["values"])["ci95"]
    assert d["values"] == [report["per_seed"][s]["heldout"]["tool_call"]["total_flops_skipped_pct"]
                           - report["per_seed"][s]["heldout"]["planning"]["total_flops_skipped_pct"]
                           for s in ("0", "1", "2")]
    per_seed = [report["per_seed"][s]["heldout"] for s in ("0", "1", "2")]
    assert per_seed[0]["tool_call"]["ppl_adapter"] != per_seed[1]["tool_call"]["ppl_adapter"]
    again = lr.load(path, adapter=tmp_path / "seed1" / "adapter")
    recomputed = evaluate(again, splits["heldout"], collate)
    assert recomputed == per_seed[1]
