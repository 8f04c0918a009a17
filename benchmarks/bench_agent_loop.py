"""Agent-loop benchmarks on the CPU (issue: agent loops in-process), writing JSON:

    python benchmarks/bench_agent_loop.py prefix-cache     # the real model, a 5-turn conversation
    python benchmarks/bench_agent_loop.py vs-transformers  # Qwen2.5-0.5B shapes, random weights

prefix-cache: Qwen2.5-Coder-0.5B-Instruct (real_model.fetch_model()), a 5-turn tool-using
conversation built by generating each assistant turn. The last turn's prefill is timed with the
engine's prefix cache holding the first four turns (restored to that state before each repeat)
and without a cache, interleaved; the greedy continuations must be equal.

vs-transformers: `lr.generate(model, ...)` on a LayerRouteModel (its engine built once and kept)
against transformers' `generate` on the same checkpoint, fp32, batch 1, a fresh random prompt
per repeat (so that no prefix is cached), interleaved, end to end (tokenized ids in, tokens out).
The JSON also counts the aten ops and host reads of one decode step of each, end to end.
Torch threads: --threads (2 on the CI machine).
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
from collections import OrderedDict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import layerroute_rt as lr  # noqa: E402

TOOLS = [{"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {
        "name": "search_flights", "description": "Search flights between two airports on a date.",
        "parameters": {"type": "object", "required": ["origin", "destination", "date"], "properties": {
            "origin": {"type": "string"}, "destination": {"type": "string"},
            "date": {"type": "string", "description": "YYYY-MM-DD"}}}}}]
TURNS = ["I am planning a trip from Paris to Rome next week. What's the weather in Rome?",
         "Thanks. Now find flights from CDG to FCO on 2026-12-09.",
         "Which of those flights is the cheapest? Explain briefly.",
         "And what will the weather be like in Paris when I come back?",
         "Summarise the plan in three short bullet points."]


def _meta(command: str) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"device": f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
            "commit": commit, "date": time.strftime("%Y-%m-%d"), "command": command, "torch": torch.__version__}


def prefix_cache_bench(args) -> dict:
    from layerroute_rt.model.real_model import fetch_model

    model = lr.load(fetch_model(), dtype=torch.float32)
    cached = lr.InferenceModel(model)
    plain = lr.InferenceModel(model, prefix_cache=False)
    chat: list[dict] = [{"role": "system", "content": "You are a travel assistant. Use the tools when they help."}]
    for turn in TURNS[:-1]:
        chat.append({"role": "user", "content": turn})
        out = lr.generate(cached, chat, max_new_tokens=args.turn_tokens, tools=TOOLS)
        chat.append({"role": "assistant", "content": out.text[0]})
    chat.append({"role": "user", "content": TURNS[-1]})
    pc = cached.prefix_cache
    saved = (OrderedDict(pc._entries), pc.tokens_held)

    def restore():
        pc._entries, pc.tokens_held = OrderedDict(saved[0]), saved[1]

    with_cache, without, cached_tokens = [], [], None
    for _ in range(args.repeats):
        restore()
        a = lr.generate(cached, chat, max_new_tokens=1, tools=TOOLS)
        b = lr.generate(plain, chat, max_new_tokens=1, tools=TOOLS)
        with_cache.append(a.stats["prefill_ms"])
        without.append(b.stats["prefill_ms"])
        cached_tokens = a.stats["cached_prompt_tokens"]
    restore()
    a = lr.generate(cached, chat, max_new_tokens=args.turn_tokens, tools=TOOLS)
    b = lr.generate(plain, chat, max_new_tokens=args.turn_tokens, tools=TOOLS)
    med_a, med_b = statistics.median(with_cache), statistics.median(without)
    return {**_meta(" ".join(sys.argv)), "model": "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M -> fp32)",
            "turns": len(TURNS), "last_turn_prompt_tokens": a.stats["prompt_tokens_per_seq"][0],
            "cached_prompt_tokens": cached_tokens,
            "prefill_ms_with_cache": med_a, "prefill_ms_without_cache": med_b,
            "prefill_ms_with_cache_all": with_cache, "prefill_ms_without_cache_all": without,
            "speedup": med_b / med_a, "same_tokens": a.tokens == b.tokens,
            "last_turn_tokens_compared": len(a.tokens[0])}


def _step_ops(run) -> dict:
    """aten ops and host reads (aten._local_scalar_dense) of one decode step, end to end: those
    of run(n=3) minus those of run(n=2) (each on a fresh prompt), counted by a TorchDispatchMode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = self.reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            self.reads += func.overloadpacket is torch.ops.aten._local_scalar_dense
            return func(*args, **(kwargs or {}))

    got = []
    for n in (2, 3):
        with torch.no_grad(), Count() as c:
            run(n)
        got.append(c)
    return {"aten_ops": got[1].ops - got[0].ops, "host_reads": got[1].reads - got[0].reads}


def vs_transformers_bench(args) -> dict:
    import transformers
    from qwen_factory import QWEN25_05B, save_random_qwen2

    tmp = Path(tempfile.mkdtemp())
    save_random_qwen2(tmp, seed=0, **QWEN25_05B)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    model = lr.load(tmp, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)

    def prompt():
        return torch.randint(0, 151000, (1, args.prompt), generator=g)

    def ours(ids):
        t0 = time.perf_counter()
        out = lr.generate(model, ids, max_new_tokens=args.new_tokens, eos_token_id=None)
        return time.perf_counter() - t0, out.tokens[0]

    @torch.no_grad()
    def theirs(ids):
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                          min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0, out[0, ids.shape[1]:].tolist()

    ids = prompt()
    same = ours(ids)[1] == theirs(ids)[1]                    # warm-up, and the check of the tokens
    counts = {name: _step_ops(lambda n: fn(prompt(), n)) for name, fn in
              (("ours", lambda ids, n: lr.generate(model, ids, max_new_tokens=n, eos_token_id=None)),
               ("transformers", lambda ids, n: hf.generate(
                   ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                   do_sample=False, pad_token_id=0)))}
    t_ours, t_hf = [], []
    for i in range(args.repeats):
        ids = prompt()
        for name in (("ours", "hf") if i % 2 == 0 else ("hf", "ours")):
            (t_ours if name == "ours" else t_hf).append((ours if name == "ours" else theirs)(ids)[0])
    mo, mh = statistics.median(t_ours), statistics.median(t_hf)
    return {**_meta(" ".join(sys.argv)), "model": "Qwen2.5-0.5B shapes, random weights, fp32",
            "batch": 1, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens,
            "ours_s": mo, "transformers_s": mh, "ours_all_s": t_ours, "transformers_all_s": t_hf,
            "ours_over_transformers": mo / mh, "same_greedy_tokens_on_warmup": same,
            "per_decode_step": counts,
            "note": "lr.generate(model) end to end, the engine built once (first call, warm-up) and kept"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("which", choices=("prefix-cache", "vs-transformers"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--turn-tokens", type=int, default=48, help="prefix-cache: tokens per assistant turn")
    p.add_argument("--prompt", type=int, default=128, help="vs-transformers: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="vs-transformers: new tokens")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = prefix_cache_bench(args) if args.which == "prefix-cache" else vs_transformers_bench(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"agent_loop_{args.which.replace('-', '_')}_cpu.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_all") and not k.endswith("_all_s")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
