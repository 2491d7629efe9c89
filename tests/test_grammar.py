"""Structured output and forced tool calls enforced while decoding (llguidance), and the reasoning budget.

The processors are tested with adversarial logits over the real glm-mini tokenizer (whatever the model
would prefer, the output parses and validates), in the batch and single-sequence engines on glm-mini,
and end to end through the OpenAI and Anthropic SDKs on the real server.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glm_mlx.generation import constrain as engine_grammar
from glm_mlx.serve import grammar as G
from glm_mlx.generation.output_parser import OutputParser
from glm_mlx.serve.prompt import BadRequest, Prompt

jsonschema = pytest.importorskip("jsonschema")

EOS = [0, 7, 9]
WEATHER = {"type": "function", "function": {"name": "W", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1,
                                                                          "maximum": 14},
                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "days"]}}}
WITAL = {"type": "function", "function": {"name": "Wital", "parameters": {  # "W" is a prefix of "Wital"
    # bounded numbers: an unbounded one may be "39E2298", valid JSON but no double (docs/structured_output.md)
    "type": "object", "properties": {"xs": {"type": "array", "items": {"type": "number", "minimum": -1000,
                                                                       "maximum": 1000}, "maxItems": 3},
                                     "ok": {"type": "boolean"}},
    "required": ["xs"]}}}
TOOLS = [WEATHER, WITAL]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                    "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}


def params_of(name):
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


def drive(tokenizer, grammar, seed, *, bias=None, steps=120, prompt_len=3, push=50.0):
    """Decode with random (optionally biased) logits through the grammar processor: greedy over the mask."""
    vocab = len(tokenizer._tokenizer)
    proc = engine_grammar.GrammarProcessor(engine_grammar.matcher(grammar, tokenizer, EOS), prompt_len, EOS)
    rng = np.random.default_rng(seed)
    hist = list(range(1, prompt_len + 1))
    for _ in range(steps):
        logits = rng.normal(size=(1, vocab)).astype(np.float32) * 4
        if bias is not None:
            logits[0, bias] += push  # e.g. the model insists on a token the grammar forbids
        out = proc(mx.array(hist), mx.array(logits))
        tok = int(mx.argmax(out, axis=-1).item())
        assert np.isfinite(np.array(out)[0, tok])
        if tok in EOS:
            return hist[prompt_len:], True
        hist.append(tok)
    return hist[prompt_len:], False


def parse(tokenizer, forced, out, thinking=False):
    p = OutputParser(TOOLS, thinking=thinking)
    events = p.feed(forced) + p.feed(tokenizer.decode(out)) + p.finish()
    return [e.call for e in events if e.kind == "tool_call"], "".join(e.text for e in events if e.kind == "content")


@pytest.fixture(scope="module")
def tok(tokenizer):
    return tokenizer


# --- grammars and the processor, adversarial logits ---------------------------------------------
@pytest.mark.parametrize("forced", ["<tool_call>", ""])
@pytest.mark.parametrize("seed", range(6))
def test_forced_call_is_a_declared_tool_with_valid_arguments(tok, forced, seed):
    g = G.tool_call_grammar(TOOLS, parallel=False, forced=forced)
    closers = [tok._tokenizer.convert_tokens_to_ids(t) for t in ("</arg_value>", "</tool_call>")]
    out, ended = drive(tok, g, seed, steps=400, bias=closers, push=6.0)  # noise, with values ending now and then
    if not ended:  # random logits may ramble inside a string value; the call is then unfinished
        pytest.skip("random logits did not finish the call within the steps")
    calls, _ = parse(tok, forced, out)
    assert len(calls) == 1, tok.decode(out)
    assert calls[0].name in ("W", "Wital")
    jsonschema.validate(calls[0].arguments, params_of(calls[0].name))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31), prefix_bias=st.booleans())
def test_forced_name_is_exact_even_when_one_name_prefixes_another(tokenizer, seed, prefix_bias):
    """The `W` vs `Wital` bug: after `W` the grammar allows `ital` or the arguments, never another name;
    with logits pushing `</tool_call>` (a call closing right after a prefix name) the name stays declared."""
    g = G.tool_call_grammar(TOOLS, parallel=False, forced="<tool_call>")
    close = tokenizer._tokenizer.convert_tokens_to_ids("</tool_call>")
    out, _ = drive(tokenizer, g, seed, bias=close if prefix_bias else None, steps=12)
    text = tokenizer.decode(out)
    name = text.split("<arg_key>")[0].split("</tool_call>")[0]
    assert name in ("W", "Wital") or (not text.endswith("</tool_call>") and "<arg_key>" not in text and
                                      ("W".startswith(name) or "Wital".startswith(name))), text


def test_named_call_and_parallel_calls(tok):
    g = G.tool_call_grammar(TOOLS, "Wital", parallel=True, forced="<tool_call>Wital")
    for seed in range(4):
        out, ended = drive(tok, g, seed, steps=300)
        if not ended:
            continue
        calls, _ = parse(tok, "<tool_call>Wital", out)
        assert calls and all(c.name == "Wital" for c in calls)
        for c in calls:
            jsonschema.validate(c.arguments, params_of("Wital"))


def test_eos_only_where_the_grammar_accepts(tok):
    g = G.tool_call_grammar(TOOLS, "W", parallel=False, forced="<tool_call>W")
    m = engine_grammar.matcher(g, tok, EOS)
    proc = engine_grammar.GrammarProcessor(m, 0, EOS)
    ids = tok._tokenizer.encode("<arg_key>city</arg_key><arg_value>Paris</arg_value>", add_special_tokens=False)
    allowed = proc.allowed(len(tok._tokenizer))
    assert not allowed[EOS].any()  # "city" and "days" are required
    proc._advance(mx.array(ids))
    assert not proc.allowed(len(tok._tokenizer))[EOS].any()
    more = tok._tokenizer.encode("<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>",
                                 add_special_tokens=False)
    proc._advance(mx.array(ids + more))
    a = proc.allowed(len(tok._tokenizer))
    assert a[EOS].all() and a.sum() == len(EOS) and proc.error is None


def test_special_tokens_of_glm_are_special_for_llguidance(tok):
    ll = engine_grammar.ll_tokenizer(tok, EOS)
    for t in ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "<think>",
              "</think>"):
        i = tok._tokenizer.convert_tokens_to_ids(t)
        assert ll.is_special_token(i) and ll.tokenize_str(t, parse_special=True) == [i]
    # a string value is text: never a special token, never `</arg_value>` spelled as text
    g = G.tool_call_grammar(TOOLS, "W", parallel=False, forced="<tool_call>W")
    m = engine_grammar.matcher(g, tok, EOS)
    assert m.consume_tokens(tok._tokenizer.encode("<arg_key>city</arg_key><arg_value>a </arg_", add_special_tokens=False))
    plain = [i for i in tok._tokenizer.encode("value>", add_special_tokens=False)]
    assert m.validate_tokens(plain) < len(plain)
    assert m.validate_tokens([tok._tokenizer.convert_tokens_to_ids("<tool_call>")]) == 0


def test_json_schema_answer_with_adversarial_logits(tok):
    g = G.json_schema_grammar(SCHEMA, thinking=True)
    close = tok._tokenizer.convert_tokens_to_ids("</think>")
    for seed in range(4):
        out, ended = drive(tok, g, seed, bias=close, steps=200)  # reasoning closes at once, then JSON
        if ended:
            text = tok.decode(out)
            jsonschema.validate(json.loads(text.split("</think>", 1)[1]), SCHEMA)
    out, ended = drive(tok, G.json_object_grammar(), 1, steps=200)
    if ended:
        assert isinstance(json.loads(tok.decode(out)), dict)


def test_response_format_and_request_helpers(tok):
    assert G.for_response_format(None) is None and G.for_response_format({"type": "text"}) is None
    assert "%json" in G.for_response_format({"type": "json_object"})
    assert "maxLength" in G.for_response_format({"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}})
    assert "maxLength" in G.for_response_format({"type": "json_schema", "name": "p", "schema": SCHEMA},
                                                param="text.format")  # the Responses API's shape
    for bad in ("json", {"type": "yaml"}, {"type": "json_schema", "json_schema": {"schema": 3}}):
        with pytest.raises(BadRequest):
            G.for_response_format(bad)
    prompt = Prompt(ids=[1], thinking=False, forced="", parse_tools=True)
    with pytest.raises(BadRequest) as e:
        G.for_request(tok, prompt, None, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "nonsense"}}})
    assert e.value.param == "response_format"
    assert G.for_request(tok, prompt, TOOLS) is None  # auto, nothing strict: unconstrained
    strict = [{**WEATHER, "function": {**WEATHER["function"], "strict": True}}, WITAL]
    assert G.for_request(tok, prompt, strict) is not None
    forced = Prompt(ids=[1], thinking=False, forced="<tool_call>", parse_tools=True)
    assert G.for_request(tok, forced, TOOLS) is not None


def test_strict_tool_under_auto_is_checked_once_the_call_opens(tok):
    strict = [{**WEATHER, "function": {**WEATHER["function"], "strict": True}}, WITAL]
    g = G.strict_tools_grammar(strict)
    m = engine_grammar.matcher(g, tok, EOS)
    enc = lambda s: tok._tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    assert m.consume_tokens(enc("Let me check.<tool_call>W<arg_key>city</arg_key><arg_value>Oslo</arg_value>"))
    assert m.validate_tokens(enc("<arg_key>days</arg_key><arg_value>x")) < len(enc("<arg_key>days</arg_key><arg_value>x"))
    m2 = engine_grammar.matcher(g, tok, EOS)  # a non-strict tool's arguments are free, its name is not
    assert m2.consume_tokens(enc("<tool_call>Wital<arg_key>anything</arg_key><arg_value>goes</arg_value></tool_call>"))
    m3 = engine_grammar.matcher(g, tok, EOS)
    bad = enc("<tool_call>Wx")
    assert m3.validate_tokens(bad) < len(bad)


def test_reasoning_budget_forces_the_close(tok):
    close = tok._tokenizer.convert_tokens_to_ids("</think>")
    rb = engine_grammar.ReasoningBudget(start=2, budget=3, close=close)
    logits = mx.zeros((1, 100 + close))
    assert mx.array_equal(rb(mx.array([1, 2, 5, 6]), logits), logits)  # 2 of 3
    forced = rb(mx.array([1, 2, 5, 6, 7]), logits)
    assert int(mx.argmax(forced, axis=-1).item()) == close and mx.isinf(forced).sum().item() == forced.size - 1
    after = rb(mx.array([1, 2, 5, close, 7, 8]), logits)  # closed already: untouched
    assert mx.array_equal(after, logits)


# --- the engines on glm-mini ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini():
    from serve_helpers import MODEL_DIR

    from glm_mlx import load_model

    return load_model(MODEL_DIR, dtype=mx.float32)


def _forced_prompt(tokenizer):
    from glm_mlx.serve.prompt import render

    p = render(tokenizer, [{"role": "user", "content": "What is the weather in Paris for 3 days?"}], tools=TOOLS,
               thinking=False, clear_thinking=None, forced="<tool_call>")
    return p


def test_constrained_and_unconstrained_decode_in_one_batch(mini, tok):
    from glm_mlx.batch.engine import BatchEngine
    from glm_mlx.generation.engine import Engine
    from glm_mlx.generation.prompt_cache import PromptCache

    forced = _forced_prompt(tok)
    free = tok.encode("Once upon a time", add_special_tokens=False)
    n = 80  # the free one decodes on while the forced one's long prompt (the tools block) prefills, and after

    def run(with_constrained: bool):
        be = BatchEngine(mini, max_batch=4)
        outs = {}
        plain = Engine(mini, mtp=False, prefill_step=16)
        be.add("free", free, PromptCache.fresh(mini, mtp=False), plain, n)
        if with_constrained:
            eng = Engine(mini, mtp=False, prefill_step=16)
            eng.sampler.processors.extend(engine_grammar.processors(tok, mini, len(forced.ids),
                                                                    G.tool_call_grammar(TOOLS, parallel=False,
                                                                                        forced="<tool_call>")))
            be.add("forced", forced.ids, PromptCache.fresh(mini, mtp=False), eng, 60)
        together = 0
        while len(be):
            together = max(together, sum(not s.prefilling for s in be.seqs))
            for key, t, _ in be.step():
                if key not in [s.key for s in be.seqs]:
                    continue
                outs.setdefault(key, []).append(t)
                if t in EOS or len(outs[key]) >= (n if key == "free" else 60):
                    be.remove(key)
        return outs, together

    alone, _ = run(False)
    both, together = run(True)
    assert together == 2  # they decoded in the same passes
    assert both["free"] == alone["free"]
    out = both["forced"]
    assert out[-1] in EOS, tok.decode(out)
    calls, _ = parse(tok, "<tool_call>", out[:-1])
    assert len(calls) == 1 and calls[0].name in ("W", "Wital")
    jsonschema.validate(calls[0].arguments, params_of(calls[0].name))


def test_single_sequence_engine_enforces_the_grammar(mini, tok):
    from glm_mlx.generation.engine import Engine

    forced = _forced_prompt(tok)
    ids = forced.ids + tok._tokenizer.encode("Wital", add_special_tokens=False)
    eng = Engine(mini, mtp=False, prefill_step=64)
    eng.sampler.processors.extend(engine_grammar.processors(tok, mini, len(ids), G.tool_call_grammar(
        TOOLS, "Wital", parallel=False, forced="<tool_call>Wital")))
    out = []
    for t in eng.generate(ids, max_tokens=60):
        out.append(int(t))
        if out[-1] in EOS:
            break
    assert out[-1] in EOS, tok.decode(out)
    calls, _ = parse(tok, "<tool_call>Wital", out[:-1])
    assert [c.name for c in calls] == ["Wital"]
    jsonschema.validate(calls[0].arguments, params_of("Wital"))


# --- the real server -------------------------------------------------------------------------------
# Bounded strings: glm-mini (a tiny Shakespeare model) would otherwise write a name until max_tokens
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]


def test_openai_json_schema_answer_validates(oa):
    from serve_helpers import NO_THINK

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = oa.chat.completions.create(model="m", messages=ASK, max_tokens=200, temperature=0, response_format=fmt,
                                   extra_body=NO_THINK)
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    assert r.choices[0].finish_reason == "stop"
    # with reasoning: the JSON comes after it
    r = oa.chat.completions.create(model="m", messages=ASK, max_tokens=300, temperature=0, response_format=fmt)
    if r.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_openai_json_object_and_langchain_shape(oa):
    from serve_helpers import NO_THINK

    r = oa.chat.completions.create(model="m", messages=ASK, max_tokens=200, temperature=0,
                                   response_format={"type": "json_object"}, extra_body=NO_THINK)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # LangChain's with_structured_output(method="json_schema") sends a pydantic schema ($defs, titles)
    schema = {"title": "Team", "type": "object", "$defs": {"Person": PERSON | {"title": "Person"}},
              "properties": {"lead": {"$ref": "#/$defs/Person"}}, "required": ["lead"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "Team", "description": "A team", "strict": True,
                                                  "schema": schema}}
    r = oa.chat.completions.create(model="m", messages=ASK, max_tokens=200, temperature=0, response_format=fmt,
                                   extra_body=NO_THINK)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_invalid_schema_is_a_400(oa):
    import openai

    for fmt in ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
                {"type": "yaml"}):
        with pytest.raises(openai.BadRequestError) as e:
            oa.chat.completions.create(model="m", messages=ASK, max_tokens=5, response_format=fmt)
        assert "response_format" in str(e.value)


def test_forced_tool_calls_validate_through_both_sdks(oa, ac):
    from serve_helpers import GREEDY, MODEL, NO_THINK

    ask = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
    r = oa.chat.completions.create(model="m", messages=ask, tools=TOOLS, tool_choice="required", max_tokens=80,
                                   temperature=0, extra_body=NO_THINK)
    calls = r.choices[0].message.tool_calls
    assert calls and r.choices[0].finish_reason == "tool_calls"
    for c in calls:
        assert c.function.name in ("W", "Wital")
        jsonschema.validate(json.loads(c.function.arguments), params_of(c.function.name))
    anthropic_tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
    for choice in ({"type": "any"}, {"type": "tool", "name": "Wital"}):
        m = ac.messages.create(model=MODEL, max_tokens=80, messages=ask, tools=anthropic_tools, tool_choice=choice,
                               thinking={"type": "disabled"}, extra_body=GREEDY)
        uses = [b for b in m.content if b.type == "tool_use"]
        assert uses and m.stop_reason == "tool_use", m
        for u in uses:
            assert u.name in (("W", "Wital") if choice["type"] == "any" else ("Wital",))
            jsonschema.validate(u.input, params_of(u.name))


def test_anthropic_thinking_budget_forces_the_answer(ac, tokenizer):
    from serve_helpers import GREEDY, MODEL, POEM

    ask = [{"role": "user", "content": POEM}]
    free = ac.messages.create(model=MODEL, max_tokens=300, messages=ask, thinking={"type": "enabled",
                              "budget_tokens": 4096}, extra_body=GREEDY)
    thought = "".join(b.thinking for b in free.content if b.type == "thinking")
    n = len(tokenizer.encode(thought, add_special_tokens=False))
    if n < 8:
        pytest.skip(f"glm-mini reasoned only {n} tokens here")
    budget = 4
    m = ac.messages.create(model=MODEL, max_tokens=300, messages=ask, thinking={"type": "enabled",
                           "budget_tokens": budget}, extra_body=GREEDY)
    short = "".join(b.thinking for b in m.content if b.type == "thinking")
    assert len(tokenizer.encode(short, add_special_tokens=False)) <= budget + 1, short
    assert short and thought.startswith(short.rstrip()[: len(short) // 2])  # the same start, cut
    assert any(b.type == "text" for b in m.content) or m.stop_reason == "end_turn", m
