"""End-to-end generation benchmark: ms per decode step and prefill ms against blocks skipped.

    python benchmarks/bench_generate.py                       # Qwen2.5-0.5B shapes, random weights
    python benchmarks/bench_generate.py --model DIR           # a checkpoint you name
    python benchmarks/bench_generate.py --device cpu --dtype float32 --batch 1 --prompt 128 \\
        --new-tokens 16 --skip-fractions 0 0.25 0.5 --baselines --repeats 15   # the CPU check

For each batch size and prompt length it times our engine dense (routers off: tau 0) and with
a fraction of the blocks skipped for every token (skip_layers, spread over the stack), plus all
blocks skipped, which gives each block's measured share of the step time; and the same skips
made by the routers ("routed": tau 0.5, router biases forcing the decisions; at 0 blocks this is
the price of routing when every block runs): the ideal time with
k blocks skipped is dense - k x share, and "saved" is the fraction of that ideal saving that was
realised. With --baselines, transformers' generate on the same checkpoint: eager, and (on CUDA)
static cache + torch.compile. A prefill case routes about half of the tokens past every block
(random router directions) and compares the time saved with the proportional saving.

Every figure is stated against its limit: ms per step against the weight-read floor (the
backbone's weight bytes over the device's measured copy bandwidth). Writes JSON and a PNG plot
(ms per step against blocks skipped, with the ideal line) to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))          # qwen_factory: random HF Qwen2 checkpoints

import layerroute_rt as lr  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Measured copy bandwidth (read + write bytes / time) of a 1 GiB buffer."""
    if device.type == "cuda":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from device_limits import copy_bandwidth_gbs as cuda_copy

        return cuda_copy()
    src = torch.empty(1 << 30, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() / min(times) / 1e9


def spread(k: int, n: int) -> list[int]:
    """k block indices spread evenly over blocks 1 .. n-1 (block 0 kept while k < n)."""
    if k >= n:
        return list(range(n))
    if k == 0:
        return []
    step = (n - 1) / k
    return sorted({1 + int(i * step) for i in range(k)})


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_stats(runs: list[dict]) -> dict:
    return {"decode_ms_per_step": statistics.median(r["decode_ms_per_step"] for r in runs),
            "decode_ms_min": min(r["decode_ms_per_step"] for r in runs),
            "decode_ms_all_repeats": [r["decode_ms_per_step"] for r in runs],
            "prefill_ms": statistics.median(r["prefill_ms"] for r in runs)}


def _ours_once(engine, prompts, new_tokens, config) -> dict:
    """config (mode, blocks): "forced" skips the blocks by skip_layers (tau 0: no router runs);
    "routed" lets the routers skip them (biases set to -1e4 there and +1e4 elsewhere, tau 0.5),
    so the router kernels, the device counts and the count-aware kernels are in the time."""
    mode, blocks = config
    if mode == "routed":
        for i, blk in enumerate(engine.blocks):
            blk.router_b.fill_(-1e4 if i in blocks else 1e4)
        kw = dict(tau=0.5)
    else:
        kw = dict(tau=0.0, skip_layers=blocks)
    stats = lr.generate(engine, prompts, max_new_tokens=new_tokens, eos_token_id=None,
                        sync_every=new_tokens, **kw).stats
    return {"decode_ms_per_step": stats["decode_ms_per_step"], "prefill_ms": stats["prefill_ms"],
            "cuda_graph": stats["cuda_graph"]}


def _hf_once(hf, prompts, new_tokens, device) -> dict:
    """ms per decode step from generate(N) - generate(1) over N - 1 steps; prefill ~ generate(1)."""
    ids = torch.tensor(prompts, device=device)

    def run(n):
        _sync(device)
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0)
        _sync(device)
        return time.perf_counter() - t0

    one, full = run(1), run(new_tokens)
    return {"decode_ms_per_step": 1e3 * (full - one) / (new_tokens - 1), "prefill_ms": 1e3 * one}


def measure_case(engine, baselines: dict, prompts, new_tokens, configs: dict, repeats,
                 device) -> tuple[dict, dict]:
    """Our engine per configuration and each transformers baseline, all warmed up (compiled,
    captured) first; then the repeats go round-robin over all of them, so that a drift of the
    machine's speed favours none. Returns ({config: stats}, {kind: stats}), medians."""
    saved = [blk.router_b.clone() for blk in engine.blocks]
    torch._dynamo.reset()                   # the compiled baseline recompiles for this shape
    for config in configs.values():
        _ours_once(engine, prompts, new_tokens, config)
    for hf in baselines.values():
        _hf_once(hf, prompts, new_tokens, device)
    ours = {k: [] for k in configs}
    theirs = {kind: [] for kind in baselines}
    for _ in range(repeats):
        for k, config in configs.items():
            ours[k].append(_ours_once(engine, prompts, new_tokens, config))
        for kind, hf in baselines.items():
            theirs[kind].append(_hf_once(hf, prompts, new_tokens, device))
    for blk, b in zip(engine.blocks, saved):
        blk.router_b.copy_(b)
    return ({k: {**_median_stats(rs), "cuda_graph": rs[0]["cuda_graph"]} for k, rs in ours.items()},
            {kind: _median_stats(rs) for kind, rs in theirs.items()})


def hf_baselines(model_dir, dtype, device) -> dict:
    """transformers' Qwen2ForCausalLM: eager, and on CUDA a static cache, with which generate()
    compiles the decode step itself (torch.compile, CUDA graphs)."""
    import transformers

    kinds = ["eager"] + (["static_compile"] if device.type == "cuda" else [])
    models = {}
    for kind in kinds:
        hf = transformers.Qwen2ForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        if kind == "static_compile":
            hf.generation_config.cache_implementation = "static"
        models[kind] = hf
    return models


def prefill_half_routed(model, engine_kwargs, prompt, dense_ms, all_skipped_ms, repeats, device):
    """Routers pointed in random directions (bias 0): about half of the tokens skip each block."""
    g = torch.Generator().manual_seed(0)
    saved = {n: p.detach().clone() for n, p in model.adapter_state_dict().items()}
    with torch.no_grad():
        for block in model.blocks:
            w = torch.randn(block.router.weight.shape, generator=g)
            block.router.weight.copy_(w / w.norm())
            block.router.bias.zero_()
    engine = lr.InferenceModel(model, **engine_kwargs)
    kw = dict(max_new_tokens=1, tau=0.5, eos_token_id=None)
    lr.generate(engine, prompt, **kw)
    outs = [lr.generate(engine, prompt, **kw) for _ in range(repeats)]
    with torch.no_grad():
        for n, p in model.adapter_state_dict().items():
            p.copy_(saved[n])
    ms = statistics.median(o.stats["prefill_ms"] for o in outs)
    ran = float(outs[0].executed[:, outs[0].valid].float().mean())
    ideal = (dense_ms - all_skipped_ms) * (1 - ran)
    return {"prefill_ms": ms, "dense_prefill_ms": dense_ms, "executed_fraction": ran,
            "ideal_saving_ms": ideal, "saving_ms": dense_ms - ms,
            "saved_of_ideal": (dense_ms - ms) / ideal if ideal > 0 else None}


def plot(results, path, floor_ms):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["batch"], r["prompt"]) for r in results["ours"]})
    fig, axes = plt.subplots(1, len(cases), figsize=(4.5 * len(cases), 3.8), squeeze=False)
    for ax, (batch, prompt) in zip(axes[0], cases):
        case = sorted((r for r in results["ours"] if (r["batch"], r["prompt"]) == (batch, prompt)),
                      key=lambda r: r["blocks_skipped"])
        forced = [r for r in case if r["mode"] == "forced"]
        routed = [r for r in case if r["mode"] == "routed"]
        ks = [r["blocks_skipped"] for r in forced]
        ax.plot(ks, [r["decode_ms_per_step"] for r in forced], "o-", label="layerroute_rt, skip_layers")
        ax.plot([r["blocks_skipped"] for r in routed], [r["decode_ms_per_step"] for r in routed], "s-",
                label="layerroute_rt, routers skip")
        ax.plot(ks, [r["ideal_ms"] for r in forced], "k--", label="ideal (dense - k x block share)")
        for r in results["transformers"]:
            if (r["batch"], r["prompt"]) == (batch, prompt):
                ax.axhline(r["decode_ms_per_step"], ls=":", color="gray")
                ax.annotate(f"transformers {r['kind']}", (ks[-1], r["decode_ms_per_step"]),
                            fontsize=7, ha="right", va="bottom")
        if batch == 1:
            ax.axhline(floor_ms, color="red", lw=0.8)
            ax.annotate("weight-read floor", (0, floor_ms), fontsize=7, color="red", va="bottom")
        ax.set(title=f"batch {batch}, prompt {prompt}", xlabel="blocks skipped",
               ylabel="ms per decode step")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['device']}, {results['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a Qwen2 checkpoint directory (default: Qwen2.5-0.5B shapes, random weights)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt", type=int, nargs="+", default=[128, 2048])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--skip-fractions", type=float, nargs="+", default=[0.0, 0.15, 0.3, 0.5])
    ap.add_argument("--baselines", action="store_true", help="time transformers' generate too")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--merge", choices=["merged", "unmerged"], default="merged")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (ms per step is measured over the decode steps)")

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    tmp = None
    if args.model is None:
        from qwen_factory import QWEN25_05B, save_random_qwen2

        tmp = tempfile.TemporaryDirectory()
        save_random_qwen2(tmp.name, **QWEN25_05B)
        model_dir = tmp.name
    else:
        model_dir = args.model
    model = lr.load(model_dir, device=device, dtype=dtype)
    engine_kwargs = dict(merge=args.merge == "merged")
    engine = lr.InferenceModel(model, **engine_kwargs)
    cfg = model.config
    L = cfg.num_hidden_layers
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    bandwidth = copy_bandwidth_gbs(device)
    floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": args.dtype, "commit": commit, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
        "torch": torch.__version__, "model": args.model or "Qwen2.5-0.5B shapes, random weights",
        "weight_bytes": weight_bytes, "copy_bandwidth_gbs": bandwidth,
        "weight_read_floor_ms": floor_ms, "new_tokens": args.new_tokens,
        "ours": [], "transformers": [], "prefill_half_routed": None,
    }
    baselines = hf_baselines(model_dir, dtype, device) if args.baselines else {}
    gen = torch.Generator().manual_seed(0)
    skip_counts = sorted({round(f * L) for f in args.skip_fractions} | {0, L})
    for prompt_len in args.prompt:
        for batch in args.batch:
            prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=gen).tolist()
            configs = {("forced", k): ("forced", spread(k, L)) for k in skip_counts}
            configs |= {("routed", k): ("routed", spread(k, L)) for k in skip_counts}
            timed, hf_timed = measure_case(engine, baselines, prompts, args.new_tokens, configs,
                                           args.repeats, device)
            rows = [{"batch": batch, "prompt": prompt_len, "mode": mode, "blocks_skipped": k,
                     "blocks": spread(k, L), **timed[mode, k]} for mode, k in configs]
            for r in rows:
                print(json.dumps(r), flush=True)
            by = {(r["mode"], r["blocks_skipped"]): r for r in rows}
            dense, none_left = by["forced", 0]["decode_ms_per_step"], by["forced", L]["decode_ms_per_step"]
            share = (dense - none_left) / L
            for r in rows:
                k = r["blocks_skipped"]
                r["ideal_ms"] = dense - k * share
                r["saved_of_ideal"] = (dense - r["decode_ms_per_step"]) / (k * share) if k else None
                r["vs_dense"] = 1 - r["decode_ms_per_step"] / dense
                r["vs_dense_min"] = 1 - r["decode_ms_min"] / by["forced", 0]["decode_ms_min"]
                # paired: repeat i of this configuration against repeat i of dense, back to back
                r["vs_dense_paired_median"] = statistics.median(
                    1 - a / b for a, b in zip(r["decode_ms_all_repeats"], by["forced", 0]["decode_ms_all_repeats"]))
                r["floor_ms"] = floor_ms if batch == 1 else None
            results["ours"].extend(rows)
            for kind, t in hf_timed.items():
                results["transformers"].append({"batch": batch, "prompt": prompt_len, "kind": kind, **t,
                                                "ours_speedup": t["decode_ms_per_step"] / dense})
                print(json.dumps(results["transformers"][-1]), flush=True)
            if prompt_len == max(args.prompt) and batch == 1:
                results["prefill_half_routed"] = prefill_half_routed(
                    model, engine_kwargs, prompts, by["forced", 0]["prefill_ms"], by["forced", L]["prefill_ms"],
                    args.repeats, device)
                print(json.dumps(results["prefill_half_routed"]), flush=True)
            save(results, Path(args.out) / f"generate_{device.type}_{args.dtype}", floor_ms)
    return 0


def save(results: dict, stem: Path, floor_ms: float) -> None:
    """JSON (written to a temp file, then renamed) and the PNG, after every case: a run cut
    short (a device lease ending) keeps the cases it finished."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_name(f".{stem.name}.json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(stem.with_suffix(".json"))
    tmp_png = stem.with_name(f".{stem.name}.tmp.png")
    plot(results, tmp_png, floor_ms)
    tmp_png.replace(stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png", flush=True)


if __name__ == "__main__":
    sys.exit(main())
