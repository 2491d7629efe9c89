"""Grammars for structured output and forced tool calls (llguidance Lark, built in handler threads).

A grammar here is plain text (an llguidance Lark grammar describing the whole output after the prompt);
it crosses to the worker in `GenRequest.grammar`, which compiles it (cached by text) into a matcher
that masks each step's logits (glm_mlx/grammar.py). Handlers validate it first (`check`), so a schema
llguidance cannot compile is a 400 before any generation.

- `json_object_grammar()`, `json_schema_grammar(schema)`: the answer is one JSON value (after the
  reasoning when the prompt ends inside `<think>`).
- `tool_call_grammar(tools, name)`: a GLM call `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...
  </tool_call>` whose NAME is exactly one declared tool (a literal alternative: `W` cannot become
  `Wital`), whose keys are that tool's declared properties in declaration order (required ones present,
  optional ones optional), whose values are raw text for string properties (not containing
  `</arg_value>`), one of the strings of a string enum, else JSON validating against the property's
  schema (llguidance `%json`); then `</tool_call>`, further calls when parallel, then EOS.
- `strict_tools_grammar(tools)`: tool_choice auto with tools marked `strict: true`: text is free, but
  once the model opens `<tool_call>` the name is a declared tool and a strict tool's arguments
  follow its schema (other tools' arguments are free key/value pairs).
- `for_request(tokenizer, prompt, tools, response_format=...)` (validated), `for_response_format(fmt)`,
  `constrain(gen, prompt, grammar, reasoning_budget)`: what the API layers call.
"""

from __future__ import annotations

import json

from ..generation.output_parser import _schema_types
from .prompt import BadRequest, tool_functions

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"
THINK_CLOSE = "</think>"

# Text lexemes never match special tokens (llguidance encodes those apart from UTF-8 text); they also
# exclude the tags spelled as plain text, which the output parser (working on text) would read as tags.
_ANY = "(?s:.*)"


def _without(*tags: str) -> str:
    """A regex for any text (specials excluded) holding none of `tags` as plain text."""
    out = f"/{_ANY}/"
    for t in tags:
        out += f" & ~/{_ANY}{_re_escape(t)}{_ANY}/"
    return out


def _re_escape(s: str) -> str:
    return "".join("\\" + c if c in r"\.+*?()|[]{}^$/-" else c for c in s)


_LEXEMES = "\n".join([
    f"REASON: {_without(THINK_CLOSE, CALL_OPEN)}",
    f"STRVAL: {_without(VALUE_CLOSE)}",
    f"FREEKEY: {_without(KEY_CLOSE)}",
    f"TEXT: {_without(CALL_OPEN)}",
])


def _open(tag: str) -> str:
    """A special token in Lark (GLM's tags are single special tokens; llguidance names them as written)."""
    return tag


def _lit(s: str) -> str:
    """A Lark string literal (UTF-8 kept as is)."""
    return json.dumps(s, ensure_ascii=False)


def _json_schema(schema) -> str:
    """`%json {...}`, lenient (an unknown `format` is a warning, not an error) unless the schema says."""
    if not isinstance(schema, dict):
        raise BadRequest("a JSON schema must be an object", "schema")
    # Compact JSON (", " and ": " separators, no other whitespace): a small model left free to add
    # whitespace may add it forever. A schema's own x-guidance options win.
    opts = {"lenient": True, "whitespace_flexible": False,
            **(schema.get("x-guidance") if isinstance(schema.get("x-guidance"), dict) else {})}
    return "%json " + json.dumps({**schema, "x-guidance": opts}, ensure_ascii=False)


def _answer(body: str, thinking: bool) -> str:
    """start: [reasoning </think>] body, with the lexemes."""
    head = f'REASON {_open(THINK_CLOSE)} "\\n"? ' if thinking else ""
    return f"start: {head}answer\nanswer: {body}\n{_LEXEMES}\n"


def json_object_grammar(thinking: bool = False) -> str:
    """The answer is one JSON object. thinking: the prompt ends inside `<think>` (reasoning comes first)."""
    return _answer(_json_schema({"type": "object"}), thinking)


def json_schema_grammar(schema: dict, thinking: bool = False) -> str:
    """The answer is JSON validating against `schema`."""
    return _answer(_json_schema(schema), thinking)


# --- tool calls ----------------------------------------------------------------------------------
def _parameters(fn: dict) -> dict:
    p = fn.get("parameters") or fn.get("input_schema") or {}
    return p if isinstance(p, dict) else {}


_CONSTRAINTS = ("$ref", "const", "enum", "allOf", "anyOf", "oneOf", "not", "properties", "items")


def _value(schema, defs: dict) -> str:
    """A property value's rule body: raw text for strings (a literal alternative for string enums) and
    for schemas that constrain nothing, else `%json` against the property's schema (the parameters'
    $defs carried along for $ref). The same split as the output parser's (`_schema_types`)."""
    types = _schema_types(schema)
    if not types:
        if isinstance(schema, dict) and any(k in schema for k in _CONSTRAINTS):
            return _json_schema({**schema, **defs})
        return "STRVAL"  # parsed as JSON if it parses, else kept as text: anything goes
    if types <= {"string"}:
        enum = schema.get("enum")
        if isinstance(enum, list) and enum and all(isinstance(e, str) for e in enum):
            return "(" + " | ".join(_lit(e) for e in enum) + ")"
        return "STRVAL"
    return _json_schema({**schema, **defs})


def _args(fn: dict, rule: str, rules: list[str]) -> str:
    """Rules for one tool's argument pairs; returns the rule body (maybe empty)."""
    params = _parameters(fn)
    props = params.get("properties")
    if not isinstance(props, dict) or not props:
        rules.append(f"{rule}: free_pair*")
        return rule
    required = set(params.get("required") or [])
    defs = {k: params[k] for k in ("$defs", "definitions") if isinstance(params.get(k), dict)}
    parts = []
    for j, (key, schema) in enumerate(props.items()):
        pair = f"{rule}_{j}"
        rules.append(f"{pair}: {_open(KEY_OPEN)} {_lit(str(key))} {_open(KEY_CLOSE)} "
                     f"{_open(VALUE_OPEN)} {_value(schema, defs)} {_open(VALUE_CLOSE)}")
        parts.append(pair if key in required else pair + "?")
    rules.append(f"{rule}: {' '.join(parts)}")
    return rule


def _free_args(rule: str, rules: list[str]) -> str:
    rules.append(f"{rule}: free_pair*")
    return rule


_FREE_PAIR = (f"free_pair: {_open(KEY_OPEN)} FREEKEY {_open(KEY_CLOSE)} "
              f"{_open(VALUE_OPEN)} STRVAL {_open(VALUE_CLOSE)}")


def _functions(tools) -> list[dict]:
    fns = [f for f in tool_functions(tools) if isinstance(f, dict) and isinstance(f.get("name"), str) and f["name"]]
    if not fns:
        raise BadRequest("no usable tool declarations", "tools")
    return fns


def _bodies(fns: list[dict], rules: list[str], strict_only: bool = False) -> str:
    """`"NAME" args` alternatives, one per tool; with strict_only, only strict tools' args are checked."""
    alts = []
    for i, fn in enumerate(fns):
        rule = f"args{i}"
        if strict_only and not fn.get("strict"):
            _free_args(rule, rules)
        else:
            _args(fn, rule, rules)
        alts.append(f"{_lit(fn['name'])} {rule}")
    rules.append("body: " + " | ".join(alts))
    return "body"


def tool_call_grammar(tools, name: str | None = None, *, parallel: bool = True, forced: str = "") -> str:
    """A forced call: `<tool_call>` + one declared tool (`name`: that one) + its validated arguments +
    `</tool_call>`, more calls when `parallel` (to the same tool when named), then EOS.
    forced: what the prompt already ends with on the model's behalf (prompt.forced: "", "<tool_call>"
    or "<tool_call>NAME"); the grammar covers the rest of the output."""
    fns = _functions(tools)
    if name is not None:
        fns = [f for f in fns if f["name"] == name]
        if not fns:
            raise BadRequest(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        fns = fns[:1]
    rules: list[str] = []
    body = _bodies(fns, rules)
    call = f"{_open(CALL_OPEN)} {body} {_open(CALL_CLOSE)}"
    if forced == "":
        first = call
    elif forced == CALL_OPEN:
        first = f"{body} {_open(CALL_CLOSE)}"
    elif name is not None and forced == CALL_OPEN + name:
        first = f"args0 {_open(CALL_CLOSE)}"
    else:
        raise ValueError(f"unexpected forced prefix {forced!r}")
    more = f' ("\\n"? {call})*' if parallel else ""
    rules += [f"start: {first}{more}", _FREE_PAIR, _LEXEMES]
    return "\n".join(rules) + "\n"


def strict_tools_grammar(tools, *, thinking: bool = False, parallel: bool = True, answer: str | None = None) -> str | None:
    """tool_choice auto with some tool marked `strict: true`: free text, but a `<tool_call>` the model
    opens names a declared tool, and a strict tool's arguments follow its schema (the others' are free
    pairs). None if no tool is strict and no `answer` is given. answer: a rule body the text answer
    must match instead of free text (a response_format's `%json`); the answer is then that or calls."""
    fns = _functions(tools)
    if not any(f.get("strict") for f in fns) and answer is None:
        return None
    rules: list[str] = []
    body = _bodies(fns, rules, strict_only=True)
    head = f'REASON {_open(THINK_CLOSE)} "\\n"? ' if thinking else ""
    calls = "(call TEXT?)*" if parallel else "(call TEXT?)?"
    if answer is None:
        rules.append(f"start: {head}TEXT? {calls}")
    else:
        more = ' ("\\n"? call)*' if parallel else ""
        rules += [f"start: {head}(answer | call{more})", f"answer: {answer}"]
    rules += [f"call: {_open(CALL_OPEN)} {body} {_open(CALL_CLOSE)}", _FREE_PAIR, _LEXEMES]
    return "\n".join(rules) + "\n"


def for_tools(tools, forced: str, *, parallel: bool = True, thinking: bool = False, answer: str | None = None) -> str | None:
    """The grammar for a request's tools, from what prompt.forced_call forced (prompt.forced): "<tool_call>"
    (required / Anthropic any): a call to any declared tool; "<tool_call>NAME": a call to NAME; "" (auto):
    strict tools' calls checked, or (answer given) the answer or calls. tools None (none): None."""
    if not tools:
        return None
    if forced == CALL_OPEN:
        return tool_call_grammar(tools, parallel=parallel, forced=forced)
    if forced.startswith(CALL_OPEN):
        return tool_call_grammar(tools, forced[len(CALL_OPEN):], parallel=parallel, forced=forced)
    return strict_tools_grammar(tools, thinking=thinking, parallel=parallel, answer=answer)


def _format_schema(fmt, param: str) -> dict | None:
    """response_format -> the answer's JSON schema ({"type": "object"} for json_object), or None (text)."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise BadRequest(f"'{param}' must be an object", param)
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema", fmt)
        if not isinstance(spec, dict):
            raise BadRequest(f"'{param}.json_schema' must be an object", param)
        schema = spec.get("schema")
        if schema is None and ("properties" in spec or spec.get("type") in ("object", "array")):
            schema = spec  # the schema given in place of its wrapper
        if schema is None:
            schema = {"type": "object"}
        if not isinstance(schema, dict):
            raise BadRequest(f"'{param}.json_schema.schema' must be an object (a JSON schema)", param)
        return schema
    raise BadRequest(f"'{param}.type' must be 'text', 'json_object' or 'json_schema'", param)


def for_response_format(fmt, thinking: bool = False, param: str = "response_format") -> str | None:
    """OpenAI `response_format` (chat) / Responses `text.format` -> a grammar or None (text).
    {"type": "text"}: None; {"type": "json_object"}: any JSON object; {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}} (Chat) or {"type": "json_schema", "name", "schema"}
    (Responses): JSON validating against the schema. Anything else: BadRequest (param named)."""
    schema = _format_schema(fmt, param)
    return None if schema is None else json_schema_grammar(schema, thinking)


def for_request(tokenizer, prompt, tools, *, parallel: bool = True, response_format=None,
                param: str = "response_format") -> str | None:
    """Everything a chat request constrains, as one validated grammar (a 400 if it cannot be enforced):
    a forced tool call (prompt.forced) wins; else a response_format's JSON answer, or a call when tools
    are offered (tool_choice auto); else strict tools' calls; else None. tools: the tools the output
    parser reads (None for tool_choice none)."""
    schema = _format_schema(response_format, param)
    answer = None if schema is None else _json_schema(schema)
    g = for_tools(tools, prompt.forced, parallel=parallel, thinking=prompt.thinking, answer=answer)
    if g is None and answer is not None:
        g = _answer(answer, prompt.thinking)
    where = "tools" if tools and (prompt.forced or answer is None) else param
    return check(g, tokenizer, where)


def constrain(gen, prompt, grammar: str | None = None, reasoning_budget: int | None = None):
    """Set a GenRequest's constraints: the grammar, and the reasoning budget when the output starts inside
    the reasoning (prompt.thinking; a forced call closed it, so no budget then). Returns gen."""
    gen.grammar = grammar
    gen.reasoning_budget = reasoning_budget if prompt.thinking else None
    return gen


def check(grammar: str | None, tokenizer, param: str) -> str | None:
    """Compile the grammar for this tokenizer (plain Python, in the handler thread): a 400 naming
    `param` with llguidance's message if it does not. Returns the grammar."""
    if grammar is None:
        return None
    from ..generation.constrain import grammar_error

    err = grammar_error(grammar, tokenizer)
    if err is not None:
        raise BadRequest(f"'{param}' cannot be enforced: {err.strip()}", param)
    return grammar
