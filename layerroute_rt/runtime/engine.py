"""The inference engine: fused (and by default LoRA-merged) weights, true skipping at prefill and
at decode, and a decode step that on CUDA never reads a device value on the host, so it can be
captured in one CUDA graph and replayed.

Weights, per block, built once from a LayerRouteModel:
  qkv [q_dim + 2 kv_dim, D] (+ bias), o [D, q_dim], gate_up [2 I, D], down [D, I], and the router
  (float32). The fused tensors replace the source model's: its projections become views of them
  (one copy of the weights), except those whose LoRA is merged in (the source keeps W, the
  engine W + scale B A: at Qwen2.5-0.5B with LoRA on q, k, v, o about 9% more). With merge=True (the default) each LoRA is folded in, W + scale B A, computed in
  float32 and rounded once; with merge=False the base stays as loaded and the LoRA factors ride
  along stacked (A of q, k and v side by side, B block-diagonal), run by the fused kernels.
  `InferenceModel.with_adapter(dir)` builds another unmerged engine over the same base tensors,
  so several adapters share one copy of the backbone.

Both prefill and the decode step run a block through layerroute_rt.runtime.block.Stages (route, qkv,
attention, o_proj, MLP), over the rows that run it.

Prefill (`prefill`, host synchronisation allowed): per block, route every real token, write the
K/V of the real tokens that skip (kv_policy "compute"), run the stages on the ones that run.

Decode (`decode_step`; on CUDA static shapes and no host reads): per block, the route kernel
writes the rows that run, their count, and the block's predicate (some row runs it), and under
"compute" the K/V of the rows that skip; the block body (qkv ... down_proj, six launches) runs
only when the predicate holds: under a CUDA-graph IF node when the step is captured and
conditional nodes exist (CUDA 12.4+), else its kernels exit early at count 0; on the CPU the
predicate is read on the host, standing in for the node. Under `sequence` granularity the
decisions are prefill's (no router runs at decode); at tau 0 every row runs every block (no
router); a block in `skip` is left out of the step.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model import checkpoint
from .. import ops
from . import prefix_cache as prefix_cache_mod
from .block import FusedBlock, Stages
from ..model.cache import KVCache
from ..config import LayerRouteConfig
from ..model.modeling import LayerRouteModel, LoRALinear


def _lora_of(m: LoRALinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The projection's (A, B) when it has a LoRA that is enabled, else None."""
    return (m.lora_A, m.lora_B) if m.lora_A is not None and m.adapter_enabled else None


def _stacked_lora(parts: list[LoRALinear], dtype: torch.dtype):
    """LoRA of projections fused along the output dim: A stacked [n r, K], B block-diagonal
    [sum N, n r], so x A^T B^T gives each projection its own update. None if none has a LoRA."""
    pairs = [_lora_of(m) for m in parts]
    live = [p for p in pairs if p is not None]
    if not live:
        return None
    r = live[0][0].shape[0]
    A = torch.cat([a for a, _ in live]).to(dtype).contiguous()
    B = torch.zeros(sum(m.weight.shape[0] for m in parts), r * len(live), dtype=dtype,
                    device=A.device)
    row, col = 0, 0
    for m, pair in zip(parts, pairs):
        n = m.weight.shape[0]
        if pair is not None:
            B[row:row + n, col:col + r] = pair[1].to(dtype)
            col += r
        row += n
    return A, B


def _merged(m: LoRALinear) -> torch.Tensor:
    """W + scale B A in float32, rounded once to W's dtype."""
    if _lora_of(m) is None:
        return m.weight
    return (m.weight.float() + m.scale * (m.lora_B.float() @ m.lora_A.float())).to(m.weight.dtype)


def _share_rows(parts: list[LoRALinear], fused: torch.Tensor, attr: str) -> None:
    """Point each part's `attr` (weight or bias) at its rows of `fused` (their concatenation)."""
    row = 0
    for m in parts:
        p = getattr(m, attr)
        n = p.shape[0]
        p.data = fused[row:row + n]
        row += n


def _fuse_block(block, merge: bool, base: FusedBlock | None = None) -> FusedBlock:
    attn, mlp = block.self_attn, block.mlp
    qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
    dtype = attn.q_proj.weight.dtype
    if base is not None:             # another adapter over the same base tensors
        weights = dict(qkv_w=base.qkv_w, qkv_b=base.qkv_b, o_w=base.o_w,
                       gate_up_w=base.gate_up_w, down_w=base.down_w)
    else:
        w = _merged if merge else (lambda m: m.weight)
        weights = dict(qkv_w=torch.cat([w(m) for m in qkv]).contiguous(),
                       qkv_b=torch.cat([m.bias for m in qkv]).contiguous(),
                       o_w=w(attn.o_proj).contiguous(),
                       gate_up_w=torch.cat([w(m) for m in gate_up]).contiguous(),
                       down_w=w(mlp.down_proj).contiguous())
        # The source's projections become views of the fused tensors wherever those hold the
        # source's own values (no LoRA merged into them): one copy of the weights, not two.
        for group, fused in ((qkv, weights["qkv_w"]), (gate_up, weights["gate_up_w"])):
            if not (merge and any(_lora_of(m) is not None for m in group)):
                _share_rows(group, fused, "weight")
        _share_rows(qkv, weights["qkv_b"], "bias")
    lora = {}
    if not merge:
        lora = dict(qkv_lora=_stacked_lora(qkv, dtype), o_lora=_stacked_lora([attn.o_proj], dtype),
                    gate_up_lora=_stacked_lora(gate_up, dtype),
                    down_lora=_stacked_lora([mlp.down_proj], dtype))
    return FusedBlock(norm1=block.input_layernorm.weight, norm2=block.post_attention_layernorm.weight,
                      router_w=block.router.weight.detach().reshape(-1).float().clone(),
                      router_b=block.router.bias.detach().float().clone(), **weights, **lora)


@dataclass
class DecodeState:
    """The static buffers one decode step reads and writes (fixed addresses for CUDA graphs)."""
    tokens: torch.Tensor        # [B] long: the tokens fed in this step
    positions: torch.Tensor     # [B] long: their RoPE positions
    slot: torch.Tensor          # [1] long: the cache slot they are written to
    length: torch.Tensor        # [1] long: slot + 1, the filled slots attention reads
    logits: torch.Tensor        # [B, vocab] float32: the step's output
    executed: torch.Tensor      # [L, B] bool: who ran which block in this step
    pred: torch.Tensor          # [L] bool: some row runs block l (the IF nodes' predicates)
    index: torch.Tensor         # [B] int32: the rows a router picked (the block being run)
    count: torch.Tensor         # [1] int32: their number
    ramp: torch.Tensor          # [B] int32: 0..B-1, the row list when every row runs
    all_rows: torch.Tensor      # [1] int32: B, the count when every row runs
    seq_rows: list | None       # sequence granularity: per block (index, count) fixed at prefill
    active: torch.Tensor | None = None   # [B] bool: the rows that hold a sequence (None: all);
                                         # the others (padding) run nothing and write nowhere
    batch_q: float = 1.0        # the batch policy: a block is skipped for the whole batch when
                                # at least this fraction of the active rows would skip it


class InferenceModel:
    """A LayerRouteModel's weights laid out for inference (see the module docstring).

    merge: fold the LoRA into the frozen weights (default), or keep it unmerged and fused.
    max_cache_len: the longest prompt + new tokens a cache may hold (default: the model's
    max_position_embeddings).
    use_cuda_graphs: on CUDA, capture the decode step in a CUDA graph (generate()).
    host_counts: whether decode_step reads each block's predicate (some row runs it) on the
    host to skip the body; None: except on CUDA. On the CPU the predicate is read either way
    (standing in for the CUDA graph's IF node, see branch_mode); False on CUDA: no host reads,
    so generate() captures the step in a CUDA graph.
    prefix_cache: keep the K/V of the sequences generate() ran, so that a prompt starting with
    one of them prefills only its new tokens (layerroute_rt.runtime.prefix_cache); prefix_cache_tokens
    bounds what it holds, in tokens.
    """

    def __init__(self, model: LayerRouteModel, merge: bool = True, max_cache_len: int | None = None,
                 use_cuda_graphs: bool = True, host_counts: bool | None = None,
                 prefix_cache: bool = True, prefix_cache_tokens: int = prefix_cache_mod.DEFAULT_TOKENS,
                 _base: "InferenceModel | None" = None):
        if not isinstance(model, LayerRouteModel):
            raise TypeError(f"InferenceModel: expected a LayerRouteModel, got {type(model).__name__}")
        cfg = model.config
        self.source = model
        self.config, self.lr_config, self.merged = cfg, model.lr_config, merge
        limit = cfg.max_position_embeddings
        self.max_cache_len = limit if max_cache_len is None else int(max_cache_len)
        if not 1 <= self.max_cache_len <= limit:
            raise ValueError(f"InferenceModel: max_cache_len must be in [1, {limit}] "
                             f"(max_position_embeddings), got {max_cache_len}")
        with torch.no_grad():
            bases = _base.blocks if _base is not None else [None] * len(model.blocks)
            self.blocks = [_fuse_block(b, merge, base) for b, base in zip(model.blocks, bases)]
        self.embed = model.model.embed_tokens.weight
        self.final_norm = model.model.norm.weight
        self.head = model.head_weight()
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.stages = Stages(cfg, model.lr_config.scale, self.device)
        self.tokenizer_dir = getattr(model, "source_dir", None)
        self.use_cuda_graphs = use_cuda_graphs
        self.graph_branch = "conditional_node"   # how a captured step skips a body (the ladder's level)
        self.host_counts = self.device.type != "cuda" if host_counts is None else host_counts
        if not isinstance(prefix_cache, bool):
            raise ValueError(f"InferenceModel: prefix_cache must be True or False, got {prefix_cache!r}")
        self.prefix_cache = prefix_cache_mod.PrefixCache(prefix_cache_tokens) if prefix_cache else None
        self.prefix_cache_tokens = prefix_cache_tokens

    def skip_set(self, skip_layers) -> frozenset[int]:
        """skip_layers checked: block indices in [0, layers)."""
        return self.source._skip_set(skip_layers)

    def with_adapter(self, adapter_dir) -> "InferenceModel":
        """An unmerged engine for another adapter of the same backbone (checked as load_adapter
        checks it, run with the adapter's own tau, granularity and kv_policy), sharing this
        engine's base tensors: this engine must be unmerged, since merged weights hold its own
        adapter."""
        if self.merged:
            raise ValueError("with_adapter: this engine has its LoRA merged into the weights; "
                             "build it with merge=False to share the base between adapters")
        model = self.source
        stored = LayerRouteConfig.from_dict(
            checkpoint.read_adapter_config(adapter_dir, model.config),
            source=f"{adapter_dir}/{checkpoint.ADAPTER_CONFIG_FILE}")
        saved = {n: p.detach().clone() for n, p in model.adapter_state_dict().items()}
        own = model.lr_config
        try:
            model.load_adapter(Path(adapter_dir))
            model.lr_config = stored               # its tau, granularity and kv_policy
            return InferenceModel(model, merge=False, max_cache_len=self.max_cache_len,
                                  use_cuda_graphs=self.use_cuda_graphs, host_counts=self.host_counts,
                                  prefix_cache=self.prefix_cache is not None,
                                  prefix_cache_tokens=self.prefix_cache_tokens,
                                  _base=self)
        finally:
            model.lr_config = own
            with torch.no_grad():
                for n, p in model.adapter_state_dict().items():
                    p.copy_(saved[n])

    # -- pieces ---------------------------------------------------------------------------------

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.stages.head(h, self.final_norm, self.head)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        if max_len > self.max_cache_len:
            raise ValueError(f"KV cache: {max_len} slots requested, the engine's max_cache_len is "
                             f"{self.max_cache_len}")
        return KVCache(self.config, batch_size, max_len, self.dtype, self.device)

    # -- prefill --------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, valid: torch.Tensor, cache: KVCache, tau: float,
                skip: frozenset[int] = frozenset()) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a left-padded batch of prompts into the cache, after the cache.length slots it
        already holds (none, or prefixes restored from the prefix cache: sequence b's real tokens
        so far are cache.seen[b], its next RoPE position). input_ids, valid [B, T]. Returns the
        logits of each sequence's last position [B, vocab] (float32) and the decisions [L, B, T].
        Under `sequence` granularity the decisions are made here, from the mean of each
        sequence's new hidden states (a step of its own), and held in the cache for decoding."""
        cfg, lr, st = self.config, self.lr_config, self.stages
        B, T = input_ids.shape
        start = cache.length
        if start + T > cache.max_len:
            raise ValueError(f"prefill: {start} cached + {T} new tokens do not fit a cache of "
                             f"{cache.max_len} slots")
        h = st.embed(input_ids, self.embed).reshape(B * T, -1)
        valid_f = valid.reshape(-1)
        positions = (cache.seen[:, None] + valid.long().cumsum(1) - 1).clamp(min=0).reshape(-1)
        slot0 = torch.full((1,), start, dtype=torch.long, device=self.device)
        n_real = valid.sum(1)
        # Per sequence: its number of real tokens if they are the last slots (left padding) and
        # nothing is cached before them, else -1. When all of them run a block, its attention
        # is plain causal (no mask).
        tail = torch.arange(T, device=self.device)[None, :] >= T - n_real[:, None]
        prompt_len = torch.where((valid == tail).all(1), n_real, -1).tolist() if start == 0 else [-1] * B
        total_real = int(n_real.sum())
        compute = lr.kv_policy == "compute"
        if lr.granularity == "sequence":
            cache.decide_sequences()
        executed = torch.zeros(cfg.num_hidden_layers, B * T, dtype=torch.bool, device=self.device)
        for i, blk in enumerate(self.blocks):
            if i in skip:                      # left out: no row runs it, its K/V are never read
                continue
            if lr.granularity == "token":
                _, index, count = ops.route_tokens(h, blk.router_w, blk.router_b, tau, valid_f)
            else:
                p, index, count = ops.route_sequences(h.view(B, T, -1), blk.router_w, blk.router_b,
                                                      tau, valid)
                cache.seq_exec[i] = p >= tau
            n = int(count[0])                                          # host sync: prefill only
            rows = index[:n].long()
            executed[i, rows] = True
            if compute and n < total_real:     # the real tokens that skip still write K/V
                st.route(blk, h, cache, i, positions, slot0, T, True, run=executed[i] | ~valid_f)
            if n == 0:
                continue
            q = st.qkv(blk, h, index, count, cache, i, positions, slot0, T)
            o = torch.empty(index.shape[0], cfg.q_dim, dtype=h.dtype, device=h.device)
            o[:n] = st.attend_prefill(q, cache, i, rows, T, prompt_len, start)
            st.finish(blk, h, o, index, count)
        cache.length = start + T
        cache.seen += valid.long().sum(1)
        last = h.view(B, T, -1)[:, -1].contiguous()
        return self.logits(last), executed.view(-1, B, T)

    # -- decode ---------------------------------------------------------------------------------

    def decode_state(self, cache: KVCache) -> DecodeState:
        """Static buffers for decoding after `prefill` on `cache`."""
        cfg, B, L = self.config, cache.batch_size, len(self.blocks)
        seq_rows = None
        executed = torch.zeros(L, B, dtype=torch.bool, device=self.device)
        pred = torch.zeros(L, dtype=torch.bool, device=self.device)
        if self.lr_config.granularity == "sequence":
            # Prefill's decisions, compacted once per generation outside the step (a host
            # sync is allowed here): the reference op, so that any backend serves.
            seq_rows = [ops.compact_rows_ref(cache.seq_exec[i].contiguous()) for i in range(L)]
            executed.copy_(cache.seq_exec)
            pred.copy_(torch.cat([count for _, count in seq_rows]) > 0)
        slot = torch.full((1,), cache.length, dtype=torch.long, device=self.device)
        return DecodeState(
            tokens=torch.zeros(B, dtype=torch.long, device=self.device),
            positions=cache.seen.clone(), slot=slot, length=slot + 1,
            logits=torch.zeros(B, cfg.vocab_size, dtype=torch.float32, device=self.device),
            executed=executed, pred=pred,
            index=torch.arange(B, dtype=torch.int32, device=self.device),
            count=torch.full((1,), B, dtype=torch.int32, device=self.device),
            ramp=torch.arange(B, dtype=torch.int32, device=self.device),
            all_rows=torch.full((1,), B, dtype=torch.int32, device=self.device),
            seq_rows=seq_rows)

    def _decide(self, blk: FusedBlock, h: torch.Tensor, tau: float, state: DecodeState, i: int):
        """The rows that run block i when some rows are padding or the batch policy applies
        (torch ops on the device, no host read): an active row wants the block iff its router
        says so (every active row at tau 0); if at least batch_q of the active rows do not want
        it, no row runs it. Writes state.executed[i] and state.pred[i]; returns (index, count,
        pred)."""
        active = state.active
        if tau == 0.0:
            want = torch.ones_like(state.executed[i]) if active is None else active.clone()
        else:
            want = torch.sigmoid(h.float() @ blk.router_w + blk.router_b) >= tau
            if active is not None:
                want &= active
        if state.batch_q < 1.0:
            n_active = torch.full((), want.numel(), device=want.device) if active is None else active.sum()
            skipping = n_active - want.sum()
            want &= ~(skipping >= state.batch_q * n_active)
        state.executed[i].copy_(want)
        index, count = ops.compact_rows(want)
        state.pred[i:i + 1].copy_(count > 0)
        return index, count, state.pred[i]

    def branch_mode(self, host_counts: bool | None = None) -> str:
        """How a decode step skips a block body that no row runs: "host_predicate" (the
        predicate read on the host: the CPU, or host_counts), "conditional_node" (a CUDA-graph
        IF node, while a step is captured and the installed torch and CUDA have them), or
        "early_exit" (the body's kernels run and exit at count 0: eager CUDA, or no nodes)."""
        host_counts = self.host_counts if host_counts is None else host_counts
        if self.device.type != "cuda" or host_counts:
            return "host_predicate"
        if torch.cuda.is_current_stream_capturing() and self.graph_branch == "conditional_node" and \
                conditional_nodes_available(self.device):
            return "conditional_node"
        return "early_exit"

    @contextlib.contextmanager
    def _body_if(self, pred: torch.Tensor, mode: str):
        """Run the enclosed block body only where pred (bool, 1 element, on the device) holds:
        yields whether to emit it at all."""
        if mode == "host_predicate":
            yield read_predicate(pred)
        elif mode == "conditional_node":
            from torch._higher_order_ops.cudagraph_conditional_nodes import _if_body

            with _if_body(pred):
                yield True
        else:
            yield True

    @torch.no_grad()
    def decode_step(self, state: DecodeState, cache: KVCache, tau: float,
                    skip: frozenset[int] = frozenset(), host_counts: bool | None = None) -> None:
        """One token per sequence: state.tokens in, state.logits and state.executed out; the
        cache, positions, slot and length advance. Every sequence of the batch is fed a token.

        Per block: left out if in `skip`; at tau 0 every row runs (no router); else the route
        kernel (token granularity) or prefill's decisions (sequence) give the rows, and under
        kv_policy "compute" the rows that skip get their K/V from the route kernel. The body
        runs under the block's predicate (see branch_mode). host_counts (None: the engine's):
        True reads the predicates on the host also on CUDA. cache.length keeps the prefill
        length (a captured graph cannot move a Python int); state.slot is the next slot.
        With state.active (padding rows) or state.batch_q < 1 (the batch policy), the decisions
        come from _decide instead (token granularity only)."""
        lr, st = self.lr_config, self.stages
        mode = self.branch_mode(host_counts)
        self.last_branch_mode = mode
        compute = lr.kv_policy == "compute"
        h = st.embed(state.tokens, self.embed)                                # [B, D]
        pos, slot = state.positions, state.slot
        decide = state.active is not None or state.batch_q < 1.0
        if decide and lr.granularity != "token":
            raise ValueError("decode_step: padding rows and the batch policy need token granularity")
        for i, blk in enumerate(self.blocks):
            if i in skip:
                continue
            if decide:                              # padding rows, or the batch policy
                index, count, pred = self._decide(blk, h, tau, state, i)
                if compute:                         # the active rows that skip write their K/V
                    keep = state.executed[i] if state.active is None else state.executed[i] | ~state.active
                    st.route(blk, h, cache, i, pos, slot, 1, True, run=keep)
            elif tau == 0.0:                        # p >= 0 always: every row runs, no router
                state.executed[i].fill_(True)
                index, count, pred = state.ramp, state.all_rows, None
            elif lr.granularity == "token":
                index, count, pred = state.index, state.count, state.pred[i]
                st.route(blk, h, cache, i, pos, slot, 1, compute, tau=tau, index=index,
                         count=count, pred=pred, executed=state.executed[i])
            else:
                (index, count), pred = state.seq_rows[i], state.pred[i]
                if compute:
                    st.route(blk, h, cache, i, pos, slot, 1, True, run=cache.seq_exec[i])
            with self._body_if(pred, mode) if pred is not None else contextlib.nullcontext(True) as run:
                if run:
                    q = st.qkv(blk, h, index, count, cache, i, pos, slot, 1)
                    o = st.attend_decode(q, cache, i, index, count, state.length)
                    st.finish(blk, h, o, index, count)
        st.head(h, self.final_norm, self.head, state.logits)
        state.positions += 1
        state.slot += 1
        state.length += 1


_tensor_item = torch.Tensor.item


def read_predicate(pred: torch.Tensor) -> bool:
    """A block's predicate read on the host: on the CPU, the stand-in of its CUDA-graph IF node
    (the only host read of a decode step there)."""
    return bool(_tensor_item(pred))


def conditional_nodes_available(device=None) -> bool:
    """Whether CUDA-graph IF nodes can be captured on `device` (see conditional_nodes_unavailable)."""
    return conditional_nodes_unavailable(device) is None


@functools.lru_cache(maxsize=None)
def _driver_version() -> int | None:
    """The CUDA driver's version (12040 for 12.4), from libcuda; None where it cannot be read."""
    import ctypes
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
        return version.value
    except (OSError, AttributeError):
        return None


def conditional_nodes_unavailable(device=None) -> str | None:
    """Why CUDA-graph IF nodes cannot be captured here, or None: the device must be CUDA, torch
    must expose them, and both the CUDA runtime torch was built with and the installed driver
    must be 12.4 or later (an unreadable driver version is left to the capture check)."""
    if device is not None and torch.device(device).type != "cuda":
        return f"{device} is not a CUDA device"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if not hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node"):
        return f"torch {torch.__version__} has no CUDA-graph IF nodes (begin_capture_to_if_node)"
    try:
        runtime = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
    except ValueError:
        runtime = (0, 0)
    if runtime < (12, 4):
        return f"torch was built with CUDA {torch.version.cuda}; IF nodes need 12.4+"
    driver = _driver_version()
    if driver is not None and driver < 12040:
        return f"the CUDA driver is {driver // 1000}.{driver % 1000 // 10}; IF nodes need 12.4+"
    return None
