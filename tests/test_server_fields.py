"""The field table (docs/api_fields.md) kept true: honoured fields are read by their endpoint, ignored
ones are accepted, refused ones are 400s naming them; and what real agents send is accepted (Claude
Code's main-loop body, the anthropic SDK 2.x's new arguments, a system entry inside `messages`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from glm_mlx.serve import anthropic_api, openai_api
from serve_helpers import CONTEXT, MODEL, NO_THINK, chat_ids, rendered

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

DOC = Path(__file__).resolve().parents[1] / "docs" / "api_fields.md"
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "messages": "/v1/messages",
         "count_tokens": "/v1/messages/count_tokens"}
HONOURED = {"chat": openai_api.CHAT, "completions": openai_api.TEXT, "messages": anthropic_api.MESSAGES,
            "count_tokens": anthropic_api.COUNT}
# A value for each ignored field, of the kind clients send.
IGNORED_VALUES = {"user": "u-1", "metadata": {"user_id": "x"}, "store": False, "service_tier": "auto",
                  "prompt_cache_key": "k", "safety_identifier": "s", "modalities": ["text"],
                  "prediction": {"type": "content", "content": "Hi"}, "verbosity": "low",
                  "web_search_options": {}, "cache_control": {"type": "ephemeral"}, "container": "c",
                  "speed": "fast", "inference_geo": "us", "diagnostics": {"x": 1}, "user_profile_id": "p",
                  "mcp_servers": []}


def table() -> list[tuple[str, str, str]]:
    """(endpoint, field, treatment) for every row of the doc's tables."""
    rows = []
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*([a-z_, ]+?)\s*\|\s*`([a-z_]+)`\s*\|\s*([a-z 0-9]+?)\s*\|", line)
        if m:
            for endpoint in m.group(1).split(","):
                rows.append((endpoint.strip(), m.group(2), m.group(3)))
    return rows


def body_for(endpoint: str) -> dict:
    if endpoint == "completions":
        return {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    if endpoint == "chat":
        return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, **NO_THINK}
    return {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


def post(server, path: str, body: dict) -> tuple[int, dict]:
    conn = server.connection()
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def test_the_table_matches_the_code():
    rows = table()
    assert len(rows) > 60
    for endpoint, field, treatment in rows:
        assert endpoint in HONOURED, endpoint
        if treatment == "ignored":
            assert field not in HONOURED[endpoint], f"{endpoint} {field}: documented ignored but read"
            assert field in IGNORED_VALUES, field
        else:  # honoured, or refused for some values (which means it is read)
            assert field in HONOURED[endpoint], f"{endpoint} {field}: documented {treatment} but not read"
    documented = {(e, f) for e, f, _ in rows}
    for endpoint, fields in HONOURED.items():
        for field in fields:
            assert (endpoint, field) in documented, f"{endpoint} reads {field!r}, which the table does not list"


@pytest.mark.parametrize("endpoint,field", sorted({(e, f) for e, f, t in table() if t == "ignored"}))
def test_an_ignored_field_is_accepted(server, endpoint, field):
    status, body = post(server, PATHS[endpoint], {**body_for(endpoint), field: IGNORED_VALUES[field]})
    assert status == 200, body


@pytest.mark.parametrize("endpoint", ["chat", "completions", "messages", "count_tokens"])
def test_an_unknown_field_is_accepted(server, endpoint):
    status, body = post(server, PATHS[endpoint], {**body_for(endpoint), "frobnicate": {"x": [1]}})
    assert status == 200, body


REFUSED = [("chat", {"n": 2}, "n"), ("completions", {"n": 3}, "n"), ("completions", {"echo": True}, "echo"),
           ("completions", {"best_of": 2}, "best_of"), ("completions", {"suffix": "x"}, "suffix")]


@pytest.mark.parametrize("endpoint,extra,param", REFUSED)
def test_a_refused_value_is_a_400_naming_it(server, endpoint, extra, param):
    status, body = post(server, PATHS[endpoint], {**body_for(endpoint), **extra})
    assert status == 400 and body["error"]["param"] == param, body


CLAUDE_CODE_BODY = {  # the shape of Claude Code 2.1's main-loop request (its tools and long prompt trimmed)
    "model": "claude-sonnet-4-5-20250929", "max_tokens": 32000, "stream": True,
    "system": [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>Be brief.</system-reminder>"},
        {"type": "text", "text": "Say hi", "cache_control": {"type": "ephemeral"}}]}],
    "tools": [{"name": "Bash", "description": "Run a command", "input_schema": {
        "type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"],
        "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}}],
    "metadata": {"user_id": "user_abc_account__session_1"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "high"}, "temperature": 1,
}


def test_claude_code_main_loop_body_is_answered_with_text(server):
    conn = server.connection()
    conn.request("POST", "/v1/messages?beta=true", body=json.dumps({**CLAUDE_CODE_BODY, "temperature": 0}),
                 headers={"Content-Type": "application/json", "anthropic-beta": "claude-code-20250219,"
                          "context-management-2025-06-27", "anthropic-version": "2023-06-01", "x-api-key": "x"})
    r = conn.getresponse()
    data = r.read().decode()
    assert r.status == 200, data
    events = [json.loads(line[6:]) for line in data.splitlines() if line.startswith("data: ")]
    assert events[0]["type"] == "message_start"
    assert events[0]["message"]["model"] == CLAUDE_CODE_BODY["model"]  # echoed
    # No `thinking` field: no thinking (Anthropic's definition), so the answer is not a lone thinking block.
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert "thinking" not in starts and starts, starts
    assert events[-1]["type"] == "message_stop"
    status, count = post(server, "/v1/messages/count_tokens?beta=true",
                         {k: v for k, v in CLAUDE_CODE_BODY.items() if k not in ("max_tokens", "stream")})
    assert status == 200 and count["input_tokens"] > 10, count


def test_sdk_2x_arguments_and_sampling_through_extra_body(ac):
    m = ac.messages.create(model="claude-opus-4-1", max_tokens=4, messages=[{"role": "user", "content": "Hi"}],
                           metadata={"user_id": "u"}, service_tier="auto",
                           extra_body={"temperature": 0, "top_k": 5, "top_p": 0.9, "cache_control": {
                               "type": "ephemeral"}, "speed": "fast", "inference_geo": "us", "diagnostics": {},
                               "container": None, "user_profile_id": "p", "output_config": {"effort": "low"}})
    assert m.model == "claude-opus-4-1" and m.content and m.content[0].type == "text"


def test_system_entry_inside_messages_renders_where_it_stands(server, ac, tokenizer):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "system", "content": "Working directory: /tmp"}, {"role": "user", "content": "Where am I?"}]
    n = ac.messages.count_tokens(model=MODEL, messages=msgs).input_tokens
    assert n == len(chat_ids(tokenizer, msgs, thinking=False))
    text = rendered(tokenizer, msgs, thinking=False)
    assert text.index("<|system|>") > text.index("Hello.")  # not hoisted to the top


@pytest.mark.parametrize("thinking,expect_thinking", [(None, False), ({"type": "disabled"}, False),
                                                      ({"type": "enabled", "budget_tokens": 2048}, True),
                                                      ({"type": "adaptive"}, True)])
def test_anthropic_thinking_field(tokenizer, thinking, expect_thinking):
    from glm_mlx.serve.stream import ServerConfig

    cfg = ServerConfig(model_id=MODEL, context=CONTEXT, max_tokens=16, vocab_size=len(tokenizer.vocab), thinking=True)
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
    if thinking is not None:
        body["thinking"] = thinking
    call = anthropic_api.messages_call(body, cfg, tokenizer)
    assert call.prompt.thinking is expect_thinking  # the --reasoning default (True here) is not Anthropic's


def test_effort_caps_the_reasoning():
    from glm_mlx.serve.stream import effort_budget

    assert effort_budget("none", "e") == (False, None) and effort_budget("minimal", "e") == (False, None)
    assert effort_budget("low", "e") == (True, 1024) and effort_budget("high", "e") == (True, None)
    with pytest.raises(Exception, match="must be one of"):
        effort_budget("extreme", "e")


def test_server_tools_are_accepted_and_not_shown(server, ac):
    m = ac.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}],
                           tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}])
    assert m.stop_reason in ("end_turn", "max_tokens")


def test_legacy_functions_render_as_tools(tokenizer):
    from glm_mlx.serve.stream import ServerConfig

    cfg = ServerConfig(model_id=MODEL, context=CONTEXT, max_tokens=16, vocab_size=len(tokenizer.vocab))
    fn = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    legacy = openai_api.chat_call({**base, "functions": [fn]}, cfg, tokenizer)
    modern = openai_api.chat_call({**base, "tools": [{"type": "function", "function": fn}]}, cfg, tokenizer)
    assert legacy.prompt.ids == modern.prompt.ids and legacy.tools


def test_stream_sends_keepalives_during_a_long_prefill(tmp_path):
    """A stream whose prompt takes longer than the keep-alive interval to prefill gets pings before its
    first token: SSE comments on the OpenAI side, `ping` events (after message_start) on Anthropic's."""
    from server_util import Server

    s = Server("--prefill-step", "16", "--context", str(CONTEXT), "--keepalive", "0.05", "--no-prefix-cache")
    s.start()
    try:
        long_prompt = "word " * 1500
        conn = s.connection()
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "model": MODEL, "stream": True, "max_tokens": 2, **NO_THINK,
            "messages": [{"role": "user", "content": long_prompt}]}), headers={"Content-Type": "application/json"})
        data = conn.getresponse().read().decode()
        chunks = [c for c in data.split("\n\n") if c]
        first_token = next(i for i, c in enumerate(chunks) if c.startswith("data: {") and '"content": "' in c
                           and '"role"' not in c or '"finish_reason": "length"' in c)
        assert ": ping" in chunks[:first_token], chunks[:4]  # after the role chunk, before the first token
        assert data.rstrip().endswith("data: [DONE]")
        conn.request("POST", "/v1/messages", body=json.dumps({
            "model": MODEL, "stream": True, "max_tokens": 2,
            "messages": [{"role": "user", "content": long_prompt + "x"}]}), headers={"Content-Type": "application/json"})
        data = conn.getresponse().read().decode()
        names = [ln[7:] for ln in data.splitlines() if ln.startswith("event: ")]
        assert names[0] == "message_start" and "ping" in names and names[-1] == "message_stop", names
    finally:
        s.stop()
        s.cleanup()


def test_anthropic_output_config_format_is_enforced(ac):
    """LangChain's ChatAnthropic.with_structured_output(method="json_schema") sends output_config.format."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    m = ac.messages.create(model="claude-x", max_tokens=40, messages=[{"role": "user", "content": "Is it ok?"}],
                           extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema}},
                                       "temperature": 0})
    text = "".join(b.text for b in m.content if b.type == "text")
    assert json.loads(text)["ok"] in (True, False), text


def test_deferred_tools_are_not_shown(tokenizer):
    from glm_mlx.serve.stream import ServerConfig

    cfg = ServerConfig(model_id=MODEL, context=CONTEXT, max_tokens=16, vocab_size=len(tokenizer.vocab))
    base = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    tool = {"name": "Read", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}
    shown = anthropic_api.messages_call({**base, "tools": [tool]}, cfg, tokenizer)
    hidden = anthropic_api.messages_call({**base, "tools": [tool, {**tool, "name": "Later", "defer_loading": True}]},
                                         cfg, tokenizer)
    assert shown.prompt.ids == hidden.prompt.ids
