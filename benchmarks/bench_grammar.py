"""What a grammar mask costs a decode step (layerroute_rt/grammar.py): the scheduler's time per
decode step with every row constrained against none, at batch 1 and 8, interleaved. Writes JSON.

    python benchmarks/bench_grammar.py [--model DIR] [--steps 32] [--repeats 5] [--out FILE]

Each run decodes exactly --steps tokens per row (no EOS; checked). Constrained rows follow a
JSON schema whose one string field has a minLength of 400 characters, so that no row's grammar
completes inside the run. The
constrained step includes what the mask brings with it: the matcher's bitmask per row, its
application to the logits, and the host read of every step's tokens (an unconstrained batch
chooses its tokens on the device and reads them every 8 steps).
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
from layerroute_rt import grammar  # noqa: E402
from layerroute_rt.cli import DEMO_DIR  # noqa: E402
from layerroute_rt.generate import encode_prompts, load_tokenizer  # noqa: E402
from layerroute_rt.scheduler import Request, Scheduler  # noqa: E402

SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 400}}, "required": ["story"]}


def run(engine, prompts, compiled, steps: int) -> float:
    """Decode ms per step of one batch: every row constrained by `compiled`, or none."""
    sched = Scheduler(engine, max_batch=len(prompts), prefill_chunk=sum(map(len, prompts)), sync_every=8)
    reqs = [Request(prompt=p, max_new_tokens=steps + 1,
                    logits_processor=None if compiled is None else grammar.GrammarProcessor(compiled))
            for p in prompts]
    for r in reqs:
        sched.submit(r)
    while sched.has_work():
        sched.step()
    failed = [r.error for r in reqs if r.error is not None or len(r.tokens) != steps + 1]
    if failed:
        raise SystemExit(f"bench_grammar: a run did not decode {steps} steps on every row: {failed[:1]}")
    st = sched.stats()
    sched.close()
    return 1e3 * st["decode_s"] / (st["steps"] or 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Qwen2 checkpoint directory (default: the bundled demo model)")
    p.add_argument("--adapter")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grammar_mask_cpu.json"))
    args = p.parse_args(argv)
    model_dir = args.model or DEMO_DIR
    adapter = args.adapter or (DEMO_DIR / "adapter" if args.model is None else None)
    engine = lr.InferenceModel(lr.load(model_dir, adapter=adapter), prefix_cache=False)
    tok = load_tokenizer(engine)
    eos = frozenset({tok.convert_tokens_to_ids("<|im_end|>")})
    compiled = grammar.compile_constraint(engine, tok, eos, grammar.constraint_spec(
        {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}))
    chats = [[{"role": "user", "content": f"Write a long story about a trip to city number {i}."}] for i in range(8)]
    prompts = [encode_prompts([c], engine)[0] for c in chats]
    results = []
    for batch in (1, 8):
        for kind in ("none", "grammar"):                                    # warm up
            run(engine, prompts[:batch], compiled if kind == "grammar" else None, 4)
        ms = {"none": [], "grammar": []}
        for _ in range(args.repeats):                                      # interleaved
            for kind in ("none", "grammar"):
                ms[kind].append(run(engine, prompts[:batch], compiled if kind == "grammar" else None, args.steps))
        none, masked = statistics.median(ms["none"]), statistics.median(ms["grammar"])
        results.append({"batch": batch, "ms_per_step_none": none, "ms_per_step_grammar": masked,
                        "overhead_pct": 100.0 * (masked / none - 1), "runs_ms": ms})
        print(f"batch {batch}: {none:.2f} ms/step unconstrained, {masked:.2f} with a grammar on every row "
              f"({100.0 * (masked / none - 1):+.1f}%)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "commit": commit, "date": time.strftime("%Y-%m-%d"),
              "command": "benchmarks/bench_grammar.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": str(model_dir), "steps": args.steps, "repeats": args.repeats, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
