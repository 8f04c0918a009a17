"""generate() over the reference path: greedy equals transformers, batching, sampling, errors."""
import pytest
import torch

import layerroute_rt as lr
from layerroute_rt.generate import generate
from qwen_factory import save_random_qwen2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen")
    hf = save_random_qwen2(path)
    return path, hf


def test_greedy_equals_transformers_without_skipping(tiny):
    path, hf = tiny
    model = lr.load(path)
    prompt = torch.randint(0, 257, (1, 7), generator=torch.Generator().manual_seed(0))
    ref = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 7:].tolist()
    assert generate(model, prompt, max_new_tokens=8, tau=0.0).tokens[0] == ref


def test_batch_equals_one_by_one_with_skipping(tiny):
    model = lr.load(tiny[0])
    model.randomize_adapter(seed=1)
    prompts = [[5, 9, 200, 3], [17, 1, 2, 3, 4, 5, 6, 7, 8], [250]]
    batch = generate(model, prompts, max_new_tokens=6)
    assert batch.executed[:, :, -1].any() and not batch.executed.all()
    for p, toks in zip(prompts, batch.tokens):
        assert generate(model, [p], max_new_tokens=6).tokens[0] == toks


def test_eos_stops_each_sequence(tiny):
    model = lr.load(tiny[0])
    prompts = [[5, 9, 200, 3], [7, 7, 1]]
    first = generate(model, prompts, max_new_tokens=5).tokens
    eos = first[0][1]
    stop = first[0].index(eos)                         # where sequence 0 first emits it
    out = generate(model, prompts, max_new_tokens=5, eos_token_id=eos)
    assert out.tokens[0] == first[0][:stop + 1]
    assert out.tokens[1] == (first[1][:first[1].index(eos) + 1] if eos in first[1] else first[1])


def test_seeded_sampling_is_reproducible(tiny):
    model = lr.load(tiny[0])
    kw = dict(max_new_tokens=6, temperature=1.0, top_k=50, top_p=0.9)
    a = generate(model, [[1, 2, 3]], seed=3, **kw).tokens
    assert a == generate(model, [[1, 2, 3]], seed=3, **kw).tokens


def test_stats(tiny):
    model = lr.load(tiny[0])
    out = generate(model, [[1, 2, 3]], max_new_tokens=4, skip_layers=[0])
    assert out.stats["skip_rate_per_layer"][0] == 1.0
    assert 0 < out.stats["block_flops_skipped_pct"] < 100 / 3
    assert out.stats["decode_ms_per_token"] > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=[[]]), "prompt 0 is empty"),
    (dict(input_ids=[[1, 999]]), r"outside \[0, 257\)"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=1000), "exceeds the model's max_position_embeddings"),
])
def test_errors(tiny, kwargs, match):
    model = lr.load(tiny[0])
    args = dict(input_ids=[[1, 2]], max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, **args)
