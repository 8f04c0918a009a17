"""Chat rendering: trajectories as chat messages, and a built-in ChatML renderer that reproduces
the Qwen2.5 chat template (QWEN2_CHAT_TEMPLATE, kept here verbatim) character for character."""
from __future__ import annotations

import json
import re
from typing import Any

from .types import Step, Trajectory

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

_TOOLS_HEADER = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                 "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and "
                 "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
                 "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

# The chat template of Qwen2.5-*-Instruct (tokenizer_config.json), for tokenizers built here.
QWEN2_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def format_tool_calls(calls: list[tuple[str, dict[str, Any]]]) -> str:
    """The Hermes/Qwen text of one assistant turn's tool calls: `<tool_call>\\n{json}\\n</tool_call>`
    per call, joined by newlines, exactly as the Qwen2.5 chat template writes them."""
    return "\n".join(f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}"
                     "\n</tool_call>" for name, arguments in calls)


def parse_tool_calls(content: str) -> list[tuple[str, dict[str, Any]]]:
    """The (name, arguments) pairs of a tool_call step's content (inverse of format_tool_calls)."""
    calls = []
    for body in _TOOL_CALL_RE.findall(content):
        call = json.loads(body)
        calls.append((call["name"], call["arguments"]))
    return calls


def to_chat_messages(steps: tuple[Step, ...] | list[Step]) -> list[dict[str, Any]]:
    """Steps as chat messages in the shape Hugging Face chat templates read: a tool_call step is an
    assistant message with `tool_calls` (arguments as dicts) and empty content."""
    messages: list[dict[str, Any]] = []
    for step in steps:
        if step.type == "tool_call":
            calls = [{"type": "function", "function": {"name": name, "arguments": arguments}}
                     for name, arguments in parse_tool_calls(step.content)]
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": step.role, "content": step.content})
    return messages


def render_chatml(messages: list[dict[str, Any]], tools: tuple[dict, ...] | list[dict] = (),
                  add_generation_prompt: bool = False) -> str:
    """Render chat messages the way QWEN2_CHAT_TEMPLATE does (ChatML with Qwen's tool prompt,
    tool results grouped into one user turn in <tool_response> tags)."""
    first_is_system = bool(messages) and messages[0]["role"] == "system"
    system = messages[0]["content"] if first_is_system else QWEN_DEFAULT_SYSTEM
    if tools:
        out = ["<|im_start|>system\n", system, _TOOLS_HEADER]
        out += ["\n" + json.dumps(tool, ensure_ascii=False) for tool in tools]
        out.append(_TOOLS_FOOTER)
    else:
        out = [f"<|im_start|>system\n{system}<|im_end|>\n"]
    for i, message in enumerate(messages):
        role, content = message["role"], message.get("content") or ""
        if role == "system" and i == 0:
            continue
        if role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                out.append("<|im_start|>user")
            out.append(f"\n<tool_response>\n{content}\n</tool_response>")
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                out.append("<|im_end|>\n")
        elif role == "assistant" and message.get("tool_calls"):
            functions = [call.get("function", call) for call in message["tool_calls"]]
            calls = [(f["name"], f["arguments"]) for f in functions]
            out.append("<|im_start|>assistant" + (f"\n{content}" if content else "")
                       + "\n" + format_tool_calls(calls) + "<|im_end|>\n")
        else:
            out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def render_trajectory(trajectory: Trajectory) -> str:
    """The whole trajectory as ChatML text (built-in renderer), e.g. to train a tokenizer on."""
    return render_chatml(to_chat_messages(trajectory.steps), trajectory.tools)
