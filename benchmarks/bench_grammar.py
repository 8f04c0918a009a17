"""What a grammar mask costs a decode step (layerroute_rt/runtime/grammar.py): the scheduler's time per
decode step with every row constrained against none, at batch 1 and 8, interleaved. Writes JSON.

    python benchmarks/bench_grammar.py [--model DIR] [--steps 32] [--repeats 5] [--out FILE]

Each run decodes exactly --steps tokens per row (no EOS; checked). Constrained rows follow a
JSON schema whose one string field has a minLength of 400 characters, so that no row's grammar
completes inside the run. The
constrained step includes what the mask brings with it: the matcher's bitmask per row, its
application to the logits, and the host read of every step's tokens (an unconstrained batch
chooses its tokens on the device and reads them every 8 steps). A third configuration,
unconstrained with a host read every step ("none_sync1"), separates the two: the mask's own
cost is grammar - none_sync1, the per-step read's is none_sync1 - none. The routers run at
--tau (default 0: every block runs), since a constrained row writes other tokens than a free
one, and at tau > 0 other tokens route differently: the step's compute would change with
the text, not with the mask.
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
from layerroute_rt.runtime import grammar  # noqa: E402
from layerroute_rt.cli import DEMO_DIR  # noqa: E402
from layerroute_rt.runtime.generate import encode_prompts, load_tokenizer  # noqa: E402
from layerroute_rt.runtime.scheduler import Request, Scheduler  # noqa: E402

SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 400}}, "required": ["story"]}


KINDS = ("none", "none_sync1", "grammar")


def run(engine, prompts, compiled, steps: int, sync_every: int = 8, tau: float = 0.0) -> float:
    """Decode ms per step of one batch: every row constrained by `compiled`, or none."""
    sched = Scheduler(engine, tau=tau, max_batch=len(prompts), prefill_chunk=sum(map(len, prompts)),
                      sync_every=sync_every)
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


def mask_ms(compiled, vocab: int, rows: int, steps: int) -> float:
    """The mask's own host time per step, alone (grammar.BatchMask: every row's matcher
    advanced and its bitmask filled, then applied to random logits [rows, vocab]), each row
    taking its masked argmax; the median over the steps after 4 warm-up steps."""
    procs = [grammar.GrammarProcessor(compiled) for _ in range(rows)]
    masks, tokens, idx = grammar.BatchMask(), [[] for _ in range(rows)], list(range(rows))
    logits, times = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)), []
    for _ in range(steps + 4):
        lg = logits.clone()
        t0 = time.perf_counter()
        bitmask, failed = masks.fill(procs, tokens, idx, rows)
        masks.apply(lg, bitmask, idx)
        times.append(time.perf_counter() - t0)
        assert not failed
        for t, nxt in zip(tokens, lg.argmax(-1).tolist()):
            t.append(nxt)
    return 1e3 * statistics.median(times[4:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Qwen2 checkpoint directory (default: the bundled demo model)")
    p.add_argument("--adapter")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tau", type=float, default=0.0, help="the routers' tau (0: every block runs)")
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
        def one(kind, steps):
            return run(engine, prompts[:batch], compiled if kind == "grammar" else None, steps,
                       sync_every=8 if kind == "none" else 1, tau=args.tau)

        for kind in KINDS:                                                  # warm up
            one(kind, 4)
        ms = {kind: [] for kind in KINDS}
        for _ in range(args.repeats):                                      # interleaved
            for kind in KINDS:
                ms[kind].append(one(kind, args.steps))
        none, sync1, masked = (statistics.median(ms[k]) for k in KINDS)
        alone = mask_ms(compiled, engine.config.vocab_size, batch, args.steps)
        results.append({"batch": batch, "ms_per_step_none": none, "ms_per_step_none_sync1": sync1,
                        "ms_per_step_grammar": masked, "overhead_pct": 100.0 * (masked / none - 1),
                        "mask_only_pct": 100.0 * (masked / sync1 - 1), "mask_alone_ms": alone,
                        "mask_alone_pct_of_step": 100.0 * alone / none, "runs_ms": ms})
        print(f"batch {batch}: {none:.2f} ms/step unconstrained, {sync1:.2f} reading every step, {masked:.2f} "
              f"with a grammar on every row ({100.0 * (masked / none - 1):+.1f}%; against the per-step read "
              f"{100.0 * (masked / sync1 - 1):+.1f}%); the mask's host work alone {alone:.3f} ms "
              f"({100.0 * alone / none:.2f}% of the unconstrained step)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "commit": commit, "date": time.strftime("%Y-%m-%d"),
              "command": "benchmarks/bench_grammar.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": str(model_dir), "tau": args.tau, "steps": args.steps, "repeats": args.repeats, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
