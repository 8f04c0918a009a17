"""Training: loss falls and gates move; kill + resume is bit-for-bit; NaN steps are handled."""
import csv

import pytest
import torch

import layerroute_rt as lr
from layerroute_rt.train import trainer as train_mod
from layerroute_rt.train.trainer import TrainConfig, TrainingDiverged, lr_factor, train
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
    with pytest.raises(ValueError, match="TrainConfig.snapshot_every must be None or an integer >= 1"):
        TrainConfig(snapshot_every=0)


def test_snapshots_keep_the_adapter_of_every_nth_step(backbone, tmp_path):
    model = lr.load(backbone)
    train(model, toy_examples(), collate, tmp_path, TrainConfig(steps=6, snapshot_every=3, **CFG),
          progress=False)
    snaps = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert snaps == ["step-00003", "step-00006"]
    last = lr.load(backbone, adapter=tmp_path / "snapshots" / "step-00006")
    mid = lr.load(backbone, adapter=tmp_path / "snapshots" / "step-00003")
    x = torch.tensor([[1, 2, 3, 10, 11]])
    assert torch.equal(last(x), model(x)) and not torch.equal(mid(x), model(x))
    log = read_log(tmp_path / "log.csv")
    assert all(0.0 <= r["context_skip_rate"] <= 1.0 for r in log)


# -- the quality-keeping additions: self-distillation, gate on step tokens, pinned blocks ------

def distill_setup(backbone):
    """A model with a random adapter, a toy batch, train_forward's scoring arguments, and the
    frozen base's logits on the scored positions (the distillation teacher)."""
    model = lr.load(backbone)
    model.randomize_adapter(seed=3)
    b = collate(toy_examples(4))
    args = dict(labels=b["input_ids"], attention_mask=b["attention_mask"], loss_mask=b["loss_mask"],
                full_logits=False)
    with torch.no_grad(), model.adapter_disabled():
        base = model.train_forward(b["input_ids"], tau=0.0, **args).scored_logits
    return model, b, args, base


def test_distill_is_the_kl_to_the_teacher(backbone):
    """KL(teacher || model) on the scored positions: 0 against itself, equal to the explicit sum
    against another teacher, and its weight scales what it adds to the loss."""
    model, b, args, base = distill_setup(backbone)
    with torch.no_grad():
        own = model.train_forward(b["input_ids"], **args).scored_logits
    same = model.train_forward(b["input_ids"], teacher_logits=own, distill_weight=1.0, **args)
    assert float(same.distill) == pytest.approx(0.0, abs=1e-6)
    out = model.train_forward(b["input_ids"], teacher_logits=base, distill_weight=0.5, **args)
    p_t = torch.softmax(base.double(), -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(out.scored_logits.double(), -1))).sum(-1).mean()
    assert float(out.distill) == pytest.approx(float(kl), rel=1e-4)
    assert float(out.distill) > 1e-3
    lr_cfg = model.lr_config
    assert float(out.loss) == pytest.approx(float(out.ce + lr_cfg.gate_lambda * out.gate_loss
                                                  + 0.5 * out.distill), rel=1e-5)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        model.train_forward(b["input_ids"], teacher_logits=base[:-1], distill_weight=1.0, **args)


def test_label_weight_weighs_each_position_in_the_kl(backbone):
    """label_weight [B, T]: weight x KL per scored position, summed and divided by their number;
    all ones is the unweighted KL."""
    model, b, args, base = distill_setup(backbone)
    with torch.no_grad():
        plain = model.train_forward(b["input_ids"], teacher_logits=base, distill_weight=1.0, **args)
        ones = model.train_forward(b["input_ids"], teacher_logits=base, distill_weight=1.0,
                                   label_weight=torch.ones(b["input_ids"].shape), **args)
        weight = torch.rand(b["input_ids"].shape, generator=torch.Generator().manual_seed(0)) * 3
        out = model.train_forward(b["input_ids"], teacher_logits=base, distill_weight=1.0,
                                  label_weight=weight, **args)
    assert float(ones.distill) == pytest.approx(float(plain.distill), rel=1e-6)
    p_t = torch.softmax(base.double(), -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(out.scored_logits.double(), -1))).sum(-1)
    tgt = (b["loss_mask"] & b["attention_mask"])[:, 1:] & b["attention_mask"][:, :-1]
    w = weight[:, 1:][tgt].double()                 # the weight of the label each row predicts
    assert float(out.distill) == pytest.approx(float((w * kl).sum() / kl.numel()), rel=1e-4)
    assert float(out.distill) != pytest.approx(float(plain.distill), rel=1e-3)
    with pytest.raises(ValueError, match="label_weight shape"):
        model.train_forward(b["input_ids"], teacher_logits=base, distill_weight=1.0,
                            label_weight=weight[:, 1:], **args)


def test_train_passes_the_batch_label_weight(backbone, tmp_path, monkeypatch):
    seen = []
    forward = lr.LayerRouteModel.train_forward

    def spy(self, *a, label_weight=None, **k):
        seen.append(label_weight)
        return forward(self, *a, label_weight=label_weight, **k)

    def weighted(batch):
        out = collate(batch)
        out["label_weight"] = torch.full(out["input_ids"].shape, 2.0)
        return out

    monkeypatch.setattr(lr.LayerRouteModel, "train_forward", spy)
    cfg = TrainConfig(steps=1, batch_size=2, grad_accum=1, distill_weight=1.0, warmup_steps=1)
    train(lr.load(backbone), toy_examples(4), weighted, tmp_path / "run", cfg, progress=False)
    student = [w for w in seen if w is not None]
    assert len(student) == 1 and (student[0] == 2.0).all()


def test_gate_on_step_counts_only_the_step_tokens(backbone):
    model = lr.load(backbone)
    model.randomize_adapter(seed=1)
    b = collate(toy_examples(4))
    mask = train_mod.route_mask(b, "token", "step")
    assert torch.equal(mask, b["loss_mask"].bool())
    assert train_mod.route_mask(b, "token", "all") is None
    with torch.no_grad():
        out = model.train_forward(b["input_ids"], attention_mask=b["attention_mask"], route_mask=mask)
    expected = (out.probs * mask.float()).sum() / (mask.sum() * len(model.blocks))
    assert float(out.gate_loss) == pytest.approx(float(expected), rel=1e-6)


def test_never_skip_pins_routers_and_trains_the_rest(backbone, tmp_path):
    model = lr.load(backbone, config=lr.LayerRouteConfig(gate_lambda=5.0))
    model.randomize_adapter(seed=2)                 # routers that skip: the teachers differ
    before = {n: p.detach().clone() for n, p in model.adapter_state_dict().items()}
    cfg = TrainConfig(steps=6, **CFG, never_skip=(1,), router_lr=1e-2, gate_on="step",
                      distill_weight=0.5, distill_teacher="self")
    train(model, toy_examples(), collate, tmp_path / "run", cfg, progress=False)
    router = model.blocks[1].router
    assert float(router.bias) == 30.0 and not router.weight.any()
    b = collate(toy_examples(8))
    with torch.no_grad():
        out = model.train_forward(b["input_ids"], attention_mask=b["attention_mask"], tau=1.0)
    assert out.executed[1][b["attention_mask"].bool()].all()        # runs even at tau 1
    after = model.adapter_state_dict()
    assert not torch.equal(after["model.layers.0.router.bias"], before["model.layers.0.router.bias"])
    rows = read_log(tmp_path / "run" / "log.csv")
    assert all(r["distill"] >= 0 for r in rows) and any(r["distill"] > 0 for r in rows)
    with pytest.raises(ValueError, match="never_skip"):
        train(lr.load(backbone), toy_examples(), collate, tmp_path / "bad",
              TrainConfig(steps=1, **CFG, never_skip=(7,)), progress=False)
    for bad in (dict(distill_weight=-1.0), dict(distill_teacher="x"), dict(gate_on="ctx"),
                dict(router_lr=0.0), dict(never_skip=(-1,))):
        with pytest.raises(ValueError, match="TrainConfig"):
            TrainConfig(**bad)


def test_agreement_term_makes_the_rows_agree(backbone, tmp_path):
    """The same run with and without agree_lambda (routers randomized alike, so p varies across
    tokens from the start): with it, the per-block variance of p over the tokens ends lower, and
    the log records the term."""
    b = collate(toy_examples(8))

    def run(agree, name):
        model = lr.load(backbone, config=lr.LayerRouteConfig(gate_lambda=0.5, agree_lambda=agree))
        model.randomize_adapter(seed=4)
        train(model, toy_examples(), collate, tmp_path / name, TrainConfig(steps=12, **CFG, router_lr=1e-1),
              progress=False)
        with torch.no_grad():
            out = model.train_forward(b["input_ids"], attention_mask=b["attention_mask"])
        return float(out.agree_loss), read_log(tmp_path / name / "log.csv")

    free, free_log = run(0.0, "free")
    agreed, log = run(50.0, "agree")
    assert agreed < 0.85 * free                     # 0.047 against 0.064 here
    assert "agree" in log[0] and "agree" not in free_log[0]
    assert log[-1]["agree"] < log[0]["agree"]
