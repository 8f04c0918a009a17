"""Load benchmark of `layerroute serve`: the server in-process on loopback, driven by the openai
client. The same number of requests twice: from one client at a time (sequential baseline), then
from --clients concurrent clients (threads). Every request is greedy with --max-tokens new tokens
exactly (the `ignore_eos` extension), so both phases generate the same token count. Reports the
completion throughput (tokens/s over the phase's wall time), per-request latency p50/p99 and the
batch sizes the server ran; writes JSON.

    python benchmarks/bench_serve.py [--model DIR] [--requests 32] [--clients 16] [--max-tokens 32]

Each phase's prompts are its own (the request number leads the user turn), so the concurrent
phase does not reuse the baseline's prompts from the prefix cache; both share the chat template's
system prefix, as clients of one server do.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

import layerroute_rt as lr  # noqa: E402
from layerroute_rt import serve  # noqa: E402
from layerroute_rt.cli import DEMO_DIR  # noqa: E402

CITIES = ["Rome", "Oslo", "Lisbon", "Vienna", "Prague", "Dublin", "Athens", "Madrid"]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile q in [0, 100]."""
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def request(client, model: str, phase: str, i: int, max_tokens: int) -> dict:
    msg = f"Request {phase}-{i}: find flights from Paris to {CITIES[i % len(CITIES)]} on {1 + i % 28} May."
    t0 = time.perf_counter()
    try:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": msg}],
                                           max_tokens=max_tokens, temperature=0,
                                           extra_body={"ignore_eos": True})
    except openai.OpenAIError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "latency_s": time.perf_counter() - t0}
    return {"ok": True, "latency_s": time.perf_counter() - t0, "tokens": r.usage.completion_tokens,
            "cached": r.usage.prompt_tokens_details.cached_tokens,
            "batch_size": r.model_extra["layerroute"]["batch_size"]}


def phase(client, model: str, name: str, n: int, clients: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: request(client, model, name, i, max_tokens), range(n)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    lat = [r["latency_s"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    sizes = [r["batch_size"] for r in ok]
    return {
        "clients": clients, "requests": n, "completed": len(ok),
        "all_complete": len(ok) == n and all(r["tokens"] == max_tokens for r in ok),
        "errors": [r["error"] for r in results if not r["ok"]][:5],
        "wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
        "latency_s": {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "mean": statistics.mean(lat),
                      "max": max(lat)} if lat else None,
        "batch_sizes": {str(s): sizes.count(s) for s in sorted(set(sizes))},
        "cached_prompt_tokens": sum(r["cached"] for r in ok),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Qwen2 checkpoint directory or GGUF (default: the bundled demo model)")
    p.add_argument("--adapter")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load_cpu.json"))
    args = p.parse_args(argv)
    bundled = args.model is None
    model = lr.load(DEMO_DIR if bundled else args.model,
                    adapter=args.adapter or (DEMO_DIR / "adapter" if bundled else None))
    name = "layerroute-demo" if bundled else Path(args.model).name
    engine = lr.InferenceModel(model)
    with serve.running(serve.create_app(engine, name)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        phase(client, name, "warmup", 2, 2, args.max_tokens)
        sequential = phase(client, name, "seq", args.requests, 1, args.max_tokens)
        concurrent = phase(client, name, "conc", args.requests, args.clients, args.max_tokens)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results = {
        "device": f"{engine.device.type} ({platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} threads)",
        "commit": commit,
        "command": "benchmarks/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "model": "bundled demo model + adapter" if bundled else args.model,
        "max_tokens": args.max_tokens, "sequential": sequential, "concurrent": concurrent,
        "throughput_ratio": concurrent["tokens_per_s"] / sequential["tokens_per_s"],
        "all_complete": sequential["all_complete"] and concurrent["all_complete"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for k in ("sequential", "concurrent"):
        r = results[k]
        print(f"{k:10s} {r['clients']:2d} client(s): {r['completed']}/{r['requests']} complete, "
              f"{r['tokens_per_s']:.1f} tokens/s, latency p50 {r['latency_s']['p50']:.2f} s, "
              f"p99 {r['latency_s']['p99']:.2f} s, batch sizes {r['batch_sizes']}")
    print(f"throughput x{results['throughput_ratio']:.2f}; wrote {out}")
    return 0 if results["all_complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
