"""The paired held-out report of scripts/real_model_experiment.py on a fixed toy report: the
summary over chosen categories, the prompt FLOPs recount (the lm_head once per prompt), and
plot_tradeoff over the same categories in several files."""
import copy
import importlib
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("real_model_experiment"), importlib.import_module("plot_tradeoff")
    finally:
        sys.path.remove(str(SCRIPTS))


def _case(cid, category, correct, skipped):
    """A record: the prompt's block FLOPs 1000 (run: 1000 - skipped), its total charged the lm_head
    on 10 prompt tokens (10 x 50); the generated part 100 of blocks and 50 of head."""
    return {"id": cid, "category": category, "correct": correct,
            "flops": {"prompt": {"block": 1000.0, "block_run": 1000.0 - skipped, "total": 1500.0,
                                 "total_run": 1500.0 - skipped},
                      "generated": {"block": 100.0, "block_run": 100.0 - skipped / 10, "total": 150.0,
                                    "total_run": 150.0 - skipped / 10}}}


def _run(cases):
    cats = sorted({c["category"] for c in cases})
    return {c: {"cases": [r for r in cases if r["category"] == c], "all": {}, "categories": {c: {}}} for c in cats}


def _report(q, routed_correct):
    ids = [f"m{i}" for i in range(6)] + [f"j{i}" for i in range(4)]
    cats = ["multiple"] * 6 + ["simple_java"] * 4
    base = [True, True, False, False, True, False, True, False, True, True]
    lora = [True, True, True, False, True, False, True, False, True, True]
    return {"adapter": "x/adapter", "tau": None, "batch_q": q, "batch_size": 8,
            "runs": {"base": _run([_case(i, c, ok, 0.0) for i, c, ok in zip(ids, cats, base)]),
                     "lora": _run([_case(i, c, ok, 0.0) for i, c, ok in zip(ids, cats, lora)]),
                     "routed": _run([_case(i, c, ok, 200.0) for i, c, ok in zip(ids, cats, routed_correct)])}}


ROUTED = [True, False, False, False, True, False, True, True, True, True]     # m: 1 lost; j: 1 gained


def test_summary_over_chosen_categories(scripts):
    rme, _ = scripts
    s = rme.paired_summary(_report(1.0, ROUTED), {"both": ["multiple", "simple_java"]})
    assert s["completed"]["categories"] == ["multiple", "simple_java"]
    row = s["both"]
    assert (row["base"]["correct"], row["lora"]["correct"], row["routed"]["correct"]) == (6, 7, 6)
    c = row["routed-base"]
    assert (c["n"], c["gains"], c["losses"], c["diff_points"]) == (10, 1, 1, 0.0)
    assert s["multiple"]["routed-base"]["losses"] == 1 and s["multiple"]["routed-base"]["gains"] == 0
    assert s["simple_java"]["routed-lora"]["gains"] == 1
    # whole request = prompt + generated: 10 x (200 + 20) skipped of 10 x (1500 + 150)
    assert row["routed"]["request_total_flops_skipped_pct"] == pytest.approx(100 * 220 / 1650)
    completed = {k: v for k, v in s["completed"].items() if k != "categories"}
    assert row == completed                          # the same cases, the same figures


def test_recount_charges_the_lm_head_once_per_prompt_and_is_idempotent(scripts):
    rme, _ = scripts
    report = rme.recount_prompt_head(_report(1.0, ROUTED), head_flops=50.0)
    rec = report["runs"]["routed"]["multiple"]["cases"][0]
    assert rec["flops"]["prompt"] == {"block": 1000.0, "block_run": 800.0, "total": 1050.0, "total_run": 850.0}
    assert rec["prompt_total_flops_skipped_pct"] == pytest.approx(100 * 200 / 1050)
    fig = report["runs"]["routed"]["multiple"]["all"]
    assert fig["prompt_total_flops_skipped_pct"] == pytest.approx(100 * 200 / 1050)
    assert fig["request_total_flops_skipped_pct"] == pytest.approx(100 * 220 / 1200)
    assert report["summary"]["completed"]["routed"]["prompt_total_flops_skipped_pct"] == pytest.approx(100 * 200 / 1050)
    again = rme.recount_prompt_head(copy.deepcopy(report), head_flops=50.0)
    assert again["runs"] == report["runs"] and again["summary"] == report["summary"]


def test_plot_over_the_same_categories_of_several_files(scripts, tmp_path):
    _, plot = scripts
    q1 = _report(1.0, ROUTED)
    q05 = _report(0.5, [True, False, False, False, False, False, True, True, True, True])
    pts = plot.points(q1, "completed", ["simple_java"]) + plot.points(q05, "completed", ["simple_java"])
    routed = [p for p in pts if p["setting"] == "routed"]
    assert [p["q"] for p in routed] == [1.0, 0.5]
    assert [p["n"] for p in routed] == [4, 4]
    assert routed[0]["diff"] == pytest.approx(25.0)            # one gained of 4
    out = tmp_path / "t.png"
    plot.plot(pts, "simple_java", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no 'nope' group"):
        plot.points({**q1, "summary": {}}, "nope")


def test_batch_skip_counts_by_hand(scripts):
    exp, _ = scripts
    import torch
    T, F = True, False
    executed = [torch.tensor([[T, F, F], [F, F, T]]),      # case 0: [L=2, 3 answer tokens], True = ran
                torch.tensor([[F, F], [F, T]]),            # case 1: 2 tokens, so the group has 2 positions
                torch.tensor([[F], [F]])]                  # case 2: a short last group, dropped
    # rows skipping each (block, position): [[1, 2], [2, 1]] over 4 pairs
    got = exp.batch_skip(executed, batch=2)
    assert got == {"row": 0.75, "q=1": 0.5, "q=0.75": 0.5, "q=0.5": 1.0, "pairs": 4}
    assert exp.batch_skip(executed, batch=1)["q=1"] == pytest.approx(exp.batch_skip(executed, batch=1)["row"])
    with pytest.raises(ValueError, match="at least batch=4"):
        exp.batch_skip(executed, batch=4)
