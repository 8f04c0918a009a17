"""Regenerate benchmarks/results/ with one command: each result file's own recorded command,
run again in turn (the file records the command that wrote it, so this cannot drift from it).

    python -m benchmarks.run_all --cpu [--dry-run] [--only NAME ...]

--cpu runs the files measured on the CPU (every file today: no GPU has run this project);
the GPU checks are `benchmarks/gpu_checks.sh`. Commands that name the real model need
`layerroute fetch` first. Afterwards `python benchmarks/results_table.py` rebuilds the
README's table. One failed command does not stop the others; the exit status says whether
all ran.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# a recorded path into the cache of the machine that ran it (`layerroute fetch`'s cache)
_CACHE = re.compile(r"^(~|/[^ ]*?)/\.cache/layerroute_rt(?=/|$)")


def local_arg(arg: str) -> str:
    """A recorded argument with a path into another machine's layerroute cache made this one's."""
    sys.path.insert(0, str(ROOT))
    from layerroute_rt.model.real_model import cache_dir
    return _CACHE.sub(lambda _: str(cache_dir()), arg)


def recorded() -> list[tuple[Path, str, str]]:
    """(result file, its device, its command as argv text) for every JSON result file."""
    out = []
    for path in sorted(RESULTS.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        command = record.get("command")
        if not isinstance(command, str) or not command.startswith("benchmarks/"):
            raise SystemExit(f"{path}: field 'command' must hold the benchmarks/ command that wrote it, "
                             f"got {command!r}")
        out.append((path, str(record.get("device", "")), command))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="the CPU-measured result files")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--only", nargs="+", metavar="NAME", help="result file names (stem) to rerun")
    args = p.parse_args(argv)
    if not args.cpu:
        p.error("pass --cpu (the GPU checks are benchmarks/gpu_checks.sh)")
    jobs = [(path, cmd) for path, device, cmd in recorded()
            if device.lower().startswith("cpu") and (not args.only or path.stem in args.only)]
    if args.only and len(jobs) != len(args.only):
        known = sorted(p.stem for p, _, _ in recorded())
        p.error(f"--only: unknown or non-CPU result files among {args.only}; known: {known}")
    failed = []
    for path, cmd in jobs:
        argv_ = [sys.executable] + [os.path.expanduser(local_arg(a)) for a in shlex.split(cmd)]
        print(f"{path.relative_to(ROOT)}: {' '.join(argv_[1:])}", flush=True)
        if args.dry_run:
            continue
        if subprocess.run(argv_, cwd=ROOT).returncode != 0:
            failed.append(path.name)
    if failed:
        print(f"run_all: these commands failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
