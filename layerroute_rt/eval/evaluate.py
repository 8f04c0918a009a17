"""Evaluation by step type, and the several-seed experiment (MISSION.md: the method's skip
differential flipped sign across seeds and was confounded with step length, so we report seeds
with an interval and a length-matched split).

Per step type, on the step's own tokens (the context belongs to earlier steps):
  skip_rate                  fraction of (block, token) pairs skipped
  block/total_flops_skipped  % of block FLOPs and of total forward FLOPs skipped (flops.py)
  ppl_base                   perplexity of the frozen base: no adapter, every block runs
  ppl_adapter                perplexity of base + adapter with skipping (tau)
  ppl_delta                  ppl_adapter - ppl_base
Under `sequence` granularity the router reads the mean over the step's context (route_mask), as
at inference, where the decision is made when the prompt is prefilled; train() does the same.
The forward used is the training path without gradients: its logits and decisions equal the
reference inference path's (tests/test_model.py).
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..model import checkpoint
from ..config import LayerRouteConfig
from ..data.splits import split_stats
from ..model.flops import flops_report
from ..model.modeling import LayerRouteModel, load
from ..train.trainer import TrainConfig, route_mask, train

# Two-sided 95% Student t quantiles by degrees of freedom (1..30); 1.96 beyond.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


@torch.no_grad()
def evaluate(model: LayerRouteModel, examples: Sequence, collate: Callable[[list], dict],
             batch_size: int = 8, tau: float | None = None) -> dict[str, dict]:
    """Metrics per step type (and "all") over `examples` (each with .step_type)."""
    if len(examples) == 0:
        raise ValueError("evaluate: no examples")
    device = model.model.embed_tokens.weight.device
    L = model.config.num_hidden_layers
    acc: dict[str, dict] = defaultdict(lambda: {
        "n_steps": 0, "n_tokens": 0, "ce_base": 0.0, "ce_adapter": 0.0,
        "ran_per_layer": torch.zeros(L, dtype=torch.float64),
        "block": 0.0, "block_run": 0.0, "total": 0.0, "total_run": 0.0})
    for start in range(0, len(examples), batch_size):
        batch = collate(list(examples[start:start + batch_size]))
        ids = batch["input_ids"].to(device)
        attn = batch["attention_mask"].to(device).bool()
        step = batch["loss_mask"].to(device).bool() & attn
        rmask = route_mask({"attention_mask": attn, "loss_mask": step}, model.lr_config.granularity)
        out = model.train_forward(ids, labels=ids, attention_mask=attn, loss_mask=step,
                                  route_mask=rmask, tau=tau, full_logits=False)
        ce_adapter = out.token_ce.double().cpu()
        with model.adapter_disabled():
            base = model.train_forward(ids, labels=ids, attention_mask=attn, loss_mask=step,
                                       tau=0.0, full_logits=False)
        ce_base = base.token_ce.double().cpu()
        executed, step, attn = out.executed.cpu(), step.cpu(), attn.cpu()
        context = attn.long().cumsum(1)
        for b, step_type in enumerate(batch["step_type"]):
            for key in (step_type, "all"):
                a = acc[key]
                a["n_steps"] += 1
                a["n_tokens"] += int(step[b].sum())
                a["ce_base"] += float(ce_base[b].sum())
                a["ce_adapter"] += float(ce_adapter[b].sum())
                a["ran_per_layer"] += (executed[:, b] & step[b]).sum(1).double()
                r = flops_report(model.config, model.lr_config, executed[:, b:b + 1],
                                 context[b:b + 1], step[b:b + 1])
                a["block"] += r.block_flops
                a["block_run"] += r.block_flops_run
                a["total"] += r.total_flops
                a["total_run"] += r.total_flops_run
    return {key: _finish(a) for key, a in acc.items()}


def _finish(a: dict) -> dict:
    n = max(a["n_tokens"], 1)
    ran = (a["ran_per_layer"] / n).tolist()
    ppl_base, ppl_adapter = math.exp(a["ce_base"] / n), math.exp(a["ce_adapter"] / n)
    return {
        "n_steps": a["n_steps"], "n_tokens": a["n_tokens"],
        "skip_rate": 1.0 - sum(ran) / len(ran),
        "skip_rate_per_layer": [1.0 - r for r in ran],
        "block_flops_skipped_pct": 100.0 * (1 - a["block_run"] / a["block"]) if a["block"] else 0.0,
        "total_flops_skipped_pct": 100.0 * (1 - a["total_run"] / a["total"]) if a["total"] else 0.0,
        "ppl_base": ppl_base, "ppl_adapter": ppl_adapter, "ppl_delta": ppl_adapter - ppl_base,
    }


def summarize(values: Sequence[float]) -> dict:
    """Mean, sample std and the 95% Student t interval of the mean."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half], "values": list(values)}


DIFFERENTIAL_KEYS = ("total_flops_skipped_pct", "block_flops_skipped_pct", "skip_rate")


def differentials(metrics: dict[str, dict], a: str = "tool_call", b: str = "planning") -> dict:
    """a minus b for each skip measure (the method's skip differential is total FLOPs %)."""
    if a not in metrics or b not in metrics:
        return {}
    return {k: metrics[a][k] - metrics[b][k] for k in DIFFERENTIAL_KEYS}


def aggregate(per_seed: dict[int, dict[str, dict[str, dict]]]) -> dict:
    """per_seed[seed][split][step_type] -> per split: each differential and each step type's
    metrics summarised over seeds."""
    out: dict[str, dict] = {}
    splits = next(iter(per_seed.values())).keys()
    for split in splits:
        diffs = [differentials(per_seed[s][split]) for s in per_seed]
        types = next(iter(per_seed.values()))[split].keys()
        out[split] = {
            "differential": {k: summarize([d[k] for d in diffs]) for k in DIFFERENTIAL_KEYS}
            if all(diffs) else {},
            "by_type": {t: {k: summarize([per_seed[s][split][t][k] for s in per_seed])
                            for k in ("skip_rate", "block_flops_skipped_pct",
                                      "total_flops_skipped_pct", "ppl_base", "ppl_adapter", "ppl_delta")}
                        for t in types},
        }
    return out


def markdown(report: dict) -> str:
    """The seeds' summary as markdown tables: per split, per step type, then the differential."""
    lines = []
    n = len(report["seeds"])
    for split, s in report["summary"].items():
        stats = report.get("splits", {}).get(split)
        lines += [f"### {split} split ({n} seed{'s' if n > 1 else ''}: mean ± std)", ""]
        if stats:
            lines += [f"{sum(stats['n'].values())} steps; mean step length (tokens) by type: "
                      + ", ".join(f"{t} {v:.1f}" for t, v in stats["mean_step_len"].items())
                      + f"; correlation of type (tool_call) with length: r = {stats['r_type_length']:+.2f}", ""]
        lines += [
                  "| step type | skip rate | block FLOPs skipped | total FLOPs skipped | ppl base | ppl adapter | ppl delta |",
                  "|---|---|---|---|---|---|---|"]
        for t, m in sorted(s["by_type"].items(), key=lambda kv: (kv[0] == "all", kv[0])):
            cells = [f"{m['skip_rate']['mean']:.3f} ± {m['skip_rate']['std']:.3f}"] + [
                f"{m[k]['mean']:.2f} ± {m[k]['std']:.2f}" for k in
                ("block_flops_skipped_pct", "total_flops_skipped_pct", "ppl_base", "ppl_adapter", "ppl_delta")]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        d = s["differential"].get("total_flops_skipped_pct")
        if d:
            lines += ["", f"Skip differential (tool_call − planning, % of total FLOPs): "
                          f"mean {d['mean']:+.2f}, std {d['std']:.2f}, 95% CI "
                          f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]; per seed: "
                          + ", ".join(f"{v:+.2f}" for v in d["values"])]
        lines.append("")
    return "\n".join(lines)


def heatmap(report: dict, path: str | Path) -> None:
    """PNG: skip rate per block (rows) and step type (columns), mean over seeds, one panel a split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(report["per_seed"].values())
    splits = list(seeds[0])
    fig, axes = plt.subplots(1, len(splits), figsize=(4 * len(splits), 5), squeeze=False)
    for ax, split in zip(axes[0], splits):
        types = [t for t in seeds[0][split] if t != "all"]
        grid = torch.tensor([[r[split][t]["skip_rate_per_layer"] for t in types] for r in seeds])
        im = ax.imshow(grid.mean(0).T.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(types)), types, rotation=30)
        ax.set_yticks(range(grid.shape[2]))
        ax.set_ylabel("block")
        ax.set_title(f"{split} split")
    fig.colorbar(im, ax=axes[0].tolist(), label="skip rate (step tokens), mean over seeds")
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def write_report(report: dict, out_dir: str | Path) -> None:
    """eval.json, eval.md and skip_heatmap.png in out_dir (each written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_json(out / "eval.json", report)
    tmp = out / ".eval.md.tmp"
    tmp.write_text(markdown(report), encoding="utf-8")
    tmp.replace(out / "eval.md")
    heatmap(report, out / "skip_heatmap.png")


def run_seeds(backbone_dir, train_examples: Sequence, splits: dict[str, Sequence],
              collate: Callable[[list], dict], seeds: Sequence[int], out_dir: str | Path,
              config: LayerRouteConfig | None = None, train_config: TrainConfig | None = None,
              device="cpu", dtype=torch.float32, batch_size: int = 8, progress: bool = True) -> dict:
    """Train one adapter per seed (adapter init and data order from the seed) and evaluate each
    on every split; write eval.json, eval.md and skip_heatmap.png to out_dir; return the report."""
    if not seeds:
        raise ValueError("run_seeds: give at least one seed")
    train_config = train_config or TrainConfig()
    out = Path(out_dir)
    per_seed: dict[str, dict] = {}
    for seed in seeds:
        model = load(backbone_dir, config=config, device=device, dtype=dtype)
        model.reset_adapter(seed)
        train(model, train_examples, collate, out / f"seed{seed}",
              dataclasses.replace(train_config, seed=seed), progress=progress)
        per_seed[str(seed)] = {name: evaluate(model, examples, collate, batch_size)
                               for name, examples in splits.items()}
    report = {"backbone": str(backbone_dir), "seeds": list(seeds),
              "layerroute_config": model.lr_config.to_dict(),
              "train_config": dataclasses.asdict(train_config),
              "splits": {name: split_stats(ex) for name, ex in splits.items()},
              "per_seed": per_seed, "summary": aggregate(per_seed)}
    write_report(report, out)
    return report
