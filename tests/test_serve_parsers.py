"""GLM-5.1 output parser: reasoning/content/tool-call split, schema typing, streaming equivalence."""

import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from glm_mlx.generation.output_parser import Event, OutputParser, ToolCall, parse_output, render_tool_call

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "w", "parameters": {
        "type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "temp": {"type": "number"},
            "metric": {"type": "boolean"}, "opts": {"type": "object"}, "tags": {"type": "array"},
            "note": {"type": ["string", "null"]}, "unit": {"enum": ["c", "f"]}}}}},
    {"name": "read_file", "description": "r", "input_schema": {  # Anthropic form
        "type": "object", "properties": {"path": {"type": "string"}, "limit": {"type": "integer"}}}},
]
TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")


def render_45(name, args):
    """GLM-4.5/4.6 form: newline after the name and around each pair."""
    pairs = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v if isinstance(v, str) else json.dumps(v)}</arg_value>\n"
                    for k, v in args.items())
    return f"<tool_call>{name}\n{pairs}</tool_call>"


def summary(reasoning, content, calls):
    return reasoning, content, [(c.name, c.arguments_json) for c in calls]


def stream(chunks, **kw):
    """Feed chunks; return the same summary shape as parse_output (merged events)."""
    p = OutputParser(**kw)
    events = []
    for c in chunks:
        events += p.feed(c)
    events += p.finish()
    for e in events:
        assert e.kind in ("reasoning", "content", "tool_call")
        assert (e.call is not None) == (e.kind == "tool_call")
        assert e.kind == "tool_call" or e.text  # no empty text events
    calls = [e.call for e in events if e.kind == "tool_call"]
    assert calls == p.tool_calls
    return summary("".join(e.text for e in events if e.kind == "reasoning"),
                   "".join(e.text for e in events if e.kind == "content"), calls)


def oneshot(text, **kw):
    return summary(*parse_output(text, **kw))


# --- whole outputs ------------------------------------------------------------------------------

def test_compact_call_after_text_with_thinking_start():
    text = ('The user wants weather.</think>\nLet me check.'
            '<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>'
            '<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>')
    r, c, calls = parse_output(text, tools=TOOLS, thinking=True)
    assert (r, c) == ("The user wants weather.", "Let me check.")
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert calls[0].arguments == {"city": "Paris", "days": 3}
    assert calls[0].arguments_json == '{"city": "Paris", "days": 3}'
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 29
    int(calls[0].id[5:], 16)


def test_glm45_newline_form_and_several_calls():
    text = (render_45("get_weather", {"city": "Paris", "metric": True}) + "\n"
            + render_45("read_file", {"path": "/tmp/a b.txt", "limit": 10}) + "\n")
    r, c, calls = parse_output(text, tools=TOOLS)
    assert (r, c) == ("", "")
    assert [(x.name, x.arguments) for x in calls] == [
        ("get_weather", {"city": "Paris", "metric": True}), ("read_file", {"path": "/tmp/a b.txt", "limit": 10})]
    assert len({x.id for x in calls}) == 2


def test_schema_typing():
    args = {"city": "12345", "days": 7, "temp": 21.5, "metric": False, "opts": {"a": [1, "x"]},
            "tags": ["a", "b"], "note": "null-ish", "unit": "5"}
    _, _, [call] = parse_output(render_tool_call("get_weather", args), tools=TOOLS)
    assert call.arguments == args
    assert isinstance(call.arguments["city"], str) and isinstance(call.arguments["days"], int)
    # Python-style literals fall back to ast.literal_eval; junk for a typed param stays raw text
    text = ("<tool_call>get_weather<arg_key>metric</arg_key><arg_value>True</arg_value>"
            "<arg_key>opts</arg_key><arg_value>{'k': None}</arg_value><arg_key>days</arg_key>"
            "<arg_value>soon</arg_value><arg_key>note</arg_key><arg_value>null</arg_value></tool_call>")
    _, _, [call] = parse_output(text, tools=TOOLS)
    assert call.arguments == {"metric": True, "opts": {"k": None}, "days": "soon", "note": None}
    # string values are raw (not stripped); no schema for a param: JSON if it parses, else text
    text = ("<tool_call>read_file<arg_key>path</arg_key><arg_value> a\n</arg_value>"
            "<arg_key>extra</arg_key><arg_value>[1, 2]</arg_value><arg_key>x</arg_key><arg_value>hi</arg_value></tool_call>")
    _, _, [call] = parse_output(text, tools=TOOLS)
    assert call.arguments == {"path": " a\n", "extra": [1, 2], "x": "hi"}


def test_undeclared_function_and_no_tools_stay_content():
    """A call to a function the request did not declare is never a tool call: its markup is content,
    with the whitespace before it, so nothing is lost and the client runs nothing it did not offer."""
    rm = render_tool_call("rm_rf", {"n": 1})
    assert parse_output(rm, tools=TOOLS) == ("", rm, [])
    assert parse_output("\n" + rm + "\n", tools=TOOLS) == ("", "\n" + rm + "\n", [])
    assert parse_output("<tool_call>now</tool_call>") == ("", "<tool_call>now</tool_call>", [])  # no tools
    assert parse_output("<tool_call>get_weather</tool_call>", tools=[]) == ("", "<tool_call>get_weather</tool_call>", [])
    # the JSON form obeys the same rule; a declared call after an undeclared one is still a call
    js = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    r, c, [call] = parse_output(js + " " + render_tool_call("read_file", {"path": "p"}), tools=TOOLS)
    assert (c, call.name) == (js + " ", "read_file")


def test_thinking_modes_and_think_in_output():
    assert parse_output("reason</think>\n\nanswer", thinking=True) == ("reason", "\nanswer", [])
    assert parse_output("answer only") == ("", "answer only", [])
    assert parse_output(" \n<think>r</think>a") == ("r", "a", [])
    assert parse_output("<think>r</think>\na", thinking=True) == ("r", "a", [])
    assert parse_output("cut off reasoning", thinking=True) == ("cut off reasoning", "", [])
    # </think> in content mode, <think> mid-text: plain text
    assert parse_output("a </think> <think> b") == ("", "a </think> <think> b", [])
    assert parse_output("<thi") == ("", "<thi", [])


def test_parse_tools_false_keeps_markup():
    text = "x " + render_tool_call("get_weather", {"city": "P"}) + "\n"
    assert parse_output(text, tools=TOOLS, parse_tools=False) == ("", text, [])


def test_whitespace_and_text_around_calls():
    call = render_tool_call("read_file", {"path": "p"})
    assert parse_output("r</think>\n\n" + call + "\n\n" + call + " \n", TOOLS, thinking=True)[:2] == ("r", "")
    assert parse_output("Hi.\n" + call + "\nDone.", TOOLS)[:2] == ("", "Hi.\n\nDone.")


def test_unterminated_and_malformed_calls_become_text():
    part = "ok<tool_call>read_file<arg_key>path</arg_key><arg_value>p</arg_value>"
    assert parse_output(part, TOOLS) == ("", part, [])
    assert parse_output("a<tool_call></tool_call>", TOOLS) == ("", "a<tool_call></tool_call>", [])
    r, c, [call] = parse_output("a <tool_call> b" + render_tool_call("read_file", {"path": "p"}), TOOLS)
    assert (c, call.name, call.arguments) == ("a <tool_call> b", "read_file", {"path": "p"})
    _, _, [call] = parse_output('<tool_call>{"name": "read_file", "arguments": {"path": "p"}}</tool_call>', TOOLS)
    assert (call.name, call.arguments) == ("read_file", {"path": "p"})


def test_minimal_holdback():
    p = OutputParser(TOOLS, thinking=True)
    assert p.feed("abc</thi") == [Event("reasoning", "abc")]
    assert p.feed("nk>") == []  # the newline after </think> may still come
    assert p.feed("\nHello <") == [Event("content", "Hello ")]
    assert p.feed("b") == [Event("content", "<b")]
    assert p.feed(" <tool_call>read_file") == [Event("content", " ")]
    [ev] = p.feed("<arg_key>path</arg_key><arg_value>x</arg_value></tool_call>")
    assert ev.kind == "tool_call" and ev.call.arguments == {"path": "x"}
    assert p.feed("\n") == [] and p.finish() == []
    q = OutputParser()
    assert q.feed("  <th") == []  # could still be a leading <think>
    assert q.feed("x") == [Event("content", "  <thx")]
    assert q.feed("a</think") == [Event("content", "a</think")]  # no </think> tag in content mode


# --- streaming equivalence --------------------------------------------------------------------

SAMPLES = [
    ("Think <b>hard</b> é😀</think>\nAnswer: <tool_call> is a tag." + render_tool_call(
        "get_weather", {"city": "42", "opts": {"a": "ü"}, "days": 2}) + "\n", True),
    (" <think>r1 </thin</think>" + render_45("read_file", {"path": "<p>", "limit": 3}) + "\n\n"
     + render_tool_call("nope", {"x": "1"}) + " tail <tool_c", False),
    ("plain answer with < and </ and <tool", False),
    ("r</think>\n\n  " + render_tool_call("read_file", {"path": "a"}) + "<tool_call>read_file<arg_key>", True),
    ("", True), ("<", False), ("\n\n", False),
]


@pytest.mark.parametrize("text,thinking", SAMPLES)
@pytest.mark.parametrize("parse_tools", [True, False])
def test_split_everywhere(text, thinking, parse_tools):
    kw = dict(tools=TOOLS, thinking=thinking, parse_tools=parse_tools)
    want = oneshot(text, **kw)
    assert stream([text], **kw) == want
    assert stream(list(text), **kw) == want
    for i in range(len(text) + 1):
        assert stream([text[:i], text[i:]], **kw) == want, i


# --- property tests ---------------------------------------------------------------------------

FRAGMENTS = list(TAGS) + ["<", "</", "<thi", "</think", "<tool_c", "</tool_call", "\n", " ", "get_weather",
                          "read_file", "city", "days", "42", '{"a": 1}', "true", "é😀", "x y"]


def split(text, cuts):
    cuts = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=30),
       st.lists(st.integers(0, 10_000), max_size=8), st.booleans(), st.booleans())
def test_random_fragments_stream_equals_oneshot(frags, cuts, thinking, parse_tools):
    text = "".join(frags)
    kw = dict(tools=TOOLS, thinking=thinking, parse_tools=parse_tools)
    assert stream(split(text, cuts), **kw) == oneshot(text, **kw)


def no_tags(s):
    return not any(t in s for t in TAGS)


plain = st.lists(st.sampled_from(["<", "</", "<thi", "</think", "<tool_c", "\n", " ", "é😀", "a"])
                 | st.text(max_size=5), max_size=8).map("".join).filter(no_tags)
blank = st.sampled_from(["", " ", "\n", "\n\n", " \t\n"])
json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | plain
json_val = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(plain, c, max_size=3),
                        max_leaves=6)
GW = {"city": plain, "days": st.integers(), "temp": st.floats(allow_nan=False, allow_infinity=False),
      "metric": st.booleans(), "opts": st.dictionaries(plain, json_val, max_size=3), "tags": st.lists(json_val, max_size=3)}
RF = {"path": plain, "limit": st.integers()}
call_st = st.one_of(*(st.tuples(st.just(n), st.fixed_dictionaries({}, optional=a), st.booleans())
                      for n, a in (("get_weather", GW), ("read_file", RF))))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.one_of(st.none(), plain), st.one_of(blank, plain), st.lists(call_st, max_size=3),
       st.lists(blank, min_size=3, max_size=3), st.one_of(blank, plain), st.lists(st.integers(0, 10_000), max_size=8))
def test_well_formed_roundtrip(thinking, reasoning, content, calls, seps, tail, cuts):
    text, want_r = "", ""
    if thinking or reasoning is not None:
        want_r = reasoning or ""
        text = ("" if thinking else " \n<think>") + want_r + "</think>\n"
    text += content
    for (name, args, compact), sep in zip(calls, seps):
        text += (render_tool_call if compact else render_45)(name, args) + sep
    after = (seps[len(calls) - 1] if calls else "") + tail  # text after the last call
    text += tail
    assume(calls or no_tags(content + tail))  # plain text must not join into a tag
    if calls:
        want_c = (content if content.strip() else "") + (after if after.strip() else "")
    else:
        want_c = content + tail if (content + tail).strip() else ""
    want = (want_r, want_c, [(n, json.dumps(a, ensure_ascii=False)) for n, a, _ in calls])
    got = stream(split(text, cuts), tools=TOOLS, thinking=thinking)
    assert got == want
    assert got == oneshot(text, tools=TOOLS, thinking=thinking)
    assert no_tags(got[0]) and no_tags(got[1])


def test_malformed_schema_types_nothing():
    """A client's schema with a non-list anyOf/oneOf must not break parsing a call to that tool."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"anyOf": 5}, "y": {"oneOf": {"type": "string"}}}}}}]
    _, _, calls = parse_output("<tool_call>f<arg_key>x</arg_key><arg_value>1</arg_value>"
                               "<arg_key>y</arg_key><arg_value>2</arg_value></tool_call>", tools=tools)
    assert calls[0].arguments == {"x": 1, "y": 2}


@pytest.mark.parametrize("parallel", [True, False])
def test_parsed_passes_the_first_call_only_without_parallel_tool_calls(parallel):
    """parallel_tool_calls false (OpenAI) / disable_parallel_tool_use (Anthropic): one call per turn."""
    from glm_mlx.serve.prompt import Prompt
    from glm_mlx.serve.stream import parsed
    from glm_mlx.serve.worker import Delta, Finished

    text = render_tool_call("f", {"x": "1"}) + render_tool_call("g", {"y": "2"})
    events = [Delta(text[i : i + 7], 0, None) for i in range(0, len(text), 7)]
    events.append(Finished("stop", None, 3, 0, len(events), 0.0, 0.0, 0.0))
    tools = [{"type": "function", "function": {"name": n, "parameters": {}}} for n in "fg"]
    items = list(parsed(iter(events), Prompt([1, 2, 3], False, "", True), tools, parallel))
    calls = [x.call.name for kind, x in items if kind == "event" and x.kind == "tool_call"]
    assert calls == (["f", "g"] if parallel else ["f"])
    assert [k for k, _ in items].count("token") == len(events) - 1 and items[-1][0] == "end"


# --- argument typing by the schema -------------------------------------------------------------

def _tool(name, **props):
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props}}}


def _args(text, tools):
    _, _, [call] = parse_output(text, tools=tools)
    return call.arguments


def _one(schema, raw):
    """The typed value of one argument written raw between <arg_value> tags."""
    return _args(f"<tool_call>f<arg_key>x</arg_key><arg_value>{raw}</arg_value></tool_call>", [_tool("f", x=schema)])["x"]


@pytest.mark.parametrize("schema,raw,want", [
    # array/object written with escaped quotes, as a JSON string literal holding JSON, or Python-style
    ({"type": "array"}, r'[\"a\", \"b\"]', ["a", "b"]),
    ({"type": "object"}, r'{\"k\": 1}', {"k": 1}),
    ({"type": "object"}, r'"{\"k\": [1, \"x\"]}"', {"k": [1, "x"]}),
    ({"type": "array"}, '"[1, 2]"', [1, 2]),
    ({"type": "array"}, r'[\"C:\\\\Users\\\\t.txt\", \"a\\nb\"]', ["C:\\Users\\t.txt", "a\nb"]),
    ({"type": "object"}, "{'k': None, 'b': True}", {"k": None, "b": True}),
    ({"type": "array"}, "\n[1, 2]\n", [1, 2]),  # whitespace around a non-string value is not part of it
    # quoted scalars converted per the schema; integer only when integral
    ({"type": "integer"}, '"5"', 5),
    ({"type": "integer"}, "5.0", 5),
    ({"type": "integer"}, '"5.0"', 5),
    ({"type": "integer"}, "5.5", 5.5),  # not integral: the number as written, for the client to judge
    ({"type": "integer"}, '"5.5"', '"5.5"'),  # a quoted non-integer for an integer: raw text
    ({"type": "number"}, '"2.5e3"', 2500.0),
    ({"type": "number"}, '"-7"', -7),
    ({"type": "boolean"}, '"true"', True),
    ({"type": "boolean"}, '"False"', False),
    ({"type": "boolean"}, "True", True),
    ({"type": "null"}, '"null"', None),
    ({"type": ["integer", "null"]}, "null", None),
    ({"type": ["integer", "null"]}, '"3"', 3),
    ({"type": "integer", "nullable": True}, "None", None),
    ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, '"true"', True),
    ({"oneOf": [{"type": "array"}, {"type": "null"}]}, r'[\"x\"]', ["x"]),
    ({"allOf": [{"type": ["integer", "string"]}, {"type": "integer"}]}, '"4"', 4),
    ({"enum": [1, 2, 3]}, "2", 2),
    ({"const": True}, "true", True),
    ({"properties": {"a": {}}}, '{"a": 1}', {"a": 1}),
    ({"items": {}}, "[true]", [True]),
    # junk and non-finite numbers for a typed param stay raw text (JSON cannot carry NaN/Infinity)
    ({"type": "integer"}, "soon", "soon"),
    ({"type": "number"}, "1e400", "1e400"),
    ({"type": "number"}, "NaN", "NaN"),
    ({"type": "object"}, "{not json", "{not json"),
    # string parameters: exactly as written, even when the text looks like JSON, a number or null
    ({"type": "string"}, '"Paris"', '"Paris"'),
    ({"type": "string"}, "[1, 2]", "[1, 2]"),
    ({"type": "string"}, "007", "007"),
    ({"type": "string"}, "  padded\n", "  padded\n"),
    ({"type": "string"}, r"C:\Users\test", r"C:\Users\test"),
    ({"enum": ["c", "f"]}, "5", "5"),
    # a union with string: another allowed type when the text is one, else the text as written
    ({"type": ["string", "null"]}, "null", None),
    ({"type": ["string", "null"]}, '"null"', "null"),  # quoted: the string (how a grammar writes it)
    ({"type": ["string", "null"]}, "hi there", "hi there"),
    ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "12", 12),
    ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, '"12"', "12"),
    ({"anyOf": [{"type": "string"}, {"type": "array"}]}, r'[\"a\"]', ["a"]),
    # no usable schema: JSON if it parses, else the raw text
    ({}, '{"a": 1}', {"a": 1}),
    ({"description": "d"}, "hello", "hello"),
    ({"anyOf": 5}, "1", 1),
])
def test_argument_typing(schema, raw, want):
    got = _one(schema, raw)
    assert json.dumps(got) == json.dumps(want)  # type-exact: 1 vs 1.0 vs True


@st.composite
def _typed_arg(draw):
    """(schema, value, rendering) for one argument. Values of a union with string are drawn from its
    other types only: GLM writes strings raw, so a string "null" and null look the same."""
    text = st.text(max_size=12).filter(no_tags)
    leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text
    nested = st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=8)
    arrays, objects = st.lists(nested, max_size=4), st.dictionaries(text, nested, max_size=4)
    floats = st.floats(allow_nan=False, allow_infinity=False)
    schema, values = draw(st.sampled_from([
        ({"type": "string"}, text), ({"type": "integer"}, st.integers()), ({"type": "number"}, floats | st.integers()),
        ({"type": "boolean"}, st.booleans()), ({"type": "null"}, st.none()), ({"type": "array"}, arrays),
        ({"type": "object"}, objects), ({"type": ["integer", "null"]}, st.integers() | st.none()),
        ({"type": "number", "nullable": True}, floats | st.none()),
        ({"anyOf": [{"type": "array"}, {"type": "object"}]}, arrays | objects),
        ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, st.integers() | st.booleans()),
        ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, st.integers()),
        ({"type": ["string", "array"]}, arrays), ({"enum": [1, 2.5, None]}, st.sampled_from([1, 2.5, None])),
    ]))
    value = draw(values)
    if isinstance(value, str) or "string" in json.dumps(schema):
        return schema, value, "glm"
    return schema, value, draw(st.sampled_from(["glm", "quoted", "escaped"]))


def _render_value(value, how):
    if how == "glm":  # what the template writes: strings raw, other values JSON
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    literal = json.dumps(json.dumps(value, ensure_ascii=False), ensure_ascii=False)
    return literal if how == "quoted" else literal[1:-1]  # "[1]" / [\"a\"] as models sometimes write


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_typed_arg(), min_size=1, max_size=5), st.booleans(), st.lists(st.integers(0, 10_000), max_size=6))
def test_schema_typing_roundtrip(specs, compact, cuts):
    """Random values of each JSON type, written as GLM writes them (also as a JSON string literal or with
    escaped quotes), come back as the original value, typed by the schema, whole or streamed."""
    props = {f"p{i}": schema for i, (schema, _, _) in enumerate(specs)}
    tools = [_tool("f", **props)]
    want = {f"p{i}": value for i, (_, value, _) in enumerate(specs)}
    rendered = {k: _render_value(v, how) for k, (_, v, how) in zip(want, specs)}
    if compact:
        text = render_tool_call("f", rendered)
    else:
        text = render_45("f", rendered)
    assume(text.count("<arg_value>") == len(specs) and text.count("</arg_value>") == len(specs))
    r, c, calls = parse_output(text, tools=tools)
    assert (r, c, len(calls)) == ("", "", 1)
    assert json.dumps(calls[0].arguments, ensure_ascii=False) == json.dumps(want, ensure_ascii=False)
    assert stream(split(text, cuts), tools=tools) == oneshot(text, tools=tools)


# --- streaming equals whole, event by event ----------------------------------------------------

def events_of(chunks, **kw):
    """Every event from feeding chunks then finish(), adjacent text of one kind merged (chunking may
    split a text event in two, never reorder or retype anything)."""
    p = OutputParser(**kw)
    out = []
    for e in [e for c in chunks for e in p.feed(c)] + p.finish():
        if e.kind == "tool_call":
            out.append(("tool_call", e.call.name, e.call.arguments_json))
        elif out and out[-1][0] == e.kind:
            out[-1] = (e.kind, out[-1][1] + e.text)
        else:
            out.append((e.kind, e.text))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(FRAGMENTS + ["rm_rf", "\\n", '{"name": "read_file"}', "path", "limit"])
                | st.text(max_size=4), max_size=30),
       st.lists(st.integers(0, 10_000), max_size=10), st.booleans(), st.sampled_from([TOOLS, None, []]))
def test_any_split_yields_the_same_events(frags, cuts, thinking, tools):
    text = "".join(frags)
    want = events_of([text], tools=tools, thinking=thinking)
    assert events_of(split(text, cuts), tools=tools, thinking=thinking) == want
    assert events_of(list(text), tools=tools, thinking=thinking) == want
    assert "".join(x[1] for x in want if x[0] == "content").count("<tool_call>") <= text.count("<tool_call>")


# --- other projects' own test cases, with our expectation --------------------------------------
# Ported from vLLM tests/tool_parsers/test_glm4_moe_tool_parser.py and test_glm47_moe_tool_parser.py,
# SGLang test/registered/function_call (Glm4MoeDetector / Glm47MoeDetector tests, test_unknown_tool_name.py)
# and mlx-lm's glm47 tool-parser tests. "peers:" notes where they disagree with us (docs/tool_calls.md).
S = {"type": "string"}
PEER_TOOLS = [
    _tool("get_weather", city=S, date=S, count={"type": "number"}, filters={"type": "object"}, zip=S,
          days={"type": "integer"}),
    _tool("get_current_weather", city=S, state=S, unit=S), _tool("get_current_date"), _tool("search", query=S),
    _tool("todo_write", todos={"type": "array"}), _tool("multiply", a={}, b={}), _tool("apply_diff", s=S),
    _tool("send_message", recipient=S, message=S, priority=S, greeting=S, emoji=S),
    _tool("calculate", operation=S, a={"type": "integer"}, b={"type": "number"}, enabled={"type": "boolean"}),
    _tool("create_task", title=S, location=S),
]
W45 = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>{}</arg_value>\n</tool_call>"
DALLAS = ("<tool_call>get_current_weather\n    <arg_key>city</arg_key>\n    <arg_value>Dallas</arg_value>\n"
          "    <arg_key>state</arg_key>\n    <arg_value>TX</arg_value>\n    </tool_call>")
TODOS = (r'[{\"id\": \"1\", \"task\": \"Check the backend\", \"status\": \"in_progress\"}, '
         r'{\"id\": \"2\", \"task\": \"Check file at C:\\\\Users\\\\test.txt\", \"status\": \"pending\"}]')
UNDECLARED = "<tool_call>bogus_fn\n<arg_key>x</arg_key>\n<arg_value>1</arg_value>\n</tool_call>"
PEER_CASES = [
    # (id, text, tools, thinking, reasoning, content, [(name, arguments)])
    ("vllm47-plain", "This is a plain response.", PEER_TOOLS, False, "", "This is a plain response.", []),
    # peers: SGLang's glm45 detector wants a newline after the name and finds no call here
    ("vllm47-zero-arg-inline", "<tool_call>get_current_date</tool_call>", PEER_TOOLS, False, "", "",
     [("get_current_date", {})]),
    ("vllm47-zero-arg-newline", "<tool_call>get_current_date\n</tool_call>", PEER_TOOLS, False, "", "",
     [("get_current_date", {})]),
    ("vllm47-same-line", "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value></tool_call>",
     PEER_TOOLS, False, "", "", [("get_weather", {"city": "Beijing"})]),
    ("vllm47-newlines", W45.format("Beijing"), PEER_TOOLS, False, "", "", [("get_weather", {"city": "Beijing"})]),
    ("vllm47-content-before", "Checking.<tool_call>get_current_date</tool_call>", PEER_TOOLS, False, "",
     "Checking.", [("get_current_date", {})]),
    # peers: vLLM returns content None here; we return "" (the API layer maps it)
    ("vllm47-whitespace-content", "  \n  <tool_call>get_current_date</tool_call>", PEER_TOOLS, False, "", "",
     [("get_current_date", {})]),
    ("vllm45-indented-pairs", DALLAS, PEER_TOOLS, False, "", "",
     [("get_current_weather", {"city": "Dallas", "state": "TX"})]),
    # peers: SGLang strips the text before a call ("... weather."); vLLM and we keep it as written
    ("vllm45-content-before-space", "I'll help you check the weather. " + DALLAS, PEER_TOOLS, False, "",
     "I'll help you check the weather. ", [("get_current_weather", {"city": "Dallas", "state": "TX"})]),
    # peers: vLLM's tool parser alone leaves the think block in content; its reasoning parser splits it like us
    ("vllm45-thinking-tags", "<think>I want to get the weather.</think>\n\nI will help you get the weather.\n"
     + W45.format("Beijing"), PEER_TOOLS, False, "I want to get the weather.", "\nI will help you get the weather.\n",
     [("get_weather", {"city": "Beijing"})]),
    # peers: vLLM returns only the text before the first call as content; we keep all text outside calls
    ("vllm45-mixed-content", "Info.\n\n" + W45.format("Beijing") + "\n\nAlso Shanghai.\n\n" + W45.format("Shanghai"),
     PEER_TOOLS, False, "", "Info.\n\n\n\nAlso Shanghai.\n\n",
     [("get_weather", {"city": "Beijing"}), ("get_weather", {"city": "Shanghai"})]),
    ("vllm45-malformed-pair", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Seattle</arg_value>\n"
     "<arg_key>incomplete_arg\n<arg_value>value</arg_value>\n</tool_call>", PEER_TOOLS, False, "", "",
     [("get_weather", {"city": "Seattle"})]),
    ("vllm45-incomplete", W45.format("Beijing")[:-len("</tool_call>")], PEER_TOOLS, False, "",
     W45.format("Beijing")[:-len("</tool_call>")], []),
    ("vllm45-open-tag-only", "<tool_call>   ", PEER_TOOLS, False, "", "<tool_call>   ", []),
    ("vllm45-empty-call", "<tool_call></tool_call>", PEER_TOOLS, False, "", "<tool_call></tool_call>", []),
    ("vllm45-numeric", "<tool_call>calculate\n<arg_key>operation</arg_key>\n<arg_value>add</arg_value>\n"
     "<arg_key>a</arg_key>\n<arg_value>42</arg_value>\n<arg_key>b</arg_key>\n<arg_value>3.14</arg_value>\n"
     "<arg_key>enabled</arg_key>\n<arg_value>true</arg_value>\n</tool_call>", PEER_TOOLS, False, "", "",
     [("calculate", {"operation": "add", "a": 42, "b": 3.14, "enabled": True})]),
    # peers: mlx-lm strips string values ("indented code"); vLLM and we keep them
    ("vllm45-whitespace-kept", "<tool_call>apply_diff\n<arg_key>s</arg_key>\n<arg_value>    indented code    "
     "</arg_value>\n</tool_call>", PEER_TOOLS, False, "", "", [("apply_diff", {"s": "    indented code    "})]),
    ("vllm45-unicode", "<tool_call>send_message\n<arg_key>greeting</arg_key>\n<arg_value>你好世界</arg_value>\n"
     "<arg_key>emoji</arg_key>\n<arg_value>🎉</arg_value>\n</tool_call>", PEER_TOOLS, False, "", "",
     [("send_message", {"greeting": "你好世界", "emoji": "🎉"})]),
    ("vllm45-quote-newline-in-string", '<tool_call>send_message\n<arg_key>message</arg_key>'
     '<arg_value>Hello "world"\nNew line</arg_value></tool_call>', PEER_TOOLS, False, "", "",
     [("send_message", {"message": 'Hello "world"\nNew line'})]),
    # peers: vLLM/mlx-lm leave escaped-quote JSON as a string; SGLang and we decode it
    ("sglang47-escaped-json-array", f"<tool_call>todo_write<arg_key>todos</arg_key><arg_value>{TODOS}</arg_value>\n"
     "</tool_call>", PEER_TOOLS, False, "", "", [("todo_write", {"todos": [
         {"id": "1", "task": "Check the backend", "status": "in_progress"},
         {"id": "2", "task": "Check file at C:\\Users\\test.txt", "status": "pending"}]})]),
    ("sglang47-literal-backslash-n-in-array", "<tool_call>todo_write<arg_key>todos</arg_key><arg_value>"
     r'[{\"id\": \"1\", \"task\": \"Print \\\\n to see newline\"}]' "</arg_value></tool_call>", PEER_TOOLS, False,
     "", "", [("todo_write", {"todos": [{"id": "1", "task": "Print \\n to see newline"}]})]),
    ("sglang45-schema-coercion", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n"
     "<arg_key>count</arg_key>\n<arg_value>42</arg_value>\n<arg_key>filters</arg_key>\n"
     '<arg_value>{"a": 1}</arg_value>\n</tool_call>', PEER_TOOLS, False, "", "",
     [("get_weather", {"city": "北京", "count": 42, "filters": {"a": 1}})]),
    ("sglang45-string-digits", W45.format("123"), PEER_TOOLS, False, "", "", [("get_weather", {"city": "123"})]),
    ("sglang45-backslashes", W45.format("C:\\Users\\test"), PEER_TOOLS, False, "", "",
     [("get_weather", {"city": "C:\\Users\\test"})]),
    # peers: SGLang decodes a quoted string for a string parameter (Paris); we keep it as written
    ("sglang45-quoted-string-param", W45.format('"Paris"'), PEER_TOOLS, False, "", "",
     [("get_weather", {"city": '"Paris"'})]),
    # peers: vLLM glm47 keeps the literal "\n" in the name; SGLang and we drop it
    ("sglang45-literal-backslash-n", "<tool_call>get_weather\\n<arg_key>city</arg_key>\\n<arg_value>Tokyo</arg_value>"
     "\\n</tool_call>", PEER_TOOLS, False, "", "", [("get_weather", {"city": "Tokyo"})]),
    ("sglang45-two-calls", W45.format("Tokyo") + "\n<tool_call>search\n<arg_key>query</arg_key>\n"
     "<arg_value>cafes</arg_value>\n</tool_call>", PEER_TOOLS, False, "", "",
     [("get_weather", {"city": "Tokyo"}), ("search", {"query": "cafes"})]),
    # peers: SGLang drops an undeclared call (text and all); vLLM and mlx-lm return it as a tool call;
    # we pass its markup through as content
    ("sglang45-undeclared", UNDECLARED, PEER_TOOLS, False, "", UNDECLARED, []),
    ("sglang47-undeclared", "<tool_call>invalid_func<arg_key>city</arg_key><arg_value>Beijing</arg_value>"
     "</tool_call>", PEER_TOOLS, False, "", "<tool_call>invalid_func<arg_key>city</arg_key><arg_value>Beijing"
     "</arg_value></tool_call>", []),
    ("vllm45-undeclared-zero-arg", "<tool_call>get_current_time\n</tool_call>", PEER_TOOLS, False, "",
     "<tool_call>get_current_time\n</tool_call>", []),
    ("sglang45-angle-brackets", "a < b and c > d. done", PEER_TOOLS, False, "", "a < b and c > d. done", []),
    ("sglang47-mtp-split", "I'll create a task.<tool_call>create_task<arg_key>title</arg_key><arg_value>Go to "
     "Beijing</arg_value><arg_key>location</arg_key><arg_value>San Francisco</arg_value></tool_call>", PEER_TOOLS,
     False, "", "I'll create a task.", [("create_task", {"title": "Go to Beijing", "location": "San Francisco"})]),
    ("sglang47-reasoning-then-call", "<think>reasoning content</think>normal text<tool_call>get_weather<arg_key>city"
     "</arg_key><arg_value>Beijing</arg_value></tool_call>", PEER_TOOLS, False, "reasoning content", "normal text",
     [("get_weather", {"city": "Beijing"})]),
    ("mlx47-multiply", "<tool_call>multiply<arg_key>a</arg_key><arg_value>12234585</arg_value><arg_key>b</arg_key>"
     "<arg_value>48838483920</arg_value></tool_call>", PEER_TOOLS, False, "", "",
     [("multiply", {"a": 12234585, "b": 48838483920})]),
    # peers: mlx-lm parses calls without tools; we (and vLLM/SGLang, which parse nothing then) keep text
    ("mlx47-multiply-no-tools", "<tool_call>multiply<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>", None,
     False, "", "<tool_call>multiply<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>", []),
    ("mlx47-name-own-line", "<tool_call>get_weather\n<arg_key>zip</arg_key>\n<arg_value>10001</arg_value>\n"
     "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>", PEER_TOOLS, False, "", "",
     [("get_weather", {"zip": "10001", "days": 3})]),
    # reasoning edge cases. peers: vLLM's generic think parser makes an unclosed block all reasoning (as we
    # do); its older glm45 parser and SGLang without forced reasoning make it content
    ("think-unterminated-prompt-opened", "still thinking about it", PEER_TOOLS, True, "still thinking about it", "", []),
    ("think-unterminated-explicit", "<think>never closed", PEER_TOOLS, False, "never closed", "", []),
    ("think-close-without-open", "r</think>a", PEER_TOOLS, True, "r", "a", []),
    # peers: vLLM's generic think parser treats text before a stray </think> as reasoning even when the
    # prompt did not open the block; we follow the prompt, so it is text
    ("think-close-in-content", "a</think>b", PEER_TOOLS, False, "", "a</think>b", []),
    ("call-inside-reasoning", "I could <tool_call>get_current_date</tool_call></think>ok", PEER_TOOLS, True,
     "I could <tool_call>get_current_date</tool_call>", "ok", []),
    # GLM-4.5 puts newlines around pairs, never inside a value: a string value keeps its newlines
    # (peers: mlx-lm strips them); a non-string value is stripped before decoding (all agree)
    ("glm45-newline-in-string", "<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>\ncafes\n</arg_value>\n"
     "</tool_call>", PEER_TOOLS, False, "", "", [("search", {"query": "\ncafes\n"})]),
    ("glm45-newline-in-number", "<tool_call>get_weather\n<arg_key>days</arg_key>\n<arg_value>\n4\n</arg_value>\n"
     "</tool_call>", PEER_TOOLS, False, "", "", [("get_weather", {"days": 4})]),
    ("text-between-calls", "<tool_call>get_current_date</tool_call>\n and then \n<tool_call>get_current_date"
     "</tool_call>\n", PEER_TOOLS, False, "", "\n and then \n", [("get_current_date", {}), ("get_current_date", {})]),
    ("undeclared-between-declared", "<tool_call>get_current_date</tool_call>\n" + UNDECLARED + "\n"
     "<tool_call>get_current_date</tool_call>", PEER_TOOLS, False, "", "\n" + UNDECLARED + "\n",
     [("get_current_date", {}), ("get_current_date", {})]),
]


@pytest.mark.parametrize("text,tools,thinking,reasoning,content,calls", [c[1:] for c in PEER_CASES],
                         ids=[c[0] for c in PEER_CASES])
def test_peer_cases(text, tools, thinking, reasoning, content, calls):
    want = (reasoning, content, [(n, json.dumps(a, ensure_ascii=False)) for n, a in calls])
    assert oneshot(text, tools=tools, thinking=thinking) == want
    assert stream(list(text), tools=tools, thinking=thinking) == want
