"""The router kernels (python_kernels/router.py), through the dispatch in layerroute_rt.ops with
LAYERROUTE_BACKEND=triton, against route_tokens_ref / route_sequences_ref.

p and the gradients: error against a float64 oracle at most twice the torch reference's own
(both compute in float32), plus a floor of a few float32 ulps of the largest value. index and
count: exactly compact_rows of the kernel's own decisions, and those decisions equal the
reference's wherever p is not within 1e-5 of tau (the two p differ by float32 rounding).
On CPU the kernels run under the Triton interpreter (tests/conftest.py); bf16 only on CUDA.
"""
import re

import pytest
import torch

from layerroute_rt import ops
from layerroute_rt.ops import router as router_op
from layerroute_rt.config import BackboneConfig, LayerRouteConfig
from layerroute_rt.model.modeling import Block

pytest.importorskip("triton")

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not ops._triton_runs_on(torch.device("cpu")),
        reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=CUDA),
]
DTYPES = [torch.float32, torch.float16]
N_ROWS = [0, 1, 5, 67, 300]
WIDTHS = [1, 7, 96, 130]
# Which rows may run: every row, a random 80%, or exactly one.
VALID = ["none", "mask", "one"]
MARGIN = 1e-5


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")


def router_params(d: int, device, gen: torch.Generator, bias: float = 0.1):
    """weight [1, D] scaled so that z = w . h + b has std 2 for h ~ N(0, 1): p spreads over
    (0, 1), some rows run and some skip at any tau in between."""
    weight = 2 * torch.randn(1, d, generator=gen) / d**0.5
    return weight.to(device), torch.tensor([bias], device=device)


def make_valid(shape, kind: str, device, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "mask":
        return (torch.rand(shape, generator=gen) < 0.8).to(device)
    valid = torch.zeros(shape, dtype=torch.bool)
    if valid.numel():
        valid.view(-1)[torch.randint(valid.numel(), (1,), generator=gen)] = True
    return valid.to(device)


def assert_close_to_oracle(kernel, reference, oracle, what: str):
    """STYLE.md: the kernel errs at most twice as much as the torch reference, against float64."""
    if oracle.numel() == 0:
        assert kernel.shape == oracle.shape
        return
    oracle = oracle.double()
    kernel_err = (kernel.double() - oracle).abs().max().item()
    torch_err = (reference.double() - oracle).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * max(1.0, oracle.abs().max().item())
    assert kernel_err <= 2 * torch_err + floor, (
        f"{what}: kernel error {kernel_err:.3g} > 2 x torch error {torch_err:.3g} + {floor:.3g}")


def assert_routing(p, index, count, ref_p, ref_index, ref_count, run_of_p):
    """index/count are compact_rows of the kernel's decisions run_of_p(p); the decisions equal
    the reference's where p_ref is not within MARGIN of tau."""
    assert p.dtype == torch.float32 and index.dtype == count.dtype == torch.int32
    assert index.shape == ref_index.shape and count.shape == (1,)
    run = run_of_p(p)
    exp_index, exp_count = ops.compact_rows_ref(run)
    assert torch.equal(index, exp_index) and torch.equal(count, exp_count)
    ref_run = torch.zeros_like(run)
    ref_run[ref_index[: int(ref_count)].long()] = True
    clear = (run_of_p(ref_p - MARGIN) == run_of_p(ref_p + MARGIN))
    assert torch.equal(run[clear], ref_run[clear])


def token_oracle(h, weight, bias):
    return torch.sigmoid(h.double() @ weight.double().reshape(-1) + bias.double())


# route_tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [*N_ROWS, 5000])  # 5000 rows: several tiles and scan steps
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("valid_kind", VALID)
@pytest.mark.parametrize("tau", [0.0, 0.5, 0.3, 1.0])  # 0: all run, 1: none
def test_route_tokens(device, dtype, n, d, valid_kind, tau):
    if n == 5000 and d > 7:
        pytest.skip("the many-tile case runs at narrow widths only (interpreter time)")
    gen = torch.Generator().manual_seed(n * 1009 + d)
    h = torch.randn(n, d, generator=gen).to(device, dtype)
    weight, bias = router_params(d, device, gen)
    valid = make_valid((n,), valid_kind, device, gen)
    p, index, count = ops.route_tokens(h, weight, bias, tau, valid)
    ref_p, ref_index, ref_count = ops.route_tokens_ref(h, weight, bias, tau, valid)
    assert_close_to_oracle(p, ref_p, token_oracle(h, weight, bias), "p")
    ok = torch.ones(n, dtype=torch.bool, device=device) if valid is None else valid
    assert_routing(p, index, count, ref_p, ref_index, ref_count, lambda q: (q >= tau) & ok)
    if tau == 0.0:
        assert int(count) == int(ok.sum())
    if tau == 1.0:
        assert int(count) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", [(1, 7), (67, 130), (300, 96)])
@pytest.mark.parametrize("weight_shape", ["[D]", "[1, D]"])
def test_route_tokens_backward(device, dtype, n, d, weight_shape):
    gen = torch.Generator().manual_seed(n + d)
    h = torch.randn(n, d, generator=gen).to(device, dtype)
    weight, bias = router_params(d, device, gen)
    if weight_shape == "[D]":
        weight = weight.reshape(-1)
    grad_p = torch.randn(n, generator=gen).to(device)

    def grads(fn, *args):
        leaves = [t.detach().clone().requires_grad_() for t in args]
        return torch.autograd.grad(fn(*leaves), leaves, grad_p)

    kernel = grads(lambda *a: ops.route_tokens(*a, 0.5)[0], h, weight, bias)
    reference = grads(lambda *a: ops.route_tokens_ref(*a, 0.5)[0], h, weight, bias)
    oracle = grads(token_oracle, h.double(), weight.double(), bias.double())
    for name, k, r, o in zip(("dh", "dw", "db"), kernel, reference, oracle):
        assert k.dtype == r.dtype and k.shape == r.shape, name
        assert_close_to_oracle(k, r, o, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tau", [0.3, 0.5, 0.7])
def test_route_tokens_matches_model_block(device, tau):
    """The kernel decides as the model does: Block.route_prob(h) >= tau."""
    cfg = BackboneConfig(vocab_size=257, hidden_size=96, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    block = Block(cfg, LayerRouteConfig()).to(device)
    with torch.no_grad():
        block.router.weight.mul_(3)  # spread p around tau
    h = torch.randn(300, cfg.hidden_size, device=device)
    with torch.no_grad():
        p, index, count = ops.route_tokens(h, block.router.weight, block.router.bias, tau)
        model_p = block.route_prob(h)
    assert 0 < int(count) < h.shape[0]
    # Rows within MARGIN of tau may fall either way (fp32 rounding): compared elsewhere only.
    assert_routing(p, index, count, model_p, *ops.compact_rows_ref(model_p >= tau),
                   lambda q: q >= tau)
    torch.testing.assert_close(p, model_p, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, d", [(5, 7), (300, 96)])  # one tile (fused scan), several tiles
def test_route_tokens_row_at_tau_runs(device, n, d):
    """p == tau exactly runs (p >= tau): weight 0 and bias 0 give p = 0.5 for every row."""
    h = torch.randn(n, d, device=device)
    valid = torch.arange(n, device=device) % 3 != 0
    p, index, count = ops.route_tokens(h, torch.zeros(d, device=device),
                                       torch.zeros(1, device=device), 0.5, valid)
    assert (p == 0.5).all()
    assert torch.equal(index[: int(count)], valid.nonzero().flatten().to(torch.int32))


# route_sequences ------------------------------------------------------------------------------


def sequence_valid(b: int, t: int, device, gen: torch.Generator) -> torch.Tensor:
    """Left padding of random length per sequence; sequence 1 (if any) has no valid row."""
    lengths = torch.randint(1, max(t, 1) + 1, (b,), generator=gen).clamp(max=t)
    if b > 1:
        lengths[1] = 0
    return (torch.arange(t)[None, :] >= t - lengths[:, None]).to(device)


def sequence_oracle(h, weight, bias, valid):
    vf = torch.ones(h.shape[:-1], dtype=torch.float64, device=h.device) if valid is None \
        else valid.double()
    mean = (h.double() * vf[..., None]).sum(1) / vf.sum(1, keepdim=True).clamp(min=1)
    return torch.sigmoid(mean @ weight.double().reshape(-1) + bias.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, t", [(0, 3), (3, 0), (1, 1), (5, 1), (3, 67), (2, 300), (33, 5),
                                  (3, 1500)])  # 4500 rows: several scan steps
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("padded", [False, True])
def test_route_sequences(device, dtype, b, t, d, padded):
    if b * t > 4096 and d > 7:
        pytest.skip("the many-step scan runs at narrow widths only (interpreter time)")
    gen = torch.Generator().manual_seed(b * 7919 + t * 31 + d)
    h = torch.randn(b, t, d, generator=gen).to(device, dtype)
    weight, bias = router_params(d, device, gen)
    valid = sequence_valid(b, t, device, gen) if padded else None
    p, index, count = ops.route_sequences(h, weight, bias, 0.5, valid)
    ref_p, ref_index, ref_count = ops.route_sequences_ref(h, weight, bias, 0.5, valid)
    assert p.shape == (b,) and index.shape == (b * t,)
    assert_close_to_oracle(p, ref_p, sequence_oracle(h, weight, bias, valid), "p")
    ok = torch.ones(b, t, dtype=torch.bool, device=device) if valid is None else valid
    assert_routing(p, index, count, ref_p, ref_index, ref_count,
                   lambda q: ((q >= 0.5)[:, None] & ok).reshape(-1))
    if padded and b > 1:  # the sequence with no valid row: mean 0, p = sigmoid(bias), no rows
        assert torch.allclose(p[1], torch.sigmoid(bias.float())[0])
        live = index[: int(count)]
        assert not ((live >= t) & (live < 2 * t)).any()


@pytest.mark.parametrize("device", DEVICES)
def test_route_sequences_at_tau_runs(device):
    """p == tau exactly runs (p >= tau): weight 0 and bias 0 give p = 0.5 for every sequence."""
    gen = torch.Generator().manual_seed(0)
    valid = sequence_valid(3, 67, device, gen)
    h = torch.randn(3, 67, 7, device=device)
    p, index, count = ops.route_sequences(h, torch.zeros(7, device=device),
                                          torch.zeros(1, device=device), 0.5, valid)
    assert (p == 0.5).all()
    assert torch.equal(index[: int(count)], valid.reshape(-1).nonzero().flatten().to(torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, t, d", [(1, 1, 7), (3, 67, 130), (4, 5, 96)])
@pytest.mark.parametrize("padded", [False, True])
def test_route_sequences_backward(device, dtype, b, t, d, padded):
    gen = torch.Generator().manual_seed(b * 100 + t + d)
    h = torch.randn(b, t, d, generator=gen).to(device, dtype)
    weight, bias = router_params(d, device, gen)
    valid = sequence_valid(b, t, device, gen) if padded else None
    grad_p = torch.randn(b, generator=gen).to(device)

    def grads(fn, *args):
        leaves = [x.detach().clone().requires_grad_() for x in args]
        return torch.autograd.grad(fn(*leaves), leaves, grad_p)

    kernel = grads(lambda *a: ops.route_sequences(*a, 0.5, valid)[0], h, weight, bias)
    reference = grads(lambda *a: ops.route_sequences_ref(*a, 0.5, valid)[0], h, weight, bias)
    oracle = grads(lambda *a: sequence_oracle(*a, valid), h.double(), weight.double(),
                   bias.double())
    for name, k, r, o in zip(("dh", "dw", "db"), kernel, reference, oracle):
        assert k.dtype == r.dtype and k.shape == r.shape, name
        assert_close_to_oracle(k, r, o, name)
    if padded:
        assert not kernel[0][~valid].any(), "padding rows must get no gradient"


@pytest.mark.parametrize("device", DEVICES)
def test_route_sequences_matches_model(device):
    """Decisions as LayerRouteModel.forward takes them at granularity "sequence": route_prob on
    the fp32 mean of the valid rows."""
    cfg = BackboneConfig(vocab_size=257, hidden_size=96, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(1)
    block = Block(cfg, LayerRouteConfig(granularity="sequence")).to(device)
    with torch.no_grad():
        block.router.weight.mul_(20)  # a mean of 67 rows is small: spread its p around tau
    gen = torch.Generator().manual_seed(0)
    valid = sequence_valid(16, 67, device, gen)
    h = torch.randn(16, 67, cfg.hidden_size, generator=gen).to(device)
    with torch.no_grad():
        p, index, count = ops.route_sequences(h, block.router.weight, block.router.bias, 0.5, valid)
        vf = valid.float()
        mean = (h * vf[..., None]).sum(1) / vf.sum(1, keepdim=True).clamp(min=1)
        model_p = block.route_prob(mean)

    def run_of_p(q):
        return ((q >= 0.5)[:, None] & valid).reshape(-1)

    assert 0 < int(count) < int(valid.sum())
    # Sequences within MARGIN of tau may fall either way (fp32 rounding): not compared.
    assert_routing(p, index, count, model_p, *ops.compact_rows_ref(run_of_p(model_p)), run_of_p)


# GPU: bf16 and Qwen2.5-0.5B shapes ------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 8, 9, 64, 4096, 16384])
def test_route_tokens_qwen_shapes_cuda(dtype, n):
    gen = torch.Generator().manual_seed(n)
    h = torch.randn(n, 896, generator=gen).to("cuda", dtype)
    weight, bias = router_params(896, "cuda", gen)
    valid = make_valid((n,), "mask", "cuda", gen)
    p, index, count = ops.route_tokens(h, weight, bias, 0.5, valid)
    ref_p, ref_index, ref_count = ops.route_tokens_ref(h, weight, bias, 0.5, valid)
    assert_close_to_oracle(p, ref_p, token_oracle(h, weight, bias), "p")
    assert_routing(p, index, count, ref_p, ref_index, ref_count, lambda q: (q >= 0.5) & valid)


@CUDA
@pytest.mark.parametrize("b, t", [(1, 4096), (8, 2048), (64, 1)])
def test_route_sequences_qwen_shapes_cuda(b, t):
    gen = torch.Generator().manual_seed(b + t)
    h = torch.randn(b, t, 896, generator=gen).to("cuda", torch.bfloat16)
    weight, bias = router_params(896, "cuda", gen)
    weight = weight * t**0.5  # the mean of t rows shrinks by sqrt(t): keep p spread
    valid = sequence_valid(b, t, "cuda", gen)
    p, index, count = ops.route_sequences(h, weight, bias, 0.5, valid)
    ref_p, ref_index, ref_count = ops.route_sequences_ref(h, weight, bias, 0.5, valid)
    assert_close_to_oracle(p, ref_p, sequence_oracle(h, weight, bias, valid), "p")
    assert_routing(p, index, count, ref_p, ref_index, ref_count,
                   lambda q: ((q >= 0.5)[:, None] & valid).reshape(-1))


# dispatch and argument checks -----------------------------------------------------------------


def test_dispatch_backend(monkeypatch):
    """LAYERROUTE_BACKEND=triton runs the kernels (the interpreter on CPU), =torch the
    references."""
    if not ops._triton_runs_on(torch.device("cpu")):
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    from python_kernels import router as router_triton

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(5, 7, generator=gen)
    weight, bias = router_params(7, "cpu", gen)

    def refuse(*args, **kwargs):
        raise AssertionError("the wrong backend ran")

    with monkeypatch.context() as m:
        m.setenv("LAYERROUTE_BACKEND", "triton")
        m.setattr(router_op, "route_tokens_ref", refuse)
        m.setattr(router_op, "route_sequences_ref", refuse)
        ops.route_tokens(h, weight, bias, 0.5)
        ops.route_sequences(h[None], weight, bias, 0.5)
    with monkeypatch.context() as m:
        m.setenv("LAYERROUTE_BACKEND", "torch")
        m.setattr(router_triton.RouteTokens, "apply", refuse)
        m.setattr(router_triton.RouteSequences, "apply", refuse)
        ops.route_tokens(h, weight, bias, 0.5)
        ops.route_sequences(h[None], weight, bias, 0.5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("change, error, message", [
    (dict(h=torch.zeros(5, 7, dtype=torch.int32)), TypeError, "`h` must be float32"),
    (dict(h=torch.zeros(5, 7, 2)), ValueError, "`h` must be 2-D [N, D]"),
    (dict(weight=torch.zeros(2, 7)), ValueError,
     "`weight` must have shape [D] or [1, D] with D = 7"),
    (dict(bias=torch.zeros(())), ValueError, "`bias` must have shape [1]"),
    (dict(valid=torch.ones(5, dtype=torch.int32)), TypeError, "`valid` must be bool"),
    (dict(valid=torch.ones(4, dtype=torch.bool)), ValueError, "`valid` must have shape [5]"),
    (dict(tau=1.5), ValueError, "`tau` must be a number in [0, 1]"),
])
def test_route_tokens_argument_checks(monkeypatch, backend, change, error, message):
    monkeypatch.setenv("LAYERROUTE_BACKEND", backend)
    if backend == "triton" and not ops._triton_runs_on(torch.device("cpu")):
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    args = dict(h=torch.zeros(5, 7), weight=torch.zeros(7), bias=torch.zeros(1), tau=0.5,
                valid=None)
    with pytest.raises(error, match="^" + re.escape(f"route_tokens: {message}")):
        ops.route_tokens(**{**args, **change})
