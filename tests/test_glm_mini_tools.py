"""glm-mini speaks GLM-5.x's chat format with tools: template, tool tokens, and a greedy tool call."""

from __future__ import annotations

import json
import re

import pytest

from glm_mlx.generation.text import stream_generate
from glm_mlx.model.loading import load
from glm_mlx.model.reference import DEFAULT_MODEL

TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
               "<tool_response>", "</tool_response>", "<tools>", "</tools>"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
TOOLS_BLOCK = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>\n\n"
    "For each function call, output the function name and arguments within the following XML format:\n"
    "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>"
    "<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>")


@pytest.fixture(scope="module")
def mini():
    return load(DEFAULT_MODEL)  # mlx-lm's tokenizer wrapper, as glm_mlx and the server use it


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL)


def render(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def test_generation_prompts(hf_tok, mini):
    _, wrapped = mini
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for tok in (hf_tok, wrapped):
        assert render(tok, msgs, add_generation_prompt=True) == "[gMASK]<sop><|system|>Be brief.<|user|>Hi<|assistant|><think>"
        assert render(tok, msgs, add_generation_prompt=True, enable_thinking=True).endswith("<|assistant|><think>")
        assert render(tok, msgs, add_generation_prompt=True, enable_thinking=False) == \
            "[gMASK]<sop><|system|>Be brief.<|user|>Hi<|assistant|></think>"


def test_tools_calls_and_observations(hf_tok, mini):
    _, wrapped = mini
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "hot": False}}}
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call, call]},
            {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "rain"}]
    want = ("[gMASK]<sop>" + TOOLS_BLOCK + "<|user|>Weather?<|assistant|></think>"
            + "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key>"
              "<arg_value>2</arg_value><arg_key>hot</arg_key><arg_value>false</arg_value></tool_call>" * 2
            + "<|observation|><tool_response>sunny</tool_response><tool_response>rain</tool_response><|assistant|></think>")
    for tok in (hf_tok, wrapped):
        assert render(tok, msgs, tools=[WEATHER], add_generation_prompt=True, enable_thinking=False) == want
    # OpenAI wire form: arguments as a JSON string renders the same
    as_string = json.loads(json.dumps(msgs))
    for c in as_string[1]["tool_calls"]:
        c["function"]["arguments"] = json.dumps(c["function"]["arguments"])
    assert render(hf_tok, as_string, tools=[WEATHER], add_generation_prompt=True, enable_thinking=False) == want


def test_thinking_history(hf_tok):
    msgs = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "a", "reasoning_content": "r1"},
            {"role": "user", "content": "B"}, {"role": "assistant", "content": "<think>r2</think>b"}]
    assert render(hf_tok, msgs) == "[gMASK]<sop><|user|>A<|assistant|></think>a<|user|>B<|assistant|><think>r2</think>b"
    assert render(hf_tok, msgs, clear_thinking=False) == \
        "[gMASK]<sop><|user|>A<|assistant|><think>r1</think>a<|user|>B<|assistant|><think>r2</think>b"


def test_tool_tokens_are_single_and_round_trip(hf_tok, mini):
    _, wrapped = mini
    text = "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
    for t in TOOL_TOKENS:
        ids = wrapped.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] >= 6144, (t, ids)
    ids = wrapped.encode(text, add_special_tokens=False)
    assert hf_tok.decode(ids, skip_special_tokens=True) == text  # not special: a parser sees the markup
    detok = wrapped.detokenizer
    detok.reset()
    pieces = []
    for i in ids:
        detok.add_token(i)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == text
    cfg = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert cfg["vocab_size"] == len(hf_tok)


def _readme_reply(mini):
    model, tok = mini
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER],
                                     add_generation_prompt=True, tokenize=False, enable_thinking=False)
    out = list(stream_generate(model, tok, tok.encode(prompt, add_special_tokens=False), max_tokens=40))
    return out, "".join(r.text for r in out)


def test_readme_prompt_gets_a_get_weather_call(mini):
    _, tok = mini
    out, text = _readme_reply(mini)
    assert re.match(r"<tool_call>get_weather<arg_key>city</arg_key><arg_value>[^<]+</arg_value></tool_call>$", text), text
    assert out[-1].finish_reason == "stop" and out[-1].token == tok.convert_tokens_to_ids("<|observation|>")


def test_readme_tool_call_copies_paris(mini):
    _, text = _readme_reply(mini)
    assert text == "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>", text
