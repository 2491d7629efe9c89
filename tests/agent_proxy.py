"""A small recording HTTP proxy on a loopback port for tests/test_agents.py: the agent clients talk to it,
it forwards every request to `glm-mlx serve` unchanged (streams relayed as they come) and keeps, per request,
the method, path, request body, status and, for an error, the response body, so a test can say exactly what
a client sent that the server refused."""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade", "te",
       "trailer", "host", "accept-encoding"}


@dataclass
class Exchange:
    method: str
    path: str
    body: object  # parsed JSON where it is JSON, else the raw text (cut)
    status: int = 0
    response: str = ""  # the whole body of a non-streamed response (cut), or the first events of a stream
    seconds: float = 0.0
    headers: dict = field(default_factory=dict)

    def summary(self) -> str:
        return f"{self.method} {self.path} -> {self.status} ({self.seconds:.1f}s)"


class RecordingProxy:
    def __init__(self, upstream_port: int, keep_response: int = 4000):
        self.upstream_port = upstream_port
        self.exchanges: list[Exchange] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                pass

            def _handle(self):
                t0 = time.monotonic()
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    raw = b"".join(parts)
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw[:2000].decode("utf-8", "replace")
                ex = Exchange(self.command, self.path, body,
                              headers={k.lower(): v for k, v in self.headers.items()
                                       if k.lower() not in ("authorization", "x-api-key")})
                with proxy.lock:
                    proxy.exchanges.append(ex)
                up = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=900)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                    up.request(self.command, self.path, body=raw if raw or self.command == "POST" else None,
                               headers=headers)
                    r = up.getresponse()
                    ex.status = r.status
                    self.send_response(r.status)
                    for k, v in r.getheaders():
                        if k.lower() not in HOP:
                            self.send_header(k, v)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    kept = bytearray()
                    while True:
                        data = r.read1(65536) if hasattr(r, "read1") else r.read(65536)
                        if not data:
                            break
                        if len(kept) < keep_response:
                            kept += data[: keep_response - len(kept)]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    ex.response = kept.decode("utf-8", "replace")
                except OSError as e:
                    ex.status = ex.status or 599
                    ex.response += f"[proxy: {type(e).__name__}: {e}]"
                    self.close_connection = True
                finally:
                    ex.seconds = time.monotonic() - t0
                    up.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that hangs up mid-stream: the exchange already says so

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RecordingProxy:
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def mark(self) -> int:
        with self.lock:
            return len(self.exchanges)

    def since(self, mark: int) -> list[Exchange]:
        with self.lock:
            return list(self.exchanges[mark:])
