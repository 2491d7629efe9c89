"""The connection guard: uvicorn's h11 protocol with the limits a server left running needs.

uvicorn closes idle keep-alive connections, but a connection that sends its request line or headers
byte by byte, or a body shorter than its Content-Length, may hold on for as long as it likes (an
open file descriptor each: a few thousand of them stop a server answering anyone). This protocol
adds what h11 and uvicorn leave to the application:
- a header timeout: a request's headers must arrive within `header_timeout` seconds of its first byte;
- a body timeout: its body within `body_timeout` seconds of its headers;
- a bound on open connections: past `max_connections` a new one is answered 503 at once and closed
  (uvicorn's own `limit_concurrency` also answers 503, but only once the request's headers are in);
- malformed requests (h11's RemoteProtocolError: a bad chunk size, two Content-Lengths, a TLS hello)
  are 400s in the OpenAI error shape, not uvicorn's plain text.
Written here because no maintained server (uvicorn, hypercorn, granian) offers header and body
timeouts as settings; the subclass keeps every other part of uvicorn's h11 handling.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def error_bytes(status: int, reason: str, message: str, kind: str = "invalid_request_error") -> bytes:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class Limits:
    """Set once by the server before it starts (uvicorn builds protocols itself, with no arguments of ours)."""

    header_timeout = 10.0
    body_timeout = 60.0
    max_connections = 1000
    log = staticmethod(lambda client, status, what: None)  # front_door.FrontDoor.connection_event


class GuardedH11Protocol(H11Protocol):
    def connection_made(self, transport):
        super().connection_made(transport)
        self._timer = None
        if len(self.connections) > Limits.max_connections:
            self._log(503, f"refused: over {Limits.max_connections} open connections (--max-connections)")
            transport.write(error_bytes(503, "Service Unavailable", f"too many open connections (over "
                                        f"{Limits.max_connections}, --max-connections); try again shortly",
                                        "server_busy"))
            transport.close()
            return
        self._arm(Limits.header_timeout, "headers")

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes):
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if getattr(self, "_phase", None) != "body":
                self._arm(Limits.body_timeout, "body")
        elif state is h11.IDLE and getattr(self, "_phase", None) is None and self.conn.our_state is h11.IDLE:
            self._arm(Limits.header_timeout, "headers")  # the next request's first bytes
        elif state is not h11.IDLE:
            self._disarm()  # DONE (the whole request is in), or closed / errored

    def on_response_complete(self):
        self._disarm()
        super().on_response_complete()

    def _log(self, status: int, what: str):
        client = self.client[0] if self.client else "-"
        Limits.log(client, status, what)

    def send_400_response(self, msg: str):
        self._disarm()
        self._log(400, f"malformed HTTP request: {msg}")
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not self.transport.is_closing():
            self.transport.write(error_bytes(400, "Bad Request", f"malformed HTTP request: {msg}"))
        self.transport.close()

    # --- timers ---------------------------------------------------------------------------------
    def _arm(self, seconds: float, phase: str):
        self._disarm()
        self._phase = phase
        self._timer = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self):
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.cancel()
        self._timer, self._phase = None, None

    def _expired(self, phase: str):
        self._timer = None
        if self.transport.is_closing():
            return
        self._log(408, f"the request's {phase} did not arrive in time")
        if self.cycle is None or not self.cycle.response_started:  # nothing answered yet: say why, then close
            if self.cycle is not None:
                self.cycle.response_complete = self.cycle.disconnected = True  # the app's receive() ends
            self.transport.write(error_bytes(408, "Request Timeout", f"the request's {phase} did not arrive in time "
                                             f"({Limits.header_timeout if phase == 'headers' else Limits.body_timeout:g}"
                                             " s)"))
        self.transport.close()
