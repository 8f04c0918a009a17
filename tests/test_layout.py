"""The layout draws the architecture (docs/DESIGN.md section 2): arrows only go down. The runtime
imports nothing from train, eval or serve; the model and the ops import nothing from the runtime
either. Checked on the source (every import statement, function-local ones included), so a lazy
import cannot hide an upward arrow."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "layerroute_rt"

# package -> the layerroute_rt packages it must never import
FORBIDDEN = {
    "ops": {"model", "runtime", "train", "eval", "serve", "data", "cli"},
    "model": {"runtime", "train", "eval", "serve", "data", "cli"},
    "runtime": {"train", "eval", "serve", "data", "cli"},
    "train": {"serve", "cli"},
    "eval": {"serve", "cli"},
    "serve": {"train", "eval", "cli"},
}


def imported_packages(path: Path, root: Path = PACKAGE) -> set[str]:
    """The layerroute_rt subpackages (first component after layerroute_rt) that `path` imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = path.relative_to(root.parent).with_suffix("").parts   # ("layerroute_rt", pkg, mod)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[:-1])
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "layerroute_rt" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_arrows_only_go_down(package):
    files = sorted((PACKAGE / package).rglob("*.py"))
    assert files, f"layerroute_rt/{package}/ has no modules"
    bad = {str(f.relative_to(PACKAGE.parent)): sorted(imported_packages(f) & FORBIDDEN[package])
           for f in files}
    bad = {f: pkgs for f, pkgs in bad.items() if pkgs}
    assert not bad, f"upward imports: {bad}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself: a relative and a function-local import of train and eval are found,
    and a sibling's is not."""
    probe = tmp_path / "layerroute_rt" / "runtime" / "engine.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..train.trainer import train\nfrom . import block\n"
                     "def f():\n    from ..eval import bfcl\n")
    assert imported_packages(probe, tmp_path / "layerroute_rt") == {"train", "eval", "runtime"}
