"""`layerroute eval --bfcl`: held-out BFCL cases through evaluate_bfcl, a table and bfcl_eval.json."""
import json
import re

import pytest

from layerroute_rt import cli
from layerroute_rt.data import bfcl

FUNCTION = {"name": "math.add", "description": "Add two numbers.", "parameters": {
    "type": "dict", "required": ["a", "b"], "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}


@pytest.fixture
def bfcl_dir(tmp_path):
    """A BFCL data directory with 5 simple_python cases and 2 irrelevance cases."""
    root = tmp_path / "bfcl"
    (root / "possible_answer").mkdir(parents=True)

    def write(name, rows):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    ids = [f"simple_python_{i}" for i in range(5)]
    write("BFCL_v4_simple_python.json", [
        {"id": i, "question": [[{"role": "user", "content": f"Add {n} and 2."}]], "function": [FUNCTION]}
        for n, i in enumerate(ids)])
    write("possible_answer/BFCL_v4_simple_python.json",
          [{"id": i, "ground_truth": [{"math.add": {"a": [n], "b": [2]}}]} for n, i in enumerate(ids)])
    write("BFCL_v4_irrelevance.json", [
        {"id": f"irrelevance_{n}", "question": [[{"role": "user", "content": "Tell a joke."}]],
         "function": [FUNCTION]} for n in range(2)])
    return root


def test_eval_bfcl_writes_a_table_and_json(bfcl_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["eval", "--bfcl", "simple_python:3", "--bfcl", "irrelevance", "--bfcl-dir", str(bfcl_dir),
                     "--model", str(cli.DEMO_DIR), "--adapter", str(cli.DEMO_DIR / "adapter"),
                     "--out", str(out), "--max-new-tokens", "4", "--settings", "base", "routed",
                     "--heldout-seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| simple_python | base |" in printed and "| irrelevance | routed |" in printed
    report = json.loads((out / "bfcl_eval.json").read_text())
    assert list(report["settings"]) == ["base", "routed"] and report["heldout_seed"] == 1
    held_out = bfcl.split_ids(bfcl.load_category(bfcl_dir, "simple_python"), heldout=3, seed=1)[1]
    ids = [c["id"] for c in report["settings"]["base"]["cases"]]
    assert ids == [c.id for c in held_out] + ["irrelevance_0", "irrelevance_1"]
    assert report["max_new_tokens"] == {"simple_python": 4, "irrelevance": 4}
    assert report["settings"]["base"]["all"]["generated_total_flops_skipped_pct"] == 0.0


@pytest.mark.parametrize("spec, message", [
    ("live_simple", "the live_\\* categories are kept for an outside check"),
    ("simple_python:0", "expected CATEGORY or CATEGORY:N with N a positive integer"),
    ("simple_python:x", "expected CATEGORY or CATEGORY:N with N a positive integer"),
    ("simple_python:6", "simple_python has 5 cases"),
    ("parallel", "BFCL_v4_parallel.json: no such BFCL file"),
])
def test_eval_bfcl_errors(bfcl_dir, capsys, spec, message):
    assert cli.main(["eval", "--bfcl", spec, "--bfcl-dir", str(bfcl_dir), "--model", str(cli.DEMO_DIR)]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_eval_bfcl_refuses_cases_the_adapter_trained_on(bfcl_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / cli.DATA_RECORD).write_text(json.dumps({"trained_trajectories": ["irrelevance_1"]}))
    assert cli.main(["eval", "--bfcl", "irrelevance", "--bfcl-dir", str(bfcl_dir), "--model", str(cli.DEMO_DIR),
                     "--adapter", str(run / "adapter")]) == 2
    assert "1 BFCL cases were used to train" in capsys.readouterr().err


def test_eval_without_bfcl_still_needs_out(capsys):
    assert cli.main(["eval", "--model", str(cli.DEMO_DIR), "--adapter", str(cli.DEMO_DIR / "adapter")]) == 2
    assert "--out DIR is required (except with --bfcl)" in capsys.readouterr().err
