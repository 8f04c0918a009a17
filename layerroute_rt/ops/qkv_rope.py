"""qkv_rope, a block stage: input RMSNorm, the fused q/k/v projection with its LoRA, RoPE, and
the K/V cache write, over the listed rows (row lists: the package docstring). Inference only."""

from __future__ import annotations

from ._checks import _check_index_count, _check_lora_pair, _check_norm, _check_out, _check_rows, _listed_rows
from ._dispatch import _TRITON_KERNELS, _custom_op, backend
from ._kv_write import _check_kv_write, _write_kv_ref


try:
    from python_kernels import qkv_rope as _qkv_rope_triton

    _TRITON_KERNELS.add("qkv_rope")
except ImportError:  # no Triton: the reference runs
    _qkv_rope_triton = None


def _check_qkv_rope(h, index, count, norm_weight, eps, weight, bias, lora_A, lora_B, scale,
                    positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, q_out):
    op = "qkv_rope"
    _check_rows(op, h, "h")
    _check_index_count(op, index, count, h, "h")
    _check_norm(op, norm_weight, eps, h)
    hd = k_cache.shape[-1] if k_cache.dim() == 4 else 1
    if q_out.dim() != 2 or q_out.shape[0] != index.shape[0] or q_out.shape[1] % hd:
        raise ValueError(f"{op}: `q_out` must be [M, H x hd] = [{index.shape[0]}, H x {hd}] (M "
                         f"from `index`), got {list(q_out.shape)}")
    _check_out(op, "q_out", q_out, tuple(q_out.shape), h.dtype, h)
    _check_kv_write(op, h, weight, bias, positions, inv_freq, k_cache, v_cache, valid, slot,
                    rows_per_seq, q_out.shape[1] // hd)
    _check_lora_pair(op, lora_A, lora_B, weight.shape[0], h.shape[1], h)


def qkv_rope_ref(h, index, count, norm_weight, eps, weight, bias, lora_A, lora_B, scale,
                 positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, q_out, *, check=True) -> None:
    if check:
        _check_qkv_rope(h, index, count, norm_weight, eps, weight, bias, lora_A, lora_B, scale,
                        positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, q_out)
    n, rows = _listed_rows("qkv_rope", index, count, h.shape[0], unique=False)
    if n:
        q = _write_kv_ref(h if rows is None else h[rows], rows, weight, bias, lora_A, lora_B,
                          scale, positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq,
                          norm_weight, eps, True)
        q_out[:n] = q.reshape(n, -1)


def qkv_rope(h, index, count, norm_weight, eps, weight, bias, lora_A, lora_B, scale, positions,
             inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, q_out, *,
             check: bool = True) -> None:
    """The qkv stage: for i < count, row r = index[i] of h [N, D]: xn = RMSNorm(h[r]) with
    norm_weight; [q | k | v] = xn weight^T + bias + scale (xn A^T) B^T; q_out[i] = RoPE(q) at
    positions[r] ([M, H hd]); K = RoPE(k) and V = v written to the cache layer at slot
    slot[0] + r % rows_per_seq of sequence r // rows_per_seq, whose valid entry is set. Rows of
    q_out from count on are not written. One launch on the Triton path."""
    if check:
        _check_qkv_rope(h, index, count, norm_weight, eps, weight, bias, lora_A, lora_B, scale,
                        positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, q_out)
    _qkv_rope_op(h, index, count, norm_weight, float(eps), weight, bias, lora_A, lora_B,
                 float(scale), positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq,
                 q_out)


@_custom_op("qkv_rope", "(Tensor h, Tensor index, Tensor count, Tensor norm_weight, float eps, "
            "Tensor weight, Tensor bias, Tensor? lora_A, Tensor? lora_B, float scale, "
            "Tensor positions, Tensor inv_freq, Tensor(a!) k_cache, Tensor(b!) v_cache, "
            "Tensor(c!) valid, Tensor slot, int rows_per_seq, Tensor(d!) q_out) -> ()",
            ("k_cache", "v_cache", "valid", "q_out"))
def _qkv_rope_op(h, index, count, norm_weight, eps, weight, bias, lora_A, lora_B, scale,
                 positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, q_out) -> None:
    if backend("qkv_rope", h.device) == "triton":
        _qkv_rope_triton.qkv_rope(h, index, count, norm_weight, float(eps), weight, bias, lora_A,
                                  lora_B, float(scale), positions, inv_freq, k_cache, v_cache,
                                  valid, slot, rows_per_seq, q_out)
    else:
        qkv_rope_ref(h, index, count, norm_weight, eps, weight, bias, lora_A, lora_B, scale,
                     positions, inv_freq, k_cache, v_cache, valid, slot, rows_per_seq, q_out,
                     check=False)
