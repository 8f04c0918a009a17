"""The README's main job: `layerroute demo`."""
import json
import re

from layerroute_rt import cli
from qwen_factory import save_random_qwen2


def test_demo_runs_the_bundled_model(capsys):
    assert cli.main(["demo", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    n_blocks = json.loads((cli.DEMO_DIR / "config.json").read_text())["num_hidden_layers"]
    assert "=== tool_call:" in out and "=== planning:" in out
    assert len(re.findall(r"^  block +\d+  [#.]+\|[#.]*$", out, flags=re.M)) == 2 * n_blocks
    assert len(re.findall(r"on the generated tokens: skip rate \d\.\d+, \d+\.\d% of block FLOPs", out)) == 2
    assert "ms per step" in out


def test_demo_on_a_checkpoint_directory(tmp_path, capsys):
    save_random_qwen2(tmp_path / "m", seed=1)
    assert cli.main(["demo", "--model", str(tmp_path / "m"), "--prompt-ids", "1", "2", "3",
                     "--max-new-tokens", "3", "--skip-layers", "0", "1"]) == 0
    out = capsys.readouterr().out
    assert "routers: fresh" in out
    assert re.search(r"^  block  0  \.\.\.\|\.\.$", out, flags=re.M)
    assert re.search(r"^  block  2  ###\|##$", out, flags=re.M)


def test_demo_reports_a_bad_directory(tmp_path, capsys):
    assert cli.main(["demo", "--model", str(tmp_path / "missing")]) == 2
    assert "checkpoint directory does not exist" in capsys.readouterr().err


def test_demo_flags_override_the_adapter(tmp_path, capsys, monkeypatch):
    import layerroute_rt as lr

    model_dir = tmp_path / "m"
    save_random_qwen2(model_dir, seed=1)
    lr.load(model_dir, config=lr.LayerRouteConfig(granularity="sequence")).save_adapter(tmp_path / "a")
    seen = {}
    real = cli.generate

    def spy(model, *args, **kwargs):
        seen["config"] = model.lr_config
        return real(model, *args, **kwargs)

    monkeypatch.setattr(cli, "generate", spy)
    argv = ["demo", "--model", str(model_dir), "--adapter", str(tmp_path / "a"), "--prompt-ids", "1", "2",
            "--max-new-tokens", "2"]
    assert cli.main(argv) == 0
    assert seen["config"].granularity == "sequence" and seen["config"].kv_policy == "compute"
    assert cli.main(argv + ["--kv-policy", "drop", "--tau", "0.3"]) == 0
    assert (seen["config"].granularity, seen["config"].kv_policy, seen["config"].tau) == ("sequence", "drop", 0.3)


def test_demo_text_prompt_needs_a_tokenizer(tmp_path, capsys):
    save_random_qwen2(tmp_path / "m", seed=1)
    assert cli.main(["demo", "--model", str(tmp_path / "m"), "--prompt", "hello"]) == 2
    assert "has no tokenizer (tokenizer.json): pass --prompt-ids" in capsys.readouterr().err


def test_train_and_eval_commands(tmp_path, capsys):
    import json

    import transformers

    from layerroute_rt import data

    texts = [data.render_trajectory(t) for t in data.generate_trajectories(30, seed=3)]
    tok = data.train_tokenizer(texts, vocab_size=400)
    model_dir = tmp_path / "m"
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--synthetic", "20", "--max-length", "192", "--batch-size", "2",
              "--grad-accum", "1", "--steps", "2", "--warmup-steps", "1", "--checkpoint-every", "2",
              "--heldout", "0.3"]
    assert cli.main(["train", "--out", str(tmp_path / "t"), *common]) == 0
    assert (tmp_path / "t" / "adapter" / "adapter.safetensors").exists()
    assert cli.main(["eval", "--out", str(tmp_path / "e"), "--adapter", str(tmp_path / "t" / "adapter"),
                     *common]) == 0
    report = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert set(report["per_seed"]["adapter"]) == {"heldout", "length_matched"}
    assert cli.main(["eval", "--out", str(tmp_path / "s"), "--seeds", "0", "1", *common]) == 0
    assert "Skip differential" in (tmp_path / "s" / "eval.md").read_text()
    assert cli.main(["eval", "--out", str(tmp_path / "x"), *common]) == 2
    assert "give --adapter DIR" in capsys.readouterr().err
    # train recorded what it trained on; eval refuses steps of those trajectories
    record = json.loads((tmp_path / "t" / "data_config.json").read_text())
    assert record["data"] == "synthetic:20" and len(record["trained_trajectories"]) == 14
    other_split = list(common)
    other_split[other_split.index("0.3")] = "0.5"       # another held-out fraction: overlaps training
    assert cli.main(["eval", "--out", str(tmp_path / "y"), "--adapter", str(tmp_path / "t" / "adapter"),
                     *other_split]) == 2
    assert "evaluated trajectories were used to train" in capsys.readouterr().err
    # runtime flags reach the evaluated model, --tau 0 included
    assert cli.main(["eval", "--out", str(tmp_path / "z"), "--adapter", str(tmp_path / "t" / "adapter"),
                     *common, "--tau", "0", "--granularity", "sequence"]) == 0
    cfg = json.loads((tmp_path / "z" / "eval.json").read_text())["layerroute_config"]
    assert cfg["tau"] == 0.0 and cfg["granularity"] == "sequence"
    skip = json.loads((tmp_path / "z" / "eval.json").read_text())["per_seed"]["adapter"]["heldout"]["all"]
    assert skip["skip_rate"] == 0.0


def test_generate_command_streams_the_same_text(capsys):
    from layerroute_rt.cli import DEMO_DIR

    args = ["generate", "--model", str(DEMO_DIR), "--adapter", str(DEMO_DIR / "adapter"),
            "--prompt", "Find flights from Paris to Rome.", "--max-new-tokens", "12"]
    assert cli.main(args) == 0
    batch = capsys.readouterr().out
    assert cli.main(args + ["--stream"]) == 0
    streamed = capsys.readouterr().out
    text = batch.split("\n", 1)[1].split("\n\nskip rate per block:")[0]
    assert text and streamed.startswith(text)
    assert "skip rate per block:" in streamed and "ms per step" in streamed
    assert cli.main(["generate", "--model", str(DEMO_DIR), "--prompt", "a", "--prompt", "b",
                     "--stream"]) == 2
    assert "--stream takes one --prompt" in capsys.readouterr().err
