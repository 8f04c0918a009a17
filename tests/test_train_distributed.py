"""Training under torch.distributed (layerroute_rt/train/trainer.py), with 2 gloo processes on CPU: 2 ranks
give the trainable parameters of 1 rank at the same global batch (micro-batches split, or
whole micro-batches shared out); only rank 0 writes; the all-reduce carries the trainable
gradients only; a rank that dies fails the other with DistributedFailure within the timeout;
a run killed after a checkpoint and resumed (on 2 ranks, or on 1) matches the uninterrupted one."""
import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

import layerroute_rt as lr
from layerroute_rt.train import trainer as train_mod
from layerroute_rt.train.trainer import TrainConfig, train
from qwen_factory import save_random_qwen2
from test_train import collate, read_log, toy_examples

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(), reason="needs gloo")

CFG = dict(lr=3e-3, warmup_steps=2, checkpoint_every=3)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp")
    save_random_qwen2(path, num_hidden_layers=2)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, backbone, out, jobs):
    """One rank: join the group, run each job (cfg, out name, resume, die_at), save its state."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=20))
    result = {}
    try:
        for cfg, name, resume, die_at in jobs:
            real = train_mod._rank_micro_batches
            if die_at is not None and rank in die_at["ranks"]:
                def dying(n, step, c, w, real=real, at=die_at["step"], how=die_at["how"]):
                    if step == at:
                        if how == "exit":
                            os._exit(3)          # the process is gone: no goodbye to the others
                        raise KeyboardInterrupt
                    return real(n, step, c, w)
                train_mod._rank_micro_batches = dying
            model = lr.load(backbone)
            try:
                train(model, toy_examples(), collate, os.path.join(out, f"{name}-rank{rank}"), TrainConfig(**cfg),
                      resume=resume, progress=False)
            except KeyboardInterrupt:
                dist.barrier()
                continue
            finally:
                train_mod._rank_micro_batches = real
            torch.save(model.adapter_state_dict(), os.path.join(out, f"{name}-state{rank}.pt"))
    except Exception as e:
        result = {"error": type(e).__name__, "message": str(e), "trace": traceback.format_exc()}
    result["t_end"] = time.time()
    with open(os.path.join(out, f"result{rank}.json"), "w") as f:
        json.dump(result, f)
    if "error" not in result:
        dist.destroy_process_group()


def _run_ranks(backbone, out, jobs, world=2, join_timeout=120):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, str(backbone), str(out), jobs)) for r in range(world)]
    t0 = time.time()
    for p in procs:
        p.start()
    for p in procs:
        p.join(join_timeout)
        assert not p.is_alive(), "a rank hung"
    results = []
    for r in range(world):
        path = out / f"result{r}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return results, t0


def _single(backbone, out, cfg, resume=False):
    model = lr.load(backbone)
    train(model, toy_examples(), collate, out, TrainConfig(**cfg), resume=resume, progress=False)
    return model.adapter_state_dict()


def _close(a, b, tol=1e-5):
    return all(torch.allclose(a[n], b[n], atol=tol, rtol=0) for n in a)


def test_two_ranks_equal_one_rank_and_only_rank_0_writes(backbone, tmp_path):
    split = dict(steps=5, batch_size=4, grad_accum=1, **CFG)        # each rank: batch 2 of every micro-batch
    shared = dict(steps=5, batch_size=2, grad_accum=2, **CFG)       # each rank: whole micro-batches
    results, _ = _run_ranks(backbone, tmp_path, [(split, "split", False, None), (shared, "shared", False, None)])
    assert all(r is not None and "error" not in r for r in results), results
    for name, cfg in (("split", split), ("shared", shared)):
        one = _single(backbone, tmp_path / f"{name}-single", cfg)
        ranks = [torch.load(tmp_path / f"{name}-state{r}.pt") for r in range(2)]
        assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in ranks[0])   # the ranks agree exactly
        assert _close(ranks[0], one), name                                     # and equal one process
        assert not any(torch.equal(one[n], lr.load(backbone).adapter_state_dict()[n]) for n in one
                       if "lora_B" in n)                                       # it trained
        assert not (tmp_path / f"{name}-rank1").exists()                       # only rank 0 writes
        assert {"log.csv", "checkpoint", "adapter"} <= {p.name for p in (tmp_path / f"{name}-rank0").iterdir()}
        log = read_log(tmp_path / f"{name}-rank0" / "log.csv")
        single_log = read_log(tmp_path / f"{name}-single" / "log.csv")
        assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in single_log], abs=1e-5)
        n_trainable = sum(p.numel() for p in lr.load(backbone).adapter_state_dict().values())
        assert all(r["world_size"] == 2 and r["allreduce_bytes"] == 4 * n_trainable for r in log)


def test_a_rank_that_dies_fails_the_other_within_the_timeout(backbone, tmp_path):
    cfg = dict(steps=6, batch_size=4, grad_accum=1, **CFG)
    results, t0 = _run_ranks(backbone, tmp_path, [(cfg, "die", False, {"ranks": [1], "step": 2, "how": "exit"})])
    assert results[1] is None                                  # rank 1 exited without a word
    r0 = results[0]
    assert r0["error"] == "DistributedFailure" and "rank 0 of 2" in r0["message"], r0
    assert r0["t_end"] - t0 < 60                              # the group's timeout is 20 s


def test_resume_after_a_kill_matches_on_two_ranks_and_on_one(backbone, tmp_path):
    import shutil
    cfg = dict(steps=6, batch_size=4, grad_accum=1, **CFG)
    full = _single(backbone, tmp_path / "full", cfg)
    results, _ = _run_ranks(backbone, tmp_path, [(cfg, "killed", False, {"ranks": [0, 1], "step": 4, "how": "raise"})])
    assert all(r is not None and "error" not in r for r in results), results
    assert len(read_log(tmp_path / "killed-rank0" / "log.csv")) == 4     # killed in the 5th step (checkpoint at 3)
    shutil.copytree(tmp_path / "killed-rank0", tmp_path / "one")
    results, _ = _run_ranks(backbone, tmp_path, [(cfg, "killed", True, None)])      # resumed on 2 ranks
    assert all(r is not None and "error" not in r for r in results), results
    assert _close(torch.load(tmp_path / "killed-state0.pt"), full)
    assert _close(_single(backbone, tmp_path / "one", cfg, resume=True), full)      # and on one process


def test_layerroute_train_runs_unchanged_under_torchrun(tmp_path):
    """The CLI under torchrun, 2 CPU processes on the demo model: rank 0 logs every step with
    the world size and the trainable gradients' bytes, and writes the adapter."""
    import subprocess
    import sys
    from layerroute_rt.cli import DEMO_DIR
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "layerroute_rt.cli", "train", "--model", str(DEMO_DIR), "--out", str(out),
           "--synthetic", "40", "--steps", "2", "--batch-size", "2", "--grad-accum", "1", "--warmup-steps", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("train: done at step 2") == 1                 # rank 0 alone prints
    log = read_log(out / "log.csv")
    trainable = sum(p.numel() for p in lr.load(DEMO_DIR).adapter_state_dict().values()) * 4
    assert [r["world_size"] for r in log] == [2, 2] and all(r["allreduce_bytes"] == trainable for r in log)
    assert (out / "adapter" / "adapter.safetensors").is_file()
