"""generate() stats for the generated tokens alone: the decode steps that fed them."""
import torch

import layerroute_rt as lr
from layerroute_rt.runtime.generate import generated_flops

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]


def _expected_skip_pct(cfg, contexts, skipped_blocks):
    """% of block and total FLOPs skipped, by hand: each token at context c costs 2 W + 4 q_dim c
    per block; a skipped block keeps its k/v projections (kv_policy compute); no router runs."""
    shapes = cfg.linear_shapes()
    w = sum(o * i for o, i in shapes.values())
    kv = 2 * 2 * cfg.hidden_size * cfg.kv_dim
    L = cfg.num_hidden_layers
    dense = sum(L * (2 * w + 4 * cfg.q_dim * c) for c in contexts)
    saved = sum(skipped_blocks * (2 * w + 4 * cfg.q_dim * c - kv) for c in contexts)
    head = 2 * cfg.hidden_size * cfg.vocab_size * len(contexts)
    return 100 * saved / dense, 100 * saved / (dense + head)


def test_skip_layers_give_the_exact_value(tiny):
    model = lr.load(tiny[0])
    engine = lr.InferenceModel(model)
    first = lr.generate(engine, PROMPTS, max_new_tokens=6, tau=0.0, skip_layers=[1], eos_token_id=None)
    # end sequence 0 at once: its first new token becomes EOS (sequence 1 does not make it)
    eos = first.tokens[0][0]
    assert eos not in first.tokens[1]
    out = lr.generate(engine, PROMPTS, max_new_tokens=6, tau=0.0, skip_layers=[1], eos_token_id=eos)
    lengths = [len(t) for t in out.tokens]
    assert lengths == [1, 6]
    # token j of sequence b is fed by decode step j (j < its length - 1), at context len(prompt) + j + 1
    contexts = [len(p) + j + 1 for p, n in zip(PROMPTS, lengths) for j in range(n - 1)]
    block, total = _expected_skip_pct(model.config, contexts, skipped_blocks=1)
    s = out.stats
    assert abs(s["generated_block_flops_skipped_pct"] - block) < 1e-9
    assert abs(s["generated_total_flops_skipped_pct"] - total) < 1e-9
    # the overall figures include the prompts, which also skip block 1 but pay their routers
    assert s["block_flops_skipped_pct"] != s["generated_block_flops_skipped_pct"]


def test_whole_request_by_hand(tiny):
    """The whole request (prompt and generated tokens): every token's blocks, the routers on each
    block for each token (charged at prefill and decode alike), and the lm_head once per prompt
    (its last token) plus once per fed token, not once per prompt token."""
    model = lr.load(tiny[0])
    cfg = model.config
    out = lr.generate(lr.InferenceModel(model), PROMPTS, max_new_tokens=5, tau=0.0, skip_layers=[1],
                      eos_token_id=None)
    w = sum(o * i for o, i in cfg.linear_shapes().values())
    kv = 2 * 2 * cfg.hidden_size * cfg.kv_dim
    L = cfg.num_hidden_layers
    contexts = [c for p in PROMPTS for c in range(1, len(p) + 5)]     # prompt, then the 4 fed tokens
    dense = sum(L * (2 * w + 4 * cfg.q_dim * c) for c in contexts)
    ran = dense - sum(2 * w + 4 * cfg.q_dim * c - kv for c in contexts) + 2 * cfg.hidden_size * L * len(contexts)
    head = 2 * cfg.hidden_size * cfg.vocab_size * (len(PROMPTS) + len(PROMPTS) * 4)
    assert abs(out.stats["block_flops_skipped_pct"] - 100 * (1 - ran / dense)) < 1e-9
    assert abs(out.stats["total_flops_skipped_pct"] - 100 * (1 - (ran + head) / (dense + head))) < 1e-9


def test_dense_at_tau_0_skips_nothing_on_generated_tokens(tiny):
    out = lr.generate(lr.load(tiny[0]), PROMPTS, max_new_tokens=4, tau=0.0, eos_token_id=None)
    assert out.stats["generated_block_flops_skipped_pct"] == 0.0
    assert out.stats["generated_total_flops_skipped_pct"] == 0.0
    assert out.stats["block_flops_skipped_pct"] < 0          # prefill ran (and is charged) its routers


def test_with_routers_between_the_prompt_and_the_overall_value(tiny):
    """Overall = prompt part and generated part weighted by their dense FLOPs, so it lies between
    them (routers run on every block at prefill and decode alike here)."""
    model = lr.load(tiny[0])
    model.randomize_adapter(seed=3)
    engine = lr.InferenceModel(model)
    out = lr.generate(engine, PROMPTS, max_new_tokens=12, eos_token_id=None)
    T = out.valid.shape[1] - out.stats["decode_steps"]
    prompt_only = out.valid.clone()
    prompt_only[:, T:] = False
    prompt = lr.flops_report(model.config, model.lr_config, out.executed, out.valid.long().cumsum(1),
                             prompt_only, head=lr.model.flops.last_tokens(prompt_only))
    s = out.stats
    for kind, prompt_pct in (("block", prompt.block_skipped_pct), ("total", prompt.total_skipped_pct)):
        gen, overall = s[f"generated_{kind}_flops_skipped_pct"], s[f"{kind}_flops_skipped_pct"]
        assert 0 < gen < 100 and abs(gen - prompt_pct) > 1e-3
        assert min(gen, prompt_pct) < overall < max(gen, prompt_pct)
    again = generated_flops(engine, out.executed, out.valid, T, router_blocks=model.config.num_hidden_layers)
    assert again.block_skipped_pct == s["generated_block_flops_skipped_pct"]


def test_no_decode_step_gives_none(tiny):
    out = lr.generate(lr.load(tiny[0]), PROMPTS, max_new_tokens=1, eos_token_id=None)
    assert out.stats["decode_steps"] == 0
    assert out.stats["generated_block_flops_skipped_pct"] is None
    assert out.stats["generated_total_flops_skipped_pct"] is None
