"""Paired statistics (layerroute_rt/eval/paired.py) on fixed toy records, and the whole-request FLOPs
of the BFCL eval (bfcl_eval.prompt_flops) against a hand count."""
import math

import pytest
import torch

import layerroute_rt as lr
from layerroute_rt.eval.bfcl import prompt_flops
from layerroute_rt.cli import DEMO_DIR
from layerroute_rt.eval.paired import bootstrap_diff_ci, compare, sign_test


def test_sign_test_exact_values():
    assert sign_test(0, 0) == 1.0
    assert sign_test(0, 5) == pytest.approx(2 / 32)              # 2 x (1/2)^5
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    # 9 gains, 7 losses (run h on the 200 cases): 2 x sum_{i<=7} C(16, i) / 2^16
    assert sign_test(9, 7) == pytest.approx(2 * 26333 / 65536)
    assert sign_test(7, 9) == sign_test(9, 7)
    assert sign_test(8, 8) == 1.0                                # capped at 1
    with pytest.raises(ValueError, match="gains"):
        sign_test(-1, 3)


def test_bootstrap_ci_on_a_toy_record():
    a = [True, True, False, False, True]
    b = [True, False, False, False, True]                      # one gain, no loss: +20 points
    lo, hi = bootstrap_diff_ci(a, b, resamples=4000, seed=1)
    assert lo == 0.0 and 20.0 <= hi <= 60.0                    # no loss: never below 0
    assert bootstrap_diff_ci(a, b, resamples=4000, seed=1) == (lo, hi)       # seeded
    assert bootstrap_diff_ci(a, a) == (0.0, 0.0)
    # 40 pairs: 6 gains, 2 losses -> +10 points; the CI holds it and is wider than one case
    a = [True] * 6 + [False] * 2 + [True] * 20 + [False] * 12
    b = [False] * 6 + [True] * 2 + [True] * 20 + [False] * 12
    lo, hi = bootstrap_diff_ci(a, b, resamples=4000)
    assert lo < 10.0 < hi and hi - lo > 2.5
    with pytest.raises(ValueError, match="paired"):
        bootstrap_diff_ci([True], [True, False])


def test_compare_counts_discordant_pairs():
    a = [1, 1, 0, 0, 1, 0]
    b = [1, 0, 1, 1, 1, 0]
    r = compare([bool(x) for x in a], [bool(x) for x in b], resamples=2000)
    assert (r["n"], r["a_correct"], r["b_correct"], r["gains"], r["losses"]) == (6, 3, 4, 1, 2)
    assert r["diff_points"] == pytest.approx(-100 / 6)
    assert r["sign_test_p"] == pytest.approx(1.0)               # 2 x (1 + 3) / 8 capped
    lo, hi = r["ci95_points"]
    assert lo <= r["diff_points"] <= hi


def test_prompt_flops_against_a_hand_count():
    """A prompt of T tokens that runs every block: dense block FLOPs L (2 W T + 4 q_dim T(T+1)/2),
    plus the routers (2 d per token and block, run at prefill at any tau); then one block
    skipped by every token saves its weights except the k/v projections; the lm_head runs once."""
    engine = lr.InferenceModel(lr.load(DEMO_DIR, adapter=DEMO_DIR / "adapter"))
    cfg = engine.config
    L, d, T, kv = cfg.num_hidden_layers, cfg.hidden_size, 9, cfg.kv_dim
    W = sum(o * i for o, i in cfg.linear_shapes().values())
    executed = torch.ones(L, 1, T + 3, dtype=torch.bool)
    valid = torch.ones(1, T + 3, dtype=torch.bool)
    valid[0, :2] = False                                     # left padding of the prompt
    executed &= valid[None]
    Tr = T - 2
    dense = L * (2.0 * W * Tr + 4.0 * cfg.q_dim * Tr * (Tr + 1) / 2)
    r = prompt_flops(engine, executed, valid, T)
    assert r.block_flops == pytest.approx(dense)
    assert r.block_flops_run == pytest.approx(dense + L * 2.0 * d * Tr)
    executed[3] = False
    r = prompt_flops(engine, executed, valid, T)
    saved = 2.0 * (W - 2 * d * kv) * Tr + 4.0 * cfg.q_dim * Tr * (Tr + 1) / 2
    assert r.block_flops_run == pytest.approx(dense + L * 2.0 * d * Tr - saved)
    # the lm_head runs on the prompt's last token only (prefill computes no other logits)
    assert math.isclose(r.total_flops - r.block_flops, 2.0 * d * cfg.vocab_size)
    assert math.isclose(r.total_flops_run - r.block_flops_run, 2.0 * d * cfg.vocab_size)
