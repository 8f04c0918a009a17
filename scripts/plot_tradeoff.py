"""The accuracy / FLOPs trade-off of a paired BFCL eval (scripts/real_model_experiment.py
heldout): for each setting against the frozen base, the paired difference in accuracy (points,
with its bootstrap 95% CI) against the % of whole-request total FLOPs skipped (prompt plus
generated tokens), and the same for the prompt and the generated tokens alone.

    python scripts/plot_tradeoff.py EVAL.json [EVAL.json ...] --group completed --out tradeoff.png
    python scripts/plot_tradeoff.py EVAL.json [EVAL.json ...] --categories multiple simple_java --out F.png

Each EVAL.json adds its settings' points, labelled by its adapter, tau, batch policy and batch
size. The group is a key of the eval's summary (a category, "tool_calls", "all", or "completed":
the categories every setting finished); --categories instead sums the given categories' records
in every file alike (the same cases for each, so the points compare).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def points(report: dict, group: str, categories: list[str] | None = None) -> list[dict]:
    """One point per setting: the paired difference against the base and the FLOPs skipped."""
    if categories:
        from real_model_experiment import paired_summary
        group = "+".join(categories)
        report = {**report, "summary": paired_summary(report, {group: categories})}
    row = report["summary"].get(group)
    if not row or "base" not in row:
        raise ValueError(f"plot_tradeoff: the eval's summary has no {group!r} group with a base setting "
                         f"(groups: {sorted(report['summary'])})")
    tau = report["tau"] if report.get("tau") is not None else report.get("layerroute_config", {}).get("tau")
    q = report.get("batch_q", 1.0)
    parts = Path(report["adapter"]).parts
    name = "/".join(parts[-3:] if len(parts) > 2 and parts[-2] == "snapshots" else parts[-2:])   # a run's snapshot: its run too
    label = f"adapter {name}, tau {tau}, q {q}, " \
            f"batch {report.get('batch_size', 8)}"
    out = [{"setting": "base", "label": label, "q": q, "diff": 0.0, "ci": [0.0, 0.0], "n": row["base"]["n"],
            **{k: row["base"][f"{k}_total_flops_skipped_pct"] for k in ("request", "prompt", "generated")}}]
    for setting in ("lora", "routed"):
        if setting in row and f"{setting}-base" in row:
            c = row[f"{setting}-base"]
            out.append({"setting": setting, "label": label, "q": q, "diff": c["diff_points"], "ci": c["ci95_points"],
                        "n": c["n"], "gains": c["gains"], "losses": c["losses"], "p": c["sign_test_p"],
                        **{k: row[setting][f"{k}_total_flops_skipped_pct"] for k in ("request", "prompt", "generated")}})
    return out


def plot(all_points: list[dict], group: str, out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    colors = {"base": "black", "lora": "tab:blue", "routed": "tab:red"}
    labels = list(dict.fromkeys(p["label"] for p in all_points))
    markers = "osD^v<>"
    for ax, part in zip(axes, ("request", "prompt", "generated")):
        for p in all_points:
            lo, hi = p["ci"]
            k = labels.index(p["label"])
            ax.errorbar(p[part], p["diff"], yerr=[[p["diff"] - lo], [hi - p["diff"]]], fmt=markers[k % len(markers)],
                        capsize=4, color=colors[p["setting"]], label=p["label"] if p["setting"] == "routed" else None)
            name = p["setting"] + (f" (q {p['q']})" if len(labels) > 1 and p["setting"] == "routed" else "")
            text = name if p["setting"] == "base" else \
                f"{name} {p['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}]\n{p['gains']} gained / {p['losses']} lost"
            ax.annotate(text, (p[part], p["diff"]), textcoords="offset points",
                        xytext=(6, -22 if p["setting"] == "lora" else 6), fontsize=8)
        ax.axhline(-2.0, color="gray", linestyle="--", linewidth=0.8)
        ax.axhline(0.0, color="gray", linewidth=0.5)
        ax.set_xlabel(f"% total FLOPs skipped ({part}{' tokens' if part != 'request' else ': prompt + generated'})")
        ax.grid(alpha=0.3)
        ax.margins(x=0.4)
    axes[0].set_ylabel("accuracy - base (points, paired bootstrap 95% CI)")
    if len(labels) > 1:
        axes[0].legend(fontsize=7, loc="lower left")
    n = all_points[0]["n"]
    fig.suptitle(f"BFCL held-out, group {group!r} ({n} paired cases); "
                 f"{all_points[0]['label'] if len(labels) == 1 else 'routed markers: see the legend'}; "
                 "dashed: the -2 point bound", fontsize=10)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("evals", nargs="+", type=Path)
    p.add_argument("--group", default="completed")
    p.add_argument("--categories", nargs="+", default=None,
                   help="sum these categories' records in every file (instead of --group)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    pts = []
    for path in args.evals:
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"plot_tradeoff: cannot read {path}: {e}")
        pts += points(report, args.group, args.categories)
    plot(pts, "+".join(args.categories) if args.categories else args.group, args.out)
    print(json.dumps(pts, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
