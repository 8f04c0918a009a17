"""Training examples: one per routed step, the chat-rendered context followed by the step's own
tokens, with the loss on the step only; and a collate function for LayerRouteModel.train_forward.

The step's tokens are what the assistant writes for it, end-of-turn marker included (for the
Qwen template: the content then `<|im_end|>`); the context is everything before, rendered with
the generation prompt (`...<|im_start|>assistant\\n`). Context and step are tokenized separately,
as at inference, where the prompt is tokenized and the step generated after it.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import tokenizers
import torch

from ..runtime.toolcalls import json_value_spans
from .chat import render_chatml, to_chat_messages
from .types import ROLE_OF, ROUTED_STEP_TYPES, Trajectory

IGNORE_INDEX = -100
_TURN_START = re.compile(r"(?=<\|im_start\|>)")
Render = Callable[[list[dict[str, Any]], tuple[dict, ...], bool], str]


@dataclass(frozen=True)
class Example:
    """One step in its context. labels are the input ids on the step's tokens and IGNORE_INDEX
    elsewhere; loss_mask is True exactly on the step's tokens (the last step_len positions).
    label_weight, if set, weighs each label position in the distillation term (one per input
    id; see value_label_weight)."""
    input_ids: list[int]
    labels: list[int]
    loss_mask: list[bool]
    step_type: str
    step_len: int
    traj_id: str
    step_index: int
    label_weight: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.label_weight is not None and len(self.label_weight) != len(self.input_ids):
            raise ValueError(f"Example {self.traj_id}: label_weight has {len(self.label_weight)} entries, "
                             f"expected one per input id ({len(self.input_ids)})")


def _renderer(tokenizer: Any) -> Render:
    """The tokenizer's own chat template when it has one, else the built-in Qwen ChatML."""
    if getattr(tokenizer, "chat_template", None):
        return lambda messages, tools, gen: tokenizer.apply_chat_template(
            messages, tools=list(tools) or None, tokenize=False, add_generation_prompt=gen)
    return lambda messages, tools, gen: render_chatml(messages, tools, gen)


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Text to ids, without BOS/EOS additions, for a `tokenizers.Tokenizer` or a HF tokenizer."""
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


def _encode_turns(encode: Callable[[str], list[int]], text: str,
                  cache: dict[str, list[int]]) -> list[int]:
    """encode(text), one ChatML turn at a time through cache. Exact when <|im_start|> is an added
    token, since the tokenizer then splits the text there before anything else."""
    ids: list[int] = []
    for piece in _TURN_START.split(text):
        if piece not in cache:
            cache[piece] = encode(piece)
        ids += cache[piece]
    return ids


def _split(render: Render, messages: list[dict[str, Any]], tools: tuple[dict, ...], index: int,
           traj_id: str) -> tuple[str, str]:
    """(context with the generation prompt, the text after it that renders messages[index])."""
    context = render(messages[:index], tools, True)
    full = render(messages[:index + 1], tools, False)
    if not full.startswith(context):
        raise ValueError(f"{traj_id}: the chat template does not render step {index} as a continuation of "
                         "its context (generation prompt); use a tokenizer without a chat template to get "
                         "the built-in Qwen ChatML rendering")
    return context, full[len(context):].rstrip("\n")


def render_step(trajectory: Trajectory, index: int, tokenizer: Any = None) -> tuple[str, str]:
    """(context, step text) of trajectory.steps[index], an assistant step after at least one
    other step, rendered with the tokenizer's chat template (built-in ChatML without one)."""
    if not 0 < index < len(trajectory.steps) or trajectory.steps[index].role != "assistant":
        raise ValueError(f"{trajectory.id}: step {index} is not an assistant step with a context")
    messages = to_chat_messages(trajectory.steps)
    return _split(_renderer(tokenizer), messages, trajectory.tools, index, trajectory.id)


def build_examples(trajectories: Iterable[Trajectory], tokenizer: Any, max_length: int = 1024,
                   step_types: Sequence[str] = ROUTED_STEP_TYPES) -> list[Example]:
    """One Example per step of step_types (assistant types: tool_call, planning, final_answer).

    Sequences longer than max_length lose context tokens from the left, never step tokens; a
    step of max_length tokens or more (no room for context) is left out, with a warning."""
    bad = [t for t in step_types if ROLE_OF.get(t) != "assistant"]
    if bad:
        raise ValueError(f"step_types {bad} are not assistant steps; choose from tool_call, planning, "
                         "final_answer")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    render, encode = _renderer(tokenizer), _encoder(tokenizer)
    by_turn = len(encode("<|im_start|>")) == 1
    examples, too_long = [], 0
    for trajectory in trajectories:
        messages, cache = to_chat_messages(trajectory.steps), {}
        for index, step in enumerate(trajectory.steps):
            if step.type not in step_types or index == 0:
                continue
            context, text = _split(render, messages, trajectory.tools, index, trajectory.id)
            step_ids = encode(text)
            if len(step_ids) >= max_length:
                too_long += 1
                continue
            context_ids = (_encode_turns(encode, context, cache) if by_turn else encode(context))
            context_ids = context_ids[len(step_ids) - max_length:]
            ids = context_ids + step_ids
            mask = [False] * len(context_ids) + [True] * len(step_ids)
            labels = [IGNORE_INDEX] * len(context_ids) + step_ids
            examples.append(Example(ids, labels, mask, step.type, len(step_ids), trajectory.id, index))
    if too_long:
        warnings.warn(f"{too_long} step(s) of max_length={max_length} tokens or more were left out",
                      stacklevel=2)
    return examples


def value_label_weight(tokenizer: Any, step_ids: Sequence[int], weight: float) -> tuple[float, ...]:
    """One weight per step token: 1 + weight on the tokens that overlap a JSON value of the
    decoded step (toolcalls.json_value_spans: argument values, quotes included), 1 elsewhere.
    Character offsets come from decoding growing prefixes, so a token that ends inside a
    multi-byte character counts with the character it completes."""
    if weight < 0:
        raise ValueError(f"value_label_weight: weight must be >= 0, got {weight!r}")
    ends, end = [], 0
    for i in range(len(step_ids)):
        end = max(end, len(tokenizer.decode(list(step_ids[:i + 1]))))
        ends.append(end)
    text = tokenizer.decode(list(step_ids))
    in_value = [False] * (len(text) + 1)
    for s, e in json_value_spans(text):
        in_value[s:e] = [True] * (e - s)
    starts = [0] + ends[:-1]
    return tuple(1.0 + weight if any(in_value[s:e]) else 1.0 for s, e in zip(starts, ends))


def collate(examples: Sequence[Example], pad_id: int = 0) -> dict[str, Any]:
    """Right-pad a batch for LayerRouteModel.train_forward: input_ids, labels (IGNORE_INDEX on
    context and padding), attention_mask and loss_mask [B, T]; step_type and traj_id lists;
    step_len [B]. labels[:, 1:] are the targets of logits[:, :-1], as train_forward reads them.
    When an example has label_weight: label_weight [B, T] too (1 where an example has none)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    B, T = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        attention_mask[b, :n] = 1
        loss_mask[b, :n] = torch.tensor(e.loss_mask)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
             "loss_mask": loss_mask, "step_type": [e.step_type for e in examples],
             "traj_id": [e.traj_id for e in examples],
             "step_len": torch.tensor([e.step_len for e in examples], dtype=torch.long)}
    if any(e.label_weight is not None for e in examples):
        weight = torch.ones(B, T, dtype=torch.float32)
        for b, e in enumerate(examples):
            if e.label_weight is not None:
                weight[b, :len(e.input_ids)] = torch.tensor(e.label_weight)
        batch["label_weight"] = weight
    return batch
