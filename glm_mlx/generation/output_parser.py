"""Streaming parser for GLM-5.1 output: reasoning, answer text and tool calls.

The model writes (see shared/reference/README.md, "GLM-5.x chat and tool-call format"):
``[<think>]reasoning</think>\\nanswer<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>``.
With thinking on, the prompt already ends in ``<think>``, so output starts inside reasoning.

Behavioural choices (the API layer relies on them; docs/tool_calls.md has the full table):
- Text is held back only while it could still become a tag that matters in the current state
  (``</think>`` in reasoning, ``<tool_call>`` in content, ``<think>`` at the very start). Whitespace-only
  content right before a call, between calls or after the last call is dropped when the call
  becomes a tool call (held until a non-space character or the call decides); other text stays raw.
- Only a call to one of the request's declared tools becomes a tool call. Anything else between
  ``<tool_call>`` and ``</tool_call>`` (an undeclared function, no tools declared at all, an
  unusable name) is passed through as content text, exactly as written, with the whitespace held
  before it: nothing is lost and the client never runs a function it did not offer. (vLLM and
  mlx-lm return such calls as tool calls; SGLang drops them, text and all.)
- Arguments are typed by the declared parameter schema (``type`` string or list, ``nullable``,
  ``anyOf``/``oneOf``/``allOf``, ``enum``/``const``): a string parameter is kept exactly as written
  (no stripping, no JSON decoding; ``render_tool_call`` is its exact inverse); other values are
  JSON-decoded, including JSON written with escaped quotes (``[\\"a\\"]``), a JSON string literal
  that holds JSON, quoted scalars (``"5"``, ``"true"``) and Python literals (``True``, ``None``).
  In a union with string, text that is not another allowed type is the string (a quoted one
  decoded once). A value that fits no allowed type is passed as decoded JSON if it is JSON (not a
  string literal), else as the raw text. A parameter without a schema gets JSON if it parses, else text.
- An unterminated ``<tool_call>`` at finish() becomes content text, even if it looks complete:
  the usual cause is a max_tokens cut, and running a call with missing arguments (a half-written
  file) is worse than showing the markup.
- A terminated call that is not a declared call falls back to the JSON form some GLM outputs use
  (as mlx-lm's glm47 parser does); if its body holds another ``<tool_call>``, the text up to that
  one is content and the rest is parsed as the call. Whole-call parsing is our own (not mlx-lm's
  ``parse_tool_call``) because that one strips string values and guesses calls from free text.
- Reasoning: with ``thinking`` (the prompt ended in ``<think>``) output is reasoning up to
  ``</think>``; a ``<think>`` never closed leaves everything reasoning and the answer empty.
  Without it, only a leading ``<think>`` opens reasoning; ``</think>`` in content is text.
"""

from __future__ import annotations

import ast
import json
import math
import re
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

_REASONING, _CONTENT, _TOOL = "reasoning", "content", "tool"
# Same pair pattern as vLLM/mlx-lm glm47: some outputs put a literal "\n" between key and value.
_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>(?:\\n|\s)*<arg_value>(.*?)</arg_value>", re.S)
_EDGE_GAP = re.compile(r"^(?:\\n|\s)+|(?:\\n|\s)+$")  # whitespace or a literal "\n" around the name
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_FAIL = object()


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=_new_id)

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass
class Event:
    kind: str  # "reasoning" | "content" | "tool_call"
    text: str = ""
    call: ToolCall | None = None


def render_tool_call(name: str, arguments: dict) -> str:
    """Compact GLM-4.7/5 markup for one call: strings raw, other values as JSON."""
    parts = [CALL_OPEN, name]
    for k, v in arguments.items():
        val = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        parts.append(f"<arg_key>{k}</arg_key><arg_value>{val}</arg_value>")
    parts.append(CALL_CLOSE)
    return "".join(parts)


def _tool_schemas(tools) -> dict[str, dict]:
    """name -> parameter properties, from OpenAI ({"function": {...}}) or Anthropic tools."""
    out = {}
    for t in tools or []:
        if not isinstance(t, dict):
            continue
        f = t["function"] if isinstance(t.get("function"), dict) else t
        name = f.get("name")
        if not isinstance(name, str) or not name.strip():
            continue
        params = f.get("parameters") or f.get("input_schema") or {}
        props = params.get("properties") if isinstance(params, dict) else None
        out[name] = props if isinstance(props, dict) else {}
    return out


def _schema_types(schema, depth: int = 0) -> set[str]:
    """JSON types a parameter schema allows: "type" (str or list), anyOf/oneOf (union), allOf
    (intersection), else enum/const values, "properties" (object) or "items" (array); nullable adds
    null. A malformed or unknown schema types nothing."""
    if not isinstance(schema, dict) or depth > 32:
        return set()
    t = schema.get("type")
    types = {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} if isinstance(t, list) else set()
    for key in ("anyOf", "oneOf"):
        subs = schema.get(key)
        for sub in subs if isinstance(subs, list) else []:
            types |= _schema_types(sub, depth + 1)
    subs = schema.get("allOf")
    for sub in subs if isinstance(subs, list) else []:
        st = _schema_types(sub, depth + 1)
        if st:
            types = types & st if types else st
    if not types:
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            types = {_json_type(e) for e in enum}
        elif "const" in schema:
            types = {_json_type(schema["const"])}
        elif isinstance(schema.get("properties"), dict):
            types = {"object"}
        elif isinstance(schema.get("items"), (dict, list)):
            types = {"array"}
    if types and schema.get("nullable") is True:
        types.add("null")
    return types


def _json_type(v) -> str:
    if isinstance(v, bool):
        return "boolean"
    return {int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(type(v), "null")


def _json(s: str, strict: bool = True):
    """json.loads that refuses NaN/Infinity anywhere (the client could not read it back)."""
    v = json.loads(s, strict=strict)
    json.dumps(v, allow_nan=False)
    return v


def _decodings(raw: str):
    """What a non-string argument value may mean, most literal first (lazily):
    JSON; a JSON string literal holding JSON; JSON written with escaped quotes (\\" -> ");
    a Python literal (True, None, 'quotes')."""
    s = raw.strip()
    try:
        v = _json(s)
    except Exception:
        pass
    else:
        yield v
        if isinstance(v, str):
            try:
                yield _json(v.strip())
            except Exception:
                pass
    if "\\" in s:
        try:
            unescaped = json.loads('"' + s + '"', strict=False)
            yield _json(unescaped.strip())
        except Exception:
            pass
    try:  # round-trip through JSON: only JSON-representable results (tuples become lists)
        yield _json(json.dumps(ast.literal_eval(s), allow_nan=False))
    except Exception:
        pass


def _from_text(s: str, types: set[str]):
    """A quoted scalar ("5", "true", "null") typed by the schema, else _FAIL."""
    low = s.strip().lower()
    if "boolean" in types and low in ("true", "false"):
        return low == "true"
    if "null" in types and low in ("null", "none"):
        return None
    if types & {"integer", "number"} and _NUMBER.fullmatch(low):
        try:
            return _fit(_json(low), types)
        except Exception:
            return _FAIL
    return _FAIL


def _fit(v, types: set[str]):
    """v as one of the allowed types (an integral float for an integer, a quoted scalar), else _FAIL."""
    jt = _json_type(v)
    if jt in types or (jt == "integer" and "number" in types):
        return v
    if jt == "number" and "integer" in types and math.isfinite(v) and v.is_integer():
        return int(v)
    if jt == "string":
        return _from_text(v, types)
    return _FAIL


def _convert(raw: str, types: set[str]):
    if not types:  # no schema for this parameter: JSON if it parses, else the raw text
        try:
            return _json(raw.strip())
        except Exception:
            return raw
    if types <= {"string"}:
        return raw  # exactly as written
    first = _FAIL
    for v in _decodings(raw):
        if first is _FAIL:
            first = v
        if "string" in types and isinstance(v, str):
            return v  # a union with string: a quoted string is that string (decoded once, as a grammar writes it)
        fitted = _fit(v, types)
        if fitted is not _FAIL:
            return fitted
    if "string" in types or first is _FAIL or isinstance(first, str):
        return raw
    return first  # valid JSON of an undeclared type: passed on for the client to judge


def _parse_markup(body: str):
    """(name, {key: raw value}) from NAME<arg_key>..., the name stripped of whitespace / literal "\\n"."""
    i = body.find("<arg_key>")
    name = _EDGE_GAP.sub("", body if i < 0 else body[:i])
    pairs = {}
    if i >= 0:  # lenient like vLLM: stray text between pairs is ignored
        for m in _PAIR.finditer(body, i):
            pairs[m.group(1).strip()] = m.group(2)
    return name, pairs


def _parse_json_call(body: str):
    """{"name": ..., "arguments": {...} or "<json>"} -> (name, args), else None."""
    try:
        obj = json.loads(body.strip())
    except Exception:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except Exception:
            return None
    return (obj["name"], args) if isinstance(args, dict) else None


def _partial_len(buf: str, tag: str) -> int:
    """Length of the longest suffix of buf that is a proper prefix of tag."""
    for n in range(min(len(buf), len(tag) - 1), 0, -1):
        if buf.endswith(tag[:n]):
            return n
    return 0


class OutputParser:
    def __init__(self, tools: list[dict] | None = None, thinking: bool = False, parse_tools: bool = True):
        """tools: OpenAI-format tool list ([{"type":"function","function":{"name","description","parameters"}}]),
        also accept Anthropic-format ([{"name","description","input_schema"}]).
        Only calls to these tools become tool calls; other markup stays content text.
        thinking: the prompt ended inside <think> (output starts as reasoning).
        parse_tools False: tool markup stays content text."""
        self._schemas = _tool_schemas(tools)
        self._parse_tools = parse_tools
        self._state = _REASONING if thinking else _CONTENT
        self._at_start = True  # a leading "<think>" (after whitespace) may still come
        self._strip_nl = False  # drop one "\n" right after </think>
        self._blank = True  # current content segment has only whitespace so far
        self._buf = ""  # held-back text
        self._held = ""  # whitespace before the open call: dropped if it is a tool call, else content
        self._scan = 0  # in a call: where to resume looking for </tool_call>
        self._out: list[Event] = []
        self.tool_calls: list[ToolCall] = []

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[Event]:
        """End of generation: flush held-back text (an unterminated call becomes content text)."""
        self._run(final=True)
        return self._take()

    def _emit(self, kind: str, text: str):
        if text:
            self._out.append(Event(kind, text))
            if kind == "content":
                self._blank = False

    def _take(self) -> list[Event]:
        merged: list[Event] = []
        for e in self._out:  # merge consecutive text events of the same kind
            if merged and e.kind != "tool_call" and merged[-1].kind == e.kind:
                merged[-1].text += e.text
            else:
                merged.append(e)
        self._out = []
        return merged

    def _run(self, final: bool):
        while True:
            buf = self._buf
            if self._state == _TOOL:
                i = buf.find(CALL_CLOSE, self._scan)
                if i < 0:
                    if final:  # unterminated call: show it as text (see module docstring)
                        self._buf, self._state = "", _CONTENT
                        self._emit("content", self._take_held() + CALL_OPEN + buf)
                    else:
                        self._scan = max(0, len(buf) - len(CALL_CLOSE) + 1)
                    return
                self._buf, self._state = buf[i + len(CALL_CLOSE):], _CONTENT
                self._end_call(buf[:i])
                continue
            if self._at_start:
                s = buf.lstrip()
                if s.startswith(THINK_OPEN):
                    self._buf, self._state, self._at_start = s[len(THINK_OPEN):], _REASONING, False
                    continue
                if THINK_OPEN.startswith(s) and not final:
                    return  # only whitespace and maybe the start of "<think>" so far
                self._at_start = False
            if self._state == _REASONING:
                i = buf.find(THINK_CLOSE)
                if i >= 0:
                    self._emit("reasoning", buf[:i])
                    self._buf, self._state, self._strip_nl = buf[i + len(THINK_CLOSE):], _CONTENT, True
                    continue
                keep = 0 if final else _partial_len(buf, THINK_CLOSE)
                self._emit("reasoning", buf[: len(buf) - keep])
                self._buf = buf[len(buf) - keep:]
                return
            if self._strip_nl:
                if not buf:
                    return
                self._strip_nl = False
                if buf[0] == "\n":
                    buf = self._buf = buf[1:]
            if not self._parse_tools:
                self._emit("content", buf)
                self._buf = ""
                return
            i = buf.find(CALL_OPEN)
            if i >= 0:
                if self._blank and not buf[:i].strip():
                    self._held = buf[:i]
                else:
                    self._emit("content", buf[:i])
                self._buf, self._state, self._scan = buf[i + len(CALL_OPEN):], _TOOL, 0
                continue
            keep = 0 if final else _partial_len(buf, CALL_OPEN)
            head = buf[: len(buf) - keep]
            if self._blank and not head.strip():
                if final:
                    self._buf = ""  # whitespace-only content segment: dropped
                return
            self._emit("content", head)
            self._buf = buf[len(buf) - keep:]
            return

    def _take_held(self) -> str:
        held, self._held = self._held, ""
        return held

    def _call(self, body: str) -> ToolCall | None:
        """A call to a declared tool (markup, else the JSON form), or None."""
        name, raw = _parse_markup(body)
        if name in self._schemas:
            props = self._schemas[name]
            return ToolCall(name, {k: _convert(v, _schema_types(props.get(k))) for k, v in raw.items()})
        parsed = _parse_json_call(body)
        if parsed is not None and parsed[0] in self._schemas:
            return ToolCall(*parsed)
        return None

    def _end_call(self, body: str):
        call = self._call(body)
        j = body.rfind(CALL_OPEN)
        if call is None and j >= 0:  # a literal "<tool_call>" in text, then maybe a real call
            self._emit("content", self._take_held() + CALL_OPEN + body[:j])
            body = body[j + len(CALL_OPEN):]
            call = self._call(body)
        if call is None:  # not a call to a declared tool: the markup as written (module docstring)
            self._emit("content", self._take_held() + CALL_OPEN + body + CALL_CLOSE)
            return
        self._held = ""  # whitespace before a call is dropped
        self.tool_calls.append(call)
        self._out.append(Event("tool_call", call=call))
        self._blank = True  # whitespace after a call is dropped unless real text follows


def parse_output(text: str, tools=None, thinking: bool = False, parse_tools: bool = True):
    """Non-streaming: (reasoning, content, tool_calls) == what feeding text in one chunk + finish gives."""
    p = OutputParser(tools, thinking=thinking, parse_tools=parse_tools)
    events = p.feed(text) + p.finish()
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    content = "".join(e.text for e in events if e.kind == "content")
    return reasoning, content, list(p.tool_calls)
