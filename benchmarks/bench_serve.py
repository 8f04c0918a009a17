"""Load benchmark of `layerroute serve` (continuous batching): the server in-process on loopback,
driven by the openai client, streaming. Writes JSON.

    python benchmarks/bench_serve.py [--model DIR] [--levels 1 4 16 64] [--out FILE]

Phases:
* levels: for each concurrency c, 12 x max(1, c // 2) ... requests (see requests_for) from c
  client threads, greedy, with mixed output lengths (LENGTHS, exactly: `ignore_eos`). Per level:
  completion tokens/s over the phase's wall time and against one client at a time (the level 1
  run), p50/p99 time to first token (first content delta) and inter-token latency (gaps between
  content deltas), and from the server's scheduler counters over the phase: the mean rows per
  decode step, the % of (step, block) pairs no row ran, and the % of the generated tokens' total
  and block FLOPs skipped.
* short_among_long: a short request (8 tokens) alone, then while 8 long streams (256 tokens) run:
  its latency against alone, and the p99 time to first token of 8 such short requests sent one
  after another while the long streams run.
* big_body: a small request's latency alone and while a 10 MB body is being sent (refused 413).

The server runs in its own process (`layerroute serve`, prefix cache off), the client threads in
this one, so that they do not share an interpreter lock with the engine.

Each request's prompt is its own (the request number leads the user turn), so no phase reuses
another's prompts from the prefix cache; all share the chat template's system prefix.
"""
from __future__ import annotations

import argparse
import http.client
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402


CITIES = ["Rome", "Oslo", "Lisbon", "Vienna", "Prague", "Dublin", "Athens", "Madrid"]
LENGTHS = [2, 8, 32, 64, 128, 256]       # output lengths, cycled over a phase's requests


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile q in [0, 100] (None for no values)."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stream_request(client, model: str, tag: str, i: int, max_tokens: int) -> dict:
    """One streamed request: latency, time to first token, the gaps between content deltas."""
    msg = f"Request {tag}-{i}: find flights from Paris to {CITIES[i % len(CITIES)]} on {1 + i % 28} May."
    t0 = time.perf_counter()
    times, usage = [], None
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": msg}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.perf_counter())
            if chunk.usage is not None:
                usage = chunk.usage
    except openai.OpenAIError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "latency_s": time.perf_counter() - t0}
    end = time.perf_counter()
    return {"ok": usage is not None, "latency_s": end - t0, "tokens": usage.completion_tokens if usage else 0,
            "ttft_s": times[0] - t0 if times else end - t0,
            "itl_s": [b - a for a, b in zip(times, times[1:])]}


def scheduler_counters(url: str) -> dict:
    """The server's scheduler counters, from /health."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("GET", "/health")
    s = json.loads(conn.getresponse().read())["scheduler"]
    conn.close()
    return {k: s[k] for k in ("steps", "row_steps", "block_steps", "none_ran")} | s["generated_flops"]


def counters_delta(before: dict, after: dict) -> dict:
    d = {k: after[k] - before[k] for k in before}
    return {
        "decode_steps": d["steps"],
        "mean_rows_per_step": d["row_steps"] / d["steps"] if d["steps"] else None,
        "blocks_no_row_ran_pct": 100.0 * d["none_ran"] / d["block_steps"] if d["block_steps"] else None,
        "generated_total_flops_skipped_pct": 100.0 * (1 - d["total_run"] / d["total"]) if d["total"] else None,
        "generated_block_flops_skipped_pct": 100.0 * (1 - d["block_run"] / d["block"]) if d["block"] else None,
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"bench_serve: the server exited: {server.stderr.read()[-2000:]}")
        try:
            scheduler_counters(url)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("bench_serve: the server did not start within 300 s")


def requests_for(clients: int, rounds: int = 2) -> int:
    return len(LENGTHS) * max(rounds, clients // 2)


def level(client, url: str, model: str, clients: int, rounds: int = 2) -> dict:
    n = requests_for(clients, rounds)
    before = scheduler_counters(url)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: stream_request(client, model, f"c{clients}", i, LENGTHS[i % len(LENGTHS)]),
                                range(n)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft_s"] for r in ok]
    itl = [g for r in ok for g in r["itl_s"]]
    return {
        "clients": clients, "requests": n, "completed": len(ok),
        "all_complete": len(ok) == n and all(r["tokens"] == LENGTHS[i % len(LENGTHS)]
                                             for i, r in enumerate(results) if r["ok"]),
        "errors": [r["error"] for r in results if not r["ok"]][:5],
        "wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
        "ttft_s": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
        "itl_s": {"p50": percentile(itl, 50), "p99": percentile(itl, 99)},
        "latency_s": {"p50": percentile([r["latency_s"] for r in ok], 50),
                      "p99": percentile([r["latency_s"] for r in ok], 99)},
        **counters_delta(before, scheduler_counters(url)),
    }


def short_among_long(client, model: str) -> dict:
    alone = [stream_request(client, model, "alone", i, 8)["latency_s"] for i in range(3)]
    stop = threading.Event()
    started = threading.Barrier(9)
    longs = []

    def long(i):
        msg = f"Long {i}: plan a week in {CITIES[i % len(CITIES)]} with museums and food."
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": msg}],
                                                max_tokens=256, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
        n = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                n += 1
                if n == 2:
                    started.wait(timeout=600)
        longs.append(time.perf_counter())

    threads = [threading.Thread(target=long, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait(timeout=600)
    t_short = time.perf_counter()
    beside = stream_request(client, model, "beside", 0, 8)
    ttfts = []
    for i in range(8):
        if len(longs) >= 4:               # keep it "while long streams run"
            break
        ttfts.append(stream_request(client, model, "ttft", i, 2)["ttft_s"])
    for t in threads:
        t.join(timeout=900)
    stop.set()
    return {"short_alone_latency_s": statistics.median(alone), "short_beside_8_long_latency_s": beside["latency_s"],
            "ratio_to_alone": beside["latency_s"] / statistics.median(alone),
            "long_streams_finished_before_short": sum(t < t_short + beside["latency_s"] for t in longs),
            "short_ttft_while_long_run_s": {"n": len(ttfts), "p50": percentile(ttfts, 50),
                                            "p99": percentile(ttfts, 99)}}


def big_body(client, model: str, url: str) -> dict:
    alone = [stream_request(client, model, "small", i, 8)["latency_s"] for i in range(3)]
    u = urllib.parse.urlparse(url)
    status = {}

    def send_big():
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        body = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (10 << 20) + b'"}]}'
        try:
            conn.request("POST", "/v1/chat/completions", body=body,
                         headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                         encode_chunked=True)
            status["code"] = conn.getresponse().status
        except OSError as e:
            status["code"] = f"closed ({type(e).__name__})"
        conn.close()

    t = threading.Thread(target=send_big)
    t.start()
    time.sleep(0.05)
    beside = stream_request(client, model, "small-big", 0, 8)["latency_s"]
    t.join(timeout=120)
    return {"small_alone_latency_s": statistics.median(alone), "small_beside_10mb_latency_s": beside,
            "delay_s": beside - statistics.median(alone), "big_body_status": status.get("code")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Qwen2 checkpoint directory or GGUF (default: the bundled demo model)")
    p.add_argument("--adapter")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--batch-q", type=float, default=1.0)
    p.add_argument("--skip-scenarios", action="store_true", help="only the concurrency levels")
    p.add_argument("--lengths", type=int, nargs="+", help=f"output lengths cycled over a level's requests "
                   f"(default {LENGTHS}; shorter for a large model on a CPU)")
    p.add_argument("--rounds", type=int, default=2, help="a level sends len(lengths) x max(rounds, clients // 2) requests")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load_cpu.json"))
    args = p.parse_args(argv)
    if args.lengths:
        LENGTHS[:] = args.lengths
    bundled = args.model is None
    name = "layerroute-demo" if bundled else Path(args.model).name
    port = free_port()
    cmd = [sys.executable, "-m", "layerroute_rt.cli", "serve", "--port", str(port), "--model-name", name,
           "--max-batch", str(max(args.levels + [16])), "--batch-q", str(args.batch_q), "--no-prefix-cache"]
    if not bundled:
        cmd += ["--model", args.model] + (["--adapter", args.adapter] if args.adapter else [])
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_listening(url, server)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)
        stream_request(client, name, "warmup", 0, 8)
        levels = [level(client, url, name, c, args.rounds) for c in args.levels]
        base = next((r for r in levels if r["clients"] == 1), None)
        for r in levels:
            r["throughput_vs_one_client"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        scenarios = {} if args.skip_scenarios else {"short_among_long": short_among_long(client, name),
                                                    "big_body": big_body(client, name, url)}
    finally:
        server.terminate()
        server.wait(timeout=60)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
                  "the server in its own process (`layerroute serve`), the clients in this one",
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "command": "benchmarks/bench_serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "model": "bundled demo model + adapter" if bundled else args.model,
        "batch_q": args.batch_q, "output_lengths": LENGTHS,
        "levels": levels, **scenarios,
        "all_complete": all(r["all_complete"] for r in levels),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)
    for r in levels:
        print(f"{r['clients']:3d} clients: {r['completed']}/{r['requests']} complete, {r['tokens_per_s']:.1f} tok/s "
              f"(x{r['throughput_vs_one_client'] or 0:.2f}), TTFT p50/p99 {r['ttft_s']['p50']:.3f}/"
              f"{r['ttft_s']['p99']:.3f} s, ITL p50/p99 {r['itl_s']['p50']:.3f}/{r['itl_s']['p99']:.3f} s, "
              f"rows/step {r['mean_rows_per_step']:.1f}, blocks no row ran {r['blocks_no_row_ran_pct']:.1f}%, "
              f"FLOPs skipped {r['generated_total_flops_skipped_pct']:.1f}% total")
    for k, v in scenarios.items():
        print(k, json.dumps(v))
    print(f"wrote {out}")
    return 0 if results["all_complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
