"""The README's main job: `layerroute demo`."""
import re

from layerroute_rt import cli


def test_demo_builds_a_model_and_prints_the_skip_map(capsys):
    assert cli.main(["demo", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    # the last of the 5 new tokens is never fed back through the blocks: 4 columns after '|'
    assert len(re.findall(r"^  block +\d+  [#.]+\|[#.]{4}$", out, flags=re.M)) == cli.DEMO_SHAPE["num_hidden_layers"]
    assert re.search(r"FLOPs skipped: \d+\.\d% of block FLOPs", out)
    assert "ms/token" in out


def test_demo_on_a_checkpoint_directory(tmp_path, capsys):
    cli.build_demo_backbone(tmp_path / "m", seed=1)
    assert cli.main(["demo", "--model", str(tmp_path / "m"), "--prompt-ids", "1", "2", "3",
                     "--max-new-tokens", "3", "--skip-layers", "0", "1"]) == 0
    out = capsys.readouterr().out
    assert "routers: fresh" in out
    assert re.search(r"^  block  0  \.\.\.\|\.\.$", out, flags=re.M)
    assert re.search(r"^  block  2  ###\|##$", out, flags=re.M)


def test_demo_reports_a_bad_directory(tmp_path, capsys):
    assert cli.main(["demo", "--model", str(tmp_path / "missing")]) == 2
    assert "checkpoint directory does not exist" in capsys.readouterr().err
