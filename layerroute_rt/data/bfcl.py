"""The Berkeley Function Calling Leaderboard (BFCL v4) data: its single-turn question files, their
possible answers, and the steps they give for training.

A BFCL record is one JSON object per line: `id`, `question` (a list of turns, each a list of chat
messages) and `function` (the function docs, JSON-schema-like with BFCL's own type names: dict,
float, tuple, any). Its possible answer (possible_answer/<same file name>) is `ground_truth`: a list
of calls `{name: {param: [allowed values]}}`, where "" among the allowed values means the parameter
may be left out. `irrelevance` has no answers: no function fits, and the right output is no call.

The live_* categories are kept for an outside check: `load_category` refuses them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chat import format_tool_calls
from .types import DataFormatError, Step, Trajectory

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance",
              "simple_java", "simple_javascript")
NO_CALL_CATEGORIES = ("irrelevance",)
_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string"}


@dataclass(frozen=True)
class BfclCase:
    """One BFCL question: the chat messages of its (single) turn, the functions offered as
    OpenAI-style tools, the raw function docs, and the possible answers (None: no call is right)."""
    id: str
    category: str
    messages: tuple[dict[str, str], ...]
    functions: tuple[dict[str, Any], ...]
    ground_truth: tuple[dict[str, dict[str, list]], ...] | None

    @property
    def tools(self) -> tuple[dict[str, Any], ...]:
        return tuple({"type": "function", "function": to_json_schema(f)} for f in self.functions)


def to_json_schema(function: dict[str, Any]) -> dict[str, Any]:
    """A BFCL function doc with its BFCL type names (dict, float, tuple, any) as JSON schema's."""
    def convert(node):
        if isinstance(node, dict):
            out = {k: convert(v) for k, v in node.items()}
            if isinstance(out.get("type"), str):
                out["type"] = _TYPES.get(out["type"], out["type"])
            return out
        if isinstance(node, list):
            return [convert(v) for v in node]
        return node
    return convert(function)


def _check_category(category: str) -> None:
    if category.startswith("live"):
        raise ValueError(f"BFCL category {category!r}: the live_* categories are kept for an outside "
                         f"check; use one of {CATEGORIES}")
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; expected one of {CATEGORIES}")


def _read_jsonl(file: Path, required: tuple[str, ...]) -> list[dict]:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such BFCL file")
    rows = []
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{file}:{n}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise DataFormatError(f"{file}:{n}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataFormatError(f"{file}:{n}: missing field(s) {missing}")
            rows.append(row)
    return rows


def _messages(row: dict, where: str) -> tuple[dict[str, str], ...]:
    turns = row["question"]
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], list) or not turns[0]:
        raise DataFormatError(f"{where}: field 'question' must be a non-empty list of turns (lists of messages)")
    if len(turns) != 1:
        raise DataFormatError(f"{where}: field 'question' has {len(turns)} turns; single-turn categories have 1")
    out = []
    for m in turns[0]:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise DataFormatError(f"{where}: field 'question': each message needs a role (system, user, "
                                  f"assistant) and a string content, got {str(m)[:200]}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _functions(row: dict, where: str) -> tuple[dict, ...]:
    fns = row["function"]
    if not isinstance(fns, list) or not fns:
        raise DataFormatError(f"{where}: field 'function' must be a non-empty list of function docs")
    for f in fns:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or \
                not isinstance(f.get("parameters"), dict):
            raise DataFormatError(f"{where}: field 'function': each entry needs a string 'name' and a "
                                  f"'parameters' object, got {str(f)[:200]}")
    return tuple(fns)


def _ground_truth(row: dict, where: str) -> tuple[dict, ...]:
    gt = row["ground_truth"]
    if not isinstance(gt, list) or not gt:
        raise DataFormatError(f"{where}: field 'ground_truth' must be a non-empty list of calls")
    for call in gt:
        if not isinstance(call, dict) or len(call) != 1:
            raise DataFormatError(f"{where}: field 'ground_truth': each call is an object with one key "
                                  f"(the function name), got {str(call)[:200]}")
        (name, params), = call.items()
        if not isinstance(params, dict) or not all(isinstance(v, list) for v in params.values()):
            raise DataFormatError(f"{where}: field 'ground_truth': {name}'s parameters must map each name "
                                  f"to a list of allowed values, got {str(params)[:200]}")
    return tuple(gt)


def load_category(data_dir, category: str) -> list[BfclCase]:
    """Every case of one BFCL category from `data_dir` (bfcl_eval/data, or real_model.fetch_bfcl()),
    with its possible answers. Malformed records raise DataFormatError naming file, line and field."""
    _check_category(category)
    root = Path(data_dir)
    qfile = root / f"BFCL_v4_{category}.json"
    rows = _read_jsonl(qfile, ("id", "question", "function"))
    answers: dict[str, tuple] = {}
    if category not in NO_CALL_CATEGORIES:
        afile = root / "possible_answer" / qfile.name
        for n, row in enumerate(_read_jsonl(afile, ("id", "ground_truth")), 1):
            answers[row["id"]] = _ground_truth(row, f"{afile}:{n}")
    cases = []
    for n, row in enumerate(rows, 1):
        where = f"{qfile}:{n}"
        if category not in NO_CALL_CATEGORIES and row["id"] not in answers:
            raise DataFormatError(f"{where}: case {row['id']!r} has no possible answer in {afile}")
        cases.append(BfclCase(str(row["id"]), category, _messages(row, where), _functions(row, where),
                              answers.get(row["id"])))
    return cases


def reference_calls(case: BfclCase) -> list[tuple[str, dict[str, Any]]]:
    """One correct answer: each ground-truth call with the first allowed value of each parameter
    ("" means the parameter may be omitted: such parameters are left out when "" comes first)."""
    if case.ground_truth is None:
        return []
    calls = []
    for call in case.ground_truth:
        (name, params), = call.items()
        args = {}
        for key, allowed in params.items():
            if allowed and allowed[0] != "":
                args[key] = _first(allowed[0])
        calls.append((name, args))
    return calls


def _first(value):
    """Nested dicts of allowed values (BFCL writes {k: [v, ...]}) reduced to their first choices."""
    if isinstance(value, dict):
        return {k: _first(v[0]) if isinstance(v, list) and v and v[0] != "" else _first(v)
                for k, v in value.items() if not (isinstance(v, list) and v and v[0] == "")}
    return value


def split_ids(cases: list[BfclCase], heldout: int, seed: int = 0) -> tuple[list[BfclCase], list[BfclCase]]:
    """(train, held-out) with `heldout` cases held out, chosen by a hash of (seed, id): stable across
    runs and independent of file order."""
    ranked = sorted(cases, key=lambda c: hashlib.sha256(f"{seed}:{c.id}".encode()).hexdigest())
    return ranked[heldout:], ranked[:heldout]


def to_trajectory(case: BfclCase) -> Trajectory:
    """The case as a trajectory whose last step is its reference tool call (in the Qwen template's
    tool-call format when rendered), for training and for perplexity on tool-call steps."""
    if case.ground_truth is None:
        raise ValueError(f"{case.id}: {case.category} has no tool call to train on")
    steps = [Step("system" if m["role"] == "system" else "user", m["content"]) for m in case.messages]
    steps.append(Step("tool_call", format_tool_calls(reference_calls(case))))
    return Trajectory(tuple(steps), tools=case.tools, source=f"bfcl:{case.category}", id=case.id)
