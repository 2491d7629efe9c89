"""`glm-mlx serve` end to end, as users meet it: the real server process (bundled glm-mini) driven with the
official `openai` SDK and raw sockets: requests in a row (streamed and whole), many at once, clients that
disconnect, and one keep-alive connection through errors and streams. (More: test_server_openai.py,
test_server_anthropic.py, test_server_limits.py, test_server_tools.py, test_serve_fuzz.py.)
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from serve_helpers import (CONTEXT, MODEL, NO_THINK, POEM, SCENE, chat_ids, check_usage, forced_token, log_line,
    long_text, raw_request, stream_chat, ttft_of, whole_chat)

openai = pytest.importorskip("openai")


# --- sequential, streamed == whole, concurrent -------------------------------------------------
def test_health_and_models(server, oa):
    status, body = server.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    models = oa.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["context_length"] == CONTEXT
    assert oa.models.retrieve(MODEL).model_extra["context_length"] == CONTEXT


def test_sequential_requests_alternating_streamed_and_whole(oa, tokenizer):
    msgs = [{"role": "user", "content": SCENE}]
    n_prompt = len(chat_ids(tokenizer, msgs, thinking=False))
    for i in range(6):
        call = stream_chat if i % 2 else whole_chat
        r = call(oa, messages=msgs, max_tokens=12, extra_body=NO_THINK)
        assert r.content.strip(), f"request {i}: empty answer"
        assert r.finish in ("stop", "length")
        check_usage(r.usage, n_prompt, 12, r.finish)
        if i > 0:  # the same prompt again: served from the prompt cache
            assert r.usage.prompt_tokens_details.cached_tokens >= n_prompt // 2, r.usage


@pytest.mark.parametrize("thinking", [False, True])
def test_greedy_stream_equals_whole(oa, thinking):
    kw = dict(messages=[{"role": "user", "content": POEM}], max_tokens=20, temperature=0,
              extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
    whole, streamed = whole_chat(oa, **kw), stream_chat(oa, **kw)
    assert (streamed.content, streamed.reasoning, streamed.finish) == (whole.content, whole.reasoning, whole.finish)
    assert streamed.usage.completion_tokens == whole.usage.completion_tokens
    assert streamed.usage.prompt_tokens == whole.usage.prompt_tokens


def test_concurrent_clients_get_their_own_complete_answers(server):
    speeches = ["HAMLET.\nTo be, or not to be, that is the question.", "MACBETH.\nIs this a dagger which I see?",
                "ROMEO.\nBut soft, what light through yonder window breaks?", "JULIET.\nO Romeo, Romeo!",
                "LEAR.\nBlow, winds, and crack your cheeks!", "PORTIA.\nThe quality of mercy is not strained.",
                "OTHELLO.\nIt is the cause, it is the cause, my soul.", "PROSPERO.\nOur revels now are ended."]
    requests = [dict(messages=[{"role": "user", "content": f"Continue this scene:\n\n{s}"}], max_tokens=16,
                     temperature=0, extra_body=NO_THINK) for s in speeches]
    alone_client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    alone = [whole_chat(alone_client, **r) for r in requests]

    results, errors = [None] * len(requests), []
    barrier = threading.Barrier(len(requests))

    def client(i):
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
            barrier.wait(timeout=30)
            results[i] = (stream_chat if i % 2 else whole_chat)(c, **requests[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i, (a, r) in enumerate(zip(alone, results)):
        assert r is not None, f"client {i} got no answer"
        assert (r.content, r.finish) == (a.content, a.finish), f"client {i}"
        assert r.usage.completion_tokens == a.usage.completion_tokens
        assert r.usage.prompt_tokens == a.usage.prompt_tokens


# --- 4: disconnects -------------------------------------------------------------------------------
def test_disconnect_mid_stream_cancels_and_server_keeps_serving(server, oa, tokenizer):
    # logit_bias pins one token: without the cancel this request would decode 2000 tokens (many seconds here)
    body = {"messages": [{"role": "user", "content": f"{uuid.uuid4().hex} Hi"}], "max_tokens": 2000,
            "temperature": 0, "stream": True, "logit_bias": {str(forced_token(tokenizer)): 100}}
    start = len(server.log_lines())
    s = raw_request(server, "/v1/chat/completions", body)
    got = b""
    while got.count(b"data: ") < 4:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200")
    s.close()
    line = log_line(server, start, "/v1/chat/completions", "cancelled")
    assert " 200 " in line  # the stream had started

    next_request_is_not_held_up(server, oa, start, time.perf_counter(), "Hello")


def next_request_is_not_held_up(server, oa, start: int, t0: float, text: str):
    """After a cancelled request, the next one is answered whole and soon (its TTFT from the access log)."""
    r = whole_chat(oa, messages=[{"role": "user", "content": text}], max_tokens=4, temperature=0, extra_body=NO_THINK)
    elapsed = time.perf_counter() - t0
    assert r.content and r.usage.completion_tokens == 4
    after = log_line(server, start, "/v1/chat/completions", "prompt=", "completion=4 ")
    assert ttft_of(after) < 2 and elapsed < 4, (after, elapsed)


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_during_long_prefill_is_cancelled_quickly(server, oa, tokenizer, stream):
    body = {"messages": [{"role": "user", "content": long_text(tokenizer, 3500)}], "max_tokens": 8,
            "temperature": 0, "stream": stream, **NO_THINK}
    start = len(server.log_lines())
    s = raw_request(server, "/v1/chat/completions", body)
    time.sleep(0.5)  # well inside the prefill: 3500 tokens in chunks of 16
    s.close()
    t_close = time.perf_counter()
    line = log_line(server, start, "/v1/chat/completions")
    if "prompt=" in line:
        pytest.skip(f"this machine prefilled 3500 tokens in under 0.5 s: nothing to cancel ({line})")
    assert "cancelled" in line and (" 200 " if stream else " 499 ") in line, line
    assert float(line.rsplit(" ", 1)[1].rstrip("s")) < 2.5, line  # the handler let go soon after the close

    # not queued behind the rest of a 3500-token prefill (about 10 s on a 2-core CPU)
    next_request_is_not_held_up(server, oa, start, t_close, "Hello there")


# --- 5: one keep-alive connection -----------------------------------------------------------------
def test_keep_alive_connection_survives_errors_and_streams(server):
    conn = server.connection()
    good = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0, **NO_THINK})
    hdrs = {"Content-Type": "application/json"}

    def request(method, path, body=None, stream=False):
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()  # chunked bodies are read to their end
        assert (r.getheader("Connection") or "").lower() != "close"
        return r, data

    conn.connect()
    sock = conn.sock
    r, data = request("POST", "/v1/nothing/here", good)
    assert r.status == 404 and json.loads(data)["error"]["type"] == "not_found_error"
    assert conn.sock is sock
    r, data = request("POST", "/v1/chat/completions", good)
    assert r.status == 200 and json.loads(data)["choices"][0]["message"]["content"]
    assert conn.sock is sock
    r, data = request("POST", "/v1/chat/completions", b'{"messages": [')
    assert r.status == 400 and "JSON" in json.loads(data)["error"]["message"]
    assert conn.sock is sock
    r, data = request("POST", "/v1/chat/completions", json.dumps({**json.loads(good), "stream": True}))
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
    events = [e for e in data.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    assert conn.sock is sock
    r, data = request("POST", "/v1/chat/completions", good)
    assert r.status == 200 and json.loads(data)["usage"]["completion_tokens"] >= 1
    assert conn.sock is sock
    r, data = request("GET", "/health")
    assert r.status == 200
    assert conn.sock is sock
    conn.close()
