"""The fused LoRA linear (python_kernels/lora_linear.py, through ops.lora_linear) against
ops.lora_linear_ref and a float64 evaluation of y = x W^T + b + s (x A^T) B^T.

On CPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py),
in fp32 and fp16 at small odd sizes; on CUDA also in bf16 and at Qwen2.5-0.5B sizes (bf16 dots
are wrong in the CPU interpreter). Tolerance, as flash-attention's tests: in half precision the
kernel's largest error against float64 is at most twice the torch reference's in the same
dtype, plus half a unit in the last place of the largest output (the rounding of the result,
which no kernel avoids); in fp32 the kernel must agree with float64 to 1e-5 of the largest
output (1e-5 at least).
"""

import os

import pytest
import torch

from layerroute_rt import ops

pytestmark = pytest.mark.skipif(
    "lora_linear" not in ops._TRITON_KERNELS, reason="Triton is not importable"
)

CPU = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set without CUDA)",
)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# (M rows, K in, N out, r rank): odd sizes that straddle the interpreter's 16 x 32 x 32 blocks.
CPU_SHAPES = [(0, 33, 7, 5), (1, 7, 130, 8), (5, 130, 33, 1), (67, 33, 130, 5), (67, 130, 7, 8),
              (5, 1, 1, 5)]
# Qwen2.5-0.5B: hidden 896; q/o 896, k/v 128, MLP up 4864 outputs.
GPU_SHAPES = CPU_SHAPES + [(1, 896, 896, 8), (5, 896, 128, 8), (64, 896, 4864, 8),
                           (67, 896, 4864, 5), (2048, 896, 896, 8), (4099, 896, 128, 16)]


def cases(cpu_shapes=CPU_SHAPES, gpu_shapes=GPU_SHAPES):
    """(device, dtype, shape) cases: CPU in fp32 and fp16, CUDA in bf16 too."""
    out = []
    for device, mark, dtypes, shapes in (
        ("cpu", CPU, (torch.float32, torch.float16), cpu_shapes),
        ("cuda", CUDA, (torch.float32, torch.float16, torch.bfloat16), gpu_shapes),
    ):
        for dtype in dtypes:
            for shape in shapes:
                name = f"{device}-{str(dtype)[6:]}-{'x'.join(map(str, shape))}"
                out.append(pytest.param(device, dtype, shape, marks=mark, id=name))
    return out


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    """Every test runs the Triton kernel unless it sets another backend."""
    monkeypatch.setenv("LAYERROUTE_BACKEND", "triton")


def make_inputs(shape, dtype, device, bias=True, lora=True, seed=0, lora_dtype=torch.float32):
    """Random operands scaled so that y is O(1), the LoRA term as large as the base one."""
    m, k, n, r = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size, std=1.0, dt=dtype):
        return (torch.randn(size, generator=g, dtype=torch.float64) * std).to(device, dt)

    return dict(
        x=randn(m, k),
        weight=randn(n, k, std=k**-0.5),
        bias=randn(n, std=0.5) if bias else None,
        lora_A=randn(r, k, std=k**-0.5, dt=lora_dtype) if lora else None,
        lora_B=randn(n, r, std=0.5, dt=lora_dtype) if lora else None,
        scale=0.75,
    )


def operands64(args):
    """The operands in float64 as the op sees them: lora_A and lora_B rounded to x's dtype
    first (the op's definition), so that only arithmetic counts as error."""
    dtype = args["x"].dtype
    return {k: v if not isinstance(v, torch.Tensor) else
            v.to(dtype).double() if k.startswith("lora") else v.double()
            for k, v in args.items()}


def reference64(x, weight, bias, lora_A, lora_B, scale):
    """y = x W^T + b + s (x A^T) B^T, on float64 operands."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    if lora_A is not None:
        y = y + scale * (x @ lora_A.T) @ lora_B.T
    return y


def assert_close(out, ref_lowp, ref64, dtype, what=""):
    """out and ref_lowp (torch, both computed in `dtype`) against ref64, by the rule of the
    module docstring."""
    assert out.dtype == ref_lowp.dtype and out.shape == ref64.shape, what
    if out.numel() == 0:
        return
    err = (out.double() - ref64).abs().max().item()
    if dtype == torch.float32:
        bound = 1e-5 * max(1.0, ref64.abs().max().item())
        assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"
        return
    torch_err = (ref_lowp.double() - ref64).abs().max().item()
    floor = 0.5 * torch.finfo(dtype).eps * ref64.abs().max().item()
    assert err <= 2 * torch_err + floor, (
        f"{what}: max error {err:.3g} > 2 x torch's {torch_err:.3g} + {floor:.3g}"
    )


@pytest.mark.parametrize("device,dtype,shape", cases())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "nolora"])
def test_forward(device, dtype, shape, bias, lora):
    args = make_inputs(shape, dtype, device, bias, lora)
    y = ops.lora_linear(**args)
    assert y.shape == (shape[0], shape[2]) and y.device == args["x"].device
    assert_close(y, ops.lora_linear_ref(**args), reference64(**operands64(args)), dtype, "y")
    out = torch.full_like(y, 1234.0)
    assert ops.lora_linear(**args, out=out) is out and torch.equal(out, y)


def _live_index(m, rows, live, g):
    """index [rows] (int32) whose first `live` entries are random rows of x, repeats allowed,
    and the rest -1 as compact_rows leaves them: the kernel must not read those."""
    index = torch.full((rows,), -1, dtype=torch.int32)
    index[:live] = torch.randint(m, (live,), generator=g, dtype=torch.int32)
    return index


@pytest.mark.parametrize("device,dtype,shape", cases(
    [(67, 33, 130, 5), (5, 130, 7, 8)], [(67, 33, 130, 5), (64, 896, 4864, 8), (4099, 896, 896, 8)]
))
@pytest.mark.parametrize("live", ["none", "one", "all", "some"])
@pytest.mark.parametrize("with_out", [False, True], ids=["new", "out"])
def test_row_index(device, dtype, shape, live, with_out):
    """y[i] = f(x[index[i]]) for i < count; rows of out= past the count keep their values."""
    m = shape[0]
    rows = m + 3  # index longer than x has rows: the count is what bounds the work
    g = torch.Generator().manual_seed(m)
    n_live = {"none": 0, "one": 1, "all": rows, "some": rows // 3}[live]
    index = _live_index(m, rows, n_live, g).to(device)
    count = torch.tensor([n_live], dtype=torch.int32, device=device)
    args = make_inputs(shape, dtype, device)
    fill = torch.full((rows, shape[2]), 1234.0, dtype=dtype, device=device)
    out = fill.clone() if with_out else None
    with torch.no_grad():
        y = ops.lora_linear(**args, index=index, count=count, out=out)
        ref = ops.lora_linear_ref(**args, index=index, count=count)
    assert y.shape == (rows, shape[2])
    if with_out:
        assert y is out and torch.equal(out[n_live:], fill[n_live:])
    picked = operands64(dict(args, x=args["x"][index[:n_live].long()]))
    assert_close(y[:n_live], ref[:n_live], reference64(**picked), dtype, "y[:count]")


@pytest.mark.parametrize("device,dtype,shape", cases([(67, 33, 130, 5)], [(67, 896, 4864, 8)]))
def test_row_index_out_of_range_skipped(device, dtype, shape):
    """Entries of index[:count] outside [0, M) are skipped, as the compiled gather / scatter
    skip them: their rows of out= keep their values, the other rows are computed as usual."""
    m, n = shape[0], shape[2]
    index = torch.tensor([3, m, -1, 0, m + 100, 2**31 - 1, m - 1], dtype=torch.int32,
                         device=device)
    count = torch.tensor([index.numel()], dtype=torch.int32, device=device)
    valid = (index >= 0) & (index < m)
    args = make_inputs(shape, dtype, device)
    fill = torch.full((index.numel(), n), 1234.0, dtype=dtype, device=device)
    out = fill.clone()
    good = index[valid]
    with torch.no_grad():
        ops.lora_linear(**args, index=index, count=count, out=out)
        ref = ops.lora_linear_ref(**args, index=good,
                                  count=torch.tensor([good.numel()], dtype=torch.int32,
                                                     device=device))
    assert torch.equal(out[~valid], fill[~valid])
    picked = operands64(dict(args, x=args["x"][good.long()]))
    assert_close(out[valid], ref, reference64(**picked), dtype, "y[valid rows]")


@CUDA
def test_row_index_in_cuda_graph():
    """The count is read on the device: a captured launch follows the count set after it."""
    shape, rows = (64, 896, 4864, 8), 16
    args = make_inputs(shape, torch.bfloat16, "cuda")
    index = torch.arange(rows, dtype=torch.int32, device="cuda").flip(0)
    count = torch.ones(1, dtype=torch.int32, device="cuda")
    out = torch.zeros(rows, shape[2], dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        ops.lora_linear(**args, index=index, count=count, out=out)  # autotunes
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ops.lora_linear(**args, index=index, count=count, out=out)
        out.zero_()
        count.fill_(5)
        graph.replay()
        ref = ops.lora_linear_ref(**args, index=index, count=count)
    torch.cuda.synchronize()
    picked = operands64(dict(args, x=args["x"][index[:5].long()]))
    assert_close(out[:5], ref[:5], reference64(**picked), torch.bfloat16, "y[:count]")
    assert not out[5:].any()


def _grads(fn, args, dy, names):
    leaves = {k: args[k].detach().requires_grad_() for k in names}
    fn(**dict(args, **leaves)).backward(dy)
    return {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("device,dtype,shape", cases())
@pytest.mark.parametrize("wrt", [("x", "lora_A", "lora_B"), ("lora_A", "lora_B"), ("x",)],
                         ids=["x,A,B", "A,B", "x"])
def test_backward(device, dtype, shape, wrt):
    """dx, dA, dB against autograd through the reference (in dtype and in float64)."""
    args = make_inputs(shape, dtype, device, seed=1)
    dy = torch.randn(shape[0], shape[2], generator=torch.Generator().manual_seed(2))
    dy = dy.to(args["x"])
    args64 = operands64(args)
    got = _grads(ops.lora_linear, args, dy, wrt)
    ref = _grads(ops.lora_linear_ref, args, dy, wrt)
    ref64 = _grads(reference64, args64, dy.double(), wrt)
    for name in wrt:
        assert got[name].dtype == args[name].dtype, name
        assert_close(got[name], ref[name], ref64[name], dtype, f"d{name}")


@pytest.mark.parametrize("device,dtype,shape", cases([(67, 33, 130, 5)], [(67, 896, 896, 8)]))
def test_backward_without_lora(device, dtype, shape):
    args = make_inputs(shape, dtype, device, lora=False, seed=4)
    dy = torch.randn(shape[0], shape[2], generator=torch.Generator().manual_seed(5))
    dy = dy.to(args["x"])
    got = _grads(ops.lora_linear, args, dy, ["x"])["x"]
    ref = _grads(ops.lora_linear_ref, args, dy, ["x"])["x"]
    assert_close(got, ref, dy.double() @ args["weight"].double(), dtype, "dx")


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=CPU),
                                    pytest.param("cuda", marks=CUDA)])
def test_lora_cast_to_x_dtype(device):
    """bf16 adapters on an fp32 layer: cast to fp32 for the kernel, grads back in bf16."""
    shape = (67, 33, 130, 5)
    args = make_inputs(shape, torch.float32, device, seed=6, lora_dtype=torch.bfloat16)
    dy = torch.randn(shape[0], shape[2], generator=torch.Generator().manual_seed(7)).to(device)
    got = _grads(ops.lora_linear, args, dy, ["lora_A", "lora_B"])
    ref = _grads(ops.lora_linear_ref, args, dy, ["lora_A", "lora_B"])
    for name in ("lora_A", "lora_B"):
        assert got[name].dtype == torch.bfloat16
        torch.testing.assert_close(got[name], ref[name])  # bf16 tolerances: one rounding apart
    with torch.no_grad():
        y, ref = ops.lora_linear(**args), ops.lora_linear_ref(**args)
        assert_close(y, ref, reference64(**operands64(args)), torch.float32)


# Dispatch ------------------------------------------------------------------------------------


def _spy_kernel(monkeypatch):
    calls = []
    from python_kernels import lora_linear as triton_lora
    kernel = triton_lora.lora_linear
    monkeypatch.setattr(triton_lora, "lora_linear",
                        lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    return calls


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=CPU),
                                    pytest.param("cuda", marks=CUDA)])
def test_dispatch_triton(monkeypatch, device):
    """LAYERROUTE_BACKEND=triton runs the kernel (on CPU under the interpreter); on CUDA it is
    also the default."""
    if device == "cuda":
        monkeypatch.delenv("LAYERROUTE_BACKEND")
    calls = _spy_kernel(monkeypatch)
    assert ops.backend("lora_linear", torch.device(device)) == "triton"
    ops.lora_linear(**make_inputs((5, 7, 33, 5), torch.float32, device))
    assert calls == [1]


@pytest.mark.parametrize("forced", ["torch", None])
def test_dispatch_torch(monkeypatch, forced):
    """LAYERROUTE_BACKEND=torch, and no setting on CPU, run the reference, not the kernel."""
    if forced is None:
        monkeypatch.delenv("LAYERROUTE_BACKEND")
    else:
        monkeypatch.setenv("LAYERROUTE_BACKEND", forced)
    calls = _spy_kernel(monkeypatch)
    args = make_inputs((5, 7, 33, 5), torch.float32, "cpu")
    assert torch.equal(ops.lora_linear(**args), ops.lora_linear_ref(**args))
    assert calls == []


def test_dispatch_triton_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.lora_linear(**make_inputs((5, 7, 33, 5), torch.float32, "cpu"))


# Argument checks -----------------------------------------------------------------------------


def _bad(args, name):
    """args with one argument made wrong, per `name`."""
    a = dict(args)
    change = {
        "x_dtype": lambda: dict(x=a["x"].to(torch.int32)),
        "x_noncontig": lambda: dict(x=a["x"].t().contiguous().t()),
        "x_1d": lambda: dict(x=a["x"][0]),
        "weight_K": lambda: dict(weight=a["weight"][:, 1:].contiguous()),
        "weight_dtype": lambda: dict(weight=a["weight"].half()),
        "weight_grad": lambda: dict(weight=a["weight"].clone().requires_grad_()),
        "bias_N": lambda: dict(bias=a["bias"][1:]),
        "lora_A_K": lambda: dict(lora_A=a["lora_A"][:, 1:]),
        "lora_B_r": lambda: dict(lora_B=a["lora_B"][:, 1:]),
        "lora_B_none": lambda: dict(lora_B=None),
        "scale_tensor": lambda: dict(scale=torch.tensor(0.5)),
        "index_int64": lambda: dict(index=torch.zeros(3, dtype=torch.int64),
                                    count=torch.ones(1, dtype=torch.int32)),
        "count_none": lambda: dict(index=torch.zeros(3, dtype=torch.int32)),
        "out_shape": lambda: dict(out=torch.empty(5, 32)),
        "out_grad": lambda: dict(lora_A=a["lora_A"].clone().requires_grad_(),
                                 out=torch.empty(5, 33)),
        "index_grad": lambda: dict(x=a["x"].clone().requires_grad_(),
                                   index=torch.zeros(3, dtype=torch.int32),
                                   count=torch.ones(1, dtype=torch.int32)),
    }[name]()
    return dict(a, **change)


@pytest.mark.parametrize("name,error,match", [
    ("x_dtype", TypeError, "`x` must be float32"),
    ("x_noncontig", ValueError, "`x` must be contiguous"),
    ("x_1d", ValueError, "`x` must be 2-D"),
    ("weight_K", ValueError, "`weight` must be 2-D"),
    ("weight_dtype", TypeError, "`weight` must have the dtype of `x`"),
    ("weight_grad", ValueError, "`weight` requires grad"),
    ("bias_N", ValueError, "`bias` must have shape"),
    ("lora_A_K", ValueError, "`lora_A` must be 2-D"),
    ("lora_B_r", ValueError, "`lora_B` must have shape"),
    ("lora_B_none", ValueError, "both be tensors or both be None"),
    ("scale_tensor", TypeError, "`scale` must be a Python float"),
    ("index_int64", TypeError, "`index` must be int32"),
    ("count_none", ValueError, "`index` and `count`"),
    ("out_shape", ValueError, r"`out` must have shape \[5, 33\]"),
    ("out_grad", RuntimeError, "out= is inference only"),
    ("index_grad", RuntimeError, "row-list variant .* is inference only"),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_argument_checks(monkeypatch, name, error, match, backend):
    monkeypatch.setenv("LAYERROUTE_BACKEND", backend)
    args = make_inputs((5, 7, 33, 5), torch.float32, "cpu")
    with pytest.raises(error, match=match):
        ops.lora_linear(**_bad(args, name))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float64_takes_the_torch_expression(monkeypatch, backend):
    """float64 (for gradcheck of the model) runs the unfused expression whatever the backend,
    with exact gradients."""
    monkeypatch.setenv("LAYERROUTE_BACKEND", backend)
    args = {k: (v.double() if torch.is_tensor(v) else v)
            for k, v in make_inputs((5, 7, 6, 3), torch.float32, "cpu").items()}
    x, A, B = (args[k].clone().requires_grad_() for k in ("x", "lora_A", "lora_B"))
    y = ops.lora_linear(x, args["weight"], args["bias"], A, B, args["scale"])
    want = x @ args["weight"].T + args["bias"] + args["scale"] * (x @ A.T) @ B.T
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, A, B: ops.lora_linear(x, args["weight"], args["bias"], A, B, args["scale"]), (x, A, B))


@pytest.mark.parametrize("limit", [101376, 166912, 232448])       # sm_86/89, sm_80, sm_90
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_config_pruning_fits_the_shared_memory(monkeypatch, limit, dtype):
    """Every config the pruning keeps, at every row count and rank, fits the device's shared
    memory by the bound (which tests/triton_sm_compile.py checks against compiled kernels);
    where no config of a set does, one fallback config with a smaller BLOCK_K is kept."""
    from python_kernels import device as device_info
    from python_kernels import lora_linear as kernel

    monkeypatch.setattr(device_info, "shared_memory_limit", lambda device: limit)
    x = torch.empty(1, 8, dtype=dtype)
    for rows in (1, 16, 32, 64, 128, 4096):                          # M_BUCKET: powers of 2
        for r_pad in (16, 32, 64, 128, 256):
            kept = kernel._prune_configs(None, {"M_BUCKET": rows, "x_ptr": x}, R_PAD=r_pad)
            assert kept
            for config in kept:
                assert rows > 64 or config.kwargs["BLOCK_M"] == max(16, rows)   # all rows
                assert kernel._shared_bound(config, x.element_size(), r_pad) <= limit, (rows, r_pad, config)
