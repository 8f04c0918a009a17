"""Every reference to docs/DESIGN.md in the code names a section that exists there, and no
reference points to a DESIGN.md outside the repository."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("layerroute_rt", "python_kernels", "csrc", "benchmarks", "scripts", "tests")
           for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh", ".cu", ".cpp", ".h")
           and "fixtures" not in p.parts] + [ROOT / "README.md", ROOT / "setup.py"]
# "DESIGN.md section 4", the words possibly broken over a comment or docstring line
REFERENCE = re.compile(r"DESIGN\.md(?:[\s#*]+section\s+(\d+))?")


def references():
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for m in REFERENCE.finditer(text):
            yield path, text.count("\n", 0, m.start()) + 1, text[max(0, m.start() - 9):m.start()], m.group(1)


def test_the_scanner_reads_a_reference_broken_over_lines():
    text = '"""masks the logits (docs/DESIGN.md\n    section 6), as"""\n# see docs/DESIGN.md\n# section 4'
    assert [m.group(1) for m in REFERENCE.finditer(text)] == ["6", "4"]


def test_design_references_name_sections_that_exist():
    design = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^## (\d+)\. ", design, flags=re.M))
    assert sections, "docs/DESIGN.md has no numbered sections"
    refs = list(references())
    assert len(refs) > 10, "expected the code to cite docs/DESIGN.md"
    missing = [f"{p.relative_to(ROOT)}:{line}: section {n}" for p, line, _, n in refs if n and n not in sections]
    assert not missing, f"references to sections docs/DESIGN.md lacks: {missing}"
    elsewhere = [f"{p.relative_to(ROOT)}:{line}" for p, line, before, _ in refs
                 if not before.endswith("docs/") and p.name != "test_docs.py"]
    assert not elsewhere, f"references to a DESIGN.md that is not docs/DESIGN.md: {elsewhere}"


def test_the_readme_results_table_is_built_from_the_result_files():
    """README.md's table equals what benchmarks/results_table.py builds from the JSON files,
    wherever the clone is (another $HOME included)."""
    import os
    import subprocess
    import sys
    for home in (os.environ.get("HOME", "/root"), "/home/elsewhere"):
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "results_table.py"), "--check"],
                             cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HOME": home})
        assert out.returncode == 0, out.stderr


def test_the_readme_stays_short_and_links_what_it_left_out():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    for doc in ("docs/DESIGN.md", "docs/api.md", "docs/serving.md", "docs/training.md",
                "docs/benchmarks.md", "docs/experiments.md"):
        assert f"]({doc})" in text and (ROOT / doc).is_file(), doc


def test_run_all_reruns_each_result_file_by_its_own_command(monkeypatch, tmp_path):
    """benchmarks/run_all.py --cpu lists one command per CPU result file, the file's own
    recorded command, with a recorded cache path mapped to this machine's cache."""
    import json
    import subprocess
    import sys
    monkeypatch.setenv("LAYERROUTE_CACHE", str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--cpu", "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, env={**__import__("os").environ})
    assert out.returncode == 0, out.stderr
    listed = dict(line.split(": ", 1) for line in out.stdout.splitlines())
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert sorted(listed) == [str(f.relative_to(ROOT)) for f in files]
    for f in files:
        command = json.loads(f.read_text())["command"]
        expected = command.replace("/root/.cache/layerroute_rt", str(tmp_path))
        assert listed[str(f.relative_to(ROOT))] == expected.strip()
