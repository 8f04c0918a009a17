"""Training speed: seconds per optimizer step of `layerroute_rt.train.trainer` against transformers + peft
training the same LoRA (rank, alpha, targets) at the same batch, grad-accum and sequence length.

    python benchmarks/bench_train.py                  # Qwen2.5-0.5B shapes, random weights, GPU
    python benchmarks/bench_train.py --model DIR --seq-len 512 --steps 20
    python benchmarks/bench_train.py --device cpu --tiny --steps 4     # a smoke run
    python benchmarks/bench_train.py --device cpu --tiny --ranks 1 2   # DDP over gloo processes

Both sides: AdamW (lr 2e-4), bf16 autocast on CUDA, batch 4 x grad-accum 4 (the method's recipe),
random token sequences with the loss on the second half. With --ranks, ours alone at each world
size (gloo on CPU, nccl on CUDA; spawned processes, the CPU threads shared out): seconds per
step at the same global batch, and the bytes the step all-reduces (which should be the trainable
parameters' gradients only: routers + LoRA, fp32). Ours also trains the routers with the
gate term and computes every block for every token (straight-through gates); it computes the
vocabulary logits only where the loss is scored (the second half), where transformers computes
them at every position: that is part of what is compared. Time per step is
(time of N steps - time of W warm-up steps) / (N - W), after a synchronise; the projection to
3,000 steps is that times 3,000. Writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))          # qwen_factory: random HF Qwen2 checkpoints

import layerroute_rt as lr  # noqa: E402
from layerroute_rt.train.trainer import TrainConfig, train  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_examples(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    loss_mask = torch.zeros(seq_len, dtype=torch.bool)
    loss_mask[seq_len // 2:] = True
    return [{"input_ids": torch.randint(0, vocab, (seq_len,), generator=g), "loss_mask": loss_mask}
            for _ in range(n)]


def collate(batch: list[dict]) -> dict:
    ids = torch.stack([e["input_ids"] for e in batch])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "loss_mask": torch.stack([e["loss_mask"] for e in batch])}


def time_ours(model_dir, examples, args, device, dtype) -> float:
    def run(steps):
        model = lr.load(model_dir, device=device, dtype=dtype)
        cfg = TrainConfig(steps=steps, batch_size=args.batch, grad_accum=args.grad_accum,
                          warmup_steps=0, checkpoint_every=10**6)
        with tempfile.TemporaryDirectory() as out:
            _sync(device)
            t0 = time.perf_counter()
            train(model, examples, collate, out, cfg, progress=False)
            _sync(device)
            return time.perf_counter() - t0

    run(args.warmup)                                 # first-call costs land outside the timing
    return (run(args.steps) - run(args.warmup)) / (args.steps - args.warmup)


def _ddp_rank(rank, world, port, model_dir, examples, args, device, dtype, threads, out):
    """One rank of the --ranks benchmark: time_ours under a process group; rank 0 writes the
    seconds per step and the log's all-reduce bytes to `out`."""
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    s_per_step = time_ours(model_dir, examples, args, device, dtype)
    with tempfile.TemporaryDirectory() as log_dir:     # one short run more, for the log's bytes
        model = lr.load(model_dir, device=device, dtype=dtype)
        row = train(model, examples, collate, log_dir, TrainConfig(steps=1, batch_size=args.batch,
                                                                    grad_accum=args.grad_accum, warmup_steps=0,
                                                                    checkpoint_every=10**6), progress=False)
        trainable = sum(p.numel() * p.element_size() for p in model.adapter_state_dict().values()
                        if p.requires_grad)
    if rank == 0:
        Path(out).write_text(json.dumps({"ranks": world, "s_per_step": s_per_step, "threads_per_rank": threads,
                                         "allreduce_bytes_per_step": row.get("allreduce_bytes", 0),
                                         "trainable_bytes": trainable}))
    dist.destroy_process_group()


def time_ranks(model_dir, examples, args, device, dtype) -> list[dict]:
    import socket
    import torch.multiprocessing as mp
    rows = []
    cores = torch.get_num_threads()
    for world in args.ranks:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rank0.json"
            mp.start_processes(_ddp_rank, args=(world, port, model_dir, examples, args, device, dtype,
                                                max(1, cores // world), str(out)),
                               nprocs=world, start_method="spawn")
            rows.append(json.loads(out.read_text()))
        print(f"layerroute_rt, {world} rank(s): {rows[-1]['s_per_step']:.3f} s per step, "
              f"{rows[-1]['allreduce_bytes_per_step']} bytes all-reduced per step", flush=True)
    return rows


def time_peft(model_dir, examples, args, device, dtype) -> float | None:
    """Seconds per step of transformers + peft, or None where peft is not installed."""
    try:
        import peft
    except ImportError:
        print("bench_train: peft is not installed: no transformers + peft baseline", file=sys.stderr)
        return None
    import transformers

    hf = transformers.Qwen2ForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    hf.train()
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=2e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
        torch.autocast("cpu", enabled=False)
    per_step = args.batch * args.grad_accum

    def step(i):
        opt.zero_grad(set_to_none=True)
        for m in range(args.grad_accum):
            lo = (i * per_step + m * args.batch) % (len(examples) - args.batch)
            batch = collate(examples[lo:lo + args.batch])
            ids = batch["input_ids"].to(device)
            labels = torch.where(batch["loss_mask"].to(device), ids, -100)
            with autocast:
                loss = hf(input_ids=ids, labels=labels).loss
            (loss / args.grad_accum).backward()
        opt.step()

    def run(steps):
        _sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        _sync(device)
        return time.perf_counter() - t0

    run(args.warmup)                                 # first-call costs land outside the timing
    return (run(args.steps) - run(args.warmup)) / (args.steps - args.warmup)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a Qwen2 checkpoint directory (default: Qwen2.5-0.5B shapes, random weights)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Qwen2 (smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="weights (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--ranks", type=int, nargs="+", help="time ours under DDP at these world sizes")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    tmp = None
    if args.model is None:
        from qwen_factory import QWEN25_05B, save_random_qwen2

        tmp = tempfile.TemporaryDirectory()
        save_random_qwen2(tmp.name, **({} if args.tiny else QWEN25_05B))
        model_dir = tmp.name
    else:
        model_dir = args.model
    vocab = lr.load(model_dir).config.vocab_size if args.tiny else \
        json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    examples = random_examples(4 * args.batch * args.grad_accum, args.seq_len, vocab)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if args.ranks:
        rows = time_ranks(model_dir, examples, args, device, dtype)
        base = rows[0]["s_per_step"]
        result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "dtype": str(dtype).removeprefix("torch."), "commit": commit, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                  "torch": torch.__version__, "backend": "nccl" if device.type == "cuda" else "gloo",
                  "model": args.model or ("tiny random Qwen2" if args.tiny else "Qwen2.5-0.5B shapes, random weights"),
                  "seq_len": args.seq_len, "global_batch": args.batch * args.grad_accum,
                  "ranks": [{**r, "steps_per_s": 1.0 / r["s_per_step"], "speedup": base / r["s_per_step"]}
                            for r in rows]}
        _write(Path(args.out), f"train_ddp_{device.type}{'_tiny' if args.tiny else ''}.json", result)
        return 0
    ours = time_ours(model_dir, examples, args, device, dtype)
    print(f"layerroute_rt: {ours:.3f} s per step", flush=True)
    theirs = time_peft(model_dir, examples, args, device, dtype)
    if theirs is not None:
        print(f"transformers + peft: {theirs:.3f} s per step", flush=True)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "commit": commit, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "model": args.model or ("tiny random Qwen2" if args.tiny else "Qwen2.5-0.5B shapes, random weights"),
        "seq_len": args.seq_len, "batch": args.batch, "grad_accum": args.grad_accum,
        "logits": "ours at the scored positions only; transformers + peft at every position",
        "ours_s_per_step": ours, "peft_s_per_step": theirs,
        "speedup": None if theirs is None else theirs / ours,
        "ours_minutes_per_3000_steps": ours * 3000 / 60,
        "peft_minutes_per_3000_steps": None if theirs is None else theirs * 3000 / 60,
    }
    _write(Path(args.out), f"train_{device.type}{'_tiny' if args.tiny else ''}.json", result)
    return 0


def _write(out: Path, name: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp_json = out / f".{name}.tmp"
    tmp_json.write_text(json.dumps(result, indent=2))
    tmp_json.replace(out / name)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
