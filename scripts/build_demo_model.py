"""Build the bundled demo model: a small Qwen2 pretrained here on synthetic agent trajectories,
its tokenizer, a LayerRoute adapter, and the adapter's several-seed evaluation.

    python scripts/build_demo_model.py                       # ~30 min on 2 CPU cores
    python scripts/build_demo_model.py --out /tmp/demo --tiny --seeds 0 1   # smoke test, < 1 min

Stages (all seeded by --seed; CPU torch is deterministic for a fixed thread count):
  1. corpus: data.generate_trajectories(--trajectories), split by trajectory into train and
     held-out (data.heldout_split): the held-out trajectories are never seen, not by the tokenizer,
     not in pretraining, not by the adapter; rendered with the Qwen2.5 ChatML template;
  2. tokenizer: byte-level BPE (data.train_tokenizer) with <|endoftext|> (pad), <|im_start|>,
     <|im_end|> (eos) and the <tool_call>/<tool_response> tags as whole tokens, Qwen's chat
     template; saved so that transformers.AutoTokenizer.from_pretrained(out) loads it;
  3. backbone: transformers.Qwen2ForCausalLM (tied embeddings, 2 KV heads, rope_theta 1e6)
     pretrained with next-token loss on packed windows of the rendered corpus; the number of steps
     is --pretrain-steps, or, if not given, what fits in --minutes (measured on the first steps;
     the cosine schedule then uses that fixed count); saved as float16 (config.json says qwen2);
  4.+5. adapter and eval: evaluate.run_seeds trains one LayerRoute adapter (routers + LoRA) per
     --seeds entry with train.train on the train part's tool_call/planning examples and evaluates
     each on the held-out split and the length-matched split (data.length_matched_split); eval.json,
     eval.md and skip_heatmap.png go to <out>/eval, seed <seeds[0]>'s adapter to <out>/adapter.

<out>/build_info.json records every setting and the pretraining step count: rerunning with
`--pretrain-steps N` (N from that file) reproduces the backbone without a time budget.
--reuse-backbone skips stages 2-3 when <out> already holds them (to retune the adapter).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from layerroute_rt import LayerRouteConfig, data
from layerroute_rt.eval import evaluate
from layerroute_rt.model.checkpoint import atomic_write_json
from layerroute_rt.train.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(trajectories=3000, heldout=0.03, vocab=3072, hidden=256, layers=6, heads=4, kv_heads=2,
            intermediate=512, seq_len=512, batch=8, lr=2e-3, max_length=384, adapter_steps=150,
            adapter_batch=4, adapter_accum=2, adapter_lr=3e-3, adapter_examples=2400)
TINY = dict(trajectories=60, heldout=0.15, vocab=400, hidden=64, layers=2, heads=2, kv_heads=2,
            intermediate=128, seq_len=128, batch=4, lr=3e-3, max_length=160, adapter_steps=3,
            adapter_batch=2, adapter_accum=1, adapter_lr=3e-3, adapter_examples=40)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "layerroute_rt" / "assets" / "demo"))
    p.add_argument("--seed", type=int, default=0, help="corpus, split, init and data order")
    p.add_argument("--minutes", type=float, default=15.0, help="pretraining time budget")
    p.add_argument("--pretrain-steps", type=int, default=None, help="fixed step count (overrides --minutes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="adapter seeds for the eval")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a smoke test")
    p.add_argument("--reuse-backbone", action="store_true", help="keep <out>'s tokenizer and backbone")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    # Sizes default to FULL (or TINY with --tiny); any of them can be given explicitly.
    for key, value in FULL.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    # The method's knobs for the demo adapter (see LayerRouteConfig).
    p.add_argument("--gate-lambda", type=float, default=0.5)
    p.add_argument("--router-init-bias", type=float, default=0.5)
    p.add_argument("--granularity", default="token", choices=("token", "sequence"))
    args = p.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build_tokenizer(texts: list[str], vocab: int, out: Path):
    """BPE tokenizer with the ChatML/Hermes tokens as whole tokens and Qwen's chat template."""
    tok = data.train_tokenizer(texts, vocab_size=vocab)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    for t in ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"):
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    tok.chat_template = data.QWEN2_CHAT_TEMPLATE
    tok.save_pretrained(out)
    return tok


def pretrain(args, tok, texts: list[str], out: Path) -> dict:
    """Next-token pretraining of a small Qwen2ForCausalLM on packed windows of the corpus."""
    import transformers

    ids = []
    for enc in tok(texts, add_special_tokens=False)["input_ids"]:
        ids += enc + [tok.pad_token_id]                    # <|endoftext|> between trajectories
    stream = torch.tensor(ids, dtype=torch.long)
    config = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=4096, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(args.seed)
    model = transformers.Qwen2ForCausalLM(config).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[pretrain] corpus {len(stream):,} tokens; model {n_params / 1e6:.2f}M parameters "
          f"(hidden {args.hidden}, {args.layers} layers, vocab {len(tok)})", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)
    warmup, probe = 20, 10
    total = args.pretrain_steps or 10 ** 9                 # fixed after `probe` steps if budgeted
    t0, curve, step = time.perf_counter(), [], 0
    while step < total:
        lr = args.lr * min(1.0, (step + 1) / warmup) * (
            1.0 if total >= 10 ** 9 else 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch,), generator=g)
        batch = torch.stack([stream[s:s + args.seq_len + 1] for s in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        curve.append(loss.item())
        if step == probe and args.pretrain_steps is None:
            per_step = (time.perf_counter() - t0) / probe
            total = max(probe + 1, int(args.minutes * 60 / per_step))
            print(f"[pretrain] {per_step:.2f} s/step: {total} steps fit in {args.minutes} min", flush=True)
        if step % args.log_every == 0 or step in (1, total):
            recent = curve[-args.log_every:]
            print(f"[pretrain] step {step}/{total if total < 10 ** 9 else '?'} loss {curve[-1]:.3f} "
                  f"(mean of last {len(recent)}: {sum(recent) / len(recent):.3f}) lr {lr:.2e} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    model.to(torch.float16).save_pretrained(out)
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "first_loss": curve[0],
            "last_loss_mean20": sum(curve[-20:]) / len(curve[-20:]), "parameters": n_params}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # 1. corpus, split by trajectory: held-out trajectories are never trained on.
    trajs = data.generate_trajectories(args.trajectories, seed=args.seed)
    train_trajs, held_trajs = data.heldout_split(trajs, fraction=args.heldout, seed=args.seed)
    texts = [data.render_trajectory(t) for t in train_trajs]
    print(f"[data] {len(trajs)} trajectories: {len(train_trajs)} train, {len(held_trajs)} held out; "
          f"{sum(map(len, texts)) / 1e6:.1f}M characters", flush=True)

    # 2.-3. tokenizer and backbone.
    if args.reuse_backbone and (out / "config.json").is_file():
        import transformers
        tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
        info_file = out / "build_info.json"
        earlier = json.loads(info_file.read_text()) if info_file.is_file() else {}
        pre = earlier.get("pretrain", {"steps": None})
        pretrain_args = earlier.get("pretrain_args", earlier.get("args"))   # the run that pretrained
        print(f"[pretrain] reusing the backbone in {out} ({pre['steps']} steps)", flush=True)
    else:
        tok = build_tokenizer(texts, args.vocab, out)
        pre = pretrain(args, tok, texts, out)
        pretrain_args = vars(args)
        atomic_write_json(out / "build_info.json",
                          {"args": vars(args), "pretrain_args": pretrain_args, "pretrain": pre})
    tok = type(tok).from_pretrained(out, local_files_only=True)     # exactly what ships

    # 4. step-typed examples (loss on the step's own tokens) and the evaluation splits.
    train_ex = data.build_examples(train_trajs, tok, max_length=args.max_length)
    g = torch.Generator().manual_seed(args.seed)
    keep = sorted(torch.randperm(len(train_ex), generator=g)[:args.adapter_examples].tolist())
    train_ex = [train_ex[i] for i in keep]
    held_ex = data.build_examples(held_trajs, tok, max_length=args.max_length)
    matched = data.length_matched_split(held_ex, seed=args.seed)
    splits = {"heldout": held_ex, "length_matched": matched}
    for name, ex in (("train", train_ex),) + tuple(splits.items()):
        s = data.split_stats(ex)
        print(f"[data] {name}: {s['n']} steps, mean length {({k: round(v, 1) for k, v in s['mean_step_len'].items()})}, "
              f"r(type, length) {s['r_type_length']:+.2f}", flush=True)

    lr_config = LayerRouteConfig(gate_lambda=args.gate_lambda, router_init_bias=args.router_init_bias,
                                 granularity=args.granularity)
    train_config = TrainConfig(steps=args.adapter_steps, batch_size=args.adapter_batch,
                               grad_accum=args.adapter_accum, lr=args.adapter_lr,
                               warmup_steps=max(1, args.adapter_steps // 10), checkpoint_every=10 ** 6)
    collate = lambda batch: data.collate(batch, pad_id=tok.pad_token_id)  # noqa: E731
    t_eval = time.perf_counter()
    report = evaluate.run_seeds(out, train_ex, splits, collate, args.seeds, out / "eval", lr_config,
                                train_config, progress=False)
    eval_seconds = time.perf_counter() - t_eval

    # The first seed's adapter ships as <out>/adapter; optimizer checkpoints are dropped.
    if (out / "adapter").exists():
        shutil.rmtree(out / "adapter")
    shutil.copytree(out / "eval" / f"seed{args.seeds[0]}" / "adapter", out / "adapter")
    for seed in args.seeds:
        shutil.rmtree(out / "eval" / f"seed{seed}" / "checkpoint", ignore_errors=True)

    info = {"args": vars(args), "pretrain_args": pretrain_args, "pretrain": pre, "eval_seconds": round(eval_seconds, 1),
            "split_sizes": {name: len(ex) for name, ex in splits.items()}, "total_seconds": round(time.perf_counter() - t_start, 1)}
    atomic_write_json(out / "build_info.json", info)

    # Summary.
    print(f"\n[done] {out} in {info['total_seconds']:.0f}s; pretraining loss {pre.get('first_loss')} -> "
          f"{pre.get('last_loss_mean20')} over {pre['steps']} steps; weights "
          f"{os.path.getsize(out / 'model.safetensors') / 1e6:.2f} MB")
    for split, s in report["summary"].items():
        types = {t: f"{m['skip_rate']['mean']:.3f}" for t, m in s["by_type"].items()}
        d = s["differential"].get("total_flops_skipped_pct")
        print(f"[done] {split}: skip rate by type {types}" + (
            f"; differential {d['mean']:+.2f} pts, 95% CI [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d else ""))
    print("\n" + evaluate.markdown(report))
    return info


if __name__ == "__main__":
    main()
