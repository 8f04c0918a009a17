"""Loaders for agent data a user brings, each step tagged with its type.

Formats (JSON Lines, one record per line, or a JSON list of records):
- openai: {"messages": [...], "tools": [...]}; an assistant message with `tool_calls` is a
  tool_call step (its text, if any, a planning step before it); role "tool" is an observation.
- sharegpt: {"conversations": [{"from": "human"|"gpt"|"system"|"tool"|"function_call"|
  "observation", "value": ...}], "system"?: str, "tools"?: JSON string or list}.
- hermes: ShareGPT with `<tool_call>` JSON (or Python-dict) blocks in gpt turns and
  `<tool_response>` blocks in tool turns; read by the same parser as sharegpt.
- glaive: {"system": "SYSTEM: ...", "chat": "USER: ... ASSISTANT: <functioncall> {...} ...
  FUNCTION RESPONSE: ..."}.
- xlam: {"query": str, "tools": JSON string, "answers": JSON string of [{"name", "arguments"}]}.

Every tool call is normalised to the Qwen/Hermes text (chat.format_tool_calls). Assistant text is
a final_answer when a user turn or the end follows it, else a planning step. A malformed record
raises DataFormatError naming the file, the line (JSON Lines) or record index (JSON list), and the
field, e.g. `data.jsonl:17: field 'messages[2].tool_calls[0].function.arguments': expected a
JSON object string, got string 'oops'`.
"""
from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .chat import format_tool_calls, parse_tool_calls
from .types import DataFormatError, Step, Trajectory

FORMATS = ("openai", "sharegpt", "hermes", "glaive", "xlam")
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_TOOL_RESPONSE_BLOCK = re.compile(r"<tool_response>(.*?)</tool_response>", re.DOTALL)
_GLAIVE_MARKER = re.compile(r"(?:^|\n)[ \t]*(USER|ASSISTANT|FUNCTION RESPONSE):[ \t]?")
_GLAIVE_CALL = re.compile(r"""^\{\s*"name"\s*:\s*"([^"]+)"\s*,\s*"arguments"\s*:\s*'(.*)'\s*\}$""", re.DOTALL)
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "observation": "tool", "function_response": "tool",
                   "function_call": "function_call"}


@dataclass(frozen=True)
class _At:
    """Where a record sits: `where` for messages, `id` for the trajectory."""
    where: str
    id: str

    def fail(self, field: str | None, problem: str) -> NoReturn:
        raise DataFormatError(f"{self.where}: field '{field}': {problem}" if field
                              else f"{self.where}: {problem}")


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _brief(value: Any) -> str:
    """The JSON type and a short excerpt of a value, for error messages."""
    text = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return f"{_json_type(value)} {text[:60] + '...' if len(text) > 60 else text}"


def _need(at: _At, record: dict[str, Any], key: str, field: str, kind: str, optional: bool = False) -> Any:
    """record[key], checked to be of JSON type kind; field is its full path for messages."""
    if key not in record:
        if optional:
            return None
        at.fail(field, f"missing (expected {kind})")
    value = record[key]
    if _json_type(value) != kind:
        at.fail(field, f"expected {kind}, got {_brief(value)}")
    return value


def _loads_object(text: str) -> Any:
    """A JSON value, or a Python literal of JSON values (Hermes data often writes dicts with
    single quotes); None when it is neither."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return json.loads(json.dumps(ast.literal_eval(text)))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None


def _arguments(at: _At, value: Any, field: str) -> dict[str, Any]:
    """Call arguments given as an object or as a JSON string of an object."""
    parsed = _loads_object(value) if isinstance(value, str) else value
    if not isinstance(parsed, dict):
        at.fail(field, f"expected a JSON object string, got {_brief(value)}")
    return parsed


def _call(at: _At, value: Any, field: str) -> tuple[str, dict[str, Any]]:
    """A {"name": str, "arguments": object | JSON string} call."""
    if not isinstance(value, dict):
        at.fail(field, f"expected an object with 'name' and 'arguments', got {_brief(value)}")
    name = _need(at, value, "name", f"{field}.name", "string")
    return name, _arguments(at, value.get("arguments", {}), f"{field}.arguments")


def _tool_schema(at: _At, value: Any, field: str) -> dict[str, Any]:
    """A tool spec as {"type": "function", "function": {...}}, wrapping a bare function spec."""
    if not isinstance(value, dict):
        at.fail(field, f"expected an object, got {_brief(value)}")
    if "function" in value:
        return value
    _need(at, value, "name", f"{field}.name", "string")
    return {"type": "function", "function": value}


def _tools(at: _At, value: Any, field: str) -> tuple[dict[str, Any], ...]:
    """A list of tool specs, given as a list or a JSON string of one."""
    parsed = _loads_object(value) if isinstance(value, str) else value
    if not isinstance(parsed, list):
        at.fail(field, f"expected a list of tools (or a JSON string of one), got {_brief(value)}")
    return tuple(_tool_schema(at, t, f"{field}[{i}]") for i, t in enumerate(parsed))


def _mark_final_answers(steps: list[Step]) -> tuple[Step, ...]:
    """Assistant text followed by a user turn or the end is the final answer; other assistant
    text (followed by more assistant or tool activity) is planning."""
    return tuple(Step("final_answer", s.content)
                 if s.type == "planning" and (i + 1 == len(steps) or steps[i + 1].type == "user") else s
                 for i, s in enumerate(steps))


def _assistant_steps(at: _At, text: str, field: str) -> list[Step]:
    """An assistant turn that may hold `<tool_call>` blocks: its text (planning) then the calls."""
    blocks = _TOOL_CALL_BLOCK.findall(text)
    rest = _TOOL_CALL_BLOCK.sub("", text).strip()
    if "<tool_call>" in rest or "</tool_call>" in rest:
        at.fail(field, "unbalanced <tool_call> tags")
    if not blocks:
        return [Step("planning", text)]
    calls = []
    for k, block in enumerate(blocks):
        parsed = _loads_object(block.strip())
        if parsed is None:
            at.fail(f"{field}.tool_call[{k}]", f"not valid JSON: {block.strip()[:60]!r}")
        calls.append(_call(at, parsed, f"{field}.tool_call[{k}]"))
    return ([Step("planning", rest)] if rest else []) + [Step("tool_call", format_tool_calls(calls))]


# --------------------------------------------------------------------------- formats
def _parse_openai(at: _At, record: dict[str, Any], source: str) -> Trajectory:
    messages = _need(at, record, "messages", "messages", "array")
    if not messages:
        at.fail("messages", "expected a non-empty array")
    tools = _tools(at, record.get("tools") or [], "tools")
    steps: list[Step] = []
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            at.fail(field, f"expected an object, got {_brief(message)}")
        role = _need(at, message, "role", f"{field}.role", "string")
        if role not in ("system", "user", "assistant", "tool"):
            at.fail(f"{field}.role", f"expected system, user, assistant or tool, got {_brief(role)}")
        content = _openai_content(at, message.get("content"), f"{field}.content")
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls:
            if not isinstance(calls, list):
                at.fail(f"{field}.tool_calls", f"expected array, got {_brief(calls)}")
            parsed = []
            for j, call in enumerate(calls):
                call_field = f"{field}.tool_calls[{j}]"
                if not isinstance(call, dict):
                    at.fail(call_field, f"expected an object, got {_brief(call)}")
                function = _need(at, call, "function", f"{call_field}.function", "object")
                parsed.append(_call(at, function, f"{call_field}.function"))
            if content.strip():
                steps.append(Step("planning", content))
            steps.append(Step("tool_call", format_tool_calls(parsed)))
        elif role == "assistant":
            if not content.strip():
                at.fail(f"{field}.content", "expected text or tool_calls in an assistant message")
            steps.append(Step("planning", content))
        else:
            steps.append(Step("observation" if role == "tool" else role, content))
    return Trajectory(_mark_final_answers(steps), tools, source, at.id)


def _openai_content(at: _At, value: Any, field: str) -> str:
    """Message content: a string, null, or a list of {"type": "text", "text": ...} parts."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    at.fail(field, f"expected a string or a list of text parts, got {_brief(value)}")


def _parse_sharegpt(at: _At, record: dict[str, Any], source: str) -> Trajectory:
    turns = _need(at, record, "conversations", "conversations", "array")
    if not turns:
        at.fail("conversations", "expected a non-empty array")
    system = _need(at, record, "system", "system", "string", optional=True)
    steps = [Step("system", system)] if system else []
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            at.fail(field, f"expected an object, got {_brief(turn)}")
        speaker = _need(at, turn, "from", f"{field}.from", "string")
        if speaker not in _SHAREGPT_ROLES:
            at.fail(f"{field}.from", f"expected one of {', '.join(_SHAREGPT_ROLES)}, got {_brief(speaker)}")
        value = _need(at, turn, "value", f"{field}.value", "string")
        role = _SHAREGPT_ROLES[speaker]
        if role == "assistant":
            steps += _assistant_steps(at, value, f"{field}.value")
        elif role == "function_call":
            parsed = _loads_object(value)
            calls = parsed if isinstance(parsed, list) else [parsed]
            if parsed is None or not calls:
                at.fail(f"{field}.value", "expected a JSON call {'name', 'arguments'} or a list of them, "
                                          f"got {_brief(value)}")
            steps.append(Step("tool_call", format_tool_calls(
                [_call(at, c, f"{field}.value[{k}]") for k, c in enumerate(calls)])))
        elif role == "tool":
            bodies = _TOOL_RESPONSE_BLOCK.findall(value)
            steps += [Step("observation", body.strip()) for body in bodies or [value]]
        else:
            steps.append(Step(role, value))
    tools = _tools(at, record.get("tools") or [], "tools")
    return Trajectory(_mark_final_answers(steps), tools, source, at.id)


def _parse_glaive(at: _At, record: dict[str, Any], source: str) -> Trajectory:
    system = _need(at, record, "system", "system", "string", optional=True) or ""
    system = system.strip().removeprefix("SYSTEM:").strip()
    chat = _need(at, record, "chat", "chat", "string")
    pieces = _GLAIVE_MARKER.split(chat)
    if len(pieces) < 3:
        at.fail("chat", "no USER:/ASSISTANT:/FUNCTION RESPONSE: turns found")
    if pieces[0].strip():
        at.fail("chat", f"text before the first turn marker: {pieces[0].strip()[:60]!r}")
    steps = [Step("system", system)] if system else []
    for k, (marker, text) in enumerate(zip(pieces[1::2], pieces[2::2])):
        text = text.replace("<|endoftext|>", "").strip()
        if marker == "USER":
            steps.append(Step("user", text))
        elif marker == "FUNCTION RESPONSE":
            steps.append(Step("observation", text))
        elif "<functioncall>" in text:
            before, _, call_text = text.partition("<functioncall>")
            name, arguments = _glaive_call(at, call_text.strip(), k)
            steps += ([Step("planning", before.strip())] if before.strip() else [])
            steps.append(Step("tool_call", format_tool_calls([(name, arguments)])))
        else:
            steps.append(Step("planning", text))
    return Trajectory(_mark_final_answers(steps), (), source, at.id)


def _glaive_call(at: _At, text: str, turn: int) -> tuple[str, dict[str, Any]]:
    """Glaive's `{"name": "f", "arguments": '{...}'}` (arguments in single quotes), or plain JSON."""
    match = _GLAIVE_CALL.match(text)
    parsed = {"name": match[1], "arguments": match[2]} if match else _loads_object(text)
    problem = f"turn {turn} (ASSISTANT): <functioncall> is not a JSON object with 'name' and 'arguments'"
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
        at.fail("chat", f"{problem}: {text[:60]!r}")
    arguments = parsed.get("arguments", {})
    arguments = _loads_object(arguments) if isinstance(arguments, str) else arguments
    if not isinstance(arguments, dict):
        at.fail("chat", f"{problem}: its arguments are not a JSON object: {text[:60]!r}")
    return parsed["name"], arguments


def _parse_xlam(at: _At, record: dict[str, Any], source: str) -> Trajectory:
    query = _need(at, record, "query", "query", "string")
    tools = _tools(at, _need(at, record, "tools", "tools", "string"), "tools")
    answers_text = _need(at, record, "answers", "answers", "string")
    answers = _loads_object(answers_text)
    if not isinstance(answers, list) or not answers:
        at.fail("answers", f"expected a JSON string of a non-empty list of calls, got {_brief(answers_text)}")
    calls = [_call(at, a, f"answers[{k}]") for k, a in enumerate(answers)]
    steps = (Step("user", query), Step("tool_call", format_tool_calls(calls)))
    return Trajectory(steps, tools, source, at.id)


_PARSERS: dict[str, Callable[[_At, dict[str, Any], str], Trajectory]] = {
    "openai": _parse_openai, "sharegpt": _parse_sharegpt, "hermes": _parse_sharegpt,
    "glaive": _parse_glaive, "xlam": _parse_xlam}


# --------------------------------------------------------------------------- files
def _read_records(path: Path) -> list[tuple[_At, Any]]:
    """The records of a JSON Lines file or of a JSON list, each with its location."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataFormatError(f"{path}: the file is empty")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        return [(_At(f"{path}: record [{i}]", f"{path.name}[{i}]"), r) for i, r in enumerate(data)]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((_At(f"{path}:{n}", f"{path.name}:{n}"), json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno}); expected JSON "
                                  "Lines (one record per line) or a JSON list") from None
    return records


def _detect(records: list[tuple[_At, Any]]) -> str:
    """The format, told from the first record's keys."""
    at, first = records[0]
    if isinstance(first, dict):
        if "messages" in first:
            return "openai"
        if "conversations" in first:
            return "hermes" if any(_is_hermes(r) for _, r in records[:20]) else "sharegpt"
        if "chat" in first:
            return "glaive"
        if "query" in first and "answers" in first:
            return "xlam"
    keys = f"keys {sorted(first)}" if isinstance(first, dict) else _json_type(first)
    at.fail(None, f"cannot tell the data format from the first record ({keys}); expected 'messages' "
                  "(openai), 'conversations' (sharegpt, hermes), 'chat' (glaive) or 'query' + 'answers' "
                  "(xlam); pass format= explicitly")


def _is_hermes(record: Any) -> bool:
    turns = record.get("conversations") if isinstance(record, dict) else None
    return isinstance(turns, list) and any(isinstance(t, dict) and (
        t.get("from") == "tool" or "<tool_call>" in str(t.get("value", ""))) for t in turns)


def load_dataset(path: str | Path, format: str = "auto") -> list[Trajectory]:
    """The trajectories of a data file (JSON Lines or a JSON list) in one of FORMATS, or
    "auto" to tell it from the first record. Raises DataFormatError on a malformed record."""
    path = Path(path)
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected 'auto' or one of {FORMATS}")
    records = _read_records(path)
    format = _detect(records) if format == "auto" else format
    parse, source = _PARSERS[format], f"{format}:{path.name}"
    out = []
    for at, record in records:
        if not isinstance(record, dict):
            at.fail(None, f"expected a JSON object per record, got {_brief(record)}")
        out.append(parse(at, record, source))
    return out


def save_openai_jsonl(trajectories: Iterable[Trajectory], path: str | Path) -> None:
    """Write trajectories as OpenAI chat JSON Lines ({"messages", "tools"}), which load_dataset
    reads back into the same steps."""
    lines = []
    for trajectory in trajectories:
        messages, pending, n_calls = [], [], 0
        for step in trajectory.steps:
            if step.type == "tool_call":
                calls = []
                for name, arguments in parse_tool_calls(step.content):
                    n_calls += 1
                    pending.append(f"call_{n_calls}")
                    function = {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}
                    calls.append({"id": pending[-1], "type": "function", "function": function})
                messages.append({"role": "assistant", "content": None, "tool_calls": calls})
            elif step.type == "observation":
                call_id = pending.pop(0) if pending else ""
                messages.append({"role": "tool", "tool_call_id": call_id, "content": step.content})
            else:
                messages.append({"role": step.role, "content": step.content})
        lines.append(json.dumps({"messages": messages, "tools": list(trajectory.tools)}, ensure_ascii=False))
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
