"""The ops: one file per op, one dispatch point per op (compiled extension layerroute_rt._C >
Triton > torch reference; docs/DESIGN.md section 4).

Each op module holds the op's argument checks, its plain-torch reference `<op>_ref` (the oracle
of every kernel test and the fallback where no kernel exists), its fake impl and its dispatching
function. `LAYERROUTE_BACKEND=torch|triton|cuda`, read on every call, forces one backend; `cuda`
means the compiled extension, whatever the device. The compiled ops are `torch.ops.layerroute.*`,
declared in csrc/torch_bindings.cpp; their fake (meta) impls are registered here, so
torch.compile and CUDA-graph capture see through them. The decode-step ops (the block stages and
decode_attention) are torch.library custom ops `layerroute::<op>` (`_dispatch._custom_op`:
explicit schema, fake impl), whose implementation picks the Triton kernel or the torch
reference; the public function checks the arguments, then calls the op. lora_linear,
route_tokens and route_sequences, which return new tensors and are trained through, are
functional custom ops (`_dispatch._functional_op`: fake impl and autograd formula); in eager
mode their public function takes the kernels' own autograd path.

The block stages (route_kv, qkv_rope, linear_scatter_add, norm_gate_up; norm_linear for the
head) are the kernels layerroute_rt.runtime.block runs a block with, at prefill and at decode.
Row spaces: h is the residual [N, D]; a row list (index int32 [M], count int32 [1]) names the
rows of h that run, and the stages' intermediate tensors (q, the attention output, the MLP
activation) are in gathered space (row i < count is h's index[i]). RoPE angles are positions x
inv_freq in float32 (reference.rope_inv_freq: the engine's one table); a row r of h caches its
K/V at sequence r // rows_per_seq, slot slot[0] + r % rows_per_seq.

Layout: _dispatch (the backend choice and op registration), _checks (argument checks shared by
several ops), reference (the one RMSNorm and RoPE), _kv_write (the K/V write two stages share),
then one module per op, each named after its kernel in python_kernels/. Adding an op: its schema
and kernels in csrc/ (or a Triton kernel in python_kernels/<op>.py), then a module here with the
checks, the reference, the fake impl and the dispatching function, exported below.
"""

from ._dispatch import BACKENDS, PYTHON_OPS, _COMPILED_KERNELS, _TRITON_KERNELS, _triton_runs_on, backend, extension_error
from .reference import rms_norm_ref, rope_cos_sin, rope_inv_freq, rope_ref
from .compact_rows import compact_rows, compact_rows_ref
from .lora_linear import lora_linear, lora_linear_ref
from .router import route_sequences, route_sequences_ref, route_tokens, route_tokens_ref
from .decode_attention import decode_attention, decode_attention_math, decode_attention_ref
from .route_kv import route_kv, route_kv_ref
from .qkv_rope import qkv_rope, qkv_rope_ref
from .linear_scatter_add import linear_scatter_add, linear_scatter_add_ref
from .norm_gate_up import norm_gate_up, norm_gate_up_ref
from .norm_linear import norm_linear, norm_linear_ref

__all__ = [
    "BACKENDS", "backend", "extension_error",
    "rms_norm_ref", "rope_cos_sin", "rope_inv_freq", "rope_ref",
    "compact_rows", "compact_rows_ref", "lora_linear", "lora_linear_ref",
    "route_tokens", "route_tokens_ref", "route_sequences", "route_sequences_ref",
    "decode_attention", "decode_attention_math", "decode_attention_ref",
    "route_kv", "route_kv_ref", "qkv_rope", "qkv_rope_ref",
    "linear_scatter_add", "linear_scatter_add_ref", "norm_gate_up", "norm_gate_up_ref",
    "norm_linear", "norm_linear_ref",
]
