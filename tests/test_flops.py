"""FLOPs accounting against hand-computed values (docs/DESIGN.md section 1), and parameter counts."""
import pytest
import torch
import transformers

import layerroute_rt as lr

CFG = lr.BackboneConfig(vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
WEIGHTS = 8 * 8 + 4 * 8 * 2 + 8 * 8 + 3 * 8 * 12     # q, k + v (kv_dim 4), o, MLP


def test_dense_has_nothing_skipped():
    executed = torch.ones(2, 1, 3, dtype=torch.bool)
    context = torch.tensor([[1, 2, 3]])
    r = lr.flops_report(CFG, lr.LayerRouteConfig(), executed, context)
    block = 2 * (2 * WEIGHTS * 3 + 4 * 8 * 6)
    assert r.block_flops == block
    assert r.total_flops == block + 2 * 8 * 100 * 3
    # routers are paid on top of the dense blocks
    assert r.block_flops_run == block + 2 * 8 * 3 * 2
    assert r.block_skipped_pct < 0


def test_skipped_token_keeps_kv_projection_under_compute_only():
    executed = torch.ones(2, 1, 3, dtype=torch.bool)
    executed[1, 0, 2] = False                       # token 2 skips block 1 (context 3)
    context = torch.tensor([[1, 2, 3]])
    saved = 2 * WEIGHTS + 4 * 8 * 3
    kv = 2 * 2 * 8 * 4
    router = 2 * 8 * 3 * 2
    dense = lr.flops_report(CFG, lr.LayerRouteConfig(), torch.ones_like(executed), context)
    compute = lr.flops_report(CFG, lr.LayerRouteConfig(kv_policy="compute"), executed, context)
    drop = lr.flops_report(CFG, lr.LayerRouteConfig(kv_policy="drop"), executed, context)
    assert compute.block_flops_run == dense.block_flops - saved + kv + router
    assert drop.block_flops_run == dense.block_flops - saved + router
    assert 0 < compute.total_skipped_pct < compute.block_skipped_pct


def test_padding_costs_nothing():
    executed = torch.ones(2, 2, 3, dtype=torch.bool)
    valid = torch.tensor([[True, True, True], [False, True, True]])
    context = valid.long().cumsum(1)
    padded = lr.flops_report(CFG, lr.LayerRouteConfig(), executed, context, valid)
    a = lr.flops_report(CFG, lr.LayerRouteConfig(), executed[:, :1], torch.tensor([[1, 2, 3]]))
    b = lr.flops_report(CFG, lr.LayerRouteConfig(), executed[:, :1, 1:], torch.tensor([[1, 2]]))
    assert padded.total_flops == a.total_flops + b.total_flops
    assert padded.block_flops_run == a.block_flops_run + b.block_flops_run


def test_sequence_routers_run_once_per_sequence():
    executed = torch.ones(2, 2, 3, dtype=torch.bool)
    context = torch.tensor([[1, 2, 3], [1, 2, 3]])
    token = lr.flops_report(CFG, lr.LayerRouteConfig(granularity="token"), executed, context)
    seq = lr.flops_report(CFG, lr.LayerRouteConfig(granularity="sequence"), executed, context)
    assert token.block_flops_run - seq.block_flops_run == 2 * 8 * 2 * (6 - 2)


def test_router_blocks_charges_only_the_routers_that_ran():
    executed = torch.ones(2, 1, 3, dtype=torch.bool)
    context = torch.tensor([[1, 2, 3]])
    every = lr.flops_report(CFG, lr.LayerRouteConfig(), executed, context)
    none = lr.flops_report(CFG, lr.LayerRouteConfig(), executed, context, router_blocks=0)
    one = lr.flops_report(CFG, lr.LayerRouteConfig(), executed, context, router_blocks=1)
    assert none.block_flops_run == none.block_flops and none.block_skipped_pct == 0.0
    assert every.block_flops_run - one.block_flops_run == one.block_flops_run - none.block_flops_run == 2 * 8 * 3



def test_head_counts_only_the_tokens_whose_logits_are_computed():
    """Prefill computes the lm_head on each prompt's last token only; a decode step on each token
    it feeds. Hand count: 2 rows, one left-padded, 3 columns."""
    executed = torch.ones(2, 2, 3, dtype=torch.bool)
    valid = torch.tensor([[True, True, True], [False, True, True]])
    context = valid.long().cumsum(1)
    last = lr.model.flops.last_tokens(valid)
    assert last.tolist() == [[False, False, True], [False, False, True]]
    every = lr.flops_report(CFG, lr.LayerRouteConfig(), executed, context, valid)
    prefill = lr.flops_report(CFG, lr.LayerRouteConfig(), executed, context, valid, head=last)
    block = 2 * (2 * WEIGHTS * 5 + 4 * 8 * (1 + 2 + 3 + 1 + 2))
    assert prefill.block_flops == every.block_flops == block
    assert every.total_flops == block + 2 * 8 * 100 * 5
    assert prefill.total_flops == block + 2 * 8 * 100 * 2
    assert prefill.total_flops_run - prefill.block_flops_run == 2 * 8 * 100 * 2
    # a head outside the valid tokens costs nothing; a row with no valid token has no last token
    assert lr.flops_report(CFG, lr.LayerRouteConfig(), executed, context, valid,
                           head=torch.ones(2, 3, dtype=torch.bool)).total_flops == every.total_flops
    assert not lr.model.flops.last_tokens(torch.zeros(1, 4, dtype=torch.bool)).any()
    assert lr.model.flops.last_tokens(torch.tensor([[True, True, False]])).tolist() == [[False, True, False]]
    with pytest.raises(ValueError, match=r"head must be a \[B, T\] mask"):
        lr.flops_report(CFG, lr.LayerRouteConfig(), executed, context, valid, head=last[:, :2])


QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0)


def test_count_parameters_of_a_transformers_config():
    cfg = lr.LayerRouteConfig()
    tied = lr.count_parameters(transformers.Qwen2Config(**QWEN25_05B, tie_word_embeddings=True), cfg)
    assert tied == {"routers": 21_528, "lora": 1_081_344, "trainable": 1_102_872, "backbone": 494_032_768}
    assert tied == lr.count_parameters(lr.BackboneConfig(**QWEN25_05B, tie_word_embeddings=True), cfg)
    # Qwen2.5-Coder-0.5B-Instruct as shipped in GGUF: an lm_head of its own (vocab x hidden more)
    untied = lr.count_parameters(transformers.Qwen2Config(**QWEN25_05B, tie_word_embeddings=False), cfg)
    assert untied["backbone"] == 494_032_768 + 151_936 * 896 == 630_167_424
    assert untied["trainable"] == tied["trainable"]


def test_count_parameters_errors():
    with pytest.raises(TypeError, match="BackboneConfig or a transformers config, got dict"):
        lr.count_parameters({"hidden_size": 8}, lr.LayerRouteConfig())
    with pytest.raises(ValueError, match="LlamaConfig: unsupported model_type 'llama'"):
        lr.count_parameters(transformers.LlamaConfig(), lr.LayerRouteConfig())
