"""Limits and bad input on the real server: a clean 400 (or 413) naming the problem, answered before any
prefill, and the server serving on afterwards.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from serve_helpers import CONTEXT, MODEL, NO_THINK, WEATHER, chat_ids, log_line, long_text, whole_chat

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")


# --- limits and bad input ----------------------------------------------------------------------
GOOD = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
CHAT, TEXT, MESSAGES = "/v1/chat/completions", "/v1/completions", "/v1/messages"
HUGE_TEMPERATURE = b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1' + b"0" * 400 + b"}"
BAD_REQUESTS = [  # (id, path, body, the OpenAI error's param, text its message must hold); all 400
    ("nested-100", CHAT, b'{"messages": ' + b"[" * 100 + b"]" * 100 + b"}", None, "nested deeper"),
    ("nested-100000", CHAT, b"[" * 100000 + b"]" * 100000, None, "nested deeper"),
    ("bad-json", CHAT, b'{"messages": [', None, "invalid JSON"),
    ("not-utf8", CHAT, b'\xff\xfe{"messages": []}', None, "invalid JSON"),
    ("body-array", CHAT, [GOOD], None, "JSON object"),
    ("stream-string", CHAT, {**GOOD, "stream": "false"}, "stream", "'stream' must be a boolean"),
    ("max-tokens-float", CHAT, {**GOOD, "max_tokens": 1.5}, "max_tokens", "'max_tokens' must be an integer"),
    ("max-tokens-0", CHAT, {**GOOD, "max_tokens": 0}, "max_tokens", "'max_tokens' must be in"),
    ("n-2", CHAT, {**GOOD, "n": 2}, "n", "'n' must be"),
    ("json-schema-not-a-schema", CHAT, {**GOOD, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": "an object please"}}}, "response_format", "'response_format.json_schema.schema'"),
    ("response-format-type", CHAT, {**GOOD, "response_format": {"type": "yaml"}}, "response_format",
     "'response_format.type'"),
    ("temperature-9", CHAT, {**GOOD, "temperature": 9}, "temperature", "'temperature' must be in [0.0, 2.0]"),
    ("temperature-huge-int", CHAT, HUGE_TEMPERATURE, "temperature", "'temperature' must be in"),
    ("seed-string", CHAT, {**GOOD, "seed": "1"}, "seed", "'seed' must be an integer"),
    ("logit-bias-key", CHAT, {**GOOD, "logit_bias": {"hello": 1}}, "logit_bias", "'hello'"),
    ("wrong-role", CHAT, {**GOOD, "messages": [{"role": "robot", "content": "Hi"}]}, "messages[0]", "'robot'"),
    ("no-messages", CHAT, {"max_tokens": 4}, "messages", "'messages'"),
    ("image-part", CHAT, {**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, "messages[0]", "'image_url'"),
    ("lone-surrogate", CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', "messages", "Unicode"),
    ("tool-choice-unknown", CHAT, {**GOOD, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ("tool-choice-bad-function", CHAT, {**GOOD, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": "get_weather"}}, "tool_choice", "'tool_choice'"),
    ("top-logprobs-alone", CHAT, {**GOOD, "top_logprobs": 2}, "top_logprobs", "'logprobs'"),
    ("completions-echo", TEXT, {"prompt": "Hi", "max_tokens": 4, "echo": True}, "echo", "'echo'"),
    ("completions-ids-out-of-vocab", TEXT, {"prompt": [1, 10 ** 9], "max_tokens": 4}, "prompt", "token ids"),
    ("completions-two-prompts", TEXT, {"prompt": ["a", "b"], "max_tokens": 4}, "prompt", "one prompt"),
    ("anthropic-no-max-tokens", MESSAGES, {"messages": [{"role": "user", "content": "Hi"}]}, None,
     "'max_tokens' is required"),
    ("anthropic-image", MESSAGES, {"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, None,
     "'image'"),
    ("anthropic-thinking-type", MESSAGES, {"max_tokens": 4, "thinking": {"type": "sometimes"},
                                           "messages": [{"role": "user", "content": "Hi"}]}, None, "'thinking.type'"),
    ("anthropic-bad-json", MESSAGES, b"{", None, "invalid JSON"),
]


@pytest.mark.parametrize("path,body,param,text", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_a_clean_400_naming_the_problem(server, path, body, param, text):
    conn = server.connection()
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    payload = json.loads(r.read())
    assert r.status == 400, payload
    if path == MESSAGES:  # Anthropic's error shape (no param field)
        assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error", payload
    else:
        assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["param"] == param, payload
    assert text in payload["error"]["message"], payload
    conn.request("GET", "/health")  # the same connection still serves
    assert conn.getresponse().status == 200
    conn.close()


def test_max_tokens_is_cut_to_what_the_context_leaves(server, oa, ac):
    """Agents ask a fixed budget (Claude Code: 32,000) whatever the prompt: it is cut, not refused."""
    msgs = [{"role": "user", "content": "Hi"}]
    r = oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=32000, temperature=0, extra_body=NO_THINK)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens < CONTEXT
    m = ac.messages.create(model="claude-sonnet-4-5", max_tokens=10 ** 6, messages=msgs,
                           extra_body={"temperature": 0})
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens + m.usage.output_tokens <= CONTEXT
    # Cut to the token: a prompt of CONTEXT - 3 ids leaves 3, and the answer ends as cut off, not finished.
    t = oa.completions.create(model=MODEL, prompt=[5] * (CONTEXT - 3), max_tokens=8, temperature=0)
    assert t.usage.completion_tokens <= 3
    if t.usage.completion_tokens == 3:
        assert t.choices[0].finish_reason == "length"


def test_prompt_too_long_is_refused_before_prefill_in_the_agents_wording(server, oa, ac, tokenizer):
    start = len(server.log_lines())
    too_long = [{"role": "user", "content": "word " * (CONTEXT + 10)}]
    t0 = time.perf_counter()
    with pytest.raises(anthropic.BadRequestError) as e:
        ac.messages.create(model=MODEL, max_tokens=1000, messages=too_long)
    assert time.perf_counter() - t0 < 2.0  # refused before any prefill
    n = len(chat_ids(tokenizer, too_long, thinking=False))
    err = e.value.body["error"]
    assert err["type"] == "invalid_request_error"
    assert err["message"].startswith(f"prompt is too long: {n} tokens > {CONTEXT - 1} maximum"), err
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=MODEL, messages=too_long, max_tokens=4)
    assert e.value.body["param"] == "messages" and e.value.body["code"] == "context_length_exceeded"
    assert "prompt is too long" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model=MODEL, prompt=[5] * CONTEXT, max_tokens=8)
    assert e.value.body["code"] == "context_length_exceeded"
    line = log_line(server, start, " 400 ")
    assert "prompt=" not in line  # nothing was generated


def _read_response(sock) -> tuple[int, dict, bytes]:
    f = sock.makefile("rb")
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline().strip()):
        k, v = line.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()
    body = f.read(int(headers.get("content-length", 0)))
    return status, headers, body


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_cap_is_413(server, chunked):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if chunked:  # 1 MiB chunks past the 32 MiB cap: refused once the cap is passed, the rest unread
        s.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"%x\r\n%s\r\n" % (2 ** 20, b" " * 2 ** 20)
        try:
            for _ in range(40):
                s.sendall(chunk)
        except OSError:  # the server answered and closed while we were still sending
            pass
    else:  # announced larger than the cap: refused before any of it is read
        s.sendall(f"{head}Content-Length: {40 * 2 ** 20}\r\n\r\n".encode())
    status, headers, body = _read_response(s)
    s.close()
    assert status == 413 and headers.get("connection") == "close"
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert server.get("/health")[0] == 200


def test_server_still_serves_after_bad_input(oa):
    r = whole_chat(oa, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, extra_body=NO_THINK)
    assert r.content and r.usage.completion_tokens == 4
