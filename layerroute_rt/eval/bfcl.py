"""BFCL tool-call accuracy, checked as BFCL's AST checker does it
(bfcl_eval/eval_checker/ast_eval/ast_checker.py), next to the FLOPs skipped on the generated tokens.

The rules, one small function each:
  name_matches       the generated name equals the ground truth's, or that name with its dots
                     replaced by underscores (BFCL's ground truth may name `a.b.c`);
  standardize        strings compared without case, spaces and the punctuation ,./-_*^ ;
  python_type_error  the value has the type the function doc declares (an int is accepted for a
                     float; an array's elements have its item type); a value of the ground truth's
                     own type where that differs from the doc's (a variable name) is compared as is;
  value_matches      strings standardized, lists element by element, dicts recursively (keys
                     among the allowed ones; a key left out only where "" is among its values);
  text_matches       Java and JavaScript: BFCL's ground truth holds their values, the model's are
                     strings in those languages; here str(value) is compared standardized,
                     numbers as numbers and booleans as true/false, lists and dicts as above;
  call_error         every required parameter present, no parameter unknown to the doc or to the
                     ground truth, each value among the allowed ones, every parameter the ground
                     truth lists given unless "" is among its values;
  case_verdict       simple_*, multiple: exactly one call, matching; parallel, parallel_multiple:
                     as many calls as the ground truth, each ground-truth call matched to a
                     distinct generated call whatever the order (a maximum matching: it accepts
                     all BFCL's greedy matching accepts, and the rare order it would miss);
                     irrelevance: right iff no call parses. A call that does not parse makes
                     any other case wrong.

evaluate_bfcl generates each case through generate() (greedy, to EOS) with its messages and its
tools rendered by the checkpoint's own chat template, parses the calls (toolcalls.py) and checks
them, for three settings: "base" (the frozen base, LoRA off, tau 0), "lora" (base + LoRA, tau 0:
routing off) and "routed" (base + LoRA + routing at the adapter's tau).
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Sequence

import torch

from ..data.bfcl import CATEGORIES, NO_CALL_CATEGORIES, BfclCase
from ..runtime.engine import InferenceModel
from ..model.flops import FlopsReport, flops_report, last_tokens
from ..runtime import grammar
from ..runtime.generate import (
    _eos_ids,
    decode_router_blocks,
    generate,
    generated_flops,
    load_tokenizer,
)
from ..model.modeling import LayerRouteModel
from ..runtime.toolcalls import parse_tool_calls

SETTINGS = ("base", "lora", "routed")
# New tokens per case: a call of Qwen2.5-Coder in a ```json fence takes 30-80 tokens; parallel
# cases answer with two to four calls.
MAX_NEW_TOKENS = {"simple_python": 128, "multiple": 128, "simple_java": 160,
                  "simple_javascript": 160, "irrelevance": 128, "parallel": 320,
                  "parallel_multiple": 384}
LANGUAGES = {"simple_java": "java", "simple_javascript": "javascript"}
PYTHON_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list,
                "tuple": list, "dict": dict, "any": str}
_PUNCTUATION = re.compile(r"[ ,./\-_*^]")


# -- the AST check -----------------------------------------------------------------------------

def standardize(s: str) -> str:
    """BFCL's string standardisation: no spaces or ,./-_*^, lower case, ' as "."""
    return _PUNCTUATION.sub("", s).lower().replace("'", '"')


def name_matches(generated: str, expected: str) -> bool:
    return generated in (expected, expected.replace(".", "_"))


def _choices(allowed) -> list:
    """A ground-truth entry's allowed values (BFCL writes lists; a few Java dicts hold one value)."""
    return allowed if isinstance(allowed, list) else [allowed]


def value_matches(value, allowed) -> bool:
    """Whether `value` equals one allowed value of the ground truth (Python rules)."""
    if isinstance(allowed, dict):
        return _dict_matches(value, allowed, value_matches)
    if isinstance(allowed, list):
        return isinstance(value, list) and len(value) == len(allowed) and \
            all(value_matches(v, a) for v, a in zip(value, allowed))
    if isinstance(allowed, str):
        return isinstance(value, str) and standardize(value) == standardize(allowed)
    return isinstance(value, bool) == isinstance(allowed, bool) and value == allowed


def _dict_matches(value, allowed: dict, matches) -> bool:
    """A dict against a ground-truth dict {key: [allowed values]}: every key known, every value
    allowed, every key left out optional ("" among its values)."""
    if not isinstance(value, dict):
        return False
    choices = {k: _choices(v) for k, v in allowed.items()}
    return all(k in choices and any(matches(v, a) for a in choices[k]) for k, v in value.items()) \
        and all(k in value or "" in c for k, c in choices.items())


def _as_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def _as_number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def text_matches(value, allowed) -> bool:
    """Java / JavaScript: whether `value` equals one allowed value, compared as text."""
    if isinstance(allowed, dict):
        return _dict_matches(value, allowed, text_matches)
    if isinstance(allowed, list):
        return isinstance(value, list) and len(value) == len(allowed) and \
            all(text_matches(v, a) for v, a in zip(value, allowed))
    if isinstance(allowed, (int, float)) and not isinstance(allowed, bool):
        number = _as_number(value)
        return number is not None and number == allowed
    return not isinstance(value, (list, dict)) and standardize(_as_text(value)) == standardize(_as_text(allowed))


def python_type_error(param: str, value, doc: dict, allowed: list) -> tuple[str | None, object, bool]:
    """(error or None, the value as compared, whether it stands for a variable) by BFCL's type
    check: the doc's type exactly (an int is taken as a float for a float; bool is not int); an
    array's elements of its item type; or, where the ground truth's values have another type than
    the doc's (a variable name), a value of that type."""
    declared = doc.get("type")
    expected = PYTHON_TYPES.get(declared)
    if expected is None:
        return f"parameter {param!r}: the function doc declares unknown type {declared!r}", value, False
    if declared == "float" and type(value) is int:
        value = float(value)
    answer_type = next((type(a) for a in allowed if a != ""), None)
    variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        item_type = PYTHON_TYPES.get((doc.get("items") or {}).get("type")) if declared in ("array", "tuple") else None
        if item_type is not None and not variable and not all(type(v) is item_type for v in value):
            return (f"parameter {param!r}: expected {declared} of {doc['items']['type']}, got "
                    f"{value!r}"), value, False
        return None, value, variable
    if type(value) is answer_type:
        return None, value, True
    return f"parameter {param!r}: expected type {declared}, got {type(value).__name__} ({value!r})", value, False


def call_error(call: dict, expected: dict, doc: dict, language: str = "python") -> str | None:
    """Why a generated call {"name", "arguments"} does not match one ground-truth call
    {name: {param: [allowed values]}} of the function `doc` (BFCL's format), or None."""
    (name, allowed_params), = expected.items()
    if not name_matches(call["name"], name):
        return f"function {call['name']!r}, expected {name!r}"
    args = call["arguments"]
    properties = doc.get("parameters", {}).get("properties", {})
    missing = [p for p in doc.get("parameters", {}).get("required", []) if p not in args]
    if missing:
        return f"{name}: missing required parameter(s) {missing}"
    for param, value in args.items():
        if param not in properties or param not in allowed_params:
            return f"{name}: unexpected parameter {param!r}"
        allowed = allowed_params[param]
        if language == "python":
            error, value, variable = python_type_error(param, value, properties[param], allowed)
            if error:
                return f"{name}: {error}"
            ok = value in allowed if variable else any(value_matches(value, a) for a in allowed)
        else:
            ok = any(text_matches(value, a) for a in allowed)
        if not ok:
            return f"{name}: parameter {param!r} = {value!r}, expected one of {allowed}"
    left_out = [p for p, allowed in allowed_params.items() if p not in args and "" not in allowed]
    if left_out:
        return f"{name}: parameter(s) {left_out} left out, and the ground truth gives no default"
    return None


def _doc(case: BfclCase, name: str) -> dict:
    for f in case.functions:
        if f["name"] == name:
            return f
    raise ValueError(f"BFCL case {case.id}: the ground truth calls {name!r}, which none of its "
                     f"function docs {[f['name'] for f in case.functions]} defines")


def _matching(ok: list[list[bool]]) -> list[int | None]:
    """A maximum bipartite matching: for each ground-truth call i, the generated call matched
    to it (or None), by augmenting paths."""
    owner: dict[int, int] = {}

    def augment(i, seen):
        for j, good in enumerate(ok[i]):
            if good and j not in seen:
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    for i in range(len(ok)):
        augment(i, set())
    of = {i: j for j, i in owner.items()}
    return [of.get(i) for i in range(len(ok))]


def case_verdict(calls: list[dict], case: BfclCase) -> tuple[bool, str | None]:
    """(correct, why not) for the parsed calls of one case (see the module docstring)."""
    good = [c for c in calls if "error" not in c]
    if case.category in NO_CALL_CATEGORIES:
        if good:
            return False, f"no function fits, but the output calls {[c['name'] for c in good]}"
        return True, None
    bad = [c for c in calls if "error" in c]
    if bad:
        return False, f"a call does not parse: {bad[0]['error']}"
    expected = list(case.ground_truth)
    if len(good) != len(expected):
        return False, f"{len(good)} call(s), expected {len(expected)}"
    language = LANGUAGES.get(case.category, "python")
    docs = [_doc(case, next(iter(e))) for e in expected]
    errors = [[call_error(c, e, d, language) for c in good] for e, d in zip(expected, docs)]
    matched = _matching([[err is None for err in row] for row in errors])
    for i, j in enumerate(matched):
        if j is None:
            reasons = "; ".join(dict.fromkeys(errors[i]))
            return False, f"no generated call matches ground-truth call {i} ({reasons})"
    return True, None


# -- generation and the three settings ---------------------------------------------------------

def render_prompt(tok, case: BfclCase) -> list[int]:
    """The case's messages with its tools through the checkpoint's chat template, as token ids."""
    text = tok.apply_chat_template(list(case.messages), tools=list(case.tools),
                                   add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


_JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "array", "object", "null"})


def grammar_tools(case: BfclCase) -> list[dict]:
    """The case's tools as the grammar of tool_choice "required" takes them: a schema node
    whose type is not a JSON-schema type (Java's and JavaScript's String, HashMap, long, ...,
    whose values the checker compares as text) admits any JSON value, its items and properties
    dropped; the rest is the tools the prompt shows."""
    def convert(node: dict) -> dict:
        kind = node.get("type")
        if isinstance(kind, str) and kind not in _JSON_TYPES:
            return {k: v for k, v in node.items() if k == "description"}
        out = dict(node)
        if isinstance(node.get("properties"), dict):
            out["properties"] = {name: convert(s) if isinstance(s, dict) else s
                                 for name, s in node["properties"].items()}
        for key in ("items", "additionalProperties", "not"):         # one subschema
            if isinstance(node.get(key), dict):
                out[key] = convert(node[key])
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):       # a list of them
            if isinstance(node.get(key), list):
                out[key] = [convert(s) if isinstance(s, dict) else s for s in node[key]]
        return out
    return [{"type": "function", "function": {**t["function"], "parameters": convert(t["function"]["parameters"])}}
            for t in case.tools]


def _engines(model_or_engine, settings: Sequence[str]):
    """(setting, engine) in order; the base engine (LoRA off) and the adapter's (LoRA merged, or
    the engine given) are each built once, the base one dropped when done."""
    if isinstance(model_or_engine, InferenceModel):
        model, adapter_engine = model_or_engine.source, model_or_engine
    elif isinstance(model_or_engine, LayerRouteModel):
        model, adapter_engine = model_or_engine, None
    else:
        raise TypeError(f"evaluate_bfcl: expected a LayerRouteModel or an InferenceModel, got "
                        f"{type(model_or_engine).__name__}")
    base_engine = None
    for setting in settings:
        if setting == "base":
            if base_engine is None:
                with model.adapter_disabled():
                    base_engine = InferenceModel(model)
            yield setting, base_engine
        else:
            base_engine = None
            if adapter_engine is None:
                adapter_engine = InferenceModel(model)
            yield setting, adapter_engine


def _check_args(cases, settings, max_new_tokens, batch_size, tau):
    if not cases or not all(isinstance(c, BfclCase) for c in cases):
        raise ValueError("evaluate_bfcl: cases must be a non-empty list of data.bfcl.BfclCase")
    unknown = sorted({c.category for c in cases} - set(CATEGORIES))
    if unknown:
        raise ValueError(f"evaluate_bfcl: unknown BFCL categories {unknown}; expected among {CATEGORIES}")
    unknown = [s for s in settings if s not in SETTINGS]
    if not settings or unknown or len(set(settings)) != len(settings):
        raise ValueError(f"evaluate_bfcl: settings must be distinct names among {SETTINGS}, got {settings!r}")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise ValueError(f"evaluate_bfcl: max_new_tokens must be None (per category) or an integer >= 1, "
                         f"got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate_bfcl: batch_size must be an integer >= 1, got {batch_size!r}")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0):
        raise ValueError(f"evaluate_bfcl: tau must be None (the adapter's) or in [0, 1], got {tau!r}")


def prompt_flops(engine, executed: torch.Tensor, valid: torch.Tensor, width: int) -> FlopsReport:
    """FLOPs of prefill over a GenerateOutput's prompt columns [:width] (routers charged on every
    block: prefill runs them at any tau; the lm_head on each prompt's last token only)."""
    valid = valid[:, :width]
    return flops_report(engine.config, engine.lr_config, executed[:, :, :width],
                        valid.long().cumsum(1), valid, head=last_tokens(valid))


def _flops_dict(report: FlopsReport) -> dict:
    return {"block": report.block_flops, "block_run": report.block_flops_run,
            "total": report.total_flops, "total_run": report.total_flops_run}


class _Tally:
    """Counts, and FLOPs summed over cases: the generated tokens' and the prompts'."""

    def __init__(self):
        self.n = self.correct = self.new_tokens = self.prompt_tokens = 0
        self.generated = [0.0, 0.0, 0.0, 0.0]
        self.prompt = [0.0, 0.0, 0.0, 0.0]

    def add(self, correct: bool, new_tokens: int, prompt_tokens: int, generated: FlopsReport,
            prompt: FlopsReport) -> None:
        self.n += 1
        self.correct += int(correct)
        self.new_tokens += new_tokens
        self.prompt_tokens += prompt_tokens
        for sums, report in ((self.generated, generated), (self.prompt, prompt)):
            for i, v in enumerate((report.block_flops, report.block_flops_run, report.total_flops,
                                   report.total_flops_run)):
                sums[i] += v

    def summary(self) -> dict:
        generated, prompt = FlopsReport(*self.generated), FlopsReport(*self.prompt)
        request = FlopsReport(*(a + b for a, b in zip(self.generated, self.prompt)))
        fed = generated.block_flops > 0
        return {"n": self.n, "correct": self.correct, "accuracy": self.correct / self.n,
                "new_tokens": self.new_tokens, "prompt_tokens": self.prompt_tokens,
                "generated_total_flops_skipped_pct": generated.total_skipped_pct if fed else None,
                "generated_block_flops_skipped_pct": generated.block_skipped_pct if fed else None,
                "prompt_total_flops_skipped_pct": prompt.total_skipped_pct,
                "prompt_block_flops_skipped_pct": prompt.block_skipped_pct,
                "request_total_flops_skipped_pct": request.total_skipped_pct,
                "request_block_flops_skipped_pct": request.block_skipped_pct}


@torch.no_grad()
def evaluate_bfcl(model_or_engine, cases: Sequence[BfclCase], settings: Sequence[str] = SETTINGS,
                  max_new_tokens: int | None = None, batch_size: int = 8, tau: float | None = None,
                  progress=None, batch_q: float = 1.0, tool_choice: str | None = None) -> dict:
    """BFCL accuracy and the FLOPs skipped on the generated tokens, per setting and category.

    model_or_engine: a LayerRouteModel (loaded from a checkpoint, so that its tokenizer and chat
    template are found) with its adapter, or an InferenceModel of one (its LoRA merged or not;
    the base setting builds its own engine from the model with the LoRA off).
    cases: data.bfcl.BfclCase, any mix of categories. settings: among "base" (LoRA off, tau 0),
    "lora" (LoRA on, tau 0) and "routed" (LoRA on, routing at `tau`, default the adapter's).
    max_new_tokens: None takes MAX_NEW_TOKENS by category. Greedy; each sequence ends at EOS.
    Cases are batched by category, longest prompt first (left-padded ragged batches).
    batch_q: the routed setting's batch policy (generate's batch_q; 1: exact per-token skipping).
    progress: called with a line of text after each batch. tool_choice "required": each
    answer is constrained to calls of its case's functions, arguments following their schemas
    (layerroute_rt.runtime.grammar, in the template's <tool_call> format); None or "auto": free text.

    Returns {"settings": {setting: {"tau", "lora", "seconds", "all": summary,
    "categories": {category: summary}, "cases": [{"id", "category", "correct", "error",
    "text", "calls", "new_tokens", "prompt_tokens", "generated_total_flops_skipped_pct",
    "prompt_total_flops_skipped_pct", "flops": {"prompt", "generated"}}]}},
    "max_new_tokens": {category: n}, "batch_size"}; a summary is {"n", "correct", "accuracy",
    "new_tokens", "prompt_tokens", and the % of total and of block FLOPs skipped over the
    generated tokens ("generated_*": the decode steps that fed them, generate.generated_flops;
    None where none did), over the prompts ("prompt_*": prefill, prompt_flops) and over whole
    requests ("request_*": both)}. A case's "flops" holds the raw sums ({"block", "block_run",
    "total", "total_run"}) of its prompt and of its generated tokens, so that any subset can be
    summed exactly.
    """
    cases = list(cases)
    settings = tuple(settings)
    _check_args(cases, settings, max_new_tokens, batch_size, tau)
    if tool_choice not in (None, "auto", "required"):
        raise ValueError(f"evaluate_bfcl: tool_choice must be None, 'auto' or 'required', got {tool_choice!r}")
    no_call = sorted({c.category for c in cases if c.category in NO_CALL_CATEGORIES})
    if tool_choice == "required" and no_call:
        raise ValueError(f"evaluate_bfcl: tool_choice 'required' forces a call, and {no_call} expect none")
    by_category: dict[str, list[BfclCase]] = defaultdict(list)
    for case in cases:
        by_category[case.category].append(case)
    budget = {c: max_new_tokens or MAX_NEW_TOKENS[c] for c in by_category}
    result = {"settings": {}, "max_new_tokens": budget, "batch_size": batch_size}
    prompts: dict[str, list[int]] = {}
    for setting, engine in _engines(model_or_engine, settings):
        tok = load_tokenizer(engine)
        if tok is None or not tok.chat_template:
            raise ValueError(f"evaluate_bfcl: the model needs its checkpoint's tokenizer with a chat "
                             f"template (loaded from {engine.tokenizer_dir})")
        if not prompts:
            prompts = {c.id: render_prompt(tok, c) for c in cases}
        run_tau = 0.0 if setting != "routed" else engine.lr_config.tau if tau is None else float(tau)
        router_blocks = decode_router_blocks(engine, run_tau, frozenset())
        tallies: dict[str, _Tally] = defaultdict(_Tally)
        none_ran = [0.0, 0]                  # % no row ran x decode steps, decode steps
        records = {}
        start = time.perf_counter()
        for category, group in by_category.items():
            group = sorted(group, key=lambda c: -len(prompts[c.id]))
            for i in range(0, len(group), batch_size):
                batch = group[i:i + batch_size]
                processors = None
                if tool_choice == "required":
                    eos = frozenset(_eos_ids(engine, "auto"))
                    processors = [grammar.GrammarProcessor(grammar.compile_constraint(
                        engine, tok, eos, grammar.constraint_spec(None, grammar_tools(c), "required")))
                        for c in batch]
                out = generate(engine, [prompts[c.id] for c in batch], max_new_tokens=budget[category],
                               temperature=0.0, tau=run_tau, batch_q=batch_q if setting == "routed" else 1.0,
                               logits_processors=processors)
                width = out.valid.shape[1] - out.stats["decode_steps"]
                if out.stats["decode_blocks_no_row_ran_pct"] is not None:
                    none_ran[0] += out.stats["decode_blocks_no_row_ran_pct"] * out.stats["decode_steps"]
                    none_ran[1] += out.stats["decode_steps"]
                for b, case in enumerate(batch):
                    calls = parse_tool_calls(out.text[b])
                    correct, error = case_verdict(calls, case)
                    report = generated_flops(engine, out.executed[:, b:b + 1], out.valid[b:b + 1],
                                             width, router_blocks)
                    prompt = prompt_flops(engine, out.executed[:, b:b + 1], out.valid[b:b + 1], width)
                    for key in (category, "all"):
                        tallies[key].add(correct, len(out.tokens[b]), len(prompts[case.id]), report, prompt)
                    fed = report.block_flops > 0
                    records[case.id] = {"id": case.id, "category": category, "correct": correct,
                                        "error": error, "text": out.text[b], "calls": calls,
                                        "new_tokens": len(out.tokens[b]),
                                        "prompt_tokens": len(prompts[case.id]),
                                        "generated_total_flops_skipped_pct":
                                            report.total_skipped_pct if fed else None,
                                        "prompt_total_flops_skipped_pct": prompt.total_skipped_pct,
                                        "flops": {"prompt": _flops_dict(prompt),
                                                  "generated": _flops_dict(report)}}
                if progress:
                    t = tallies[category]
                    progress(f"bfcl {setting} {category}: {t.n}/{len(group)} cases, {t.correct} right "
                             f"({time.perf_counter() - start:.0f} s)")
        result["settings"][setting] = {
            "tau": run_tau, "tool_choice": tool_choice or "auto", "lora": setting != "base", "seconds": time.perf_counter() - start,
            "batch_q": batch_q if setting == "routed" else 1.0,
            "decode_blocks_no_row_ran_pct": none_ran[0] / none_ran[1] if none_ran[1] else None,
            "all": tallies["all"].summary(),
            "categories": {c: tallies[c].summary() for c in by_category},
            "cases": [records[c.id] for c in cases]}
    return result


def markdown_table(result: dict) -> str:
    """One row per category and setting: accuracy and the FLOPs skipped on generated tokens."""
    def pct(v):
        return "n/a" if v is None else f"{v:.2f}"

    rows = ["| category | setting | accuracy | correct / n | % total FLOPs skipped (generated) "
            "| % block FLOPs skipped (generated) |", "|---|---|---|---|---|---|"]
    for setting, r in result["settings"].items():
        for category, s in [*r["categories"].items(), ("all", r["all"])]:
            rows.append(f"| {category} | {setting} | {100 * s['accuracy']:.1f}% | {s['correct']} / {s['n']} "
                        f"| {pct(s['generated_total_flops_skipped_pct'])} "
                        f"| {pct(s['generated_block_flops_skipped_pct'])} |")
    return "\n".join(rows)
