"""The HTTP front: keep-alive connections, routing, body and nesting limits, SSE over chunked
transfer encoding, client-disconnect detection, one access-log line per request.

Handler threads never touch MLX: they parse, render the prompt (tokenizer only), submit a job to
the worker and relay its events.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import sys
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import anthropic_api, openai_api, responses_api, responses_output
from .fields import json_depth
from .prompt import BadRequest
from .responses_store import ResponseStore
from .stream import PING, ServerConfig, parsed
from .worker import Busy, Failed, Finished, Worker


class ClientGone(Exception):
    pass


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # A client that resets its keep-alive connection (e.g. closes with a response unread) is routine:
        # no traceback on the console for it.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def make_handler(worker: Worker, cfg: ServerConfig, log=None):
    log = log or sys.stderr
    responses = ResponseStore()  # /v1/responses: previous_response_id, GET /v1/responses/{id}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        disable_nagle_algorithm = True  # TCP_NODELAY: each SSE chunk leaves at once, not behind an ACK
        server_version = "glm-mlx"

        def log_message(self, fmt, *args):  # the access log below replaces the default lines
            pass

        # --- plumbing -------------------------------------------------------------------
        def _start(self):
            self.t0, self.stats, self.status, self.gone = time.perf_counter(), None, 0, False

        def _access_log(self):
            s = self.stats
            extra = ""
            if isinstance(s, Finished):
                tps = s.generation_tps
                extra = (f" prompt={s.prompt_tokens} cached={s.cached_tokens} completion={s.completion_tokens} "
                         f"ttft={s.ttft:.3f}s {tps:.1f}tok/s {s.reason}")
            elif self.gone:  # the job was cancelled before its Finished came back; a stream's status is still 200
                extra = " cancelled (client disconnected)"
            print(f'{self.client_address[0]} "{self.command} {self.path}" {self.status}{extra} '
                  f"{time.perf_counter() - self.t0:.2f}s", file=log, flush=True)

        def _body(self) -> bytes:
            """Read the whole body (also for requests that will be refused, so the connection stays usable)."""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts, total = [], 0
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(parts)
                    total += size
                    if total > cfg.max_body:
                        self.close_connection = True
                        raise BadRequest(f"request body over {cfg.max_body} bytes", status=413)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                self.close_connection = True
                raise BadRequest("bad Content-Length") from None
            if length > cfg.max_body:
                self.close_connection = True  # not worth reading: the connection is closed instead
                raise BadRequest(f"request body is {length} bytes; the limit is {cfg.max_body}", status=413)
            return self.rfile.read(length) if length > 0 else b""

        def _send(self, status: int, obj: dict):
            data = json.dumps(obj, ensure_ascii=False).encode()
            self.status = status
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, param=None, anthropic=False, code=None):
            if anthropic:
                return self._send(status, anthropic_api.error_body(status, message))
            kind = {404: "not_found_error", 413: "invalid_request_error", 503: "server_busy"}.get(
                status, "invalid_request_error" if status < 500 else "server_error")
            self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": code}})

        def _client_gone(self) -> bool:
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def _relay(self, job, pings: bool = False):
            """The job's events; cancels it (ClientGone) when the client closes its connection. pings: a
            stream's keep-alive, PING after `cfg.keepalive` seconds without an event (a long prefill), so
            clients with idle timeouts keep waiting."""
            checked = last = time.monotonic()
            while True:
                try:
                    ev = job.events.get(timeout=0.05)
                except queue.Empty:
                    ev = None
                now = time.monotonic()
                if ev is None or now - checked > 0.1:
                    checked = now
                    if self._client_gone():
                        job.cancel()
                        raise ClientGone
                if ev is None and pings and now - last >= cfg.keepalive:
                    last = now
                    yield PING
                if ev is not None:
                    last = now
                    if isinstance(ev, (Finished, Failed)):
                        self.stats = ev
                        yield ev
                        return
                    yield ev

        def _sse_start(self):
            self.status = 200
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")  # the connection stays open after [DONE]
            self.end_headers()

        def _chunk(self, text: str):
            """One chunk of the chunked transfer encoding (an SSE event)."""
            data = text.encode()
            self._write(b"%x\r\n%s\r\n" % (len(data), data))

        def _sse_end(self):
            self._write(b"0\r\n\r\n")  # the last chunk: the connection stays open for the next request

        def _write(self, data: bytes):
            try:
                self.wfile.write(data)
                self.wfile.flush()
            except OSError:
                raise ClientGone from None

        # --- routes ---------------------------------------------------------------------
        def do_GET(self):
            self._start()
            try:
                self._body()
                path = self.path.split("?")[0].rstrip("/")
                model = {"id": cfg.model_id, "object": "model", "created": 0, "owned_by": "glm-mlx",
                         "context_length": cfg.context, "max_model_len": cfg.context}
                if path == "/v1/models":
                    self._send(200, {"object": "list", "data": [model]})
                elif path == f"/v1/models/{cfg.model_id}":
                    self._send(200, model)
                elif path in ("/health", "/v1/health"):
                    self._send(200, {"status": "ok", "model": cfg.model_id, "waiting": worker.waiting})
                elif path.startswith("/v1/responses/"):
                    self._send(*responses_output.lookup(responses, path))
                else:
                    self._error(404, f"unknown path {path or '/'}")
            except BadRequest as e:
                self._error(e.status, str(e), e.param)
            self._access_log()

        def do_DELETE(self):
            self._start()
            try:
                self._body()
                path = self.path.split("?")[0].rstrip("/")
                if path.startswith("/v1/responses/"):
                    self._send(*responses_output.delete(responses, path))
                else:
                    self._error(404, f"unknown path {path or '/'}")
            except BadRequest as e:
                self._error(e.status, str(e), e.param)
            self._access_log()

        def do_POST(self):
            self._start()
            path = self.path.split("?")[0].rstrip("/")
            anthropic = path.startswith("/v1/messages")
            self.job = None
            try:
                raw = self._body()
                routes = {"/v1/chat/completions": self._openai_chat, "/v1/completions": self._openai_text,
                          "/v1/messages": self._anthropic, "/v1/messages/count_tokens": self._count,
                          "/v1/responses": self._responses}
                if path not in routes:
                    return self._error(404, f"unknown path {path}", anthropic=anthropic)
                try:
                    body = json.loads(raw or b"null")
                except RecursionError:
                    raise BadRequest(f"JSON nested deeper than {cfg.max_depth} levels") from None
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise BadRequest(f"invalid JSON: {e}") from None
                if json_depth(body) > cfg.max_depth:
                    raise BadRequest(f"JSON nested deeper than {cfg.max_depth} levels")
                routes[path](body)
            except BadRequest as e:
                self._error(e.status, str(e), e.param, anthropic, e.code)
            except Busy as e:
                self._error(503, f"server busy: {e}", anthropic=anthropic)
            except (ClientGone, ConnectionError):  # ConnectionError: writing a whole response to a closed socket
                self.close_connection = True
                self.status, self.gone = self.status or 499, True
            except Exception as e:  # noqa: BLE001 - a bug in handling this request: say so, keep serving
                traceback.print_exc(file=log)
                self.close_connection = True
                if not self.status:  # nothing sent yet: a 500 rather than a silently dropped connection
                    self._error(500, f"internal error: {type(e).__name__}: {e}", anthropic=anthropic)
            finally:
                if self.job is not None:  # a no-op after it finished; stops it if the client went away or
                    self.job.cancel()  # this handler failed mid-way (e.g. a write to a closed socket)
                self._access_log()

        def _openai_chat(self, body):
            return self._openai(openai_api.chat_call(body, cfg, worker.tokenizer))

        def _openai_text(self, body):
            return self._openai(openai_api.text_call(body, cfg, worker.tokenizer))

        def _submit(self, gen):
            self.job = worker.submit(gen)
            return self.job

        def _openai(self, call):
            job = self._submit(call.gen)
            responder = openai_api.Responder(call, cfg, worker.tokenizer)
            items = parsed(self._relay(job, pings=call.stream), call.prompt, call.tools, call.parallel_tool_calls)
            if not call.stream:
                body, end = responder.whole(items)
                if isinstance(end, Failed):
                    self._error(500, end.message)
                else:
                    self._send(200, body)
                return
            self._sse_start()
            for payload in responder.chunks(items):
                if payload is PING:  # an SSE comment: clients skip it, idle timers restart
                    self._chunk(": ping\n\n")
                    continue
                self._chunk(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n")
            self._chunk("data: [DONE]\n\n")
            self._sse_end()

        def _anthropic(self, body):
            call = anthropic_api.messages_call(body, cfg, worker.tokenizer)
            job = self._submit(call.gen)
            responder = anthropic_api.Responder(call, cfg)
            items = parsed(self._relay(job, pings=call.stream), call.prompt, call.tools, call.parallel_tool_calls)
            if not call.stream:
                body, end = responder.whole(items)
                if isinstance(end, Failed):
                    self._error(500, end.message, anthropic=True)
                else:
                    self._send(200, body)
                return
            self._sse_start()
            for name, payload in responder.events(items):
                self._chunk(f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n")
            self._sse_end()

        def _count(self, body):
            self._send(200, anthropic_api.count_tokens(body, cfg, worker.tokenizer))

        def _responses(self, body):
            call = responses_api.responses_call(body, cfg, worker.tokenizer, responses)
            job = self._submit(call.gen)
            responder = responses_output.Responder(call, responses)
            items = parsed(self._relay(job, pings=call.stream), call.prompt, call.tools, call.parallel_tool_calls)
            if not call.stream:
                body, end = responder.whole(items)
                if isinstance(end, Failed):
                    self._error(500, end.message)
                else:
                    self._send(200, body)
                return
            self._sse_start()
            for name, payload in responder.events(items):
                if name == responses_output.PING:  # an SSE comment: clients skip it, idle timers restart
                    self._chunk(": ping\n\n")
                    continue
                self._chunk(f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n")
            self._sse_end()

    return Handler


def serve(worker: Worker, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8080, log=None) -> HTTPServer:
    """Bind (port 0: a free port); the caller runs `serve_forever()`. The worker must be ready."""
    return HTTPServer((host, port), make_handler(worker, cfg, log))
