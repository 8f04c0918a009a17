"""The README's results table, built from the result JSON files, so that it cannot go stale.

    python benchmarks/results_table.py           # rewrite the table in README.md
    python benchmarks/results_table.py --check   # exit 1 if README.md's table is not this

Each row reads one JSON file (benchmarks/results/, the real model's eval/) and gives its
figure, the device it ran on, the day it was measured, and the command that reproduces it,
as the file records them. tests/test_docs.py runs --check.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin (benchmarks/results_table.py) -->", "<!-- results:end -->"
RESULTS = ROOT / "benchmarks" / "results"
REAL_EVAL = ROOT / "layerroute_rt" / "assets" / "qwen2.5-coder-0.5b" / "eval"


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _date(record: dict, path: Path) -> str:
    if not isinstance(record.get("date"), str):
        raise SystemExit(f"{path}: no 'date' field (the day it was measured)")
    return record["date"]


def _command(record: dict) -> str:
    """The recorded command, with a path into the recording machine's cache written ~/.cache/..."""
    cmd = re.sub(r"(^|\s)(~|/[^ ]*?)/\.cache/layerroute_rt(?=/|\s|$)", r"\1~/.cache/layerroute_rt",
                 record.get("command", "?"))
    if cmd.startswith("benchmarks/") or cmd.startswith("scripts/"):
        cmd = "python " + cmd
    return f"`{cmd.strip()}`"


def _pct(x: float) -> str:
    return f"{x:+.1f}%"


def bfcl600(path: Path):
    d = _load(path)
    s = d["summary"]["completed"]
    n = s["base"]["n"]
    rb, rl = s["routed-base"], s["routed-lora"]
    figure = (f"BFCL held-out, {n} paired cases ({len(s['categories'])} of 7 categories): base "
              f"{100 * s['base']['accuracy']:.1f}%, LoRA {100 * s['lora']['accuracy']:.1f}%, routed "
              f"{100 * s['routed']['accuracy']:.1f}% at {s['routed']['request_total_flops_skipped_pct']:.1f}% of "
              f"whole-request FLOPs skipped; routed - base {rb['diff_points']:+.1f} points "
              f"[{rb['ci95_points'][0]:+.1f}, {rb['ci95_points'][1]:+.1f}], routed - LoRA "
              f"{rl['diff_points']:+.1f} [{rl['ci95_points'][0]:+.1f}, {rl['ci95_points'][1]:+.1f}]")
    return "real model, run h", figure, "cpu, 2 threads, fp32, batch 8", d


def request_time(path: Path):
    d = _load(path)
    s = d["summary"]
    figure = (f"batch 1, tau 0.5 vs tau 0 (same weights): decode time {-s['decode_time_saved_pct']:+.1f}% for "
              f"{s['generated_total_flops_skipped_pct']:.1f}% of its FLOPs skipped, prefill "
              f"{-s['prefill_time_saved_pct']:+.1f}% for {s['prompt_total_flops_skipped_pct']:.1f}%, "
              f"whole request {-s['request_time_saved_pct']:+.1f}% for {s['request_total_flops_skipped_pct']:.1f}%")
    return "real model, run h", figure, d.get("device", "?"), d


def decode_steps(path: Path):
    d = _load(path)
    rows = {(r["mode"], r["blocks_skipped"]): r["decode_ms_per_step"] for r in d["ours"]}
    dense = rows[("forced", 0)]
    parts = [f"dense {dense:.1f} ms/step (weight-read floor {d['weight_read_floor_ms']:.1f})"]
    for (mode, k), ms in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if k in (6, 12):
            how = "skip_layers" if mode == "forced" else "routers"
            parts.append(f"{k}/24 blocks by {how} {ms:.1f} ({_pct(100 * (ms / dense - 1))})")
    return "0.5B shape, random weights", "decode, batch 1: " + ", ".join(parts), d["device"], d


def batch_policy(path: Path):
    d = _load(path)
    cut = "paired_cut_vs_tau0_pct" if "paired_cut_vs_tau0_pct" in d["results"][0] else "cut_vs_tau0_pct"
    parts = [f"{r['config']} {_pct(-r[cut])} time, {r['decode_blocks_no_row_ran_pct']:.0f}% "
             f"blocks no row ran" for r in d["results"] if r["config"] != "tau 0"]
    figure = f"decode at batch {d['batch']} vs tau 0: " + "; ".join(parts)
    if d.get("batch1"):
        figure += f"; the same prompts at batch 1: routed {_pct(-d['batch1'][cut])} time"
    model = "demo model" if d["model"].startswith("bundled") else "real model"
    if "/runs/real/" in (d.get("adapter") or ""):      # a trained run's snapshot, not the shipped adapter
        model += ", run " + d["adapter"].split("/runs/real/")[1].replace("/snapshots/", " ")
    return model, figure, d["device"], d


def grammar_mask(path: Path):
    d = _load(path)
    parts = [f"batch {r['batch']}: the mask's host work {r['mask_alone_ms']:.2f} ms "
             f"({r['mask_alone_pct_of_step']:.2f}% of a {r['ms_per_step_none']:.0f} ms step), the step "
             f"{_pct(r['overhead_pct'])} end to end" for r in d["results"]]
    return "real model", "grammar mask (every row constrained): " + "; ".join(parts), d["device"], d


def serve_load(path: Path):
    d = _load(path)
    top = max(d["levels"], key=lambda r: r["clients"])
    figure = (f"server, {top['clients']} concurrent clients: {top['tokens_per_s']:.1f} tokens/s, TTFT p50 "
              f"{top['ttft_s']['p50']:.2f} s, all {sum(r['requests'] for r in d['levels'])} requests complete: "
              f"{d['all_complete']}")
    return "real model", figure, d["device"].split(", the server")[0], d


def prefix_cache(path: Path):
    d = _load(path)
    figure = (f"agent loop, turn {d['turns']} ({d['last_turn_prompt_tokens']} prompt tokens, "
              f"{d['cached_prompt_tokens']} cached): prefill {d['prefill_ms_with_cache']:.0f} ms vs "
              f"{d['prefill_ms_without_cache']:.0f} ms uncached (x{d['speedup']:.1f}), same tokens: {d['same_tokens']}")
    return "real model", figure, d["device"], d


def train_ddp(path: Path):
    d = _load(path)
    parts = [f"{r['ranks']} rank(s) x {r['threads_per_rank']} threads {r['s_per_step']:.2f} s/step" for r in d["ranks"]]
    return "demo model", "training under torchrun: " + ", ".join(parts), d["device"], d


ROWS = [
    (bfcl600, REAL_EVAL / "bfcl_heldout600.json"),
    (request_time, REAL_EVAL / "request_time.json"),
    (decode_steps, RESULTS / "generate_cpu_float32.json"),
    (batch_policy, RESULTS / "batch_policy_cpu.json"),
    (batch_policy, RESULTS / "batch_policy_real_cpu.json"),
    (batch_policy, RESULTS / "batch_policy_real_cpu_run_l.json"),
    (grammar_mask, RESULTS / "grammar_mask_real_cpu.json"),
    (serve_load, RESULTS / "serve_load_real_cpu.json"),
    (prefix_cache, RESULTS / "agent_loop_prefix_cache_cpu.json"),
    (train_ddp, RESULTS / "train_ddp_cpu.json"),
]


def table() -> str:
    lines = [BEGIN, "| model | result | device | date | reproduce | file |", "|---|---|---|---|---|---|"]
    for row, path in ROWS:
        model, figure, device, record = row(path)
        rel = path.relative_to(ROOT)
        lines.append(f"| {model} | {figure} | {device} | {_date(record, path)} | "
                     f"{_command(record)} | [{path.name}]({rel}) |")
    lines.append(END)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md's table is stale")
    args = p.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        print(f"{README}: no results block ({BEGIN} ... {END})", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + table() + tail
    if args.check:
        if new != text:
            print(f"{README}: the results table is stale; run python benchmarks/results_table.py",
                  file=sys.stderr)
            return 1
        return 0
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(README)
    print(f"wrote the results table of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
