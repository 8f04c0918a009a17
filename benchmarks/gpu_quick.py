"""The quick GPU check, one stage per call (benchmarks/gpu_checks.sh quick runs them in order, each
under its time budget), every stage adding its results to one JSON file (atomically):

    python benchmarks/gpu_quick.py STAGE --json benchmarks/results/gpu-<date>.json [--smoke]

Stages, in order of value (their time budgets are gpu_checks.sh's):
  equality      greedy tokens of generate() against the plain-torch model (model.py, the oracle,
                no cache) on the bundled demo model (fp32) and on a random model of
                Qwen2.5-0.5B's shape (bf16): equal tokens, and where they first differ;
  graph         the engine's decode path (the ladder: IF-node graph, early-exit graph, eager;
                decode_runner.decode_path) and the KERNEL nodes of the captured decode step per
                running block and per router-skipped block (from the graph's DOT dump);
  dense         batch-1 dense decode ms/token on the 0.5B shape against the weight-read floor
                (the bytes a step reads / the measured copy bandwidth);
  skip          the time a skipped block saves against its share of the step (half the blocks
                in skip_layers, and every block skipped by its router);
  transformers  transformers' Qwen2 with a static cache (generate() compiles its decode step)
                on the same shape, side by side with ours.
The kernel microbenchmarks run between skip and transformers, from the shell script (pytest).
--smoke: a tiny random model on whatever device there is (the CPU test of this script); the
graph and transformers stages then report why they did not run.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import layerroute_rt as lr  # noqa: E402
from layerroute_rt.runtime import decode_runner  # noqa: E402

STAGES = ("equality", "graph", "dense", "skip", "transformers")    # budgets: gpu_checks.sh
NEW_TOKENS = 32


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shape_model(smoke: bool, dtype: torch.dtype):
    """A random model of Qwen2.5-0.5B's shape (the tiny one with --smoke), on the device."""
    from qwen_factory import QWEN25_05B, TINY, save_random_qwen2
    with tempfile.TemporaryDirectory() as d:
        save_random_qwen2(d, **(TINY if smoke else QWEN25_05B))
        return lr.load(d, device=_device(), dtype=dtype)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _engine(model) -> lr.InferenceModel:
    return lr.InferenceModel(model, max_cache_len=min(512, model.config.max_position_embeddings))


def _oracle_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of the plain-torch model (model.py's forward, routing at the adapter's tau)."""
    ids = torch.tensor([prompt], device=model.model.embed_tokens.weight.device)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids)[0, -1].float().argmax())
            out.append(nxt)
            ids = torch.cat([ids, ids.new_tensor([[nxt]])], 1)
    return out


def _compare(model, prompt, n) -> dict:
    engine = _engine(model)
    ours = lr.generate(engine, [prompt], max_new_tokens=n, eos_token_id=None).tokens[0]
    ref = _oracle_greedy(model, prompt, n)
    first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
    return {"equal": ours == ref, "first_difference": first, "tokens": n}


def stage_equality(smoke: bool) -> dict:
    from layerroute_rt.cli import DEMO_DIR
    from layerroute_rt.runtime.generate import encode_prompts
    demo = lr.load(DEMO_DIR, adapter=DEMO_DIR / "adapter", device=_device())
    ids = encode_prompts(["Find flights from Paris to Rome."], lr.InferenceModel(demo))[0]
    out = {"demo_fp32_routed": _compare(demo, ids, NEW_TOKENS)}
    dtype = torch.float32 if smoke or _device().type == "cpu" else torch.bfloat16
    shaped = _shape_model(smoke, dtype)
    rand = torch.randint(0, shaped.config.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    out[f"shape_{str(dtype).removeprefix('torch.')}_dense"] = _compare(shaped, rand, NEW_TOKENS)
    return out


def _kernel_nodes(engine, tau: float, skip) -> tuple[int, str | None]:
    """KERNEL nodes of the decode step captured at batch 1 for (tau, skip), and its branch mode."""
    run = decode_runner._Runner(engine, 1, 64, tau, engine.skip_set(skip), use_graph=True)
    ids = torch.tensor([[5, 9, 200, 3]], device=engine.device)
    engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool), run.cache, tau, run.skip)
    st = run.state
    st.positions.copy_(run.cache.seen)
    st.slot.fill_(run.cache.length)
    st.length.fill_(run.cache.length + 1)
    graph = run._capture(debug=True)
    with tempfile.TemporaryDirectory() as tmp:
        dot = Path(tmp) / "step.dot"
        graph.debug_dump(str(dot))
        text = dot.read_text(errors="replace")
    return len(re.findall(r"KERNEL", text)), run.branch_mode


def stage_graph(smoke: bool) -> dict:
    if _device().type != "cuda":
        return {"skipped": "no CUDA device"}
    model = _shape_model(smoke, torch.bfloat16)
    engine = _engine(model)
    path = decode_runner.decode_path(engine)
    L = model.config.num_hidden_layers
    dense, mode_dense = _kernel_nodes(engine, 0.0, None)
    fixed, _ = _kernel_nodes(engine, 0.0, list(range(L)))
    with torch.no_grad():                      # routers that skip every block
        for b in model.blocks:
            b.router.weight.zero_()
            b.router.bias.fill_(-10.0)
    routed = _engine(model)
    routed.__dict__["_decode_path"] = path
    routed.graph_branch = engine.graph_branch
    skipped, mode = _kernel_nodes(routed, 0.5, None)
    return {"decode_path": path, "skipped_block_mode": mode, "branch_mode_dense": mode_dense,
            "kernel_nodes": {"dense_step": dense, "fixed": fixed, "routers_skip_all": skipped,
                             "per_running_block": (dense - fixed) / L,
                             "per_router_skipped_block": (skipped - fixed) / L},
            "goal": "per running block <= 7 (8 with torch's set-conditional kernel), per skipped <= 1 (2)"}


def _weight_bytes(model) -> tuple[int, int]:
    """(bytes one decode step reads in weights, bytes of one block's)."""
    block = sum(p.numel() * p.element_size() for n, p in model.blocks[0].named_parameters()
                if "router" not in n and "lora" not in n)
    head = model.head_weight()
    total = block * len(model.blocks) + head.numel() * head.element_size()
    return total, block


def _decode_ms(engine, prompt, n, repeats=5, **kw) -> float:
    lr.generate(engine, [prompt], max_new_tokens=8, eos_token_id=None, **kw)      # capture, warm
    runs = []
    for _ in range(repeats):
        runs.append(lr.generate(engine, [prompt], max_new_tokens=n, eos_token_id=None, **kw)
                    .stats["decode_ms_per_token"])
    return sorted(runs)[len(runs) // 2]


def _copy_gbs() -> float:
    from bench_generate import copy_bandwidth_gbs
    return copy_bandwidth_gbs(_device())


def stage_dense(smoke: bool) -> dict:
    dtype = torch.float32 if _device().type == "cpu" else torch.bfloat16
    model = _shape_model(smoke, dtype)
    engine = _engine(model)
    prompt = torch.randint(0, model.config.vocab_size, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    ms = _decode_ms(engine, prompt, 64, tau=0.0)
    total, _ = _weight_bytes(model)
    gbs = _copy_gbs()
    floor = total / (gbs * 1e9) * 1e3
    return {"dtype": str(dtype).removeprefix("torch."), "dense_ms_per_token": ms, "weight_bytes": total,
            "copy_bandwidth_gbs": gbs, "weight_read_floor_ms": floor, "x_floor": ms / floor,
            "goal": "within 1.6x of the floor"}


def stage_skip(smoke: bool) -> dict:
    dtype = torch.float32 if _device().type == "cpu" else torch.bfloat16
    model = _shape_model(smoke, dtype)
    engine = _engine(model)
    prompt = torch.randint(0, model.config.vocab_size, (128,), generator=torch.Generator().manual_seed(1)).tolist()
    L = model.config.num_hidden_layers
    half = list(range(1, L, 2))
    total, block = _weight_bytes(model)
    dense = _decode_ms(engine, prompt, 64, tau=0.0)
    skipped = _decode_ms(engine, prompt, 64, tau=0.0, skip_layers=half)
    with torch.no_grad():
        for b in model.blocks:
            b.router.weight.zero_()
            b.router.bias.fill_(-10.0)
    routed_engine = _engine(model)
    routed = _decode_ms(routed_engine, prompt, 64, tau=0.5)
    share_half = len(half) * block / total
    share_all = L * block / total

    def saved(ms, share):
        return (dense - ms) / (share * dense)

    return {"dense_ms_per_token": dense,
            "skip_layers_half": {"ms_per_token": skipped, "blocks": len(half), "share_of_weight_bytes": share_half,
                                 "fraction_of_share_saved": saved(skipped, share_half)},
            "routers_skip_all": {"ms_per_token": routed, "blocks": L, "share_of_weight_bytes": share_all,
                                 "fraction_of_share_saved": saved(routed, share_all)},
            "goal": "a skipped block saves at least 85% of its share"}


def stage_transformers(smoke: bool) -> dict:
    if _device().type != "cuda":
        return {"skipped": "no CUDA device (the static-cache compiled baseline needs one)"}
    from bench_generate import _hf_once, hf_baselines
    from qwen_factory import QWEN25_05B, TINY, save_random_qwen2
    prompt = [torch.randint(0, 1000, (128,), generator=torch.Generator().manual_seed(2)).tolist()]
    with tempfile.TemporaryDirectory() as d:
        save_random_qwen2(d, **(TINY if smoke else QWEN25_05B))
        hf = hf_baselines(d, torch.bfloat16, _device())["static_compile"]
        model = lr.load(d, device=_device(), dtype=torch.bfloat16)
    _hf_once(hf, prompt, 8, _device())                   # compile, warm
    theirs = sorted(_hf_once(hf, prompt, 64, _device())["decode_ms_per_step"] for _ in range(3))[1]
    ours = _decode_ms(_engine(model), prompt[0], 64, repeats=3, tau=0.0)
    return {"transformers_static_compile_ms_per_token": theirs, "ours_dense_ms_per_token": ours,
            "speedup": theirs / ours}


def _merge(path: Path, key: str, value: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def environment() -> dict:
    import triton
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "commit": commit or "unknown", "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=list(STAGES) + ["env"])
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / f"gpu-{time.strftime('%Y-%m-%d')}.json")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model (a CPU test of the stages)")
    args = ap.parse_args(argv)
    if args.stage == "env":
        _merge(args.json, "environment", environment())
        return 0
    t0 = time.perf_counter()
    try:
        result = globals()[f"stage_{args.stage}"](args.smoke)
    except Exception as e:                     # recorded, and the next stage still runs
        result = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    _merge(args.json, args.stage, result)
    print(json.dumps({args.stage: result}), flush=True)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
