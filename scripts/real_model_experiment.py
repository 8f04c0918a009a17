"""The method on the real Qwen2.5-Coder-0.5B-Instruct, on the CPU, with a reduced recipe.

Stages (each writes under --work, default ~/.cache/layerroute_rt/runs/real; nothing large goes
into the repository):

  planning  the dense model's own plans for BFCL training questions (greedy, generated once and
            cached as JSONL: the natural-language planning steps)
  selfcalls the dense model's own greedy answers to BFCL training questions, tools in the system
            prompt exactly as `layerroute eval --bfcl` renders them (cached as JSONL): the
            tool-call targets of `train --targets self`, on the distribution generation sees
  train     routers + LoRA on BFCL tool-call steps (the training split) and those planning steps
  finalize  a run stopped before its last step: its latest checkpoint becomes its adapter
  stepeval  per step type on held-out steps: skip rate, FLOPs skipped, perplexity delta, with a
            length-matched split (layerroute_rt.eval.evaluate)
  valtau    BFCL accuracy and FLOPs skipped at several tau on training-split cases the adapter
            never saw: tau chosen without the held-out cases
  recount   a heldout JSON written before prefill charged the lm_head once: its prompt FLOPs again
  valueskip the skip rate on a call's JSON-value tokens against the rest, teacher-forced on the
            frozen base's answers to the held-out eval cases

The shipped planning_steps.jsonl and self_calls.jsonl (layerroute_rt/assets/qwen2.5-coder-0.5b/),
copied into --work, make `planning` and `selfcalls --self-call-factor 2` no-ops (each stage resumes
from its JSONL).

BFCL accuracy of the three settings comes from `layerroute eval --bfcl` (layerroute_rt.eval.bfcl).
The held-out BFCL cases are the first HELDOUT[category] of data.bfcl.split_ids(seed 0): training
never reads them, and `layerroute eval --bfcl CATEGORY:N` with N <= HELDOUT[category] evaluates a
subset of them.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import layerroute_rt as lr
from layerroute_rt.model import checkpoint, real_model
from layerroute_rt.data import bfcl
from layerroute_rt.data.examples import IGNORE_INDEX, Example, build_examples, collate, value_label_weight
from layerroute_rt.data.types import Step, Trajectory

TOOL_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "simple_java",
                   "simple_javascript")
HELDOUT = {"simple_python": 50, "multiple": 30, "parallel": 30, "parallel_multiple": 30,
           "simple_java": 20, "simple_javascript": 10, "irrelevance": 30}
PLAN_SYSTEM = ("You are a careful assistant that plans before it acts. Before any function call, "
               "write your plan in two or three plain English sentences: which of the functions "
               "fits the request, which arguments it needs, and where their values come from. "
               "Do not call a function and do not write code or JSON.")


def split(category: str, data_dir: Path) -> tuple[list, list]:
    return bfcl.split_ids(bfcl.load_category(data_dir, category), HELDOUT[category], seed=0)


def planning_system(case: bfcl.BfclCase) -> str:
    """The planning instruction and the functions by name and description (no JSON schemas: the
    tool-call template makes the model call at once instead of planning)."""
    listed = "\n".join(f"- {f['name']}: {f.get('description', '')}" for f in case.functions)
    return f"{PLAN_SYSTEM}\n\nThe functions available:\n{listed}"


def planning_prompt(case: bfcl.BfclCase) -> list[dict]:
    return [{"role": "system", "content": planning_system(case)},
            *[m for m in case.messages if m["role"] == "user"]]


def _clean_plan(text: str) -> str | None:
    """A plan kept as a planning step: plain sentences, cut after its last full stop; None for
    one with code, JSON or a tool call (the model did not follow the instruction)."""
    if any(s in text for s in ("```", "{", "<tool_call>")):
        return None
    end = text.rfind(".")
    text = text[:end + 1].strip() if end > 0 else ""
    return text if len(text.split()) >= 8 else None


def _load_jsonl(path: Path) -> dict:
    """The records of a JSONL cache by id ({} before the first write): a stage resumes from it."""
    if not path.exists():
        return {}
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def _save_jsonl(path: Path, records) -> None:
    """Write the records atomically (temp file, then rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def stage_planning(args) -> None:
    out = args.work / "planning_steps.jsonl"
    model_dir = real_model.fetch_model()
    data_dir = real_model.fetch_bfcl()
    model = lr.load(model_dir, dtype=torch.float32)
    engine = lr.InferenceModel(model)
    from layerroute_rt.runtime.generate import load_tokenizer
    tok = load_tokenizer(engine)
    rng = random.Random(0)
    cases = []
    for category in ("simple_python", "multiple", "parallel", "parallel_multiple"):
        train_cases, _ = split(category, data_dir)
        cases += rng.sample(train_cases, args.plans_per_category)
    done = _load_jsonl(out)
    todo = [c for c in cases if c.id not in done]
    t0 = time.time()
    for i in range(0, len(todo), args.batch):
        batch = todo[i:i + args.batch]
        ids = [tok.encode(tok.apply_chat_template(planning_prompt(c), tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)
               for c in batch]
        res = lr.generate(engine, ids, max_new_tokens=args.plan_tokens, tau=0.0)
        for c, text in zip(batch, res.text):
            done[c.id] = {"id": c.id, "category": c.category, "raw": text, "plan": _clean_plan(text)}
        _save_jsonl(out, done.values())
        print(f"planning: {len(done)}/{len(cases)} ({time.time() - t0:.0f} s)", flush=True)
    kept = sum(r["plan"] is not None for r in done.values())
    print(f"planning: {kept} of {len(done)} plans kept -> {out}")


SELF_CALLS = {"simple_python": 24, "multiple": 16, "parallel": 12, "parallel_multiple": 8,
              "simple_java": 12, "simple_javascript": 8, "irrelevance": 8}


def stage_selfcalls(args) -> None:
    from layerroute_rt.eval.bfcl import MAX_NEW_TOKENS, render_prompt
    from layerroute_rt.runtime.generate import load_tokenizer
    out = args.work / "self_calls.jsonl"
    model = lr.load(real_model.fetch_model(), dtype=torch.float32)
    engine = lr.InferenceModel(model)
    tok = load_tokenizer(engine)
    data_dir = real_model.fetch_bfcl()
    rng = random.Random(1)
    done = _load_jsonl(out)
    t0 = time.time()
    for category, n in SELF_CALLS.items():
        train_cases, _ = split(category, data_dir)
        n = min(len(train_cases), round(n * args.self_call_factor))
        todo = [c for c in rng.sample(train_cases, n) if c.id not in done]
        todo.sort(key=lambda c: -len(render_prompt(tok, c)))
        for i in range(0, len(todo), args.batch):
            batch = todo[i:i + args.batch]
            prompts = [render_prompt(tok, c) for c in batch]
            res = lr.generate(engine, prompts, max_new_tokens=MAX_NEW_TOKENS[category], tau=0.0)
            for c, ids, toks, text, why in zip(batch, prompts, res.tokens, res.text, res.finish_reasons):
                done[c.id] = {"id": c.id, "category": category, "prompt_ids": ids,
                              "tokens": list(toks), "text": text, "finish_reason": why}
            _save_jsonl(out, done.values())
            print(f"selfcalls: {len(done)} ({time.time() - t0:.0f} s)", flush=True)
    print(f"selfcalls: {sum(r['finish_reason'] == 'stop' for r in done.values())} of {len(done)} "
          f"ended at EOS -> {out}")


def self_call_examples(work: Path, tok, max_length: int, value_weight: float = 0.0) -> list[Example]:
    """The dense model's own answers as tool-call steps: the rendered prompt, then the generated
    tokens up to and including EOS (answers cut by the token budget are left out). With
    value_weight > 0 the KL of the tokens of the call's JSON values weighs 1 + value_weight."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for line in (work / "self_calls.jsonl").read_text().splitlines():
        r = json.loads(line)
        step = list(r["tokens"])
        if r["finish_reason"] != "stop":
            continue
        if not step or step[-1] != eos:
            step.append(eos)
        if len(step) >= max_length:
            continue
        context = r["prompt_ids"][len(step) - max_length:]
        weight = None if value_weight == 0 else \
            (1.0,) * len(context) + value_label_weight(tok, step, value_weight)
        out.append(Example(context + step, [IGNORE_INDEX] * len(context) + step,
                           [False] * len(context) + [True] * len(step), "tool_call", len(step),
                           r["id"], 1, weight))
    return out


def planning_trajectories(work: Path, data_dir: Path) -> list[Trajectory]:
    plans = [json.loads(l) for l in (work / "planning_steps.jsonl").read_text().splitlines()]
    by_id = {c.id: c for cat in ("simple_python", "multiple", "parallel", "parallel_multiple")
             for c in bfcl.load_category(data_dir, cat)}
    out = []
    for p in plans:
        if p["plan"] is None:
            continue
        case = by_id[p["id"]]
        steps = [Step("system" if m["role"] == "system" else "user", m["content"])
                 for m in planning_prompt(case)] + [Step("planning", p["plan"])]
        out.append(Trajectory(tuple(steps), source="bfcl-plan", id="plan:" + case.id))
    return out


def datasets(args, tok):
    """(train examples, held-out examples): tool calls of the BFCL training split plus planning
    steps (90% train / 10% held out, by id), and the held-out BFCL tool calls."""
    data_dir = real_model.fetch_bfcl()
    train_t, held_t = [], []
    for category in TOOL_CATEGORIES:
        tr, ho = split(category, data_dir)
        train_t += [bfcl.to_trajectory(c) for c in tr]
        held_t += [bfcl.to_trajectory(c) for c in ho]
    plans = planning_trajectories(args.work, data_dir)
    plan_held = [t for t in plans if hash_frac(t.id) < args.plan_heldout]
    plan_train = [t for t in plans if hash_frac(t.id) >= args.plan_heldout]
    train = build_examples(train_t + plan_train, tok, max_length=args.max_length)
    held = build_examples(held_t + plan_held, tok, max_length=args.max_length)
    return train, held


def hash_frac(s: str) -> float:
    import hashlib
    return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) / 2 ** 32


def stage_train(args) -> None:
    from layerroute_rt.train.trainer import TrainConfig, train
    model_dir = real_model.fetch_model()
    cfg = lr.LayerRouteConfig(rank=8, alpha=16, granularity="token", kv_policy="compute",
                              gate_lambda=args.gate_lambda, target_rate=args.target_rate, tau=0.5,
                              agree_lambda=args.agree_lambda)
    model = lr.load(model_dir, config=cfg, dtype=torch.float32)
    if args.init_adapter is not None:      # warm start: routers and LoRA from an earlier run
        model.load_adapter(args.init_adapter)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    train_ex, held_ex = datasets(args, tok)
    if args.targets == "self":        # the dense model's own answers replace the reference calls
        train_ex = [e for e in train_ex if e.step_type == "planning"] + \
            self_call_examples(args.work, tok, args.max_length, args.value_weight)
    elif args.value_weight:
        raise SystemExit("train: --value-weight needs --targets self (the weights are set on the self-calls)")
    # Within the budget (--max-examples): every planning step, and a random subset of the calls.
    rng = random.Random(args.seed)
    plans = [e for e in train_ex if e.step_type == "planning"]
    calls = [e for e in train_ex if e.step_type == "tool_call"]
    rng.shuffle(calls)
    train_ex = plans + calls[:max(0, args.max_examples - len(plans))]
    kinds = {k: sum(e.step_type == k for e in train_ex) for k in ("tool_call", "planning")}
    print(f"train: {len(train_ex)} examples {kinds}, {len(held_ex)} held out", flush=True)
    tc = TrainConfig(steps=args.steps, batch_size=1, grad_accum=args.grad_accum, lr=args.lr,
                     warmup_steps=max(1, args.steps // 10), checkpoint_every=10, seed=args.seed,
                     distill_weight=args.distill, distill_teacher=args.teacher, gate_on=args.gate_on,
                     never_skip=tuple(args.never_skip), router_lr=args.router_lr,
                     snapshot_every=args.snapshot_every)
    run = args.work / args.run
    t0 = time.time()
    row = train(model, train_ex, lambda b: collate(b, pad_id=tok.pad_token_id or 0), run, tc,
                resume=(run / "checkpoint").exists(), progress=True)
    trained = sorted({e.traj_id for e in train_ex} | {e.traj_id.removeprefix("plan:") for e in train_ex})
    checkpoint.atomic_write_json(run / "data_config.json", {   # read by `layerroute eval --bfcl`
        "source": "BFCL v4 non-live training splits + the dense model's planning steps",
        "heldout": HELDOUT, "trained_trajectories": trained})
    checkpoint.atomic_write_json(run / "recipe.json", {
        "train_config": asdict(tc), "layerroute_config": cfg.to_dict(), "examples": kinds,
        "max_length": args.max_length, "value_weight": args.value_weight,
        "init_adapter": None if args.init_adapter is None else str(args.init_adapter),
        "command": " ".join(sys.argv), "cpu_seconds_this_invocation": time.time() - t0,
        "torch_threads": torch.get_num_threads(), "final": row})
    print(json.dumps(row), f"{time.time() - t0:.0f} s")


def stage_finalize(args) -> None:
    """A run stopped before its last step (the CPU budget): its latest checkpoint becomes the
    run's adapter, with the data record `layerroute eval --bfcl` checks."""
    import shutil
    from transformers import AutoTokenizer
    run = args.work / args.run
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)
    with checkpoint.atomic_dir(run / "adapter") as tmp:
        for f in (run / "checkpoint" / "adapter").iterdir():
            shutil.copy2(f, tmp / f.name)
    tok = AutoTokenizer.from_pretrained(real_model.fetch_model())
    train_ex, _ = datasets(args, tok)
    checkpoint.atomic_write_json(run / "data_config.json", {
        "source": "BFCL v4 non-live training splits + the dense model's planning steps",
        "heldout": HELDOUT, "stopped_at_step": state["step"],
        "trained_trajectories": sorted({e.traj_id for e in train_ex}
                                       | {e.traj_id.removeprefix("plan:") for e in train_ex})})
    print(f"finalize: {run / 'adapter'} from step {state['step']}")


EVAL_MIX = {"simple_python": 14, "multiple": 6, "parallel": 4, "simple_java": 4,
            "simple_javascript": 2, "irrelevance": 2}     # the held-out eval of docs/experiments.md


def stage_valtau(args) -> None:
    """Choose tau without the held-out cases: BFCL accuracy and FLOPs skipped of the run's adapter
    at tau 0 and at each --taus value on validation cases, the same mix as the held-out eval but
    drawn from the training splits among the cases the adapter never trained on (neither a
    self-generated call nor a planning step: the first of each split's order)."""
    from layerroute_rt.eval.bfcl import evaluate_bfcl, markdown_table
    data_dir = real_model.fetch_bfcl()
    used = set(_load_jsonl(args.work / "self_calls.jsonl")) | set(_load_jsonl(args.work / "planning_steps.jsonl"))
    cases = []
    for category, n in EVAL_MIX.items():
        train_cases, _ = split(category, data_dir)
        cases += [c for c in train_cases if c.id not in used][:n]
    model = lr.load(real_model.fetch_model(), adapter=args.work / args.run / "adapter", dtype=torch.float32)
    report = {"cases": [c.id for c in cases], "by_tau": {}}
    for tau in [0.0] + list(args.taus):
        result = evaluate_bfcl(model, cases, settings=("lora" if tau == 0 else "routed",), tau=tau or None,
                               progress=lambda line: print(line, flush=True))
        report["by_tau"][str(tau)] = result
        print(markdown_table(result), flush=True)
        checkpoint.atomic_write_json(args.work / args.run / "valtau.json", report)
    for tau, r in report["by_tau"].items():
        summary = next(iter(r["settings"].values()))["all"]
        print(f"tau {tau}: {summary['correct']}/{summary['n']}, "
              f"{summary['generated_total_flops_skipped_pct'] or 0:.2f}% total FLOPs skipped")


# The paired held-out eval (issue 23): 600 cases stratified as the 200-case set (x3). Per
# category: the HELDOUT cases, then the training split's cases that no run trained on (neither
# a self-generated call, a planning step nor an adapter's recorded trajectory), after the first
# VALIDATION of those, which are kept for choosing tau and checkpoints (they start with valtau's
# EVAL_MIX cases).
HELDOUT600 = {"simple_python": 150, "multiple": 90, "parallel": 90, "parallel_multiple": 90,
              "simple_java": 60, "simple_javascript": 30, "irrelevance": 90}
VALIDATION = {"simple_python": 40, "multiple": 20, "parallel": 20, "parallel_multiple": 20,
              "simple_java": 10, "simple_javascript": 4, "irrelevance": 20}
SHIPPED = Path(lr.__file__).parent / "assets" / "qwen2.5-coder-0.5b"


def untrained_ids(work: Path) -> set[str]:
    """Every BFCL id some run trained on or generated from: the shipped and the work dir's
    self-call and planning caches, and the shipped adapter's training record."""
    used = set()
    for root in (SHIPPED, work):
        used |= set(_load_jsonl(root / "self_calls.jsonl")) | set(_load_jsonl(root / "planning_steps.jsonl"))
    record = SHIPPED / "data_config.json"
    used |= set(json.loads(record.read_text(encoding="utf-8"))["trained_trajectories"])
    return used


def eval_splits(work: Path, data_dir: Path) -> tuple[dict, dict]:
    """(validation, held-out) cases per category (see HELDOUT600)."""
    used = untrained_ids(work)
    validation, heldout = {}, {}
    for category, n in HELDOUT600.items():
        train_cases, held = split(category, data_dir)
        unused = [c for c in train_cases if c.id not in used]
        validation[category] = unused[:VALIDATION[category]]
        heldout[category] = (held + unused[VALIDATION[category]:])[:n]
        if len(heldout[category]) < n:
            raise ValueError(f"heldout600: {category} has {len(heldout[category])} untrained cases, {n} wanted")
    return validation, heldout


def _flops_parts(recs: list[dict]) -> dict:
    """The records' FLOPs summed: FlopsReports of the prompt, the generated tokens and the whole
    request (their sum)."""
    from layerroute_rt.model.flops import FlopsReport
    keys = ("block", "block_run", "total", "total_run")
    sums = {part: [sum(r["flops"][part][k] for r in recs) for k in keys] for part in ("prompt", "generated")}
    return {"prompt": FlopsReport(*sums["prompt"]), "generated": FlopsReport(*sums["generated"]),
            "request": FlopsReport(*(a + b for a, b in zip(sums["prompt"], sums["generated"])))}


def paired_summary(report: dict, extra: dict | None = None) -> dict:
    """Per category, over all, over the six tool-call categories and over the categories every
    setting has completed ("completed", with its "categories"), and over each extra group
    {name: categories} of `extra`: accuracy of each setting, the FLOPs skipped (generated,
    prompt, whole request), and the paired comparisons routed - base, lora - base and
    routed - lora (layerroute_rt.eval.paired)."""
    from layerroute_rt.eval.paired import compare
    runs = report["runs"]
    groups = {c: [c] for c in HELDOUT600}
    groups["tool_calls"] = list(TOOL_CATEGORIES)
    groups["all"] = list(HELDOUT600)
    # while it runs: the categories every setting has finished
    groups["completed"] = [c for c in HELDOUT600 if all(c in runs.get(s, {}) for s in ("base", "routed", "lora"))]
    groups.update(extra or {})
    out = {}
    for name, cats in groups.items():
        row = {}
        records = {}
        if not cats:
            out[name] = row
            continue
        for setting, by_cat in runs.items():
            if not all(c in by_cat for c in cats):
                continue
            recs = [r for c in cats for r in by_cat[c]["cases"]]
            records[setting] = {r["id"]: r for r in recs}
            parts = _flops_parts(recs)
            gen, prompt, request = parts["generated"], parts["prompt"], parts["request"]
            row[setting] = {"n": len(recs), "correct": sum(r["correct"] for r in recs),
                            "accuracy": sum(r["correct"] for r in recs) / len(recs),
                            "generated_total_flops_skipped_pct": gen.total_skipped_pct,
                            "prompt_total_flops_skipped_pct": prompt.total_skipped_pct,
                            "request_total_flops_skipped_pct": request.total_skipped_pct,
                            "request_block_flops_skipped_pct": request.block_skipped_pct}
        for a, b in (("routed", "base"), ("lora", "base"), ("routed", "lora"), ("base_required", "base"),
                     ("routed_required", "routed"), ("routed_required", "base_required")):
            if a in records and b in records:
                ids = sorted(records[a])
                row[f"{a}-{b}"] = compare([records[a][i]["correct"] for i in ids],
                                          [records[b][i]["correct"] for i in ids])
        out[name] = row
    out["completed"]["categories"] = groups["completed"]
    return out


def stage_heldout(args) -> None:
    """The paired BFCL eval on the 600 held-out cases (HELDOUT600): category by category, each
    --settings setting in turn, written after each (category, setting) to --out, which a rerun
    resumes; then the paired summary (paired_summary) in the same file."""
    from layerroute_rt.eval.bfcl import evaluate_bfcl
    data_dir = real_model.fetch_bfcl()
    _, heldout = eval_splits(args.work, data_dir)
    adapter = args.adapter or args.work / args.run / "adapter"
    out = args.out or args.work / args.run / "bfcl_heldout600.json"
    ids = {c: [x.id for x in v] for c, v in heldout.items()}
    report = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    same = (ids, str(adapter), args.tau, args.batch_q, args.batch)
    if (report.get("cases"), report.get("adapter"), report.get("tau"), report.get("batch_q", 1.0),
            report.get("batch_size", 8)) != same:
        report = {"adapter": str(adapter), "tau": args.tau, "batch_q": args.batch_q, "batch_size": args.batch,
                  "cases": ids, "runs": {},
                  "date": time.strftime("%Y-%m-%d"),
                  "command": "python scripts/real_model_experiment.py " + " ".join(sys.argv[1:])}
    if args.reuse is not None:                       # tau 0 settings: the batch policy and tau do not touch them
        try:
            other = json.loads(args.reuse.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"heldout --reuse {args.reuse}: cannot read it: {e}")
        if (other.get("cases"), other.get("batch_size", 8)) != (ids, args.batch):
            raise SystemExit(f"heldout --reuse {args.reuse}: not the same cases and batch size")
        # the frozen base does not read the adapter; the LoRA at tau 0 is reused from the same adapter only
        reused = ("base", "lora") if other.get("adapter") == str(adapter) else ("base",)
        for setting in reused:
            for category, run in other["runs"].get(setting, {}).items():
                if category in (args.categories or heldout):       # only the categories this run pairs
                    report["runs"].setdefault(setting, {}).setdefault(category, run)
        report["reused"] = {"from": str(args.reuse), "settings": list(reused)}
    model = lr.load(real_model.fetch_model(), adapter=adapter, dtype=torch.float32)
    report["layerroute_config"] = model.lr_config.to_dict()
    order = args.categories or list(heldout)
    for category in order:                           # category by category: paired as it goes
        cases = heldout[category]
        for setting in args.settings:
            if category in report["runs"].get(setting, {}):
                continue
            base_setting, _, choice = setting.partition("_")        # "routed_required": tool_choice required
            if choice and category not in TOOL_CATEGORIES:
                continue                                             # a forced call cannot be right there
            result = evaluate_bfcl(model, cases, settings=(base_setting,), tau=args.tau, batch_q=args.batch_q,
                                   batch_size=args.batch, progress=lambda line: print(line, flush=True),
                                   tool_choice=choice or None)
            report["runs"].setdefault(setting, {})[category] = result["settings"][base_setting]
            report["summary"] = paired_summary(report)
            checkpoint.atomic_write_json(out, report)
    report["summary"] = paired_summary(report)
    checkpoint.atomic_write_json(out, report)
    print(json.dumps(report["summary"]["all"], indent=1))


def recount_prompt_head(report: dict, head_flops: float) -> dict:
    """A heldout report whose prompt FLOPs charged the lm_head on every prompt token (before
    flops_report's `head`), recounted in place: each record's prompt total becomes its block
    FLOPs plus one lm_head row (head_flops = 2 x hidden x vocab: prefill computes the prompt's last
    logits only), then the per-setting figures and the paired summary are computed again from
    the records. Block FLOPs are untouched, so a second recount changes nothing."""
    from layerroute_rt.model.flops import FlopsReport
    keys = ("block", "block_run", "total", "total_run")
    for by_cat in report["runs"].values():
        for run in by_cat.values():
            for r in run["cases"]:
                f = r["flops"]["prompt"]
                f["total"], f["total_run"] = f["block"] + head_flops, f["block_run"] + head_flops
                r["prompt_total_flops_skipped_pct"] = FlopsReport(*(f[k] for k in keys)).total_skipped_pct
            groups = [(run["all"], run["cases"])] + [(fig, [r for r in run["cases"] if r["category"] == c])
                                                      for c, fig in run["categories"].items()]
            for fig, recs in groups:
                parts = _flops_parts(recs)
                fig["prompt_total_flops_skipped_pct"] = parts["prompt"].total_skipped_pct
                fig["request_total_flops_skipped_pct"] = parts["request"].total_skipped_pct
    report["summary"] = paired_summary(report)
    return report


def stage_recount(args) -> None:
    """recount_prompt_head on the heldout JSON --out, with the real model's lm_head, rewritten
    atomically."""
    if args.out is None or not args.out.is_file():
        raise SystemExit(f"recount: --out must name an existing heldout JSON, got {args.out}")
    cfg = json.loads((real_model.fetch_model() / "config.json").read_text(encoding="utf-8"))
    report = recount_prompt_head(json.loads(args.out.read_text(encoding="utf-8")),
                                 2.0 * cfg["hidden_size"] * cfg["vocab_size"])
    report["recount"] = ("python scripts/real_model_experiment.py recount --out FILE: prompt FLOPs with the lm_head "
                         "on each prompt's last token only (prefill computes no other logits)")
    checkpoint.atomic_write_json(args.out, report)
    print(json.dumps(report["summary"].get("all") or report["summary"], indent=1)[:2000])


def stage_valueskip(args) -> None:
    """Where the routers skip: the skip rate at the positions that predict a JSON-value token of
    a call (its argument values, toolcalls.json_value_spans) against the rest, teacher-forced on the frozen base's own
    answers to the held-out eval cases (--answers: a `layerroute eval --bfcl` JSON with a base
    setting), the adapter at its tau. Block-token pairs over all blocks, pinned ones included."""
    from transformers import AutoTokenizer
    from layerroute_rt.eval.bfcl import render_prompt
    model_dir, data_dir = real_model.fetch_model(), real_model.fetch_bfcl()
    tok = AutoTokenizer.from_pretrained(model_dir)
    answers = {c["id"]: c["text"] for c in json.loads(args.answers.read_text())["settings"]["base"]["cases"]}
    by_id = {c.id: c for cat in {i.rsplit("_", 1)[0] for i in answers} for c in bfcl.load_category(data_dir, cat)}
    model = lr.load(model_dir, adapter=args.work / args.run / "adapter", dtype=torch.float32)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    skipped = {"value": 0, "other": 0}
    pairs = {"value": 0, "other": 0}
    for i, (case_id, text) in enumerate(answers.items()):
        prompt = render_prompt(tok, by_id[case_id])
        step = tok.encode(text, add_special_tokens=False) + [eos]
        value = torch.tensor(value_label_weight(tok, step, 1.0)) > 1
        ids = torch.tensor([prompt + step])
        with torch.no_grad():
            out = model.train_forward(ids, labels=ids, full_logits=False,
                                      loss_mask=torch.arange(ids.shape[1])[None] >= len(prompt))
        # Step token j is predicted at input position len(prompt) - 1 + j: the routing there is
        # what decides it (and what the value weight of `train --value-weight` acts on).
        ran = out.executed[:, 0, len(prompt) - 1:-1]                      # [L, len(step)]
        for kind, mask in (("value", value), ("other", ~value)):
            skipped[kind] += int((~ran[:, mask]).sum())
            pairs[kind] += int(mask.sum()) * ran.shape[0]
        print(f"valueskip {i + 1}/{len(answers)} {case_id}", flush=True)
    report = {"run": args.run, "answers": str(args.answers), "tau": model.lr_config.tau,
              **{f"{k}_skip_rate": skipped[k] / max(pairs[k], 1) for k in skipped},
              "value_tokens": pairs["value"] // len(model.blocks),
              "other_tokens": pairs["other"] // len(model.blocks)}
    checkpoint.atomic_write_json(args.work / args.run / "valueskip.json", report)
    print(json.dumps(report))


def stage_stepeval(args) -> None:
    from layerroute_rt.eval import evaluate
    from layerroute_rt.data.splits import length_matched_split
    model_dir = real_model.fetch_model()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    _, held = datasets(args, tok)
    tools = [e for e in held if e.step_type == "tool_call"]
    plans = [e for e in held if e.step_type == "planning"]
    held = tools[:args.step_eval_tools] + plans
    model = lr.load(model_dir, adapter=args.work / args.run / "adapter", dtype=torch.float32)
    splits = {"heldout": held, "length_matched": length_matched_split(held)}
    report = {name: evaluate.evaluate(model, ex, lambda b: collate(b, pad_id=tok.pad_token_id or 0),
                                      batch_size=4) for name, ex in splits.items()}
    checkpoint.atomic_write_json(args.work / args.run / "stepeval.json", report)
    print(json.dumps(report, indent=1)[:4000])


SCREEN_RULE = """Checkpoint screening and the choice before the held-out run (fixed before it runs):
1. screen: every snapshot of the run (and the shipped adapter, the reference), at tau 0.5,
   teacher-forced on the frozen base's own greedy answers to the VALIDATION pool's tool-call
   cases: % of total FLOPs skipped over whole requests (prompt + answer) and top-1 agreement
   of the routed model's next-token choice with the base's answer tokens;
2. the candidate is the snapshot with the most whole-request FLOPs skipped among those whose
   agreement is at least the reference's minus 1 point;
3. it is accepted if on the VALIDATION pool's BFCL cases (routed against the frozen base,
   paired) routed - base is at least -2 points; else the next snapshot by (2) is tried;
4. the accepted one alone runs the held-out 600, once."""


def validation_base_answers(args, validation) -> dict:
    """The frozen base's greedy answers to the validation pool's tool-call cases (computed once,
    cached in <work>/validation_base.json): evaluate_bfcl's base records, by case id."""
    from layerroute_rt.eval.bfcl import evaluate_bfcl
    path = args.work / "validation_base.json"
    if path.is_file():
        return json.loads(path.read_text())
    model = lr.load(real_model.fetch_model(), dtype=torch.float32)
    cases = [c for cat in TOOL_CATEGORIES for c in validation[cat]]
    result = evaluate_bfcl(model, cases, settings=("base",), batch_size=args.batch,
                           progress=lambda line: print(line, flush=True))["settings"]["base"]
    records = {r["id"]: r for r in result["cases"]}
    checkpoint.atomic_write_json(path, records)
    return records


BATCH_QS = (1.0, 0.75, 0.5)


def batch_skip(executed: list[torch.Tensor], batch: int, qs=BATCH_QS) -> dict:
    """How often the rows of a batch agree to skip, teacher-forced: `executed` holds each case's
    [L, A] block decisions (True: ran) at the tokens decode processes. Cases are grouped in order
    into batches of `batch` (a last short group is dropped); at each position j below the group's
    shortest answer, a (position, block) pair counts as skipped for the batch at q when at least
    q x batch of its rows skip the block, as generate's batch_q does. Returns the fraction of
    pairs so skipped for each q ("q=1", ...) and "row": the rows' own skip rate over the same
    pairs (what a batch of one skips)."""
    groups = [executed[g:g + batch] for g in range(0, len(executed) - batch + 1, batch)]
    if not groups:
        raise ValueError(f"batch_skip: needs at least batch={batch} cases, got {len(executed)}")
    pairs, rows, hits = 0, 0.0, {q: 0 for q in qs}
    for group in groups:
        n = min(e.shape[1] for e in group)
        skipped = torch.stack([~e[:, :n] for e in group]).sum(0)       # [L, n]: rows that skip
        pairs += skipped.numel()
        rows += float(skipped.sum()) / batch
        for q in qs:
            hits[q] += int((skipped >= q * batch).sum())
    return {"row": rows / pairs, **{f"q={q:g}": hits[q] / pairs for q in qs}, "pairs": pairs}


def stage_screen(args) -> None:
    """Screening (SCREEN_RULE, steps 1-2): each adapter of --screen (default: the run's
    snapshots, and the shipped adapter as the reference) teacher-forced on the base's greedy
    answers to the validation pool; writes <run>/screen.json."""
    from transformers import AutoTokenizer
    from layerroute_rt.eval.bfcl import render_prompt
    from layerroute_rt.model.flops import FlopsReport, flops_report
    data_dir, model_dir = real_model.fetch_bfcl(), real_model.fetch_model()
    validation, _ = eval_splits(args.work, data_dir)
    answers = validation_base_answers(args, validation)
    tok = AutoTokenizer.from_pretrained(model_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    cases = [c for cat in TOOL_CATEGORIES for c in validation[cat]]
    seqs = []
    for c in cases:
        answer = tok.encode(answers[c.id]["text"], add_special_tokens=False) + [eos]
        seqs.append((render_prompt(tok, c), answer))
    batch_order = random.Random(0).sample(range(len(seqs)), len(seqs))
    adapters = args.screen or [SHIPPED / "adapter", *sorted((args.work / args.run / "snapshots").iterdir())]
    tau = 0.5 if args.tau is None else args.tau
    out_path = args.out or args.work / args.run / "screen.json"
    done = {(r["adapter"], r["tau"]): r for r in
            (json.loads(out_path.read_text())["rows"] if out_path.is_file() else [])}   # resumed
    rows = []
    for adapter in adapters:
        if (str(adapter), tau) in done:
            rows.append(done[(str(adapter), tau)])
            continue
        model = lr.load(model_dir, adapter=adapter, dtype=torch.float32)
        sums = {part: [0.0] * 4 for part in ("prompt", "answer", "request")}
        agree = total = 0
        decode_executed = []
        with torch.no_grad():
            for prompt, answer in seqs:
                ids = torch.tensor([prompt + answer])
                out = model.train_forward(ids, tau=tau, full_logits=True)
                executed = out.executed                                  # [L, 1, T]
                T, P = ids.shape[1], len(prompt)
                decode_executed.append(executed[:, 0, P:T - 1])   # decode's inputs: the answer but its last
                pred = out.logits[0, P - 1:T - 1].argmax(-1)
                agree += int((pred == ids[0, P:]).sum())
                total += len(answer)
                positions = torch.arange(1, T + 1)[None]
                head = positions >= P                    # logits: the prompt's last token, then each answer token
                for part, sl in (("prompt", slice(0, P)), ("answer", slice(P, T)), ("request", slice(0, T))):
                    r = flops_report(model.config, model.lr_config, executed[:, :, sl], positions[:, sl],
                                     head=head[:, sl])
                    for i, v in enumerate((r.block_flops, r.block_flops_run, r.total_flops, r.total_flops_run)):
                        sums[part][i] += v
        row = {"adapter": str(adapter), "tau": tau, "agreement": agree / total, "answer_tokens": total,
               **{f"{part}_total_flops_skipped_pct": FlopsReport(*v).total_skipped_pct for part, v in sums.items()},
               "request_block_flops_skipped_pct": FlopsReport(*sums["request"]).block_skipped_pct,
               # the cases in a fixed random order, so that a batch mixes categories as a server's does
               f"batch{args.batch}_skip": batch_skip([decode_executed[i] for i in batch_order], args.batch)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        kept = {**done, **{(r["adapter"], r["tau"]): r for r in rows}}
        checkpoint.atomic_write_json(out_path, {"rows": list(kept.values()), "partial": True})
    reference = rows[0]
    eligible = [r for r in rows[1:] if r["agreement"] >= reference["agreement"] - 0.01]
    candidates = sorted(eligible, key=lambda r: -r["request_total_flops_skipped_pct"])
    report = {"rule": SCREEN_RULE, "cases": len(cases), "rows": rows, "reference": reference["adapter"],
              "candidates_in_order": [r["adapter"] for r in candidates],
              "date": time.strftime("%Y-%m-%d"),
                  "command": "python scripts/real_model_experiment.py " + " ".join(sys.argv[1:])}
    checkpoint.atomic_write_json(out_path, report)
    print(json.dumps({"candidates_in_order": report["candidates_in_order"]}, indent=1))


def stage_reqtime(args) -> None:
    """Whole-request time and FLOPs at batch 1: --reqtime-cases validation-pool cases per
    tool-call category (kept aside from the held-out eval), each generated for exactly
    --reqtime-tokens tokens (no EOS, so both settings decode the same number of steps) with the
    adapter at its tau ("routed") and at tau 0 (the same weights, every block run), interleaved
    per case and repeated --reqtime-repeats times; per case the median prefill ms, decode ms per
    step and whole-request ms of each setting, and the FLOPs skipped on the prompt, the
    generated tokens and the whole request."""
    from layerroute_rt.eval.bfcl import prompt_flops, render_prompt
    from layerroute_rt.runtime.generate import load_tokenizer
    data_dir = real_model.fetch_bfcl()
    validation, _ = eval_splits(args.work, data_dir)
    adapter = args.adapter or args.work / args.run / "adapter"
    model = lr.load(real_model.fetch_model(), adapter=adapter, dtype=torch.float32)
    engine = lr.InferenceModel(model, prefix_cache=False)
    tok = load_tokenizer(engine)
    tau = model.lr_config.tau if args.tau is None else args.tau
    cases = [c for cat in TOOL_CATEGORIES for c in validation[cat][:args.reqtime_cases]]
    n = args.reqtime_tokens
    lr.generate(engine, [render_prompt(tok, cases[0])], max_new_tokens=4, eos_token_id=None)   # warm
    rows = []
    for case in cases:
        prompt = render_prompt(tok, case)
        runs = {"routed": [], "dense": []}
        for _ in range(args.reqtime_repeats):
            for setting, t in (("routed", tau), ("dense", 0.0)):
                out = lr.generate(engine, [prompt], max_new_tokens=n, eos_token_id=None, tau=t)
                st = out.stats
                runs[setting].append(dict(prefill_ms=st["prefill_ms"], decode_ms_per_step=st["decode_ms_per_step"],
                                          request_ms=st["prefill_ms"] + st["decode_ms_per_step"] * st["decode_steps"],
                                          out=out))
        med = {s: {k: statistics.median(r[k] for r in v) for k in ("prefill_ms", "decode_ms_per_step", "request_ms")}
               for s, v in runs.items()}
        out = runs["routed"][0]["out"]
        T = len(prompt)
        pf = prompt_flops(engine, out.executed, out.valid, T)
        gen = out.stats["generated_total_flops_skipped_pct"]
        rows.append({"id": case.id, "prompt_tokens": T, "new_tokens": n, **{f"{s}_{k}": v for s, m in med.items()
                                                                             for k, v in m.items()},
                     "prompt_total_flops_skipped_pct": pf.total_skipped_pct,
                     "generated_total_flops_skipped_pct": gen,
                     "request_total_flops_skipped_pct": out.stats["total_flops_skipped_pct"]})
        print(json.dumps({k: v for k, v in rows[-1].items()}), flush=True)

    def saved(key):
        r = sum(x[f"routed_{key}"] for x in rows)
        d = sum(x[f"dense_{key}"] for x in rows)
        return 100.0 * (1 - r / d)
    report = {"adapter": str(adapter), "tau": tau, "cases": rows,
              "date": time.strftime("%Y-%m-%d"),
                  "command": "python scripts/real_model_experiment.py " + " ".join(sys.argv[1:]),
              "device": f"cpu, {torch.get_num_threads()} threads, float32, batch 1",
              "summary": {"prefill_time_saved_pct": saved("prefill_ms"),
                          "decode_time_saved_pct": saved("decode_ms_per_step"),
                          "request_time_saved_pct": saved("request_ms"),
                          "prompt_total_flops_skipped_pct": statistics.mean(x["prompt_total_flops_skipped_pct"] for x in rows),
                          "generated_total_flops_skipped_pct": statistics.mean(x["generated_total_flops_skipped_pct"] for x in rows),
                          "request_total_flops_skipped_pct": statistics.mean(x["request_total_flops_skipped_pct"] for x in rows)}}
    out_path = args.out or args.work / args.run / "request_time.json"
    checkpoint.atomic_write_json(out_path, report)
    print(json.dumps(report["summary"], indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("planning", "selfcalls", "train", "finalize", "stepeval", "valtau", "recount",
                                      "valueskip", "heldout", "reqtime", "screen"))
    p.add_argument("--work", type=Path, default=real_model.cache_dir() / "runs" / "real")
    p.add_argument("--run", default="a")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plans-per-category", type=int, default=40)
    p.add_argument("--plan-tokens", type=int, default=96)
    p.add_argument("--plan-heldout", type=float, default=0.2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=768)
    p.add_argument("--max-examples", type=int, default=100000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--router-lr", type=float, default=1e-3)
    p.add_argument("--gate-lambda", type=float, default=0.5)
    p.add_argument("--distill", type=float, default=0.0)
    p.add_argument("--value-weight", type=float, default=0.0,
                   help="train (--targets self): the KL of the tokens of a call's JSON values "
                        "weighs 1 + this (argument values: where skipping changes the call)")
    p.add_argument("--target-rate", type=float, default=None,
                   help="train: the gate term is (mean p - TARGET)^2 (p: the run probability)")
    p.add_argument("--agree-lambda", type=float, default=0.0,
                   help="train: weight of the batch-agreement term (the per-block variance of p over the tokens)")
    p.add_argument("--self-call-factor", type=float, default=1.0,
                   help="selfcalls: this many times SELF_CALLS questions per category")
    p.add_argument("--teacher", choices=("base", "self"), default="self")
    p.add_argument("--targets", choices=("reference", "self"), default="reference",
                   help="tool-call targets: BFCL's reference calls in the template's format, or the "
                        "dense model's own answers (the selfcalls stage)")
    p.add_argument("--init-adapter", type=Path, default=None,
                   help="train: warm start from this adapter directory (routers and LoRA)")
    p.add_argument("--gate-on", choices=("step", "all"), default="step",
                   help="train: the tokens whose p counts in the gate term: the step's own, or all "
                        "(the prompt's too)")
    p.add_argument("--snapshot-every", type=int, default=None,
                   help="train: keep the adapter of every n-th step in <run>/snapshots/")
    p.add_argument("--never-skip", type=int, nargs="*", default=[0, 23])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--taus", type=float, nargs="+", default=[0.5, 0.45, 0.4],
                   help="valtau: the routing thresholds tried on the validation cases")
    p.add_argument("--step-eval-tools", type=int, default=60)
    p.add_argument("--answers", type=Path, default=Path(lr.__file__).parent / "assets" / "qwen2.5-coder-0.5b"
                   / "run_c" / "bfcl_heldout64.json",
                   help="valueskip: the frozen base's answers to teacher-force (default: its answers to "
                        "the first 64 held-out cases, in run c's eval)")
    p.add_argument("--adapter", type=Path, default=None,
                   help="heldout: the adapter (default: WORK/RUN/adapter)")
    p.add_argument("--out", type=Path, default=None,
                   help="heldout: the report (default: WORK/RUN/bfcl_heldout600.json; resumed if present)")
    p.add_argument("--settings", nargs="+", default=["base", "routed", "lora"],
                   choices=["base", "routed", "lora", "base_required", "routed_required", "lora_required"],
                   help="heldout: the settings, in the order run (X_required: X with tool_choice "
                        "'required', on the six tool-call categories)")
    p.add_argument("--tau", type=float, default=None, help="heldout: routing tau (default: the adapter's)")
    p.add_argument("--categories", nargs="+", choices=list(HELDOUT600), default=None,
                   help="heldout: the categories to run now, in this order (default: all, in HELDOUT600's)")
    p.add_argument("--batch-q", type=float, default=1.0, help="heldout: the routed setting's batch policy")
    p.add_argument("--reuse", type=Path, default=None,
                   help="heldout: an eval JSON of the same cases and adapter whose base and lora runs "
                        "(tau 0: no tau or batch policy applies) are copied in instead of run again")
    p.add_argument("--screen", type=Path, nargs="+", default=None,
                   help="screen: adapter directories, the first the reference (default: the shipped "
                        "adapter, then the run's snapshots)")
    p.add_argument("--reqtime-cases", type=int, default=1, help="reqtime: validation cases per tool-call category")
    p.add_argument("--reqtime-tokens", type=int, default=32, help="reqtime: tokens generated per request")
    p.add_argument("--reqtime-repeats", type=int, default=2, help="reqtime: interleaved repeats per case")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    {"planning": stage_planning, "selfcalls": stage_selfcalls, "train": stage_train, "finalize": stage_finalize,
     "stepeval": stage_stepeval, "valtau": stage_valtau, "valueskip": stage_valueskip,
     "heldout": stage_heldout, "reqtime": stage_reqtime, "screen": stage_screen,
     "recount": stage_recount}[args.stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
