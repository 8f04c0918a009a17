"""The real model (Qwen2.5-Coder-0.5B-Instruct, from its GGUF, as real_model.fetch_model() converts
it): our logits equal transformers', a greedy tool call through generate() equals transformers'
token for token and parses to the right call, and a small BFCL run on the frozen base."""
import pytest
import torch
import transformers

import layerroute_rt as lr
from layerroute_rt.eval.bfcl import evaluate_bfcl
from layerroute_rt.data import bfcl
from layerroute_rt.runtime.generate import load_tokenizer
from layerroute_rt.model.real_model import fetch_bfcl
from layerroute_rt.runtime.toolcalls import parse_tool_calls

pytestmark = pytest.mark.real_model

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
QUESTION = [{"role": "user", "content": "What's the weather like in Paris right now, in celsius?"}]


@pytest.fixture(scope="module")
def hf_model(real_model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(real_model):
    return lr.InferenceModel(real_model)


def weather_prompt(engine) -> list[int]:
    tok = load_tokenizer(engine)
    text = tok.apply_chat_template(QUESTION, tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def test_the_model_is_untied_with_qwen25_05b_shapes(real_model):
    cfg = real_model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (24, 896, 14, 2, 4864, 151936, False)
    assert lr.count_parameters(cfg, real_model.lr_config)["backbone"] == \
        sum(p.numel() for n, p in real_model.named_parameters() if ".router." not in n and ".lora_" not in n)


@torch.no_grad()
def test_logits_equal_transformers(real_model, hf_model, engine):
    ids = torch.tensor([weather_prompt(engine)[-48:]])
    ours = real_model(ids, tau=0.0)
    theirs = hf_model(ids).logits
    assert ours.shape == theirs.shape == (1, 48, 151936)
    # fp32 on the same weights: the difference is summation order, ~1e-5 of logits of size ~10
    assert (ours - theirs).abs().max() < 2e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@torch.no_grad()
def test_greedy_tool_call_equals_transformers(engine, hf_model):
    prompt = weather_prompt(engine)
    out = lr.generate(engine, [prompt], max_new_tokens=48)
    theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False)[0, len(prompt):]
    assert out.tokens[0] == theirs.tolist()
    assert out.tokens[0][-1] in (151643, 151645)                  # ended at EOS, not at the limit
    assert parse_tool_calls(out.text[0]) == [
        {"name": "get_current_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]


def test_evaluate_bfcl_base_on_two_simple_cases(real_model):
    cases = {c.id: c for c in bfcl.load_category(fetch_bfcl(), "simple_python")}
    picked = [cases["simple_python_0"], cases["simple_python_1"]]
    result = evaluate_bfcl(real_model, picked, settings=("base",), max_new_tokens=64, batch_size=2)
    base = result["settings"]["base"]
    assert list(result["settings"]) == ["base"] and base["tau"] == 0.0 and base["lora"] is False
    assert base["all"]["n"] == 2 and base["categories"]["simple_python"]["n"] == 2
    assert base["all"]["generated_total_flops_skipped_pct"] == 0.0        # tau 0: every block runs
    first, second = base["cases"]
    assert first["id"] == "simple_python_0" and second["id"] == "simple_python_1"
    # the base answers both easy cases right, in a ```json fence (seen: 45 and 30 new tokens)
    assert first["text"].startswith("```json")
    assert first["calls"] == [{"name": "calculate_triangle_area",
                               "arguments": {"base": 10, "height": 5, "unit": "units"}}]
    assert first["correct"] and first["error"] is None, first
    assert second["calls"] == [{"name": "math.factorial", "arguments": {"number": 5}}]
    assert second["correct"], second
    assert base["all"]["correct"] == 2 and base["all"]["accuracy"] == 1.0


def test_agent_loop_with_tools_and_the_prefix_cache(real_model):
    """generate(tools=...) on the real model: the call comes back parsed, and the next turn (the
    call and the tool's answer appended) reuses the first turn from the prefix cache, giving the
    same tokens as an engine without one."""
    engine = lr.engine_for(real_model)
    out = lr.generate(real_model, QUESTION, max_new_tokens=48, tools=[WEATHER_TOOL])
    assert out.tool_calls == [[{"name": "get_current_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]]
    assert out.finish_reasons == ["stop"]
    chat = QUESTION + [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": out.tool_calls[0][0]}]},
        {"role": "tool", "content": '{"temperature": 18, "unit": "celsius", "sky": "clear"}'}]
    second = lr.generate(real_model, chat, max_new_tokens=24, tools=[WEATHER_TOOL])
    assert lr.engine_for(real_model) is engine
    assert second.stats["cached_prompt_tokens"] > 0.8 * out.stats["prompt_tokens_per_seq"][0]
    plain = lr.InferenceModel(real_model, prefix_cache=False)
    assert second.tokens == lr.generate(plain, chat, max_new_tokens=24, tools=[WEATHER_TOOL]).tokens


def test_streamed_text_of_multibyte_characters(real_model):
    """Byte-level BPE splits a character over tokens: the stream gives it whole, once, and the
    pieces join to the text."""
    from layerroute_rt.runtime.sampling import TextDeltas

    tok = load_tokenizer(lr.engine_for(real_model))
    text = "naïve café, 東京 and 🚀!"
    ids = tok.encode(text, add_special_tokens=False)
    deltas = TextDeltas(tok, 1)
    pieces = [deltas.push(0, t, i == len(ids) - 1) for i, t in enumerate(ids)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])          # some tokens were held back
    stream = lr.generate(real_model, "Say 'bonjour' and '東京' in one line.", max_new_tokens=16, stream=True)
    chunks = list(stream)
    assert "".join(c.text[0] for c in chunks) == stream.output.text[0]
