"""Training: loss falls and gates move; kill + resume is bit-for-bit; NaN steps are handled."""
import csv

import pytest
import torch

import layerroute_rt as lr
from layerroute_rt import train as train_mod
from layerroute_rt.train import TrainConfig, TrainingDiverged, lr_factor, train
from qwen_factory import save_random_qwen2


def toy_examples(n=48, seed=0):
    """Context + step; half the steps are a fixed pattern (easy), half random tokens (hard)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ctx = torch.randint(0, 257, (6,), generator=g).tolist()
        step = [10, 11, 12, 13] * 2 if i % 2 else torch.randint(0, 257, (8,), generator=g).tolist()
        out.append((ctx, step))
    return out


def collate(batch):
    width = max(len(c) + len(s) for c, s in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    attn = torch.zeros_like(ids, dtype=torch.bool)
    loss = torch.zeros_like(attn)
    for b, (c, s) in enumerate(batch):
        ids[b, :len(c) + len(s)] = torch.tensor(c + s)
        attn[b, :len(c) + len(s)] = True
        loss[b, len(c):len(c) + len(s)] = True
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path = tmp_path_factory.mktemp("train")
    save_random_qwen2(path, num_hidden_layers=2)
    return path


def read_log(path):
    with open(path) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


CFG = dict(batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=3, checkpoint_every=5)


def fixed_batch_eval(model, examples):
    batch = collate(examples)
    with torch.no_grad():
        out = model.train_forward(batch["input_ids"], labels=batch["input_ids"],
                                  attention_mask=batch["attention_mask"], loss_mask=batch["loss_mask"])
    return float(out.ce), float(out.gate_loss)


def test_short_run_lowers_loss_and_moves_gates(backbone, tmp_path):
    model = lr.load(backbone, config=lr.LayerRouteConfig(gate_lambda=1.0))
    examples = toy_examples()
    ce0, gate0 = fixed_batch_eval(model, examples)
    train(model, examples, collate, tmp_path, TrainConfig(steps=30, **{**CFG, "lr": 1e-2}),
          progress=False)
    ce1, gate1 = fixed_batch_eval(model, examples)
    assert ce1 < ce0 - 0.15, (ce0, ce1)
    assert gate1 < gate0 - 0.1, (gate0, gate1)
    log = read_log(tmp_path / "log.csv")
    assert len(log) == 30 and log[-1]["skip_rate"] > 0
    again = lr.load(backbone, adapter=tmp_path / "adapter")
    x = torch.tensor([[1, 2, 3, 10, 11]])
    assert torch.equal(again(x), model(x))


def test_killed_and_resumed_run_equals_uninterrupted(backbone, tmp_path, monkeypatch):
    cfg = TrainConfig(steps=12, **CFG)
    full = lr.load(backbone)
    train(full, toy_examples(), collate, tmp_path / "full", cfg, progress=False)

    killed = lr.load(backbone)
    real_append = train_mod._append_log

    def die_at_step_8(path, row):            # the run dies after step 8 was logged (ckpt at 5)
        real_append(path, row)
        if row["step"] == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_append_log", die_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(killed, toy_examples(), collate, tmp_path / "resumed", cfg, progress=False)
    monkeypatch.undo()
    resumed = lr.load(backbone)
    train(resumed, toy_examples(), collate, tmp_path / "resumed", cfg, resume=True, progress=False)
    a, b = full.adapter_state_dict(), resumed.adapter_state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert read_log(tmp_path / "full" / "log.csv") == read_log(tmp_path / "resumed" / "log.csv")


def test_resume_with_another_run_is_refused(backbone, tmp_path):
    model = lr.load(backbone)
    train(model, toy_examples(), collate, tmp_path, TrainConfig(steps=5, **CFG), progress=False)
    with pytest.raises(ValueError, match=r'another run.*"train_config.lr": \[0.003, 0.001\]'):
        train(model, toy_examples(), collate, tmp_path,
              TrainConfig(steps=5, **{**CFG, "lr": 1e-3}), resume=True, progress=False)
    with pytest.raises(ValueError, match=r'"train_config.steps": \[5, 10\]'):
        train(model, toy_examples(), collate, tmp_path, TrainConfig(steps=10, **CFG), resume=True,
              progress=False)
    other = lr.load(backbone, config=lr.LayerRouteConfig(gate_lambda=50.0))
    with pytest.raises(ValueError, match=r'"layerroute_config.gate_lambda": \[1.0, 50.0\]'):
        train(other, toy_examples(), collate, tmp_path, TrainConfig(steps=5, **CFG), resume=True,
              progress=False)
    with pytest.raises(ValueError, match=r'"data_fingerprint"'):
        train(model, toy_examples(seed=1), collate, tmp_path, TrainConfig(steps=5, **CFG), resume=True,
              progress=False)
    with pytest.raises(FileExistsError, match="holds an earlier run's checkpoint"):
        train(model, toy_examples(), collate, tmp_path, TrainConfig(steps=5, **CFG), progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(model, toy_examples(), collate, tmp_path / "none", TrainConfig(steps=5, **CFG),
              resume=True, progress=False)


@pytest.mark.parametrize("left_as", ["tmp", "old"])
def test_resume_after_a_kill_between_the_checkpoint_renames(backbone, tmp_path, monkeypatch, left_as):
    """atomic_dir renames the old checkpoint away, then the new one in: a kill in between leaves
    the complete new copy (.tmp) and the old one (.old) as hidden siblings and no checkpoint/.
    Resume takes the newest complete one."""
    cfg = TrainConfig(steps=10, **CFG)
    full = lr.load(backbone)
    train(full, toy_examples(), collate, tmp_path / "full", cfg, progress=False)

    real_append = train_mod._append_log

    def die_at_step_7(path, row):                   # the last checkpoint is the one of step 5
        real_append(path, row)
        if row["step"] == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_append_log", die_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(lr.load(backbone), toy_examples(), collate, tmp_path / "killed", cfg, progress=False)
    monkeypatch.undo()
    killed = tmp_path / "killed"
    (killed / "checkpoint").rename(killed / f".checkpoint.0123abcd.{left_as}")
    resumed = lr.load(backbone)
    train(resumed, toy_examples(), collate, killed, cfg, resume=True, progress=False)
    a, b = full.adapter_state_dict(), resumed.adapter_state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_nan_steps_are_skipped_then_stop_the_run(backbone, tmp_path, monkeypatch, capsys):
    model = lr.load(backbone)
    real = model.train_forward
    bad = {3, 4}

    def sometimes_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        if sometimes_nan.step in bad:
            out.loss = out.loss * float("nan")
        return out

    sometimes_nan.step = 0
    real_append = train_mod._append_log

    def count_steps(path, row):
        real_append(path, row)
        sometimes_nan.step = row["step"]

    snapshots = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def snapshot_then_clip(params, max_norm):       # called once per step, before any update
        snapshots[sometimes_nan.step] = [p.detach().clone() for p in params]
        return real_clip(params, max_norm)

    monkeypatch.setattr(model, "train_forward", sometimes_nan)
    monkeypatch.setattr(train_mod, "_append_log", count_steps)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", snapshot_then_clip)
    before = {n: p.detach().clone() for n, p in model.adapter_state_dict().items()}
    train(model, toy_examples(), collate, tmp_path / "a", TrainConfig(steps=6, max_bad_steps=2, **CFG),
          progress=False)
    log = read_log(tmp_path / "a" / "log.csv")
    assert [r["skipped_update"] for r in log] == [0, 0, 0, 1, 1, 0]
    assert "step 3: loss is nan (not finite); step skipped" in capsys.readouterr().err
    # bad steps 3 and 4 left the adapter as it was after step 2; step 2 and step 5 updated it
    assert all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[5]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))
    assert any(not torch.equal(p, before[n]) for n, p in model.adapter_state_dict().items())

    bad.update(range(5))
    sometimes_nan.step = 0
    with pytest.raises(TrainingDiverged, match="more than max_bad_steps=2"):
        train(model, toy_examples(), collate, tmp_path / "b",
              TrainConfig(steps=6, max_bad_steps=2, **CFG), progress=False)


def test_schedule_and_config_errors():
    cfg = TrainConfig(steps=100, warmup_steps=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == 1.0
    assert lr_factor(55, cfg) == pytest.approx(0.5) and lr_factor(100, cfg) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="TrainConfig.steps must be an integer >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="TrainConfig.lr must be > 0"):
        TrainConfig(lr=0.0)
