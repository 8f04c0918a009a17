"""Read a Hugging Face Qwen2 checkpoint directory, and write files so none is left half-written.

Backbone reading checks everything (file layout, tensor names, shapes, dtypes) before it reads any
tensor data, then reads tensor by tensor from the memory-mapped safetensors files, converting each
to the requested dtype and device on its own: the whole checkpoint is never held in memory at its
stored precision.

Safe writes go to a temporary sibling (same directory, so the same filesystem) that is fsynced
and then renamed over the target with `os.replace`, which is atomic: a reader sees the old file or
the new one, never a partial one. On an exception the temporary is removed and the target is kept.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import BackboneConfig

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_LIST_LIMIT = 5  # how many names an error message lists before "... and N more"

T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, malformed, or does not match the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint directory or file that should exist does not."""


# ---------------------------------------------------------------------------------------------
# Reading a backbone
# ---------------------------------------------------------------------------------------------

_HF_DIR = f"a Hugging Face model directory with {CONFIG_FILE} and {SAFETENSORS_FILE} or {INDEX_FILE}"


def _check_dir(path: str | os.PathLike, kind: str = "checkpoint directory", expected: str = _HF_DIR) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise CheckpointNotFoundError(f"{directory}: {kind} does not exist (expected {expected})")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected {expected})")
    return directory


def _read_json(file: Path) -> dict:
    """Parse a JSON object from `file`; errors name the file and, for bad JSON, the position."""
    try:
        with open(file, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: not valid UTF-8 JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_backbone_config(path: str | os.PathLike) -> BackboneConfig:
    """Read `<path>/config.json` of a Hugging Face Qwen2 checkpoint into a BackboneConfig."""
    file = _check_dir(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file}: missing (every Hugging Face model directory has one)")
    try:
        return BackboneConfig.from_dict(_read_json(file), source=str(file))
    except CheckpointError:
        raise
    except ValueError as e:  # from_dict's messages already name the file
        raise CheckpointError(str(e)) from e


def expected_backbone_shapes(cfg: BackboneConfig) -> dict[str, tuple[int, ...]]:
    """The Hugging Face Qwen2 tensor names and shapes for `cfg` (lm_head only when untied)."""
    d = cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    linear = cfg.linear_shapes()
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}.self_attn.{proj}.weight"] = linear[proj]
            if proj != "o_proj":  # Qwen2: q/k/v have biases, o_proj has none
                shapes[f"{prefix}.self_attn.{proj}.bias"] = (linear[proj][0],)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            shapes[f"{prefix}.mlp.{proj}.weight"] = linear[proj]
        shapes[f"{prefix}.input_layernorm.weight"] = (d,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def _some(items: list[str]) -> str:
    """The first few of `items` for an error message, and how many more there are."""
    shown = "; ".join(items[:_LIST_LIMIT])
    rest = len(items) - _LIST_LIMIT
    return shown + (f"; ... and {rest} more" if rest > 0 else "")


def _checkpoint_files(directory: Path) -> tuple[Path, list[Path]]:
    """(the file that names the checkpoint in errors, the safetensors files to read).

    A single `model.safetensors` wins over an index, as in transformers.
    """
    single = directory / SAFETENSORS_FILE
    if single.is_file():
        return single, [single]
    index = directory / INDEX_FILE
    if not index.is_file():
        raise CheckpointNotFoundError(
            f"{directory}: no weights found (expected {SAFETENSORS_FILE} or {INDEX_FILE})")
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: expected a 'weight_map' object mapping tensor name -> shard file")
    shards: dict[str, str] = {}  # shard file -> the first tensor the index places there
    for name, shard in weight_map.items():
        shards.setdefault(shard, name)
    for shard, name in shards.items():
        if not (directory / shard).is_file():
            raise CheckpointNotFoundError(
                f"{index}: shard file {shard} (which should hold {name}) does not exist in {directory}")
    return index, [directory / shard for shard in sorted(shards)]


def _guarded(file: Path, what: str, fn: Callable[..., T], *args: Any) -> T:
    """Call a safetensors function, turning its errors into a CheckpointError naming the file."""
    try:
        return fn(*args)
    except SafetensorError as e:
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({what}: {e})") from e


def load_backbone_tensors(path: str | os.PathLike, expected: dict[str, tuple[int, ...]],
                          dtype: torch.dtype, device: torch.device | str,
                          tied_embeddings: bool) -> dict[str, torch.Tensor]:
    """Load exactly the tensors in `expected` (name -> shape) from a checkpoint directory.

    Every check (missing, unexpected, shape, dtype) runs on the safetensors headers before any data
    is read. With `tied_embeddings`, a stored "lm_head.weight" is ignored (the embedding is the
    lm_head); rotary "inv_freq" buffers are always ignored. Tensors already of `dtype` on the CPU
    are returned as read, without a copy.
    """
    directory = _check_dir(path)
    source, files = _checkpoint_files(directory)
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(_guarded(
            file, "opening", safe_open, str(file), "pt", "cpu")) for file in files}
        where: dict[str, Path] = {}
        for file, handle in handles.items():
            for name in handle.keys():
                where.setdefault(name, file)

        missing = [name for name in expected if name not in where]
        if missing:
            raise CheckpointError(f"{source}: missing {len(missing)} tensor(s): {_some(missing)}")
        unexpected = [f"{name} (in {file.name})" for name, file in where.items()
                      if name not in expected and not name.endswith("inv_freq")
                      and not (tied_embeddings and name == "lm_head.weight")]
        if unexpected:
            raise CheckpointError(f"{source}: {len(unexpected)} unexpected tensor(s) for this "
                                  f"Qwen2 config: {_some(unexpected)}")
        problems = []
        for name, shape in expected.items():
            file = where[name]
            info = _guarded(file, f"reading the header of {name}", handles[file].get_slice, name)
            if tuple(info.get_shape()) != tuple(shape):
                problems.append(f"{name} in {file.name} has shape {tuple(info.get_shape())}, "
                                f"expected {tuple(shape)}")
            if not info.get_dtype().startswith(("F", "BF")):
                problems.append(f"{name} in {file.name} has non-floating dtype {info.get_dtype()}")
        if problems:
            raise CheckpointError(f"{source}: {len(problems)} tensor(s) do not match the config: "
                                  f"{_some(problems)}")

        return {name: _guarded(where[name], f"reading {name}", handles[where[name]].get_tensor, name)
                .to(device=device, dtype=dtype) for name in expected}


# ---------------------------------------------------------------------------------------------
# Safe writes
# ---------------------------------------------------------------------------------------------

def _temp_sibling(path: Path, kind: str) -> Path:
    """A hidden, unique name next to `path` (same filesystem, so os.replace is atomic)."""
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.{kind}"


def _fsync(path: Path) -> None:
    """Flush a file's (or, on POSIX, a directory's entries') data to disk."""
    if path.is_dir() and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on failure it is removed."""
    target = Path(path)
    tmp = _temp_sibling(target, "tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(target.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    with _atomic_file(path) as tmp, open(tmp, "x", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (and string `metadata`) as a safetensors file at `path` atomically."""
    with _atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it becomes `path`.

    An existing directory at `path` is renamed away, the new one renamed in, then the old one
    removed; if the second rename fails the old one is put back. On an exception in the body the
    temporary directory is removed and `path` is untouched. (A crash between the two renames leaves
    the old directory as a hidden `.<name>.*.old` sibling: POSIX has no atomic directory swap.)
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target}: exists and is not a directory")
    tmp = _temp_sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            _fsync(file)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists() or target.is_symlink():
        old = _temp_sibling(target, "old")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(target.parent)
    if old is not None:
        _remove(old)


# ---------------------------------------------------------------------------------------------
# Adapters: our format (routers + LoRA) and a PEFT LoRA export
# ---------------------------------------------------------------------------------------------

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_FORMAT = "layerroute_rt.adapter/1"
_ADAPTER_DIR = f"a directory written by save_adapter, with {ADAPTER_CONFIG_FILE} and {ADAPTER_FILE}"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
# The backbone fields that fix the adapter's tensor shapes.
_ADAPTER_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_key_value_heads", "head_dim")


def check_replaceable(path: str | os.PathLike, ours: set[str]) -> None:
    """Refuse to replace an existing directory that holds anything but the entries we write."""
    target = Path(path)
    if target.is_dir():
        foreign = sorted(p.name for p in target.iterdir() if p.name not in ours)
        if foreign:
            raise CheckpointError(f"{target}: exists and holds other files ({_some(foreign)}); "
                                  f"refusing to replace it: choose an empty or new directory")


def save_adapter(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 layerroute: dict, backbone: dict) -> None:
    """Write `<path>/adapter_config.json` and `<path>/adapter.safetensors` as one atomic directory
    (replacing an earlier adapter there, never a directory holding other files)."""
    check_replaceable(path, {ADAPTER_CONFIG_FILE, ADAPTER_FILE})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path) as tmp:
        save_file({n: t.detach().float().contiguous().cpu() for n, t in tensors.items()},
                  str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        with open(tmp / ADAPTER_CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump({"format": ADAPTER_FORMAT, "layerroute": layerroute, "backbone": backbone},
                      f, indent=2)


def read_adapter_config(path: str | os.PathLike, backbone: BackboneConfig) -> dict:
    """The LayerRouteConfig fields stored with an adapter, after checking it fits `backbone`."""
    directory = _check_dir(path, "adapter directory", _ADAPTER_DIR)
    file = directory / ADAPTER_CONFIG_FILE
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file}: missing (is {directory} a layerroute_rt adapter?)")
    obj = _read_json(file)
    if obj.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{file}: field 'format' is {obj.get('format')!r}, expected "
                              f"{ADAPTER_FORMAT!r}")
    for key in ("layerroute", "backbone"):
        if not isinstance(obj.get(key), dict):
            raise CheckpointError(f"{file}: field {key!r} must be an object")
    mismatched = [f"{k}: adapter {obj['backbone'].get(k)!r}, backbone {getattr(backbone, k)!r}"
                  for k in _ADAPTER_SHAPE_FIELDS if obj["backbone"].get(k) != getattr(backbone, k)]
    if mismatched:
        raise CheckpointError(f"{file}: the adapter was trained for another backbone shape "
                              f"({'; '.join(mismatched)})")
    return obj["layerroute"]


def load_adapter_tensors(path: str | os.PathLike,
                         expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Read `<path>/adapter.safetensors`, checking names and shapes against `expected`."""
    file = _check_dir(path, "adapter directory", _ADAPTER_DIR) / ADAPTER_FILE
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file}: missing")
    with _guarded(file, "opening", safe_open, str(file), "pt", "cpu") as handle:
        names = list(handle.keys())
        missing = [n for n in expected if n not in names]
        unexpected = [n for n in names if n not in expected]
        if missing or unexpected:
            raise CheckpointError(f"{file}: missing tensor(s): {_some(missing) or 'none'}; "
                                  f"unexpected tensor(s): {_some(unexpected) or 'none'}")
        tensors = {n: _guarded(file, f"reading {n}", handle.get_tensor, n) for n in expected}
    bad = [f"{n} has shape {tuple(t.shape)}, expected {tuple(expected[n])}"
           for n, t in tensors.items() if tuple(t.shape) != tuple(expected[n])]
    if bad:
        raise CheckpointError(f"{file}: {_some(bad)}")
    return tensors


def export_peft(path: str | os.PathLike, lora: dict[str, torch.Tensor], rank: int, alpha: float,
                targets: tuple[str, ...], base_model: str | None = None) -> None:
    """Write a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

    `lora` maps our names ("model.layers.0.self_attn.q_proj.lora_A") to tensors; PEFT names them
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight". Routers have no place in a
    PEFT LoRA adapter and are not exported: with PEFT the adapter runs every block.
    """
    check_replaceable(path, {ADAPTER_CONFIG_FILE, PEFT_WEIGHTS_FILE})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
        "init_lora_weights": True, "base_model_name_or_path": base_model,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path) as tmp:
        save_file({f"base_model.model.{n}.weight": t.detach().float().contiguous().cpu()
                   for n, t in lora.items()}, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        with open(tmp / ADAPTER_CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(peft_config, f, indent=2)
