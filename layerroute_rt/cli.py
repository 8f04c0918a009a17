"""The `layerroute` command.

    layerroute demo [--model DIR] [--adapter DIR] [--prompt TEXT | --prompt-ids 1 2 3] ...

demo: load a Qwen2 checkpoint directory (or, without --model, build a small random Qwen2 model
and write it as a Hugging Face directory first), generate, and print the tokens with the
per-layer skip map, the FLOPs skipped and the time per token.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

from . import checkpoint
from .generate import generate
from .model import load

DEMO_SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=1024)
DEFAULT_PROMPT = "Find flights from Paris to Rome on 3 May."
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_demo_backbone(path: str | Path, seed: int = 0) -> Path:
    """Write a small randomly initialised Qwen2 model (HF format) to `path`."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**DEMO_SHAPE))
    model.save_pretrained(path)
    return Path(path)


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


def _tokenizer(model_dir: Path):
    """The checkpoint's own tokenizer, if it ships one (local files only)."""
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            model_dir = build_demo_backbone(Path(tmp) / "demo-qwen2", seed=args.seed)
            print(f"no --model given: built a small random Qwen2 model ({DEMO_SHAPE['num_hidden_layers']} "
                  f"blocks, hidden {DEMO_SHAPE['hidden_size']}, vocab {DEMO_SHAPE['vocab_size']})")
        else:
            model_dir = Path(args.model)
        model = load(model_dir, adapter=args.adapter, device=args.device, dtype=DTYPES[args.dtype])
    # The flags given override the adapter's stored (or the default) runtime settings.
    given = {k: getattr(args, k) for k in ("tau", "granularity", "kv_policy") if getattr(args, k) is not None}
    model.lr_config = dataclasses.replace(model.lr_config, **given)
    random_routers = args.random_routers if args.random_routers is not None else (
        args.seed if args.model is None and args.adapter is None else None)
    if random_routers is not None:
        model.randomize_adapter(seed=random_routers)
        print(f"routers: random and untrained (seed {random_routers}); they show the mechanism, "
              f"not a learned policy")
    elif args.adapter is None:
        print("routers: fresh (p starts near 1, every block runs); pass --adapter or --random-routers")

    tok = _tokenizer(model_dir) if args.model else None
    if args.prompt_ids:
        prompts = [args.prompt_ids]
    elif tok is not None:
        prompts = [tok(args.prompt or DEFAULT_PROMPT)["input_ids"]]
    elif args.prompt is not None:
        raise ValueError(f"--prompt needs the checkpoint's tokenizer, and {model_dir} has none "
                         f"(tokenizer.json); pass --prompt-ids instead")
    else:
        g = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(0, model.config.vocab_size, (16,), generator=g).tolist()]
    out = generate(model, prompts, max_new_tokens=args.max_new_tokens,
                   skip_layers=args.skip_layers, temperature=args.temperature, seed=args.seed)
    prompt_len = len(prompts[0])   # one prompt: no left padding
    new = out.tokens[0]
    print(f"\nprompt ({len(prompts[0])} tokens): {tok.decode(prompts[0]) if tok else prompts[0]}")
    print(f"generated ({len(new)} tokens): {tok.decode(new) if tok else new}")
    print("\nskip map (rows: blocks; columns: prompt tokens | generated tokens fed back; "
          "# ran the block, . skipped it):")
    print(skip_map(out.executed[:, 0], out.valid[0], prompt_len))
    s = out.stats
    rates = " ".join(f"{r:.2f}" for r in s["skip_rate_per_layer"])
    print(f"\nskip rate per block: {rates}")
    print(f"FLOPs skipped: {s['block_flops_skipped_pct']:.1f}% of block FLOPs, "
          f"{s['total_flops_skipped_pct']:.1f}% of total forward FLOPs (lm_head included)")
    decode = s["decode_ms_per_token"]
    print(f"time: prefill {s['prefill_ms']:.1f} ms, decode "
          f"{'n/a' if decode is None else f'{decode:.2f} ms/token'} "
          f"({args.device}, {args.dtype}, reference path)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="layerroute", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="generate with skipping and print the skip map")
    p.add_argument("--model", help="a Hugging Face Qwen2 checkpoint directory (default: build a small one)")
    p.add_argument("--adapter", help="a LayerRoute adapter directory written by save_adapter")
    p.add_argument("--prompt", help=f"text prompt (needs the checkpoint's tokenizer; default "
                                    f"{DEFAULT_PROMPT!r}, or random ids without a tokenizer)")
    p.add_argument("--prompt-ids", type=int, nargs="+", help="prompt as token ids")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--tau", type=float, help="routing threshold (default: the adapter's, or 0.5)")
    p.add_argument("--granularity", choices=("token", "sequence"))
    p.add_argument("--kv-policy", choices=("compute", "drop"))
    p.add_argument("--skip-layers", type=int, nargs="*", help="blocks to skip for every token")
    p.add_argument("--random-routers", type=int, metavar="SEED",
                   help="random untrained routers (default for the built-in model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, checkpoint.CheckpointError, FileNotFoundError) as e:
        print(f"layerroute {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
