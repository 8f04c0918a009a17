"""The BFCL AST check, rule by rule, on hand-made calls (each rule with cases that must fail), and
evaluate_bfcl end to end on the bundled demo model."""
import pytest

from layerroute_rt.eval import bfcl as be
from layerroute_rt.cli import DEMO_DIR
from layerroute_rt.data.bfcl import BfclCase

DOC = {"name": "calc.area", "parameters": {"type": "dict", "required": ["shape", "size"], "properties": {
    "shape": {"type": "string"}, "size": {"type": "float"}, "count": {"type": "integer"},
    "exact": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}},
    "weights": {"type": "array", "items": {"type": "float"}},
    "opts": {"type": "dict"}, "rows": {"type": "array", "items": {"type": "dict"}}}}}
GT = {"calc.area": {"shape": ["Square", "sq"], "size": [2.0], "count": [3, ""], "exact": [True, ""],
                    "tags": [["New York", "b"], ""], "weights": [[0.5, 1.0], ""],
                    "opts": [{"unit": ["cm", ""], "round": [True]}, ""],
                    "rows": [[{"k": ["a"]}, {"k": ["b"]}], ""]}}


def call(name="calc.area", **arguments):
    return {"name": name, "arguments": {"shape": "square", "size": 2.0, **arguments}}


def error(c, gt=GT, doc=DOC, language="python"):
    return be.call_error(c, gt, doc, language)


def test_standardize_drops_case_spaces_and_punctuation():
    assert be.standardize("April 1, 2024") == be.standardize("april 1 2024") == "april12024"
    assert be.standardize("New-York_City./*^") == "newyorkcity"
    assert be.standardize("it's") == 'it"s'
    assert be.standardize("Paris") != be.standardize("Pariss")


def test_function_name_same_or_dots_as_underscores():
    assert be.name_matches("calc.area", "calc.area") and be.name_matches("calc_area", "calc.area")
    assert not be.name_matches("area", "calc.area") and not be.name_matches("calc.area", "calc_area")
    assert error(call()) is None and error(call("calc_area")) is None
    assert "expected 'calc.area'" in error(call("calc.volume"))


def test_required_parameters_present():
    assert "missing required parameter(s) ['size']" in error({"name": "calc.area", "arguments": {"shape": "sq"}})


def test_no_unknown_parameter():
    assert "unexpected parameter 'colour'" in error(call(colour="red"))
    # known to the doc but not to the ground truth: BFCL rejects it too
    doc = {**DOC, "parameters": {**DOC["parameters"], "properties": {**DOC["parameters"]["properties"],
                                                                     "extra": {"type": "string"}}}}
    assert "unexpected parameter 'extra'" in error(call(extra="x"), doc=doc)


def test_strings_among_the_allowed_ones_standardized():
    assert error(call(shape="SQUARE")) is None and error(call(shape="s-q")) is None
    assert "parameter 'shape'" in error(call(shape="circle"))


def test_int_accepted_for_a_float_but_not_the_other_way_or_a_bool_for_an_int():
    assert error(call(size=2)) is None
    assert "expected type integer, got float" in error(call(count=3.0))
    assert "expected type integer, got bool" in error(call(count=True))
    assert "expected type float, got str" in error(call(size="2.0"))
    assert "parameter 'size'" in error(call(size=3))


def test_optional_parameters_may_be_left_out_only_where_the_ground_truth_says_so():
    assert error(call()) is None                  # all but shape and size have ""
    gt = {"calc.area": {**GT["calc.area"], "count": [3]}}
    assert "['count'] left out" in error(call(), gt=gt)
    assert error(call(count=3), gt=gt) is None


def test_lists_element_by_element():
    assert error(call(tags=["new york", "B"])) is None
    assert "parameter 'tags'" in error(call(tags=["b", "new york"]))            # order matters
    assert "parameter 'tags'" in error(call(tags=["new york"]))                 # length too
    assert error(call(weights=[0.5, 1.0])) is None
    # BFCL's nested type check: an int in a float array is refused (only top-level ints convert)
    assert "expected array of float" in error(call(weights=[0.5, 1]))


def test_dicts_recursively():
    assert error(call(opts={"unit": "CM", "round": True})) is None
    assert error(call(opts={"round": True})) is None                            # unit may be left out
    assert "parameter 'opts'" in error(call(opts={"unit": "cm"}))               # round may not
    assert "parameter 'opts'" in error(call(opts={"round": True, "x": 1}))      # unknown key
    assert "parameter 'opts'" in error(call(opts={"round": False}))
    assert error(call(rows=[{"k": "A"}, {"k": "b"}])) is None
    assert "parameter 'rows'" in error(call(rows=[{"k": "b"}, {"k": "a"}]))


def test_value_matches_directly():
    assert be.value_matches({"a": [1, 2]}, {"a": [[1, 2]]})
    assert not be.value_matches(1, True) and not be.value_matches(True, 1)
    assert be.value_matches(None, None) and not be.value_matches("x", ["x"])


def test_a_variable_name_where_the_ground_truth_holds_one():
    doc = {"name": "f", "parameters": {"required": ["n"], "properties": {"n": {"type": "integer"}}}}
    gt = {"f": {"n": ["num_items"]}}
    assert be.call_error({"name": "f", "arguments": {"n": "num_items"}}, gt, doc) is None
    assert be.call_error({"name": "f", "arguments": {"n": 5}}, gt, doc) is not None
    assert be.call_error({"name": "f", "arguments": {"n": "other"}}, gt, doc) is not None


def test_unknown_type_in_the_doc_is_an_error():
    doc = {"name": "f", "parameters": {"properties": {"n": {"type": "HashMap"}}}}
    assert "unknown type 'HashMap'" in be.call_error({"name": "f", "arguments": {"n": 1}}, {"f": {"n": [1]}}, doc)


def test_java_and_javascript_values_as_text():
    doc = {"name": "S.make", "parameters": {"required": ["object", "useShortName"], "properties": {
        "object": {"type": "any"}, "useShortName": {"type": "boolean"}, "params": {"type": "HashMap"},
        "ids": {"type": "Array"}, "limit": {"type": "float"}}}}
    gt = {"S.make": {"object": ["Customers"], "useShortName": [True],
                     "params": [{"limit": [50], "schemaFilter": ["public"]}, ""], "ids": [[1, 2], ""],
                     "limit": [4.0, ""]}}

    def java(**args):
        return be.call_error({"name": "S_make", "arguments": args}, gt, doc, "java")

    assert java(object="customers", useShortName="true") is None
    assert java(object="Customers", useShortName=True, params={"limit": "50", "schemaFilter": "Public"}) is None
    assert java(object="Customers", useShortName=True, ids=["1", 2], limit="4") is None
    assert java(object="Customers", useShortName="false") is not None
    assert java(object="Orders", useShortName=True) is not None
    assert java(object="Customers", useShortName=True, params={"limit": "51", "schemaFilter": "public"}) is not None
    assert java(object="Customers", useShortName=True, ids=[2, 1]) is not None
    assert java(object="Customers", useShortName=True, limit="four") is not None
    assert be.text_matches("null", None) and not be.text_matches([1], "[1]")


def case(category, ground_truth, functions=(DOC,)):
    return BfclCase(f"{category}_0", category, ({"role": "user", "content": "q"},), tuple(functions),
                    ground_truth)


def test_simple_needs_exactly_one_matching_call():
    c = case("simple_python", (GT,))
    assert be.case_verdict([call()], c) == (True, None)
    assert be.case_verdict([call(), call()], c) == (False, "2 call(s), expected 1")
    assert be.case_verdict([], c) == (False, "0 call(s), expected 1")
    ok, why = be.case_verdict([call(shape="circle")], c)
    assert not ok and "parameter 'shape'" in why
    ok, why = be.case_verdict([call(), {"error": "bare JSON: not valid JSON", "text": "{"}], c)
    assert not ok and "does not parse" in why


def test_multiple_picks_the_right_function():
    other = {"name": "calc.volume", "parameters": {"required": [], "properties": {"shape": {"type": "string"}}}}
    c = case("multiple", (GT,), functions=(other, DOC))
    assert be.case_verdict([call()], c)[0]
    assert not be.case_verdict([{"name": "calc.volume", "arguments": {"shape": "square"}}], c)[0]


def test_parallel_without_regard_to_order():
    gt_a = {"calc.area": {"shape": ["square"], "size": [1.0]}}
    gt_b = {"calc.area": {"shape": ["circle"], "size": [2.0]}}
    c = case("parallel", (gt_a, gt_b))
    a = {"name": "calc.area", "arguments": {"shape": "square", "size": 1}}
    b = {"name": "calc.area", "arguments": {"shape": "circle", "size": 2}}
    assert be.case_verdict([a, b], c)[0] and be.case_verdict([b, a], c)[0]
    assert not be.case_verdict([a, a], c)[0]                      # each ground-truth call its own
    assert be.case_verdict([a], c) == (False, "1 call(s), expected 2")
    assert not be.case_verdict([a, b, b], c)[0]


def test_parallel_matching_finds_the_assignment_a_greedy_pass_misses():
    c = case("parallel_multiple", ({"calc.area": {"shape": ["sq", "circle"], "size": [1.0]}},
                                   {"calc.area": {"shape": ["sq"], "size": [1.0]}}))
    sq = {"name": "calc.area", "arguments": {"shape": "sq", "size": 1.0}}
    circle = {"name": "calc.area", "arguments": {"shape": "circle", "size": 1.0}}
    assert be.case_verdict([sq, circle], c)[0]
    ok, why = be.case_verdict([circle, circle], c)
    assert not ok and "ground-truth call 1" in why


def test_irrelevance_right_iff_no_call_parses():
    c = case("irrelevance", None)
    assert be.case_verdict([], c) == (True, None)
    assert be.case_verdict([{"error": "not valid JSON", "text": "{"}], c) == (True, None)
    ok, why = be.case_verdict([{"name": "anything", "arguments": {}}], c)
    assert not ok and "'anything'" in why


def test_ground_truth_naming_an_undefined_function():
    c = case("simple_python", ({"nowhere": {}},))
    with pytest.raises(ValueError, match="simple_python_0: the ground truth calls 'nowhere'"):
        be.case_verdict([{"name": "nowhere", "arguments": {}}], c)


# -- evaluate_bfcl --------------------------------------------------------------------------------

WEATHER = {"name": "get_weather", "description": "Current weather in a city.", "parameters": {
    "type": "dict", "required": ["city"], "properties": {"city": {"type": "string", "description": "City"}}}}


@pytest.fixture(scope="module")
def demo_model():
    import layerroute_rt as lr

    return lr.load(DEMO_DIR, adapter=DEMO_DIR / "adapter")


def test_evaluate_bfcl_on_the_demo_model(demo_model):
    cases = [BfclCase(f"simple_python_{i}", "simple_python",
                      ({"role": "user", "content": f"What is the weather in {city}?"},), (WEATHER,),
                      ({"get_weather": {"city": [city]}},)) for i, city in enumerate(("Paris", "Rome"))]
    cases.append(BfclCase("irrelevance_0", "irrelevance", ({"role": "user", "content": "Sing a song."},),
                          (WEATHER,), None))
    lines = []
    result = be.evaluate_bfcl(demo_model, cases, max_new_tokens=6, batch_size=2, progress=lines.append)
    assert list(result["settings"]) == ["base", "lora", "routed"]
    assert result["max_new_tokens"] == {"simple_python": 6, "irrelevance": 6}
    for setting, r in result["settings"].items():
        assert [c["id"] for c in r["cases"]] == [c.id for c in cases]
        assert r["all"]["n"] == 3 and r["all"]["correct"] == sum(c["correct"] for c in r["cases"])
        assert r["categories"]["simple_python"]["n"] == 2 and r["categories"]["irrelevance"]["n"] == 1
        for record in r["cases"]:
            assert 1 <= record["new_tokens"] <= 6 and isinstance(record["text"], str)
            assert isinstance(record["calls"], list)
            assert record["correct"] == (record["error"] is None)
            pct = record["generated_total_flops_skipped_pct"]
            assert pct is None if record["new_tokens"] == 1 else (pct == 0.0) == (setting != "routed")
        assert r["tau"] == (0.5 if setting == "routed" else 0.0) and r["lora"] == (setting != "base")
    # tau 0 runs every block and no router: nothing skipped, exactly
    for setting in ("base", "lora"):
        assert result["settings"][setting]["all"]["generated_block_flops_skipped_pct"] == 0.0
    routed = result["settings"]["routed"]["all"]
    assert 0 < routed["generated_total_flops_skipped_pct"] < routed["generated_block_flops_skipped_pct"] < 100
    assert len(lines) == 3 * 2 and lines[0].startswith("bfcl base simple_python: 2/2 cases")
    table = be.markdown_table(result)
    assert "| simple_python | routed |" in table and "| all | base |" in table


def test_evaluate_bfcl_base_engine_from_an_inference_model(demo_model):
    import layerroute_rt as lr

    cases = [BfclCase("simple_python_0", "simple_python", ({"role": "user", "content": "Weather in Paris?"},),
                      (WEATHER,), ({"get_weather": {"city": ["Paris"]}},))]
    from_model = be.evaluate_bfcl(demo_model, cases, settings=("base", "routed"), max_new_tokens=8)
    from_engine = be.evaluate_bfcl(lr.InferenceModel(demo_model), cases, settings=("routed", "base"),
                                   max_new_tokens=8, tau=0.5)
    for setting in ("base", "routed"):
        assert from_model["settings"][setting]["cases"][0]["text"] == from_engine["settings"][setting]["cases"][0]["text"]
    # the demo adapter's LoRA changes what is generated
    assert from_model["settings"]["base"]["cases"][0]["text"] != from_model["settings"]["routed"]["cases"][0]["text"]


def test_evaluate_bfcl_tool_choice_required_gives_calls_that_parse(demo_model):
    """Constrained to calls of the case's functions, where the free answer is prose."""
    cases = [BfclCase("simple_python_0", "simple_python", ({"role": "user", "content": "Tell me a joke about cats."},),
                      (WEATHER,), ({"get_weather": {"city": ["Paris"]}},))]
    free = be.evaluate_bfcl(demo_model, cases, settings=("routed",), max_new_tokens=60)
    forced = be.evaluate_bfcl(demo_model, cases, settings=("routed",), max_new_tokens=60, tool_choice="required")
    assert free["settings"]["routed"]["cases"][0]["calls"] == []
    calls = forced["settings"]["routed"]["cases"][0]["calls"]
    assert calls and all(c["name"] == "get_weather" and isinstance(c["arguments"].get("city"), str) for c in calls)
    assert forced["settings"]["routed"]["tool_choice"] == "required"
    irrelevant = [BfclCase("irrelevance_0", "irrelevance", ({"role": "user", "content": "Sing."},), (WEATHER,), None)]
    with pytest.raises(ValueError, match="forces a call"):
        be.evaluate_bfcl(demo_model, irrelevant, tool_choice="required")


def test_grammar_tools_admit_any_value_where_the_doc_type_is_not_json_schemas():
    """Java's and JavaScript's type names become "any JSON value" for the grammar (their values
    are compared as text), nested ones too; JSON-schema types, enums and required lists stay,
    and a property named like a schema keyword is still a property. The result compiles."""
    doc = {"name": "Ctl.run", "parameters": {"type": "dict", "required": ["policy", "type"], "properties": {
        "policy": {"type": "String", "description": "a Java string"},
        "type": {"type": "string", "enum": ["a", "b"]},
        "description": {"type": "HashMap"},
        "ids": {"type": "array", "items": {"type": "long"}},
        "opts": {"type": "dict", "properties": {"deep": {"type": "Boolean"}, "n": {"type": "integer"}},
                 "additionalProperties": {"type": "HashMap"}},
        "either": {"anyOf": [{"type": "String"}, {"type": "integer"}]}}}}
    case = BfclCase("simple_java_0", "simple_java", ({"role": "user", "content": "x"},), (doc,), None)
    params = be.grammar_tools(case)[0]["function"]["parameters"]
    props = params["properties"]
    assert params["type"] == "object" and params["required"] == ["policy", "type"]
    assert props["policy"] == {"description": "a Java string"} and props["description"] == {}
    assert props["type"] == {"type": "string", "enum": ["a", "b"]}
    assert props["ids"] == {"type": "array", "items": {}}
    assert props["opts"]["properties"] == {"deep": {}, "n": {"type": "integer"}}
    assert props["opts"]["additionalProperties"] == {} and props["either"]["anyOf"] == [{}, {"type": "integer"}]
    pytest.importorskip("xgrammar")
    import layerroute_rt as lr
    from layerroute_rt.runtime import grammar
    from layerroute_rt.runtime.generate import load_tokenizer
    engine = lr.InferenceModel(lr.load(DEMO_DIR))
    tok = load_tokenizer(engine)
    eos = frozenset({tok.convert_tokens_to_ids("<|im_end|>")})
    with pytest.raises(ValueError, match="cannot be compiled"):     # the raw doc does not compile
        grammar.compile_constraint(engine, tok, eos, grammar.constraint_spec(None, list(case.tools), "required"))
    assert grammar.compile_constraint(engine, tok, eos, grammar.constraint_spec(None, be.grammar_tools(case),
                                                                                "required")) is not None


@pytest.mark.parametrize("kwargs, match", [
    (dict(cases=[]), "cases must be a non-empty list"),
    (dict(tool_choice="any"), "tool_choice must be None, 'auto' or 'required'"),
    (dict(settings=("base", "dense")), "settings must be distinct names"),
    (dict(settings=("base", "base")), "settings must be distinct names"),
    (dict(max_new_tokens=0), "max_new_tokens must be None"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(tau=1.5), r"tau must be None \(the adapter's\) or in \[0, 1\]"),
    (dict(cases=[BfclCase("x", "live_simple", (), (), None)]), r"unknown BFCL categories \['live_simple'\]"),
])
def test_evaluate_bfcl_errors(demo_model, kwargs, match):
    args = dict(cases=[BfclCase("simple_python_0", "simple_python", ({"role": "user", "content": "q"},),
                                (WEATHER,), ({"get_weather": {"city": ["Paris"]}},))])
    with pytest.raises(ValueError, match=match):
        be.evaluate_bfcl(demo_model, **{**args, **kwargs})


def test_evaluate_bfcl_needs_a_model():
    with pytest.raises(TypeError, match="expected a LayerRouteModel or an InferenceModel, got str"):
        be.evaluate_bfcl("model", [BfclCase("simple_python_0", "simple_python", (), (WEATHER,), None)])
