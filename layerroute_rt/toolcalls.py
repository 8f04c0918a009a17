"""Tool calls parsed back out of generated text (DESIGN.md section 5).

Three forms, found in this order, each in the text the earlier ones did not take:
  1. `<tool_call>...</tool_call>` blocks (Qwen2.5-Instruct's chat template; an unclosed last
     block runs to the end of the text);
  2. fenced code blocks: ```json (or a bare ```) holding a call object or a list of them
     (Qwen2.5-Coder's usual answer); fences in another language are left alone;
  3. bare JSON objects with "name" and "arguments" (or a list of them) in the remaining text.
A call object is `{"name": str, "arguments": dict}`; "arguments" may be a JSON string holding
an object, "parameters" is taken as an alias, and OpenAI's `{"type": "function", "function":
{...}}` wrapper is unwrapped. Each call comes back as `{"name", "arguments"}`; what looks like a
call but does not parse comes back as `{"error": str, "text": str}` in its place. Nothing raises.
"""
from __future__ import annotations

import json
import re

_TAG = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_JSON_FENCES = ("", "json", "json5", "jsonc")
_NAME_KEY = re.compile(r'"name"\s*:')
_LINE_START_JSON = re.compile(r"\n[ \t]*[\[{]")
_DECODER = json.JSONDecoder()


def parse_tool_calls(text: str) -> list[dict]:
    """Every tool call in `text`, in the order they appear (see the module docstring)."""
    if not isinstance(text, str):
        return [{"error": f"expected generated text (a string), got {type(text).__name__}", "text": repr(text)}]
    found: list[tuple[int, dict]] = []
    rest = text
    for m in _TAG.finditer(text):
        found += [(m.start(), c) for c in _parse_block(m.group(1), "<tool_call> block")]
        rest = _blank(rest, m.start(), m.end())
    for m in _FENCE.finditer(rest):
        lang = m.group(1).lower()
        body = m.group(2)
        if lang in _JSON_FENCES and (lang or body.lstrip()[:1] in ("{", "[")):
            found += [(m.start(), c) for c in _parse_block(body, f"```{lang} block")]
        rest = _blank(rest, m.start(), m.end())
    found += _bare(rest)
    found.sort(key=lambda pc: pc[0])
    return [c for _, c in found]


def _blank(text: str, start: int, end: int) -> str:
    """`text` with [start, end) replaced by spaces (positions stay as they were)."""
    return text[:start] + " " * (end - start) + text[end:]


def _parse_block(body: str, where: str) -> list[dict]:
    """The calls of one tagged or fenced block: a call object or a list of them."""
    inner = body.strip()
    fenced = _FENCE.fullmatch(inner)            # a fence inside tags
    if fenced:
        inner = fenced.group(2).strip()
    try:
        value = json.loads(inner)
    except json.JSONDecodeError as e:
        return [{"error": f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                 "text": body}]
    return _calls(value, body, where)


def _calls(value, text: str, where: str) -> list[dict]:
    items = value if isinstance(value, list) else [value]
    if not items:
        return [{"error": f"{where}: an empty list", "text": text}]
    return [to_call(item, text, where) for item in items]


def to_call(obj, text: str = "", where: str = "tool call") -> dict:
    """A decoded JSON value as {"name", "arguments"}, or {"error", "text"} saying what is wrong."""
    if isinstance(obj, dict) and obj.get("type") == "function" and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    text = text or json.dumps(obj)
    if not isinstance(obj, dict):
        return {"error": f"{where}: expected a call object, got a JSON {type(obj).__name__}", "text": text}
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return {"error": f"{where}: field 'name' must be a non-empty string, got {name!r}", "text": text}
    key = "arguments" if "arguments" in obj else "parameters" if "parameters" in obj else None
    args = {} if key is None else obj[key]
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return {"error": f"{where}: field {key!r} is a string that is not valid JSON ({e.msg})",
                    "text": text}
    if not isinstance(args, dict):
        return {"error": f"{where}: field {key!r} must be an object, got a JSON {type(args).__name__}",
                "text": text}
    return {"name": name, "arguments": args}


def _is_call(obj) -> bool:
    if isinstance(obj, dict) and obj.get("type") == "function" and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    return isinstance(obj, dict) and "name" in obj and ("arguments" in obj or "parameters" in obj)


def _bare(text: str) -> list[tuple[int, dict]]:
    """Bare JSON call objects (or lists of them) in prose. A '{' or '[' that does not decode is
    an error only where the text it decoded before failing names a call ("name": ...); the error
    runs from there to the next line that starts with '{' or '[' (or the end)."""
    found = []
    pos = 0
    while True:
        starts = [i for i in (text.find("{", pos), text.find("[", pos)) if i >= 0]
        if not starts:
            return found
        start = min(starts)
        try:
            value, end = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError as e:
            if _NAME_KEY.search(text, start, e.pos):
                nxt = _LINE_START_JSON.search(text, e.pos)
                stop = nxt.start() + 1 if nxt else len(text)
                found.append((start, {"error": f"bare JSON: not valid JSON ({e.msg})",
                                      "text": text[start:stop].strip()}))
                pos = stop
            else:
                pos = start + 1
            continue
        items = value if isinstance(value, list) else [value]
        if items and all(_is_call(v) for v in items):
            found += [(start, c) for c in _calls(value, text[start:end], "bare JSON")]
            pos = end
        else:
            pos = start + 1                    # not a call: look inside it


_LITERAL = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|true|false|null")


def json_value_spans(text: str) -> list[tuple[int, int]]:
    """The character spans [start, end) of the JSON values in `text`: every string that is not
    an object key (quotes included), number, true, false and null inside a {...} or [...]
    (outside brackets, prose is left alone). A lexer, not a parser: it needs no valid JSON, so a
    truncated or commented call still has its values found. Training weights the tokens of these
    spans (a call's argument values, where a skipped block most often changes the call)."""
    spans: list[tuple[int, int]] = []
    depth, i, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth = max(0, depth - 1)
        elif c == '"' and depth:
            end = i + 1
            while end < n and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            end = min(end + 1, n)                      # past the closing quote (or the text's end)
            after = end
            while after < n and text[after] in " \t\r\n":
                after += 1
            if after >= n or text[after] != ":":      # a key is followed by ':'
                spans.append((i, end))
            i = end
            continue
        elif depth and (c.isdigit() or c in "-.tfn"):
            m = _LITERAL.match(text, i)
            if m and not _in_word(text, i - 1) and not _in_word(text, m.end()):
                spans.append((i, m.end()))
                i = m.end()
                continue
        i += 1
    return spans


def _in_word(text: str, i: int) -> bool:
    return 0 <= i < len(text) and (text[i].isalnum() or text[i] == "_")
