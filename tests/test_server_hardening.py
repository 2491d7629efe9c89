"""A server you can leave running, tried as a hostile client would (loopback only, bounded): idle and
slow connections, malformed HTTP, keys, hosts and origins, endings that say what happened, /metrics,
the access log. Each of these failed against the hand-written HTTP front this replaced.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest

from serve_helpers import CONTEXT, MODEL, NO_THINK, SCENE
from server_util import Server

GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **NO_THINK}


def _start(*args: str) -> Server:
    s = Server("--prefill-step", "16", "--context", str(CONTEXT), "--no-prefix-cache", *args)
    try:
        s.start()
    except RuntimeError as e:
        s.cleanup()
        pytest.fail(str(e))
    return s


@pytest.fixture(scope="module")
def guarded():
    s = _start("--header-timeout", "1", "--body-timeout", "1", "--max-connections", "700")
    yield s
    s.stop()
    log = s.stderr()
    s.cleanup()
    assert "Traceback" not in log, log[-4000:]


def _raw(server, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, read until the server closes (or `timeout`)."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    s.sendall(data)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    s.close()
    return out


def _status_and_json(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_idle_connections_do_not_stop_the_server(guarded):
    idle = []
    try:
        for i in range(600):  # each sends part of a request line and stops
            s = socket.create_connection(("127.0.0.1", guarded.port), timeout=5)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127")
            idle.append(s)
        t0 = time.perf_counter()
        status, body = guarded.post("/v1/chat/completions", GOOD, timeout=10)
        assert status == 200 and time.perf_counter() - t0 < 1.0, body
        # The header timeout (1 s here) closes them, with a 408 saying why.
        time.sleep(1.5)
        idle[0].settimeout(2)
        got = idle[0].recv(4096)
        assert got.startswith(b"HTTP/1.1 408") and b"did not arrive in time" in got, got
    finally:
        for s in idle:
            s.close()


def test_excess_connections_are_refused_fast(tmp_path):
    s = _start("--max-connections", "8")
    held = []
    try:
        for _ in range(8):
            held.append(socket.create_connection(("127.0.0.1", s.port), timeout=5))
        time.sleep(0.2)
        t0 = time.perf_counter()
        status, body = _status_and_json(_raw(s, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout=5))
        assert status == 503 and "too many open connections" in body["error"]["message"]
        assert time.perf_counter() - t0 < 1.0
        for c in held:
            c.close()
        time.sleep(0.3)
        assert s.get("/health")[0] == 200  # once they let go, at once
    finally:
        for c in held:
            c.close()
        s.stop()
        s.cleanup()


def test_a_body_shorter_than_its_length_times_out(guarded):
    t0 = time.perf_counter()
    raw = _raw(guarded, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"messages\"")
    assert raw.startswith(b"HTTP/1.1 408") and time.perf_counter() - t0 < 5, raw


MALFORMED = [
    ("chunk-size-zz", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"zz\r\nxx\r\n0\r\n\r\n"),
    ("chunk-size-negative", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked"
                            b"\r\n\r\n-1\r\n"),
    ("two-content-lengths", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
                            b"Content-Length: 5\r\n\r\n{}"),
    ("bad-request-line", b"GARBAGE\r\n\r\n"),
]


@pytest.mark.parametrize("raw", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_http_is_a_json_400(guarded, raw):
    status, body = _status_and_json(_raw(guarded, raw))
    assert status == 400 and body["error"]["type"] == "invalid_request_error", body


def test_a_tls_hello_is_refused_not_held(guarded):
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=5) as s:
        with pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(s, server_hostname="localhost")
    assert time.perf_counter() - t0 < 3


def test_get_with_a_chunked_body_and_head_and_options(guarded):
    s = socket.create_connection(("127.0.0.1", guarded.port), timeout=5)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
              b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    time.sleep(0.5)
    got = s.recv(65536)
    s.close()
    assert got.count(b"HTTP/1.1 200") == 2, got  # both answered on the one connection
    conn = guarded.connection()
    conn.request("HEAD", "/health")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b""
    conn.request("HEAD", "/v1/models")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b""
    conn.request("OPTIONS", "/v1/chat/completions")
    r = conn.getresponse()
    body = json.loads(r.read())
    assert r.status == 405 and body["error"]["type"] == "invalid_request_error"


def test_a_huge_integer_is_a_400(guarded):
    status, body = guarded.post("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], "seed": '
                                + b"9" * 5001 + b"}")
    assert status == 400 and "invalid JSON" in body["error"]["message"]


def test_control_characters_are_escaped_in_the_access_log(guarded):
    start = len(guarded.log_lines())
    # A raw ESC in the request line is malformed HTTP (a 400); percent-encoded, it reaches the path.
    raw = _raw(guarded, b"GET /v1/\x1b[31mred HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400")
    _raw(guarded, b"GET /v1/%1b[31mred HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    line = guarded.wait_for_log(lambda ln: "red" in ln, start=start)
    assert "\x1b" not in line and "\\x1b" in line and " 404 " in line


def test_a_non_json_body_is_415(guarded):
    status, body = guarded.post("/v1/chat/completions", json.dumps(GOOD).encode(),
                                headers={"Content-Type": "text/plain"})
    assert status == 415 and "JSON" in body["error"]["message"]


# --- keys, hosts and origins ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed():
    s = _start("--api-key", "sekret-1", "--api-key", "sekret-2", "--allowed-origins", "http://localhost:3000",
               "--allowed-host", "glm.lan")
    yield s
    s.stop()
    s.cleanup()


def test_keys_are_checked_on_every_api_route(keyed):
    assert keyed.get("/health")[0] == 200  # open
    status, body = keyed.post("/v1/chat/completions", GOOD)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, body = keyed.post("/v1/messages", {**GOOD, "model": "claude-x"})
    assert status == 401 and body["type"] == "error" and body["error"]["type"] == "authentication_error"
    status, _ = keyed.post("/v1/chat/completions", GOOD, headers={"Authorization": "Bearer wrong"})
    assert status == 401
    assert keyed.post("/v1/chat/completions", GOOD, headers={"Authorization": "Bearer sekret-1"})[0] == 200
    assert keyed.post("/v1/chat/completions", GOOD, headers={"x-api-key": "sekret-2"})[0] == 200
    conn = keyed.connection()
    conn.request("GET", "/v1/models")
    assert conn.getresponse().status == 401


def test_sdk_clients_with_the_key(keyed):
    import anthropic
    import openai

    oa = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sekret-1", max_retries=0)
    assert oa.chat.completions.create(model=MODEL, messages=GOOD["messages"], max_tokens=2).choices
    ac = anthropic.Anthropic(base_url=keyed.url, api_key="sekret-2", max_retries=0)
    assert ac.messages.create(model="claude-x", max_tokens=2, messages=GOOD["messages"]).content is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0).models.list()


def _request(server, method, path, headers, body=b""):
    conn = server.connection()
    conn.putrequest(method, path, skip_host=True)
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    r = conn.getresponse()
    data = r.read()
    return r.status, dict(r.getheaders()), data


def test_a_web_page_cannot_make_the_model_generate(keyed, guarded):
    body = json.dumps(GOOD).encode()
    for server, extra in ((guarded, {}), (keyed, {"Authorization": "Bearer sekret-1"})):
        # A "simple" request (no preflight) from a page the user visits.
        status, _, data = _request(server, "POST", "/v1/chat/completions", {
            "Host": f"127.0.0.1:{server.port}", "Origin": "http://evil.example", "Content-Type": "text/plain", **extra},
            body)
        assert status == 403, data
    status, headers, _ = _request(keyed, "OPTIONS", "/v1/chat/completions", {
        "Host": "localhost", "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
    assert status == 204 and headers["access-control-allow-origin"] == "http://localhost:3000"
    status, _, _ = _request(keyed, "OPTIONS", "/v1/chat/completions", {
        "Host": "localhost", "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert status == 403
    status, headers, _ = _request(keyed, "POST", "/v1/chat/completions", {
        "Host": "localhost", "Origin": "http://localhost:3000", "Content-Type": "application/json",
        "Authorization": "Bearer sekret-1"}, body)
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"


def test_dns_rebinding_is_refused(keyed):
    status, _, data = _request(keyed, "GET", "/health", {"Host": "attacker.example"})
    assert status == 421, data
    assert _request(keyed, "GET", "/health", {"Host": "glm.lan:8080"})[0] == 200  # --allowed-host
    assert _request(keyed, "GET", "/health", {"Host": "localhost"})[0] == 200


def test_binding_beyond_loopback_needs_a_key_or_no_auth():
    r = subprocess.run([sys.executable, "-m", "glm_mlx.cli.app", "serve", "--host", "0.0.0.0", "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Error:" in r.stderr and "API key" in r.stderr and "Traceback" not in r.stderr


# --- endings that say what happened --------------------------------------------------------------
def _long(tokenizer) -> dict:
    """A request that surely runs for seconds: the end-of-turn ids are biased away."""
    ends = {str(tokenizer.convert_tokens_to_ids(t)): -100 for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    return {"model": MODEL, "messages": [{"role": "user", "content": SCENE}], "max_tokens": 3000, "temperature": 0,
            "logit_bias": ends, **NO_THINK}


def _sse_after_sigterm(server, path: str, body: dict) -> str:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: "
              f"{len(data)}\r\n\r\n".encode() + data)
    got = b""
    while got.count(b"data: ") < 6:
        got += s.recv(65536)
    server.proc.send_signal(signal.SIGTERM)
    try:
        while chunk := s.recv(65536):
            got += chunk
    except OSError:
        pass
    s.close()
    return got.decode(errors="replace")


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_sigterm_mid_answer_ends_with_an_error_not_a_finish(api, tokenizer):
    LONG = _long(tokenizer)
    s = _start("--shutdown-timeout", "0.5")
    try:
        if api == "openai":
            text = _sse_after_sigterm(s, "/v1/chat/completions", {**LONG, "stream": True})
            assert '"finish_reason": "stop"' not in text and '"finish_reason": "length"' not in text, text[-2000:]
            assert '"error"' in text and "shutting down" in text, text[-2000:]
        else:
            text = _sse_after_sigterm(s, "/v1/messages", {**LONG, "model": "claude-x", "stream": True})
            assert "event: error" in text and "shutting down" in text, text[-2000:]
            assert "event: message_stop" not in text and '"end_turn"' not in text
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()
        s.cleanup()


def test_sigterm_before_an_answer_is_a_503(tokenizer):
    LONG = _long(tokenizer)
    s = _start("--shutdown-timeout", "0.5")
    try:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        data = json.dumps(LONG).encode()
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(1.0)  # generating
        s.proc.send_signal(signal.SIGTERM)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
        status, body = _status_and_json(raw)
        assert status == 503 and "shutting down" in body["error"]["message"]
    finally:
        s.stop()
        s.cleanup()


# --- what an operator looks at -------------------------------------------------------------------
def test_metrics_and_status(guarded):
    guarded.post("/v1/chat/completions", GOOD)
    status, data = guarded.get("/metrics")
    text = data.decode()
    assert status == 200
    for name in ("glm_mlx_requests_total{api=\"chat\",status=\"200\"}", "glm_mlx_tokens_total{kind=\"prompt\"}",
                 "glm_mlx_time_to_first_token_seconds_bucket", "glm_mlx_time_per_output_token_seconds_bucket",
                 "glm_mlx_batch_size", "glm_mlx_queue_length"):
        assert name in text, name
    status, data = guarded.get("/status")
    snap = json.loads(data)
    assert status == 200 and snap["model"] == MODEL and snap["memory"]["active"] > 0
    status, page = guarded.get("/")
    assert status == 200 and b"glm-mlx serve" in page


def test_json_access_log():
    s = _start("--log-format", "json")
    try:
        start = len(s.log_lines())
        s.post("/v1/chat/completions", GOOD)
        line = s.wait_for_log(lambda ln: ln.startswith("{") and "chat/completions" in ln, start=start)
        rec = json.loads(line)
        assert rec["status"] == 200 and rec["completion"] == 2 and rec["method"] == "POST"
        _raw(s, b"GARBAGE\r\n\r\n")  # what the guard refuses is logged in the same format
        line = s.wait_for_log(lambda ln: ln.startswith("{") and "malformed" in ln, start=start)
        assert json.loads(line)["status"] == 400
    finally:
        s.stop()
        s.cleanup()
