"""The first numbers of a GPU lease (gpu_checks.sh quick runs this before anything else):

1. the dense batch-1 decode figure (Qwen2.5-0.5B shapes, random weights, bf16 by default):
   ms per token of generate() through the captured decode step, written to
   $OUT/decode_dense_<device>_<dtype>.json at once;
2. the kernel nodes per block in the captured graph: the step is captured with the graph's
   debug mode on and its DOT dump read (`KERNEL` nodes), for a dense step (tau 0), with every
   block in skip_layers, and with routers that skip every block; per block = the difference
   over the blocks. Added to the same JSON, next to the CPU launch counts of
   tests/launch_count.py for comparison.

    python benchmarks/decode_graph_check.py [--dtype bfloat16] [--new-tokens 64] [--out DIR]

On a machine without CUDA it measures the CPU figure only (no graph).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import layerroute_rt as lr  # noqa: E402
from layerroute_rt import scheduler as sched_module  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _save(results: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)
    print(json.dumps(results), flush=True)


def dense_ms_per_token(engine, vocab: int, new_tokens: int, repeats: int) -> list[float]:
    prompt = torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(0)).tolist()
    lr.generate(engine, prompt, max_new_tokens=8, tau=0.0, eos_token_id=None)   # capture, warm
    runs = []
    for _ in range(repeats):
        out = lr.generate(engine, prompt, max_new_tokens=new_tokens, tau=0.0, eos_token_id=None)
        runs.append(out.stats["decode_ms_per_token"])
    return runs


def graph_kernel_nodes(engine, tau: float, skip) -> tuple[int, str | None]:
    """KERNEL nodes of the decode step captured for (tau, skip) at batch 1, and how it skips
    block bodies (the runner's branch mode)."""
    runner = sched_module._Runner(engine, 1, 64, tau, engine.skip_set(skip), use_graph=False)
    ids = torch.tensor([[5, 9, 200, 3]], device=engine.device)
    engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), runner.cache, tau, runner.skip)
    st = runner.state
    st.positions.copy_(runner.cache.seen)
    st.slot.fill_(runner.cache.length)
    st.length.fill_(runner.cache.length + 1)
    if runner.sequence:
        runner.refresh_sequences()
    saved = (st.positions.clone(), st.slot.clone(), st.length.clone(), st.tokens.clone(),
             st.executed.clone(), st.pred.clone(), int(st.slot[0]))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        runner._eager_step()
    torch.cuda.current_stream().wait_stream(side)
    runner._restore(saved)
    graph = torch.cuda.CUDAGraph()
    graph.enable_debug_mode()
    with torch.cuda.graph(graph):
        runner._eager_step()
    mode = engine.last_branch_mode
    with tempfile.TemporaryDirectory() as tmp:
        dot = Path(tmp) / "step.dot"
        graph.debug_dump(str(dot))
        text = dot.read_text(errors="replace")
    # Kernel nodes, those inside conditional bodies included.
    return len(re.findall(r"KERNEL", text)), mode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    from qwen_factory import QWEN25_05B, save_random_qwen2

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as model_dir:
        save_random_qwen2(model_dir, **QWEN25_05B)
        model = lr.load(model_dir, device=device, dtype=dtype)
    engine = lr.InferenceModel(model, max_cache_len=512)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    path = Path(args.out) / f"decode_dense_{device.type}_{args.dtype}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "commit": commit, "dtype": args.dtype, "batch": 1, "prompt": 128,
               "new_tokens": args.new_tokens, "torch": torch.__version__}
    t0 = time.perf_counter()
    runs = dense_ms_per_token(engine, model.config.vocab_size, args.new_tokens, args.repeats)
    results |= {"dense_decode_ms_per_token": sorted(runs)[len(runs) // 2],
                "dense_decode_ms_all": runs, "seconds": round(time.perf_counter() - t0, 1)}
    _save(results, path)
    if device.type != "cuda":
        return 0
    L = model.config.num_hidden_layers
    dense, mode_dense = graph_kernel_nodes(engine, 0.0, None)
    none_left, _ = graph_kernel_nodes(engine, 0.0, list(range(L)))
    with torch.no_grad():                      # routers that skip every block
        for b in model.blocks:
            b.router.weight.zero_()
            b.router.bias.fill_(-10.0)
    routed = lr.InferenceModel(model, max_cache_len=512)
    all_skipped, mode_routed = graph_kernel_nodes(routed, 0.5, None)
    results["graph_kernel_nodes"] = {
        "dense_step": dense, "skip_layers_all": none_left, "routers_skip_all": all_skipped,
        "per_running_block": (dense - none_left) / L,
        "per_router_skipped_block": (all_skipped - none_left) / L,
        "fixed": none_left, "branch_mode": mode_routed, "branch_mode_dense": mode_dense,
        "note": "KERNEL nodes of the DOT dump, conditional bodies included (a body under an "
                "IF node is in the graph but runs only when its predicate holds)",
        "cpu_launch_counts": "tests/launch_count.py: running 7, router-skipped 1, skip_layers 0, "
                             "fixed 6 (with the argmax)"}
    _save(results, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
