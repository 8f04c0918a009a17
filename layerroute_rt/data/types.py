"""The common representation of step-typed agent trajectories, shared by the synthetic generator
and the loaders."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STEP_TYPES = ("system", "user", "planning", "tool_call", "observation", "final_answer")
ROUTED_STEP_TYPES = ("tool_call", "planning")
ROLE_OF = {"system": "system", "user": "user", "planning": "assistant", "tool_call": "assistant",
           "observation": "tool", "final_answer": "assistant"}


class DataFormatError(ValueError):
    """A record that does not follow its format; the message names the file, the line (or the
    record index in a JSON list) and the field."""


@dataclass(frozen=True)
class Step:
    """One step of a trajectory.

    content is the step's own text as the model reads or writes it: for a tool_call step, one or
    more Hermes blocks `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` joined by
    newlines (see chat.format_tool_calls); for an observation, the tool's raw response (the chat
    template wraps it in <tool_response> tags)."""
    type: str
    content: str

    def __post_init__(self) -> None:
        if self.type not in STEP_TYPES:
            raise ValueError(f"unknown step type {self.type!r}; expected one of {STEP_TYPES}")
        if not isinstance(self.content, str):
            raise TypeError(f"Step.content must be a string, got {type(self.content).__name__}")

    @property
    def role(self) -> str:
        """The chat role: system, user, assistant or tool."""
        return ROLE_OF[self.type]


@dataclass(frozen=True)
class Trajectory:
    """A conversation as typed steps.

    tools: the function schemas offered, OpenAI/Qwen style ({"type": "function", "function":
    {...}}), rendered into the system prompt by the chat template. Empty when the system text
    already lists the functions itself (Hermes and Glaive data). id names the trajectory (held-out
    splits are by id); source names where it came from ("synthetic", "openai:data.jsonl", ...)."""
    steps: tuple[Step, ...]
    tools: tuple[dict[str, Any], ...] = ()
    source: str = ""
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def of_type(self, step_type: str) -> list[Step]:
        """The steps of one type, in order."""
        return [s for s in self.steps if s.type == step_type]
