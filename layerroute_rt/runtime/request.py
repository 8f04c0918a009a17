"""A request to the scheduler (layerroute_rt.runtime.scheduler), and the sequence the scheduler
runs for it: its sampling parameters, callbacks and results, then its place in the staging and
running caches and its statistics as it goes."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling import TextDeltas


@dataclass
class Request:
    """One sequence to generate. on_token(token, text) is called on the scheduler's thread for
    each new token (text: what it completed, as generate's stream gives it); returning True ends
    the sequence (finish "stop": its owner's stop string). on_done(request) is called once, when
    it has ended; `error` is then set if generation failed. `cancel()` may be called from any
    thread. logits_processor(tokens so far, logits [vocab] float32) -> logits runs before this
    row's sampling. logprobs k (0 or more): each new token's log-probability under the model
    (log_softmax of its raw logits, before the processor and the temperature) and the k most
    likely tokens', into `token_logprobs` as (logprob, [(token, logprob), ...] best first); such
    a row is read on the host at every step."""
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos: frozenset[int] = frozenset()
    on_token: Callable[[int, str], bool] | None = None
    on_done: Callable[["Request"], None] | None = None
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None
    logprobs: int | None = None
    # results
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish: str | None = None            # "stop", "length" or "cancelled"
    error: Exception | None = None
    stats: dict = field(default_factory=dict)
    executed: torch.Tensor | None = None  # [L, prompt + fed tokens] bool, when it ended
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class _Seq:
    """A request as the scheduler runs it: its staging cache (and row there) while it
    prefills, then its row of the running batch."""

    def __init__(self, req: Request, device, tok):
        self.req = req
        self.generator = torch.Generator(device=device).manual_seed(req.seed) \
            if req.seed is not None and req.temperature > 0 else None
        self.deltas = TextDeltas(tok, 1) if tok is not None else None
        self.staging = None
        self.srow = 0                       # its row in the staging cache
        self.slots: torch.Tensor | None = None   # its real tokens' slots there, in order
        self.todo: list[int] = []           # prompt tokens still to prefill
        self.cached_prompt = 0              # taken from the prefix cache
        self.exec_cols: list[torch.Tensor] = []   # [L, n] decisions of its tokens, in order
        self.row = -1
        self.length = 0                     # its tokens in the running cache
        self.extra = 0                      # slots after them fed past its end (sync_every > 1)
        self.steps = 0                      # decode steps that fed it a token it kept
        self.none_ran = 0                   # over those steps: blocks no row of the batch ran
        self.batch_rows = 0                 # and the active rows summed
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.failure: Exception | None = None   # its logits processor raised: it ends alone
        self.pending_lp: torch.Tensor | None = None  # log_softmax of the logits its next token came from
        self.followers: list[_Seq] = []     # requests of the same prompt, which share its prefill
        self.shared_prefill = False         # it followed another's prefill

    @property
    def deferrable(self) -> bool:
        """Its next tokens can be chosen on the device, without the host between steps."""
        return self.req.logits_processor is None and self.req.logprobs is None

    def follow(self, leader: "_Seq") -> None:
        """Take the prefill state of `leader` (the same prompt): its staging row and slots."""
        self.staging, self.srow, self.slots = leader.staging, leader.srow, leader.slots
        self.todo, self.cached_prompt = list(leader.todo), leader.cached_prompt
        self.exec_cols = list(leader.exec_cols)
