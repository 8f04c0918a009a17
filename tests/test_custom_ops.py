"""Every op of layerroute_rt.ops is a torch.library custom op (layerroute::<op>) with a fake
impl: the decode-step ops (which write into their arguments), and lora_linear, route_tokens
and route_sequences (functional, with their autograd formula registered).
torch.library.opcheck (schema and mutations, fake tensors, autograd registration, AOT
dispatch with dynamic shapes) passes for each, on the torch references and, under the
interpreter, on the Triton kernels; torch.compile traces a stage without a graph break, and
compiles a LoRA layer's forward and backward to eager's values."""
import os

import pytest
import torch

from layerroute_rt import ops

D, H, HKV, HD, INTER = 24, 4, 2, 8, 20
QD, KVD = H * HD, HKV * HD
N = 3


def _g():
    return torch.Generator().manual_seed(0)


def _cache():
    k = torch.zeros(N, HKV, 6, HD)
    return k, torch.zeros_like(k), torch.zeros(N, 6, dtype=torch.bool)


def _rows(live=2):
    return (torch.tensor([2, 0, -1], dtype=torch.int32), torch.tensor([live], dtype=torch.int32))


def _qkv_args(lora: bool):
    g = _g()
    index, count = _rows()
    k, v, valid = _cache()
    return (torch.randn(N, D, generator=g), index, count, torch.rand(D, generator=g) + 0.5, 1e-6,
            torch.randn(QD + 2 * KVD, D, generator=g) / 5, torch.randn(QD + 2 * KVD, generator=g),
            torch.randn(6, D, generator=g) if lora else None,
            torch.randn(QD + 2 * KVD, 6, generator=g) if lora else None, 2.0,
            torch.arange(N) + 3, ops.rope_inv_freq(HD, 1e6, "cpu"), k, v, valid,
            torch.tensor([1]), 1, torch.zeros(N, QD))


def _route_args(routed: bool):
    g = _g()
    h = torch.randn(N, D, generator=g)
    k, v, valid = _cache()
    return (h, torch.randn(D, generator=g) if routed else None,
            torch.zeros(1) if routed else None, 0.5,
            None if routed else torch.tensor([True, False, False]),
            torch.zeros(N, dtype=torch.int32) if routed else None,
            torch.zeros(1, dtype=torch.int32) if routed else None,
            torch.zeros((), dtype=torch.bool) if routed else None,
            torch.zeros(N, dtype=torch.bool) if routed else None,
            torch.rand(D, generator=g) + 0.5, 1e-6, torch.randn(QD + 2 * KVD, D, generator=g) / 5,
            torch.randn(QD + 2 * KVD, generator=g), None, None, 1.0, torch.arange(N),
            ops.rope_inv_freq(HD, 1e6, "cpu"), k, v, valid, torch.tensor([0]), 1, True)


def _scatter_args(lora: bool):
    g = _g()
    index, count = _rows()
    return (torch.randn(N, INTER, generator=g), index, count, torch.randn(D, INTER, generator=g),
            torch.randn(4, INTER, generator=g) if lora else None,
            torch.randn(D, 4, generator=g) if lora else None, 2.0, torch.randn(N, D, generator=g))


def _gate_up_args(lora: bool):
    g = _g()
    index, count = _rows()
    return (torch.randn(N, D, generator=g), index, count, torch.rand(D, generator=g) + 0.5, 1e-6,
            torch.randn(2 * INTER, D, generator=g), torch.randn(4, D, generator=g) if lora else None,
            torch.randn(2 * INTER, 4, generator=g) if lora else None, 2.0, torch.zeros(N, INTER))


def _head_args(_lora: bool):
    g = _g()
    return (torch.randn(N, D, generator=g), torch.rand(D, generator=g) + 0.5, 1e-6,
            torch.randn(37, D, generator=g), torch.zeros(N, 37))


def _attention_args(_lora: bool):
    g = _g()
    index, count = _rows()
    return (torch.randn(N, H, HD, generator=g), torch.randn(N, HKV, 6, HD, generator=g),
            torch.randn(N, HKV, 6, HD, generator=g), torch.rand(N, 6, generator=g) > 0.3, index,
            count, torch.tensor([5]), HD ** -0.5, torch.zeros(N, H, HD))


CASES = {
    "qkv_rope": _qkv_args,
    "route_kv": lambda lora: _route_args(routed=lora),       # the flag: routed or given decisions
    "linear_scatter_add": _scatter_args,
    "norm_gate_up": _gate_up_args,
    "norm_linear": _head_args,
    "decode_attention": _attention_args,
}


def test_every_decode_op_is_a_custom_op():
    from layerroute_rt.runtime.generate import DECODE_OPS

    assert set(DECODE_OPS) <= {name.split("::")[1] for name in ops.PYTHON_OPS}
    for name in ops.PYTHON_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta") or \
            torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd")


@pytest.mark.parametrize("backend", [
    "torch", pytest.param("triton", marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1"))])
@pytest.mark.parametrize("flag", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_opcheck(monkeypatch, name, flag, backend):
    monkeypatch.setenv("LAYERROUTE_BACKEND", backend)
    op = getattr(torch.ops.layerroute, name).default
    torch.library.opcheck(op, CASES[name](flag))


def _lora_args(kind: str):
    g = _g()
    x = torch.randn(N, D, generator=g, requires_grad=kind == "grad")
    lora = [torch.randn(4, D, generator=g) / 3, torch.randn(INTER, 4, generator=g) / 3]
    if kind == "grad":
        lora = [t.requires_grad_() for t in lora]
    rows = (torch.tensor([2, 0, 2], dtype=torch.int32), torch.tensor([3], dtype=torch.int32))
    return (x, torch.randn(INTER, D, generator=g) / 5, torch.randn(INTER, generator=g) if kind != "plain" else None,
            *(lora if kind != "plain" else (None, None)), 2.0, *(rows if kind == "rows" else (None, None)))


def _router_args(kind: str, sequences: bool):
    g = _g()
    h = torch.randn(*((2, 4) if sequences else (N,)), D, generator=g, requires_grad=kind == "grad")
    w = torch.randn(D, generator=g, requires_grad=kind == "grad")
    b = torch.zeros(1, requires_grad=kind == "grad")
    # "none": no row runs (tau 1 with p < 1); "one": valid keeps one row; "grad": all, with grads
    valid = {"one": torch.zeros(h.shape[:-1], dtype=torch.bool).index_put_((torch.tensor([1]),), torch.tensor(True)),
             "none": None, "grad": None}[kind]
    return (h, w, b, 1.0 if kind == "none" else 0.0, valid)


FUNCTIONAL = {
    **{f"lora_linear-{k}": ("lora_linear", lambda k=k: _lora_args(k)) for k in ("plain", "lora", "rows", "grad")},
    **{f"route_tokens-{k}": ("route_tokens", lambda k=k: _router_args(k, False)) for k in ("none", "one", "grad")},
    **{f"route_sequences-{k}": ("route_sequences", lambda k=k: _router_args(k, True))
       for k in ("none", "one", "grad")},
}


@pytest.mark.parametrize("backend", [
    "torch", pytest.param("triton", marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1"))])
@pytest.mark.parametrize("case", list(FUNCTIONAL))
def test_opcheck_functional_ops(monkeypatch, case, backend):
    monkeypatch.setenv("LAYERROUTE_BACKEND", backend)
    name, args = FUNCTIONAL[case]
    torch.library.opcheck(getattr(torch.ops.layerroute, name).default, args())


def test_the_registered_gradients_equal_the_references():
    """The op's autograd formula (used by torch.compile / AOT autograd) against autograd
    through the torch references, for the LoRA layer and both routers."""
    cases = [("lora_linear", _lora_args("grad"), ops.lora_linear_ref, (0, 3, 4)),
             ("route_tokens", _router_args("grad", False), ops.route_tokens_ref, (0, 1, 2)),
             ("route_sequences", _router_args("grad", True), ops.route_sequences_ref, (0, 1, 2))]
    for name, args, ref, wrt in cases:
        out = getattr(torch.ops.layerroute, name)(*args)
        expected = ref(*args)
        out, expected = (out[0], expected[0]) if isinstance(out, tuple) else (out, expected)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, [args[i] for i in wrt], grad)
        want = torch.autograd.grad(expected, [args[i] for i in wrt], grad)
        for i, a, b in zip(wrt, got, want):
            torch.testing.assert_close(a, b, msg=f"{name}: the gradient of argument {i}")


def test_compile_runs_a_lora_layer_and_its_backward_as_eager_does():
    x, weight, bias, A, B, scale, _, _ = _lora_args("grad")

    def layer(x, A, B):
        return ops.lora_linear(x, weight, bias, A, B, scale).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, A, B), (x, A, B))
    want = torch.autograd.grad(layer(x, A, B), (x, A, B))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_compile_traces_a_stage_without_graph_breaks():
    """torch.compile (fullgraph: a graph break is an error) through the public op: the fake
    impl carries it past the kernel."""
    args = _scatter_args(True)
    expected = args[-1].clone()
    ops.linear_scatter_add(*args[:-1], expected)

    def stage(x, index, count, weight, A, B, residual):
        ops.linear_scatter_add(x, index, count, weight, A, B, 2.0, residual)
        return residual

    torch._dynamo.reset()
    compiled = torch.compile(stage, fullgraph=True, backend="eager")
    x, index, count, weight, A, B, _, residual = args
    out = compiled(x, index, count, weight, A, B, residual.clone())
    torch.testing.assert_close(out, expected)
