"""Tool calls parsed back out of generated text (docs/DESIGN.md section 5).

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


# -- streaming: the calls of a text that grows ---------------------------------------------------

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_WS = " \t\r\n"


class _Incomplete(Exception):
    """The text ends before this can be decided."""


class _Irregular(Exception):
    """Not the template's `{"name": ..., "arguments": {...}}` layout."""


def _ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    if i == len(s):
        raise _Incomplete
    return i


def _expect(s: str, i: int, ch: str) -> int:
    i = _ws(s, i)
    if s[i] != ch:
        raise _Irregular
    return i + 1


def _string(s: str, i: int) -> tuple[str, int]:
    """The JSON string starting at s[i] (a quote) and the index after it."""
    j = i + 1
    while j < len(s) and s[j] != '"':
        j += 2 if s[j] == "\\" else 1
    if j >= len(s):
        raise _Incomplete
    try:
        return json.loads(s[i:j + 1]), j + 1
    except json.JSONDecodeError:
        raise _Irregular from None


def _value_end(s: str, i: int) -> int | None:
    """The index after the object or array that starts at s[i], or None if s ends inside it."""
    depth, j = 0, i
    while j < len(s):
        c = s[j]
        if c == '"':
            j += 1
            while j < len(s) and s[j] != '"':
                j += 2 if s[j] == "\\" else 1
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


def _block_call(body: str, closed: bool) -> tuple[str | None, str, bool]:
    """One <tool_call> block's (name or None while unknown, arguments text so far, complete).
    The template's layout streams: the name once its string is whole, then the arguments'
    characters as they come, exactly as written. Any other layout waits for the block to close
    and is parsed then (arguments re-serialized); a block that does not parse gives no call."""
    name = None
    try:
        i = _expect(body, 0, "{")
        i = _ws(body, i)
        if body[i] != '"':
            raise _Irregular
        key, i = _string(body, i)
        if key != "name":
            raise _Irregular
        i = _expect(body, i, ":")
        i = _ws(body, i)
        if body[i] != '"':
            raise _Irregular
        name, i = _string(body, i)
        i = _expect(body, i, ",")
        i = _ws(body, i)
        if body[i] != '"':
            raise _Irregular
        key, i = _string(body, i)
        if key not in ("arguments", "parameters"):
            raise _Irregular
        i = _expect(body, i, ":")
        i = _ws(body, i)
        if body[i] not in "{":
            raise _Irregular
        end = _value_end(body, i)
        return name, body[i:end], end is not None
    except _Incomplete:
        if not closed:
            return name, "", False
    except _Irregular:
        pass
    if not closed:
        return name, "", False
    call = next(iter(_parse_block(body, "<tool_call> block")), {})
    if "name" not in call or (name is not None and call["name"] != name):
        return name, "", True                # a name already streamed keeps its place
    return call["name"], json.dumps(call["arguments"], ensure_ascii=False), True


def scan_tool_calls(text: str, final: bool) -> tuple[list[tuple[str, str, bool]], str | None]:
    """The tool calls of `text` as far as they are decided, and the content (None until the end,
    or where there are calls): ([(name, arguments text so far, complete)], content).

    An answer that starts with <tool_call> (after white space) streams its calls as they are
    written (_block_call); prose after the last block is dropped. Any other answer is decided
    at the end by parse_tool_calls (fenced or bare JSON calls, arguments re-serialized), or is
    content. What `final=False` gives is a prefix of what a longer text gives: each call's
    arguments only grow, and nothing is taken back."""
    lead = text.lstrip(_WS)
    if not lead.startswith(_OPEN):
        if not final:
            return [], None
        calls = [c for c in parse_tool_calls(text) if "name" in c]
        if calls:
            return [(c["name"], json.dumps(c["arguments"], ensure_ascii=False), True) for c in calls], None
        return [], text
    calls = []
    pos = len(text) - len(lead) + len(_OPEN)
    while True:
        end = text.find(_CLOSE, pos)
        closed = end >= 0 or final
        name, args, complete = _block_call(text[pos:] if end < 0 else text[pos:end], closed)
        if name is not None:
            calls.append((name, args, complete))
        if end < 0:
            break
        rest = text[end + len(_CLOSE):]
        nxt = rest.lstrip(_WS)
        if not nxt.startswith(_OPEN):
            break
        pos = len(text) - len(nxt) + len(_OPEN)
    if final and not calls:
        return [], text
    return calls, None


class ToolCallStream:
    """OpenAI streaming deltas of a growing answer with tools: `update(text, final)` returns the
    new deltas since the last call, each {"content": str} or {"tool_calls": [{"index", ...}]}:
    a call's first delta carries its id, type and name (arguments ""), later ones argument
    fragments. `result(text)` is the non-streamed answer, (content, calls as OpenAI tool calls),
    with the same ids: the streamed fragments of a call join into its arguments."""

    def __init__(self, new_id):
        self.new_id = new_id
        self.ids: list[str] = []
        self.sent_args: list[str] = []
        self.content_sent = False

    def update(self, text: str, final: bool = False) -> list[dict]:
        calls, content = scan_tool_calls(text, final)
        out = []
        for i, (name, args, _) in enumerate(calls):
            if i == len(self.ids):
                self.ids.append(self.new_id())
                self.sent_args.append("")
                out.append({"tool_calls": [{"index": i, "id": self.ids[i], "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})
            sent = self.sent_args[i]
            if len(args) > len(sent):
                out.append({"tool_calls": [{"index": i, "function": {"arguments": args[len(sent):]}}]})
                self.sent_args[i] = args
        if content and not self.content_sent and not self.ids:
            out.append({"content": content})
            self.content_sent = True
        return out

    def result(self, text: str) -> tuple[str | None, list[dict]]:
        self.update(text, final=True)            # ids for calls not streamed yet
        calls, content = scan_tool_calls(text, True)
        return content, [{"id": self.ids[i], "type": "function", "function": {"name": n, "arguments": a}}
                         for i, (n, a, _) in enumerate(calls)]
