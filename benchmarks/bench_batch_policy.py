"""Skip under batching: decode time of one batch against the same weights at tau 0, for the
batch policy q (generate's batch_q) in {1, 0.75, 0.5}, interleaved, several repeats. Writes JSON.

    python benchmarks/bench_batch_policy.py [--model DIR --adapter DIR] [--batch 8] [--new 48]

Prompts: the first --batch cases of BFCL simple_python's held-out order (the real model, with
`layerroute fetch`'s data), or synthetic agent prompts for the bundled demo model. Every sequence
generates exactly --new tokens (no EOS), so every configuration runs the same decode steps.
Per configuration: decode ms per step (median and min over repeats), the cut against tau 0 (of
the medians, and the median of each repeat's own cut: configurations run back to back in a
repeat, so the paired figure is less exposed to the machine's drift between repeats), the
% of (step, block) pairs no row ran, the % of total FLOPs skipped on the generated tokens, and
how many sequences equal tau 0's tokens (greedy). With --batch1, the same prompts one at a
time (routed against tau 0, interleaved, in the same repeats) give batch 1's cut, and each q's
batch-8 cut as a share of it (the issue's goal: at least half).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import layerroute_rt as lr  # noqa: E402
from layerroute_rt.cli import DEMO_DIR  # noqa: E402

CONFIGS = [("tau 0", 0.0, 1.0), ("routed q=1", None, 1.0), ("routed q=0.75", None, 0.75),
           ("routed q=0.5", None, 0.5)]


def prompts_for(engine, batch: int, real: bool) -> list:
    if not real:
        return [f"Find flights from Paris to {c} on {d} May." for c, d in
                zip(["Rome", "Oslo", "Lima", "Kyiv", "Riga", "Bern", "Doha", "Baku"] * 4, range(1, 33))][:batch]
    from layerroute_rt.model import real_model
    from layerroute_rt.eval.bfcl import render_prompt
    from layerroute_rt.data import bfcl
    from layerroute_rt.runtime.generate import load_tokenizer
    cases = bfcl.split_ids(bfcl.load_category(real_model.fetch_bfcl(), "simple_python"), heldout=50, seed=0)[1]
    tok = load_tokenizer(engine)
    return [render_prompt(tok, c) for c in cases[:batch]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model")
    p.add_argument("--adapter")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch1", action="store_true", help="also time the prompts one at a time (routed vs tau 0)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batch_policy_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    real = args.model is not None
    model = lr.load(args.model if real else DEMO_DIR, adapter=args.adapter if real else DEMO_DIR / "adapter",
                    dtype=torch.float32)
    engine = lr.InferenceModel(model, prefix_cache=False)
    prompts = prompts_for(engine, args.batch, real)
    runs = {name: [] for name, _, _ in CONFIGS}
    outs = {}
    single = {"tau 0": [], "routed": []}                                # batch 1: decode ms per step, summed over prompts
    with torch.no_grad():
        for name, tau, q in CONFIGS:                                    # warm-up
            lr.generate(engine, prompts, max_new_tokens=4, eos_token_id=None, tau=tau, batch_q=q)
        for _ in range(args.repeats):
            for name, tau, q in CONFIGS:                                # interleaved
                out = lr.generate(engine, prompts, max_new_tokens=args.new, eos_token_id=None, tau=tau, batch_q=q)
                runs[name].append(out.stats["decode_ms_per_step"])
                outs[name] = out
            if args.batch1:
                totals = {"tau 0": 0.0, "routed": 0.0}
                for prompt in prompts:
                    for name, tau in (("tau 0", 0.0), ("routed", None)):
                        out = lr.generate(engine, [prompt], max_new_tokens=args.new, eos_token_id=None, tau=tau)
                        totals[name] += out.stats["decode_ms_per_step"]
                for name, v in totals.items():
                    single[name].append(v / len(prompts))
    dense = statistics.median(runs["tau 0"])

    def paired_cut(a, b):
        """Median over repeats of 1 - a / b (the same repeat), in %."""
        return 100.0 * statistics.median(1 - x / y for x, y in zip(a, b))

    results = []
    for name, tau, q in CONFIGS:
        out = outs[name]
        med = statistics.median(runs[name])
        results.append({
            "config": name, "tau": engine.lr_config.tau if tau is None else tau, "batch_q": q,
            "decode_ms_per_step": {"median": med, "min": min(runs[name]), "all": runs[name]},
            "cut_vs_tau0_pct": 100.0 * (1 - med / dense),
            "paired_cut_vs_tau0_pct": paired_cut(runs[name], runs["tau 0"]),
            "decode_blocks_no_row_ran_pct": out.stats["decode_blocks_no_row_ran_pct"],
            "generated_total_flops_skipped_pct": out.stats["generated_total_flops_skipped_pct"],
            "sequences_equal_to_tau0": sum(a == b for a, b in zip(out.tokens, outs["tau 0"].tokens)),
        })
    batch1 = None
    if args.batch1:
        cut1 = 100.0 * (1 - statistics.median(single["routed"]) / statistics.median(single["tau 0"]))
        batch1 = {"decode_ms_per_step": {k: {"median": statistics.median(v), "all": v} for k, v in single.items()},
                  "cut_vs_tau0_pct": cut1, "paired_cut_vs_tau0_pct": paired_cut(single["routed"], single["tau 0"])}
        for r in results:
            r["share_of_batch1_cut"] = r["cut_vs_tau0_pct"] / cut1 if cut1 > 0 and r["tau"] > 0 else None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {"device": f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)",
              "commit": commit, "date": time.strftime("%Y-%m-%d"), "command": "benchmarks/bench_batch_policy.py " + " ".join(argv or sys.argv[1:]),
              "model": args.model or "bundled demo model + adapter", "adapter": args.adapter,
              "batch": args.batch, "new_tokens": args.new, "repeats": args.repeats, "results": results,
              "batch1": batch1}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    for r in results:
        print(f"{r['config']:14s} {r['decode_ms_per_step']['median']:7.1f} ms/step (cut {r['cut_vs_tau0_pct']:+5.1f}%, "
              f"paired {r['paired_cut_vs_tau0_pct']:+5.1f}%), "
              f"blocks no row ran {r['decode_blocks_no_row_ran_pct']:5.1f}%, FLOPs skipped "
              f"{r['generated_total_flops_skipped_pct']:5.1f}%, equal to tau 0: {r['sequences_equal_to_tau0']}/{args.batch}")
    if batch1:
        print(f"batch 1: routed cut {batch1['cut_vs_tau0_pct']:+5.1f}% against tau 0 (mean over the prompts, medians over repeats)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
