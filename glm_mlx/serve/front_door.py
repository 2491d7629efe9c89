"""The front door: every request passes here first (a pure ASGI middleware).

- Host: the Host header must name the bound address, a loopback name, or an `--allowed-host`
  (else 421): a web page that rebinds its own DNS name to 127.0.0.1 cannot read the answers.
  Bound to a wildcard address, an IP literal is accepted too (rebinding needs a name).
- Origin: a request carrying an `Origin` not in `--allowed-origins` is refused (403) whatever its
  content type, so a page the user visits cannot make the model generate with a "simple" request;
  CORS preflights are answered for the allowed origins only.
- API keys: with keys set, every /v1 route needs one (`Authorization: Bearer KEY` or `x-api-key`,
  compared in constant time); /health stays open. 401 in each API's error shape.
- A POST whose declared content type is not JSON is a 415.
- The access log: one line per request, written whole, control characters escaped; `json` format
  for machines. Metrics are counted here too.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import sys
import threading
import time
from dataclasses import dataclass, field

from starlette.datastructures import Headers

from .app import error_response

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "localhost.localdomain"}
OPEN_PATHS = {"/health", "/v1/health"}  # no key needed (a liveness probe; /, /status and /metrics are outside /v1)
CORS_HEADERS = "authorization, content-type, x-api-key, anthropic-version, anthropic-beta, openai-beta"


@dataclass
class Policy:
    host: str = "127.0.0.1"  # the bound address
    api_keys: list[str] = field(default_factory=list)
    allowed_hosts: set[str] = field(default_factory=set)
    allowed_origins: set[str] = field(default_factory=set)
    log_format: str = "text"  # or "json"

    def host_ok(self, header: str | None) -> bool:
        if not header:
            return False
        name = header.strip().lower()
        if name.startswith("["):  # [::1]:8080
            name = name[1:].split("]", 1)[0]
        elif name.count(":") == 1:
            name = name.rsplit(":", 1)[0]
        if name in LOOPBACK_NAMES or name == self.host.lower() or name in self.allowed_hosts:
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return False
        return ip.is_loopback or self.host in ("0.0.0.0", "::")  # an IP literal cannot be rebound

    def origin_ok(self, origin: str) -> bool:
        return origin in self.allowed_origins or "*" in self.allowed_origins

    def key_ok(self, headers: Headers) -> bool:
        if not self.api_keys:
            return True
        given = headers.get("x-api-key") or ""
        auth = headers.get("authorization") or ""
        if auth[:7].lower() == "bearer ":
            given = given or auth[7:].strip()
        ok = False
        for key in self.api_keys:  # every key compared: the time does not say which one nearly matched
            ok |= hmac.compare_digest(given.encode(), key.encode())
        return ok


def escape(text: str) -> str:
    """Control characters (an ESC from a request path would reach the terminal) as \\x.. escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class FrontDoor:
    def __init__(self, app, policy: Policy, front, log=None):
        self.app, self.policy, self.front = app, policy, front
        self.log = log or sys.stderr
        self._lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = Headers(scope=scope)
        path, method = scope["path"], scope["method"]
        sent = {"status": 0}

        async def send_logged(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                if origin and self.policy.origin_ok(origin):
                    message.setdefault("headers", [])
                    message["headers"] = [*message["headers"], (b"access-control-allow-origin", origin.encode()),
                                          (b"vary", b"Origin")]
            await send(message)

        origin = headers.get("origin")
        refusal = self._refusal(scope, headers, path, method, origin)
        try:
            if refusal is not None:
                await refusal(scope, receive, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        finally:
            self._done(scope, method, path, sent["status"], time.perf_counter() - t0)

    def _refusal(self, scope, headers, path, method, origin):
        p = self.policy
        if not p.host_ok(headers.get("host")):
            return error_response(421, f"Host {escape(headers.get('host') or '(none)')!r} is not this server's "
                                  "(glm-mlx serve --allowed-host NAME allows it)", path)
        if origin is not None and not p.origin_ok(origin):
            return error_response(403, f"requests from web pages at {escape(origin)!r} are refused "
                                  "(glm-mlx serve --allowed-origins ORIGIN allows one)", path)
        if method == "OPTIONS":
            if origin is None:
                return error_response(405, f"method OPTIONS is not allowed on {escape(path)}", path)
            return _preflight(origin)
        if path.startswith("/v1/") and path not in OPEN_PATHS and not p.key_ok(headers):
            return error_response(401, "a valid API key is required (Authorization: Bearer KEY or x-api-key)",
                                  path, headers={"WWW-Authenticate": "Bearer"})
        if method == "POST":
            kind = (headers.get("content-type") or "application/json").split(";")[0].strip().lower()
            if kind != "application/json" and not kind.endswith("+json"):
                return error_response(415, f"the body must be JSON (Content-Type: application/json), got "
                                      f"{escape(kind)!r}", path)
        return None

    def _done(self, scope, method, path, status, seconds):
        state = scope.get("state") or {}
        seen = state.get("seen") or {}
        end = seen.get("end")
        if self.front.metrics is not None:
            self.front.metrics.request(state.get("api") or "other", status, end, seen)
        query = scope.get("query_string") or b""
        where = escape(path + ("?" + query.decode("latin-1") if query else ""))
        client = (scope.get("client") or ("-", 0))[0]
        # A generation route whose job ended without a Finished or Failed: its client went away.
        cancelled = end is None and (state.get("gone") or (status == 200 and "seen" in state))
        if self.policy.log_format == "json":
            rec = {"time": round(time.time(), 3), "client": client, "method": method, "path": where,
                   "status": status, "seconds": round(seconds, 3)}
            if hasattr(end, "prompt_tokens"):
                rec.update(prompt=end.prompt_tokens, cached=end.cached_tokens, completion=end.completion_tokens,
                           ttft=round(end.ttft, 3), tok_s=round(end.generation_tps, 1), reason=end.reason)
            elif end is not None:
                rec["error"] = escape(end.message)
            elif cancelled:
                rec["cancelled"] = True
            line = json.dumps(rec)
        else:
            extra = ""
            if hasattr(end, "prompt_tokens"):
                extra = (f" prompt={end.prompt_tokens} cached={end.cached_tokens} completion={end.completion_tokens} "
                         f"ttft={end.ttft:.3f}s {end.generation_tps:.1f}tok/s {end.reason}")
            elif end is not None:
                extra = f" error: {escape(end.message)}"
            elif cancelled:
                extra = " cancelled (client disconnected)"
            line = f'{client} "{method} {where}" {status}{extra} {seconds:.2f}s'
        self.write(line)

    def connection_event(self, client: str, status: int, what: str):
        """A line for what the guard did to a connection no request of which reached the app (a timeout,
        malformed HTTP, the connection cap), in the access log's format."""
        if self.policy.log_format == "json":
            self.write(json.dumps({"time": round(time.time(), 3), "client": client, "status": status, "error": what}))
        else:
            self.write(f'{client} "- -" {status} {what}')

    def write(self, line: str):
        with self._lock:  # one line written whole, never interleaved with another (relay threads log too)
            self.log.write(line + "\n")
            self.log.flush()


def _preflight(origin: str):
    from starlette.responses import Response

    return Response(status_code=204, headers={
        "access-control-allow-origin": origin, "access-control-allow-methods": "GET, POST, DELETE, OPTIONS",
        "access-control-allow-headers": CORS_HEADERS, "access-control-max-age": "600", "vary": "Origin"})
