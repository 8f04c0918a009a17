"""A seeded generator of synthetic agent trajectories in the Qwen/Hermes tool-calling format.

A trajectory: a system prompt with the tools' JSON schemas, a user task, then planning steps
(free-text reasoning), tool calls (`<tool_call>` JSON), tool observations and a final answer.
The tool catalog (tool_catalog.py) spans 10 domains and 40 tools whose arguments cover
strings, free text, integers, numbers, booleans, enums, arrays and nested objects.

Lengths are controlled: each tool call and planning step is built to a target length drawn
uniformly from its range (measured by `length_fn`: characters by default, or tokens with a
tokenizer's length), so the ranges decide whether tool calls and planning steps of the same
length exist. Everything is drawn from `random.Random` seeded per trajectory: the same seed gives
the same trajectories, and a longer list extends a shorter one with the same seed.
"""
from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .chat import format_tool_calls
from .tool_catalog import DOMAINS, TOOLS, Tool
from .types import Step, Trajectory

LengthFn = Callable[[str], int]
_MAX_ATTEMPTS = 40



SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant with access to tools. Think about what you need, call tools when "
    "you lack information, and give a concise final answer.",
    "You are an agent that solves tasks step by step. Plan before acting, use the tools below, "
    "and report the result clearly.",
    "You are a {domain} assistant. Use the available functions when they help, and never invent "
    "results that a tool should provide.",
)


# --------------------------------------------------------------------------- step builders
@dataclass
class _Call:
    tool: Tool
    arguments: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)


def _call_step_text(calls: list[_Call]) -> str:
    return format_tool_calls([(c.tool.name, c.arguments) for c in calls])


def _build_calls(tools: list[Tool], n_calls: int, lo: int, hi: int, length_fn: LengthFn,
                 rng: random.Random) -> list[_Call]:
    """n_calls calls (one step) whose text length lies in [lo, hi], grown towards a target drawn
    uniformly from the range; tools that cannot fit are replaced by others, and parallel calls
    that cannot fit by a single call."""
    target = rng.randint(lo, hi)
    for attempt in range(_MAX_ATTEMPTS):
        n = n_calls if attempt < _MAX_ATTEMPTS // 2 else 1
        calls = [_Call(t, t.params.sample(rng)) for t in rng.sample(tools, min(n, len(tools)))]
        length = length_fn(_call_step_text(calls))
        while length < target:
            for _ in range(6):
                call = rng.choice(calls)
                grown = call.tool.params.grow(call.arguments, rng)
                if grown is None:
                    continue
                old, call.arguments = call.arguments, grown
                new_length = length_fn(_call_step_text(calls))
                if new_length <= hi:
                    length = new_length
                    break
                call.arguments = old
            else:
                break
        if lo <= length <= hi:
            return calls
    raise ValueError(f"cannot build a tool call of length in [{lo}, {hi}] from the tools "
                     f"{[t.name for t in tools]}: widen or shift tool_call_len")


def _distinct(sentences: Iterator[str], patience: int = 20) -> Iterator[str]:
    """The stream without repeats; a repeat passes only after `patience` repeats in a row."""
    seen: set[str] = set()
    skipped = 0
    for sentence in sentences:
        if sentence in seen and skipped < patience:
            skipped += 1
            continue
        seen.add(sentence)
        skipped = 0
        yield sentence


def _fit_text(sentences: Iterator[str], lo: int, hi: int, length_fn: LengthFn,
              rng: random.Random) -> str:
    """Sentences joined until the text reaches a target drawn from [lo, hi], never above hi: a
    sentence that would overshoot is skipped, and as a last resort cut short at a word."""
    target = rng.randint(lo, hi)
    text, misses = "", 0
    for sentence in itertools.islice(_distinct(sentences), 1000):
        candidate = f"{text} {sentence}".strip()
        if length_fn(candidate) <= hi:
            text = candidate
            if length_fn(text) >= target:
                return text
            continue
        misses += 1
        if length_fn(text) >= lo:
            return text
        if misses < 8:
            continue
        words = sentence.split()
        for k in range(len(words) - 1, 0, -1):
            candidate = f"{text} {' '.join(words[:k])}".strip()
            if lo <= length_fn(candidate) <= hi:
                return candidate
    raise ValueError(f"cannot build a text step of length in [{lo}, {hi}]: widen the range")


def _phrase(tool: Tool) -> str:
    return tool.description[0].lower() + tool.description[1:]


def _show(value: Any) -> str:
    """A short natural-language rendering of a JSON value."""
    if isinstance(value, list):
        return f"{len(value)} item{'s' * (len(value) != 1)}"
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_show(v)}" for k, v in value.items())
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _planning_sentences(task: str, calls: list[_Call], done: list[_Call],
                        rng: random.Random) -> Iterator[str]:
    """An endless stream of reasoning sentences about the next calls (or the answer, when calls
    is empty), given the calls already done."""
    openers = []
    if not done:
        openers.append(f"The user asks: {task[0].lower() + task[1:]}")
    else:
        key, value = rng.choice(list(done[-1].result.items()))
        openers.append(f"The {done[-1].tool.name} result gives {key.replace('_', ' ')} {_show(value)}.")
    if calls:
        names = " and ".join(c.tool.name for c in calls)
        openers.append(f"Next I will call {names}.")
    else:
        openers.append("I now have everything I need to answer.")
    yield from openers
    while True:
        if calls:
            call = rng.choice(calls)
            arg, value = rng.choice(list(call.arguments.items()))
            missing = [p.name for p in call.tool.params.props if p.name not in call.arguments]
            options = [
                f"{call.tool.name} can {_phrase(call.tool)}, which is what this step needs.",
                f"I will set {arg} to {_show(value)} because that matches the request.",
                f"The {arg} argument comes straight from the user's message, so I do not need to ask.",
                "If the result looks incomplete, I can refine the arguments and try again.",
                f"I should double-check that {arg} is right before calling {call.tool.name}.",
                f"After {call.tool.name} returns, I will compare the result with what the user asked for.",
            ]
            if missing:
                options.append(f"The optional {rng.choice(missing)} argument is not needed here, "
                               "so I will leave it out.")
            if done:
                options.append(f"Earlier I used {rng.choice(done).tool.name}, and its output narrows down "
                               "what to ask for now.")
        else:
            call = rng.choice(done)
            key, value = rng.choice(list(call.result.items()))
            options = [
                f"From {call.tool.name} I know the {key.replace('_', ' ')} is {_show(value)}.",
                "The answer should be short and only state what the tools returned.",
                "Nothing in the results contradicts the request, so no further calls are needed.",
                f"I will mention the {key.replace('_', ' ')} explicitly since the user will need it.",
            ]
        yield rng.choice(options)


def _answer_sentences(done: list[_Call], rng: random.Random) -> Iterator[str]:
    """An endless stream of final-answer sentences reporting the calls' results."""
    yield "Here is what I found."
    while True:
        call = rng.choice(done)
        key, value = rng.choice(list(call.result.items()))
        yield rng.choice((
            f"The {key.replace('_', ' ')} came back as {_show(value)}.",
            f"According to {call.tool.name}, {key.replace('_', ' ')}: {_show(value)}.",
            f"I used {call.tool.name} to {_phrase(call.tool)}.",
            "Let me know if you would like me to change anything.",
            "I can look into more details if that helps.",
        ))


def _task(call: _Call) -> str:
    """The user's request for a call, from its tool's template and the call's arguments."""
    return call.tool.task.format(**call.arguments)


def _result(tool: Tool, rng: random.Random) -> dict[str, Any]:
    value = tool.returns.sample(rng)
    for _ in range(rng.randint(0, 3)):
        value = tool.returns.grow(value, rng) or value
    return value


@dataclass(frozen=True)
class _Spec:
    """generate_trajectories' settings (see its docstring)."""
    domains: tuple[str, ...]
    tool_call_len: tuple[int, int]
    planning_len: tuple[int, int]
    final_answer_len: tuple[int, int]
    calls: tuple[int, int]
    planning_prob: float
    parallel_prob: float
    length_fn: LengthFn

    def __post_init__(self) -> None:
        for name in ("tool_call_len", "planning_len", "final_answer_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 1 <= low <= high, got {(lo, hi)}")
        if not 1 <= self.calls[0] <= self.calls[1]:
            raise ValueError(f"calls must be (min, max) with 1 <= min <= max, got {self.calls}")
        unknown = set(self.domains) - set(DOMAINS)
        if unknown or not self.domains:
            raise ValueError(f"unknown or no domains {sorted(unknown)}; choose from {DOMAINS}")


def _trajectory(index: int, seed: int, spec: _Spec) -> Trajectory:
    rng = random.Random(f"layerroute-synthetic:{seed}:{index}")
    main = rng.choice(spec.domains)
    second = [d for d in spec.domains if d != main]
    picked = [main] + ([rng.choice(second)] if second and rng.random() < 0.4 else [])
    callable_tools = [t for t in TOOLS if t.domain in picked]
    others = [t for t in TOOLS if t.domain not in picked]
    offered = callable_tools + rng.sample(others, rng.randint(0, 2))
    rng.shuffle(offered)

    call_steps: list[list[_Call]] = []
    for _ in range(rng.randint(*spec.calls)):
        n_calls = 2 if rng.random() < spec.parallel_prob else 1
        step = _build_calls(callable_tools, n_calls, *spec.tool_call_len, spec.length_fn, rng)
        for call in step:
            call.result = _result(call.tool, rng)
        call_steps.append(step)
    task = _task(call_steps[0][0])
    if len(call_steps) > 1 and rng.random() < 0.5:
        then = _task(call_steps[1][0])
        task += " Then " + then[0].lower() + then[1:]

    steps = [Step("system", rng.choice(SYSTEM_PROMPTS).format(domain=main)), Step("user", task)]
    done: list[_Call] = []
    for step_calls in call_steps:
        if rng.random() < spec.planning_prob:
            sentences = _planning_sentences(task, step_calls, done, rng)
            steps.append(Step("planning", _fit_text(sentences, *spec.planning_len, spec.length_fn, rng)))
        steps.append(Step("tool_call", _call_step_text(step_calls)))
        steps += [Step("observation", json.dumps(c.result, ensure_ascii=False)) for c in step_calls]
        done += step_calls
    if rng.random() < spec.planning_prob / 2:
        sentences = _planning_sentences(task, [], done, rng)
        steps.append(Step("planning", _fit_text(sentences, *spec.planning_len, spec.length_fn, rng)))
    answer = _fit_text(_answer_sentences(done, rng), *spec.final_answer_len, spec.length_fn, rng)
    steps.append(Step("final_answer", answer))
    return Trajectory(tuple(steps), tuple(t.schema() for t in offered), "synthetic",
                      f"synthetic:{seed}:{index}", {"domains": picked})


def generate_trajectories(n: int, seed: int = 0, *, tool_call_len: tuple[int, int] = (70, 320),
                          planning_len: tuple[int, int] = (60, 600),
                          final_answer_len: tuple[int, int] = (40, 300), calls: tuple[int, int] = (1, 4),
                          planning_prob: float = 0.85, parallel_prob: float = 0.15,
                          domains: tuple[str, ...] = DOMAINS, length_fn: LengthFn = len) -> list[Trajectory]:
    """n synthetic trajectories, deterministic in seed (trajectory i depends only on seed and i).

    tool_call_len / planning_len / final_answer_len: (low, high) length of each such step, in
    length_fn units (characters by default; pass e.g. `lambda s: len(tok.encode(s))` for tokens).
    The defaults overlap, so length-matched tool_call/planning pairs exist, while planning steps
    run longer on average, as in real agent data. calls: (min, max) tool-call steps per
    trajectory; planning_prob: chance of a planning step before each call; parallel_prob: chance
    that a call step holds two calls; domains: the domains whose tools are called (see DOMAINS)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    spec = _Spec(tuple(domains), tool_call_len, planning_len, final_answer_len, calls, planning_prob,
                 parallel_prob, length_fn)
    return [_trajectory(i, seed, spec) for i in range(n)]
