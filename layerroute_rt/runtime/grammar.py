"""Constrained decoding: a per-row grammar masks the logits before sampling (docs/DESIGN.md
section 6), as vLLM and SGLang do with xgrammar.

A constraint is compiled once per engine and spec (cached: `compile_constraint`), off the
decode loop: the caller compiles it when a request is made. Each sequence then gets its own
matcher (`GrammarProcessor`), which the scheduler calls as the row's logits processor: it
accepts the row's last token, fills the row's allowed-token bitmask and masks the logits. Rows
without a constraint are untouched.

Specs (the OpenAI API's):
  * response_format: {"type": "text"} (none), {"type": "json_object"} (any JSON object), or
    {"type": "json_schema", "json_schema": {"name": str, "schema": {...}, "strict": bool}};
  * tool_choice with tools: "auto" (prose, or calls in the chat template's <tool_call> format
    whose arguments follow their schemas), "required" (at least one call), or a named function
    ({"type": "function", "function": {"name": ...}}: exactly that call); parallel_tool_calls
    False allows one call at most. "none" (no tools rendered, nothing constrained) is the
    caller's.
The tool-call format is Qwen's (<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>),
the one Qwen2.5's template asks for.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

import torch

MAX_CACHED = 64          # compiled grammars kept per engine (least recently used dropped)
_TOOL_FORMAT = "qwen_3"  # xgrammar's structural tag for the <tool_call> JSON format (Qwen2.5 too)


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:       # an optional dependency where it cannot install (the GPU image)
        raise ValueError("constrained decoding (response_format, tool_choice) needs xgrammar: "
                         "pip install xgrammar") from e
    return xgrammar


def _check_tools(tools) -> list[dict]:
    if not isinstance(tools, (list, tuple)) or not tools:
        raise ValueError(f"tool_choice needs tools: a non-empty list of function schemas, got {tools!r}")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': str, "
                             f"'parameters': {{...}}}}}}, got {t!r}")
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters: must be a JSON schema object, got {params!r}")
        out.append({"type": "function", "function": {"name": fn["name"], "parameters": params}})
    return out


def tool_choice_name(tool_choice) -> str | None:
    """The function a named tool_choice names (the OpenAI dict or the bare name), else None."""
    if isinstance(tool_choice, str) and tool_choice not in ("none", "auto", "required"):
        return tool_choice
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"tool_choice: expected 'none', 'auto', 'required' or {{'type': 'function', "
                             f"'function': {{'name': str}}}}, got {tool_choice!r}")
        return fn["name"]
    return None


def constraint_spec(response_format=None, tools=None, tool_choice=None, parallel_tool_calls: bool = True):
    """The checked spec of a constraint (a JSON-able tuple, the cache key), or None for none."""
    if not isinstance(parallel_tool_calls, bool):
        raise ValueError(f"parallel_tool_calls: must be true or false, got {parallel_tool_calls!r}")
    if response_format is not None and tool_choice not in (None, "none"):
        raise ValueError("response_format and tool_choice cannot both constrain one answer")
    if response_format is not None:
        if not isinstance(response_format, dict) or response_format.get("type") not in ("text", "json_object",
                                                                                          "json_schema"):
            raise ValueError(f"response_format: expected {{'type': 'text' | 'json_object' | 'json_schema'}}, "
                             f"got {response_format!r}")
        kind = response_format["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return ("json_object",)
        js = response_format.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise ValueError(f"response_format.json_schema: expected {{'name': str, 'schema': {{...}}, "
                             f"'strict': bool}}, got {js!r}")
        return ("json_schema", json.dumps(js.get("schema", {}), sort_keys=True), bool(js.get("strict", False)))
    if tool_choice in (None, "none"):
        return None
    fns = _check_tools(tools)
    name = tool_choice_name(tool_choice)
    if name is not None:
        if name not in [f["function"]["name"] for f in fns]:
            raise ValueError(f"tool_choice: no tool named {name!r} in tools")
        choice = {"type": "function", "function": {"name": name}}
    elif tool_choice in ("auto", "required"):
        choice = tool_choice
    else:
        raise ValueError(f"tool_choice: expected 'none', 'auto', 'required' or a named function, got {tool_choice!r}")
    return ("tools", json.dumps(fns, sort_keys=True), json.dumps(choice, sort_keys=True), parallel_tool_calls)


class _Compiler:
    """An engine's xgrammar compiler (its tokenizer's vocabulary, padded to the model's) and
    its cache of compiled grammars."""

    def __init__(self, tok, vocab_size: int, eos: frozenset[int]):
        xgr = _xgrammar()
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(eos) or None)
        self.compiler = xgr.GrammarCompiler(self.info)
        self.cache: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def compile(self, spec: tuple):
        with self.lock:
            if spec in self.cache:
                self.cache.move_to_end(spec)
                return self.cache[spec]
        xgr = _xgrammar()
        try:
            # JSON as json.dumps writes it (", " and ": ", no other whitespace): a small model
            # left free to emit whitespace can emit it forever
            if spec[0] == "json_object":
                compiled = self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            elif spec[0] == "json_schema":
                compiled = self.compiler.compile_json_schema(spec[1], any_whitespace=False, strict_mode=spec[2])
            else:
                tag = xgr.get_model_structural_tag(_TOOL_FORMAT, tools=json.loads(spec[1]),
                                                   tool_choice=json.loads(spec[2]), reasoning=False,
                                                   parallel_tool_calls=spec[3])
                compiled = self.compiler.compile_structural_tag(tag)
        except Exception as e:     # xgrammar's own schema errors (RuntimeError, ValueError, ...)
            what = "response_format.json_schema.schema" if spec[0] == "json_schema" else "tools"
            raise ValueError(f"{what}: cannot be compiled to a grammar: {e}") from e
        with self.lock:
            self.cache[spec] = compiled
            while len(self.cache) > MAX_CACHED:
                self.cache.popitem(last=False)
        return compiled


def compile_constraint(engine, tok, eos: frozenset[int], spec):
    """The compiled grammar of a spec (constraint_spec) for the engine, cached on it; None for
    no spec. The engine's first call builds its compiler (the tokenizer's vocabulary)."""
    if spec is None:
        return None
    if tok is None:
        raise ValueError("constrained decoding needs the checkpoint's tokenizer")
    compiler = engine.__dict__.get("_grammar_compiler")
    if compiler is None or compiler[0] != eos:
        compiler = (eos, _Compiler(tok, engine.config.vocab_size, eos))
        engine.__dict__["_grammar_compiler"] = compiler
    return compiler[1].compile(spec)


class GrammarProcessor:
    """One sequence's matcher. The scheduler advances it and fills its row of a batch bitmask
    together with the batch's other constrained rows (`BatchMask`); called as a plain logits
    processor, (tokens so far, logits [vocab]) -> the logits with every token the grammar
    forbids at -inf, it does the same for one row."""

    def __init__(self, compiled):
        xgr = _xgrammar()
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self.mask = xgr.allocate_token_bitmask(1, self.vocab_size)
        self.accepted = 0

    def advance(self, tokens: list[int]) -> None:
        """Accept the tokens sampled since the last call (a RuntimeError if one was forbidden)."""
        for t in tokens[self.accepted:]:
            if not self.matcher.accept_token(t):
                raise RuntimeError(f"grammar: token {t} was sampled against its mask")
        self.accepted = len(tokens)

    def __call__(self, tokens: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.advance(tokens)
        self._xgr.reset_token_bitmask(self.mask)
        self.matcher.fill_next_token_bitmask(self.mask)
        masked = logits[None]
        self._xgr.apply_token_bitmask_inplace(masked, self.mask.to(logits.device))
        return masked[0]


class BatchMask:
    """The bitmasks of one batch's constrained rows, as vLLM builds them: each row's matcher
    advanced, then every row's bitmask filled in one call (xgrammar's BatchGrammarMatcher,
    threaded) into one host int32 tensor [rows, ceil(vocab / 32)], which one call applies to
    the rows' logits (a single copy to their device). The scheduler fills it right after
    launching the step (on CUDA the host work overlaps the step's kernels) and applies it when
    the logits are read."""

    def __init__(self):
        xgr = _xgrammar()
        self._xgr = xgr
        self._batch = xgr.BatchGrammarMatcher()
        self._mask: torch.Tensor | None = None

    def fill(self, procs: list[GrammarProcessor], tokens: list[list[int]], rows: list[int],
             n_rows: int) -> tuple[torch.Tensor, dict[int, Exception]]:
        """Advance procs[i] by tokens[i] and fill bitmask row rows[i], for a batch of n_rows
        rows: (bitmask [n_rows, words], {i: the error of a proc that failed}); a failed row's
        bitmask row is left as it was (the caller drops the row). A row fails alone: its token
        was forbidden, or its grammar has ended (accepted its stop token) while the row goes on."""
        failed: dict[int, Exception] = {}
        for i, (proc, toks) in enumerate(zip(procs, tokens)):
            try:
                proc.advance(toks)
                if proc.matcher.is_terminated():
                    raise RuntimeError("grammar: the answer is complete (its stop token was accepted), "
                                       "but the row goes on: the grammar's stop tokens must be the "
                                       "request's EOS tokens")
            except Exception as e:      # this row's grammar failed: only this row ends
                failed[i] = e
        vocab = procs[0].vocab_size if procs else 0
        words = (vocab + 31) // 32
        if self._mask is None or self._mask.shape[0] < n_rows or self._mask.shape[1] != words:
            self._mask = self._xgr.allocate_token_bitmask(n_rows, vocab)
        keep = [i for i in range(len(procs)) if i not in failed]
        if keep:
            try:
                self._batch.batch_fill_next_token_bitmask([procs[i].matcher for i in keep], self._mask,
                                                          indices=[rows[i] for i in keep])
            except Exception:           # find the row at fault: each filled alone
                for i in keep:
                    try:
                        procs[i].matcher.fill_next_token_bitmask(self._mask, rows[i])
                    except Exception as e:
                        failed[i] = e
        return self._mask[:n_rows], failed

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Set logits[r, t] (logits [n_rows, vocab]) to -inf for each row r in rows and each
        token t its bitmask row forbids, in place, in one call."""
        if rows:
            self._xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
