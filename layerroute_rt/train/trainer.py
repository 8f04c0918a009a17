"""Training routers + LoRA on a frozen backbone (the method's recipe by default).

AdamW on the trainable tensors only (routers and LoRA, float32), a cosine schedule with linear
warm-up, batch x grad-accum micro-batches per optimizer step, loss = CE on the steps' own tokens
+ gate_lambda x gate term (+ agree_lambda x the batch-agreement term; LayerRouteConfig). bf16
autocast on CUDA. A step whose loss is NaN or inf is skipped (no update) and reported; more than
`max_bad_steps` stop the run.

Checkpoints are directories written atomically every `checkpoint_every` steps: the adapter
(model.save_adapter) plus trainer_state.pt (optimizer, schedule, step, data position, RNG).
With `snapshot_every`, the adapter of every n-th step is also kept, in snapshots/step-NNNNN
(atomically), so that checkpoints can be screened after the run.
`resume=True` continues from the last checkpoint exactly: on CPU the adapter after a killed and
resumed run equals that of an uninterrupted run bit for bit (the data order is a pure function of
the seed and the step).

Under torch.distributed (torchrun; init_distributed() sets up the process group): the step's
examples (batch_size x grad_accum, the same global batch at every world size, so a run resumes
at another world size) are shared out over the ranks, whole micro-batches where grad_accum
divides by the world size (the sum is the single-process one), else each micro-batch split in
equal parts (batch_size must then divide; equal to one process where the examples score as
many tokens). DistributedDataParallel wraps the trainable tensors only (_Trainable: routers and
LoRA): the frozen backbone is neither broadcast nor all-reduced, and one all-reduce of the
trainable gradients per step is the traffic (the log's allreduce_bytes). The gates are
deterministic (no router noise), so the ranks differ only in their data. Rank 0 alone writes the
log, the checkpoints and the adapter, and reads the checkpoint on resume (sent to the others:
no shared file system needed); only it shows the progress bar. A collective that fails (a rank
died, or the process group's timeout passed) raises DistributedFailure naming this rank.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..model import checkpoint
from ..model.modeling import LayerRouteModel

STATE_FILE = "trainer_state.pt"
CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "log.csv"


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    checkpoint_every: int = 200
    snapshot_every: int | None = None  # also keep the adapter of every n-th step, in
                                       # snapshots/step-NNNNN (for screening checkpoints)
    max_bad_steps: int = 10
    seed: int = 0
    # Quality-keeping additions to CE + gate term (all off by default: the method's recipe).
    distill_weight: float = 0.0     # + w x KL(teacher || model) on the step tokens
    distill_teacher: str = "base"   # "base": the frozen dense backbone (no LoRA, tau 0);
                                    # "self": this model run dense (tau 0), detached
    gate_on: str = "all"            # token granularity: "all" tokens or only the "step" tokens
                                    # count in the gate term
    never_skip: tuple[int, ...] = ()   # blocks whose routers are pinned to run (p = 1), untrained
    router_lr: float | None = None  # the routers' learning rate (default: lr)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {v!r}")
        if self.snapshot_every is not None and (isinstance(self.snapshot_every, bool)
                                                or not isinstance(self.snapshot_every, int)
                                                or self.snapshot_every < 1):
            raise ValueError(f"TrainConfig.snapshot_every must be None or an integer >= 1, "
                             f"got {self.snapshot_every!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.warmup_steps < 0 or self.max_bad_steps < 0:
            raise ValueError("TrainConfig.warmup_steps and max_bad_steps must be >= 0")
        if self.distill_weight < 0:
            raise ValueError(f"TrainConfig.distill_weight must be >= 0, got {self.distill_weight!r}")
        if self.distill_teacher not in ("base", "self"):
            raise ValueError(f"TrainConfig.distill_teacher must be 'base' or 'self', got {self.distill_teacher!r}")
        if self.gate_on not in ("all", "step"):
            raise ValueError(f"TrainConfig.gate_on must be 'all' or 'step', got {self.gate_on!r}")
        object.__setattr__(self, "never_skip", tuple(self.never_skip))
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.never_skip):
            raise ValueError(f"TrainConfig.never_skip must be block indices >= 0, got {self.never_skip!r}")
        if self.router_lr is not None and not self.router_lr > 0:
            raise ValueError(f"TrainConfig.router_lr must be > 0, got {self.router_lr!r}")


class TrainingDiverged(RuntimeError):
    """Too many steps had a NaN or infinite loss."""


class DistributedFailure(RuntimeError):
    """A collective with the other ranks failed: one of them died, or the timeout passed."""


def init_distributed(device: str = "cpu", timeout_s: float = 300.0) -> tuple[int, int, str]:
    """Under torchrun (WORLD_SIZE > 1 in the environment): join the process group (nccl on
    CUDA, gloo on CPU) with a timeout on every collective, and return (rank, world size, this
    rank's device: cuda:LOCAL_RANK for "cuda"). Without it: (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


@dataclass(frozen=True)
class _World:
    rank: int = 0
    size: int = 1


def _world() -> _World:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return _World(dist.get_rank(), dist.get_world_size())
    return _World()


def _check_world(cfg: TrainConfig, world: _World) -> None:
    if world.size > 1 and cfg.grad_accum % world.size and cfg.batch_size % world.size:
        raise ValueError(f"train: the step's {cfg.batch_size} x {cfg.grad_accum} examples cannot be shared "
                         f"out over {world.size} ranks: grad_accum or batch_size must be a multiple of the "
                         f"world size")


def _rank_micro_batches(n_examples: int, step: int, cfg: TrainConfig, world: _World) -> tuple[list[list[int]], float]:
    """This rank's micro-batches of optimizer step `step`, and the weight of each one's loss
    (DDP averages the ranks' gradients)."""
    micros = _batch_indices(n_examples, step, cfg)
    W, G = world.size, cfg.grad_accum
    if W == 1:
        return micros, 1.0 / G
    if G % W == 0:                        # whole micro-batches: the sum of one process, x W / W
        return micros[world.rank::W], W / G
    k = cfg.batch_size // W               # each micro-batch in W equal parts
    return [m[world.rank * k:(world.rank + 1) * k] for m in micros], 1.0 / G


class _Trainable(torch.nn.Module):
    """What DistributedDataParallel wraps: the trainable tensors only (a ParameterList of the
    routers and LoRA); the model is held outside the module tree, so DDP neither broadcasts nor
    all-reduces the frozen backbone. forward is the model's train_forward."""

    def __init__(self, model: LayerRouteModel, params: list[torch.nn.Parameter]):
        super().__init__()
        self.trainable = torch.nn.ParameterList(params)
        object.__setattr__(self, "model", model)

    def forward(self, input_ids, **kw):
        return self.model.train_forward(input_ids, **kw)


def _on_rank0(world: _World, fn: Callable[[], object]):
    """fn() on rank 0, its result (or its exception) sent to every rank."""
    if world.size == 1:
        return fn()
    import torch.distributed as dist
    box = [None]
    if world.rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:          # every rank raises it
            box[0] = ("error", e)
    _collective(world, "broadcast", lambda: dist.broadcast_object_list(box, src=0))
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def _collective(world: _World, what: str, fn: Callable[[], object]):
    try:
        return fn()
    except Exception as e:
        if world.size == 1:
            raise
        raise DistributedFailure(f"train: rank {world.rank} of {world.size}: {what} with the other ranks "
                                 f"failed (one of them died, or the process group's timeout passed): "
                                 f"{type(e).__name__}: {e}") from e


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at cfg.steps (step counts from 0)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batch_indices(n_examples: int, step: int, cfg: TrainConfig) -> list[list[int]]:
    """The micro-batches of optimizer step `step`: a pure function of (seed, step), so a
    resumed run reads exactly the data the uninterrupted one would have. Each epoch is a
    permutation seeded by (seed, epoch)."""
    per_step = cfg.batch_size * cfg.grad_accum
    perms: dict[int, list[int]] = {}
    flat = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, k = divmod(pos, n_examples)
        if epoch not in perms:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(n_examples, generator=g).tolist()
        flat.append(perms[epoch][k])
    return [flat[i:i + cfg.batch_size] for i in range(0, per_step, cfg.batch_size)]


def route_mask(batch: dict, granularity: str, gate_on: str = "all") -> torch.Tensor | None:
    """The tokens a `sequence` router averages: the step's context (the prompt), as at
    inference, where the decision is made when the prompt is prefilled. Under `token`: the tokens
    whose p counts in the gate term, None for all of them, the step's own with gate_on "step"."""
    if granularity != "sequence":
        return batch["loss_mask"].bool() if gate_on == "step" else None
    attn = batch["attention_mask"].bool()
    context = attn & ~batch["loss_mask"].bool()
    return torch.where(context.any(1, keepdim=True), context, attn)   # no context: the step


def train(model: LayerRouteModel, examples: Sequence, collate: Callable[[list], dict],
          out_dir: str | os.PathLike, config: TrainConfig | None = None, resume: bool = False,
          progress: bool = True) -> dict:
    """Train `model`'s routers and LoRA on `examples`; returns the final log row.

    collate(list of examples) -> dict with input_ids [B, T], attention_mask [B, T] and
    loss_mask [B, T] (the label positions that count: the step's own tokens).
    out_dir receives log.csv, checkpoint/ (the latest, atomic) and adapter/ (the final adapter).
    """
    cfg = config or TrainConfig()
    if len(examples) == 0:
        raise ValueError("train: no training examples")
    world = _world()
    _check_world(cfg, world)
    writer = world.rank == 0
    out = Path(out_dir)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    device = model.model.embed_tokens.weight.device
    pin_routers(model, cfg.never_skip)
    routers = [p for n, p in model.named_parameters() if p.requires_grad and ".router." in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and ".router." not in n]
    params = routers + lora
    opt = torch.optim.AdamW([{"params": lora, "lr": cfg.lr},
                             {"params": routers, "lr": cfg.router_lr or cfg.lr}],
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    start, bad_steps = 0, 0
    run = {"layerroute_config": model.lr_config.to_dict(), "n_examples": len(examples),
           "data_fingerprint": _fingerprint(examples)}
    if resume:
        shapes = {n: tuple(p.shape) for n, p in model.adapter_state_dict().items()}
        state = _on_rank0(world, lambda: _read_state(_checkpoint_dir(out), cfg, run, shapes))
        start, bad_steps = _apply_state(model, opt, sched, state)
        if writer:
            _truncate_log(out / LOG_FILE, start)
    else:
        def fresh():
            if _checkpoint_dir(out, required=False) is not None:
                raise FileExistsError(f"train: {out / CHECKPOINT_DIR} holds an earlier run's checkpoint; "
                                      f"pass resume=True (--resume) to continue it, or choose a new output "
                                      f"directory")
            (out / LOG_FILE).unlink(missing_ok=True)
        _on_rank0(world, fresh)
    ddp, allreduce_bytes = None, [0]
    if world.size > 1:                    # after the resume: DDP sends rank 0's tensors to all
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        ddp = torch.nn.parallel.DistributedDataParallel(
            _Trainable(model, params), device_ids=[device.index] if device.type == "cuda" else None)

        def counted_allreduce(_, bucket):
            allreduce_bytes[0] += bucket.buffer().numel() * bucket.buffer().element_size()
            return default_hooks.allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, counted_allreduce)
    forward = ddp if ddp is not None else model.train_forward
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
        torch.autocast("cpu", enabled=False)

    row: dict = {}
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (progress and writer),
               desc="train")
    for step in bar:
        opt.zero_grad(set_to_none=True)
        lr_now = sched.get_last_lr()[0]
        totals = torch.zeros(7, dtype=torch.float64)  # loss, ce, gate, skip rate, distill, context skip, agree
        micros, weight = _rank_micro_batches(len(examples), step, cfg, world)
        allreduce_bytes[0] = 0
        for m_i, micro in enumerate(micros):
            last = m_i == len(micros) - 1
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in collate([examples[i] for i in micro]).items()}
            args = dict(labels=batch["input_ids"], attention_mask=batch["attention_mask"],
                        loss_mask=batch["loss_mask"],
                        route_mask=route_mask(batch, model.lr_config.granularity, cfg.gate_on),
                        full_logits=False)
            with autocast:
                teacher = _teacher_logits(model, batch["input_ids"], args, cfg) \
                    if cfg.distill_weight > 0 else None
                with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                    res = forward(batch["input_ids"], teacher_logits=teacher, distill_weight=cfg.distill_weight,
                                  label_weight=batch.get("label_weight"), **args)
            if ddp is not None and last:  # this backward all-reduces the trainable gradients
                _collective(world, "the gradient all-reduce", lambda: (res.loss * weight).backward())
            else:
                with ddp.no_sync() if ddp is not None else contextlib.nullcontext():
                    (res.loss * weight).backward()
            scored = batch["attention_mask"].bool() & batch["loss_mask"].bool()
            skip = 1.0 - res.executed[:, scored].float().mean()       # on the steps' own tokens
            context = batch["attention_mask"].bool() & ~batch["loss_mask"].bool()
            skip_ctx = 1.0 - res.executed[:, context].float().mean() if bool(context.any()) \
                else torch.zeros((), device=device)
            distill = res.distill.detach() if res.distill is not None else torch.zeros((), device=device)
            totals += torch.stack([res.loss.detach().double(), res.ce.detach().double(),
                                   res.gate_loss.detach().double(), skip.double(),
                                   distill.double(), skip_ctx.double(),
                                   res.agree_loss.detach().double()]).cpu() * (weight / world.size)
        if world.size > 1:               # the step's means over every rank's examples
            import torch.distributed as dist
            _collective(world, "the log's all-reduce", lambda: dist.all_reduce(totals))
        loss, ce, gate, skip, distill, skip_ctx, agree = totals.tolist()
        # One norm over all gradients: it clips, and it is not finite iff some gradient is not.
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
        finite = math.isfinite(loss) and bool(torch.isfinite(norm))
        if finite:
            opt.step()
        else:
            bad_steps += 1
            tqdm.write(f"train: step {step}: loss is {loss} (not finite); step skipped "
                       f"({bad_steps}/{cfg.max_bad_steps} allowed)", file=sys.stderr)
            if bad_steps > cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"train: {bad_steps} steps had a NaN or infinite loss (more than "
                    f"max_bad_steps={cfg.max_bad_steps}); last good checkpoint in {out / CHECKPOINT_DIR}")
        sched.step()
        row = {"step": step + 1, "loss": loss, "ce": ce, "gate": gate, "skip_rate": skip,
               "context_skip_rate": skip_ctx, "distill": distill, "lr": lr_now,
               "skipped_update": int(not finite)}
        if model.lr_config.agree_lambda > 0:
            row["agree"] = agree
        if world.size > 1:
            row["world_size"], row["allreduce_bytes"] = world.size, allreduce_bytes[0]
        if not writer:
            continue
        _append_log(out / LOG_FILE, row)
        bar.set_postfix(loss=f"{loss:.3f}", skip=f"{skip:.2f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_state(model, opt, sched, out / CHECKPOINT_DIR, step + 1, bad_steps, cfg, run)
        if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0:
            (out / "snapshots").mkdir(exist_ok=True)
            model.save_adapter(out / "snapshots" / f"step-{step + 1:05d}")     # atomic
    if writer:
        model.save_adapter(out / "adapter")
        checkpoint.atomic_write_json(out / "train_config.json", asdict(cfg))
    return row


def pin_routers(model: LayerRouteModel, blocks: Sequence[int]) -> None:
    """The routers of `blocks` always run their block (weight 0, bias 30: p = 1 in float32, which
    passes every tau in [0, 1]) and are left out of training."""
    bad = [i for i in blocks if not 0 <= i < len(model.blocks)]
    if bad:
        raise ValueError(f"never_skip: blocks {bad} do not exist (the model has {len(model.blocks)})")
    with torch.no_grad():
        for i in blocks:
            router = model.blocks[i].router
            router.weight.zero_()
            router.bias.fill_(30.0)
            router.requires_grad_(False)


@torch.no_grad()
def _teacher_logits(model: LayerRouteModel, input_ids: torch.Tensor, args: dict,
                    cfg: TrainConfig) -> torch.Tensor:
    """The distillation teacher's logits on the scored positions: the model run dense (tau 0),
    with its LoRA ("self") or without it ("base": the frozen backbone)."""
    context = model.adapter_disabled() if cfg.distill_teacher == "base" else contextlib.nullcontext()
    with context:
        return model.train_forward(input_ids, tau=0.0, **args).scored_logits


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log rows up to `step` (those after the checkpoint are run again on resume)."""
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    os.replace(tmp, path)


def _append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _fingerprint(examples: Sequence) -> str:
    """A hash of the training data, so that a resumed run is known to read the same examples."""
    h = hashlib.sha256()
    for e in examples:
        ids = e["input_ids"] if isinstance(e, dict) else getattr(e, "input_ids", e)
        if isinstance(ids, torch.Tensor):          # repr would elide the middle of a long one
            ids = ids.tolist()
        h.update(repr(ids).encode())
    return h.hexdigest()


def _checkpoint_dir(out: Path, required: bool = True) -> Path | None:
    """out/checkpoint; if a kill fell between atomic_dir's two renames, the complete new copy
    (a hidden .tmp sibling, fsynced before the renames) or else the old one (.old)."""
    path = out / CHECKPOINT_DIR
    if (path / STATE_FILE).is_file():
        return path
    for kind in ("tmp", "old"):
        found = sorted(out.glob(f".{CHECKPOINT_DIR}.*.{kind}"), key=lambda p: p.stat().st_mtime)
        found = [p for p in found if (p / STATE_FILE).is_file() and (p / "adapter").is_dir()]
        if found and not path.exists():
            return found[-1]
    if required:
        raise FileNotFoundError(f"train --resume: no checkpoint at {path} ({STATE_FILE} missing)")
    return None


def _save_state(model, opt, sched, path: Path, step: int, bad_steps: int, cfg: TrainConfig,
                run: dict) -> None:
    """The adapter and everything a resumed run needs, as one atomically written directory."""
    checkpoint.check_replaceable(path, {"adapter", STATE_FILE})
    with checkpoint.atomic_dir(path) as tmp:
        model.save_adapter(tmp / "adapter")
        torch.save({"step": step, "bad_steps": bad_steps, "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "train_config": asdict(cfg), **run},
                   tmp / STATE_FILE)


def _read_state(path: Path, cfg: TrainConfig, run: dict, shapes: dict) -> dict:
    """The checkpoint at `path` (checked to be this run's), with its adapter tensors."""
    state = torch.load(path / STATE_FILE, weights_only=True)
    saved = {**{f"train_config.{k}": v for k, v in state["train_config"].items()},
             **{f"layerroute_config.{k}": v for k, v in (state.get("layerroute_config") or {}).items()},
             "n_examples": state.get("n_examples"), "data_fingerprint": state.get("data_fingerprint")}
    now = {**{f"train_config.{k}": v for k, v in asdict(cfg).items()},
           **{f"layerroute_config.{k}": v for k, v in run["layerroute_config"].items()},
           "n_examples": run["n_examples"], "data_fingerprint": run["data_fingerprint"]}
    diff = {k: [saved.get(k), now[k]] for k in now if saved.get(k) != now[k]}
    if diff:
        raise ValueError(f"train --resume: {path / STATE_FILE} was written by another run "
                         f"(saved, now): {json.dumps(diff, default=str)[:2000]}")
    state["adapter"] = checkpoint.load_adapter_tensors(path / "adapter", shapes)
    return state


def _apply_state(model, opt, sched, state: dict) -> tuple[int, int]:
    with torch.no_grad():
        for name, p in model.adapter_state_dict().items():
            p.copy_(state["adapter"][name])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return state["step"], state["bad_steps"]
