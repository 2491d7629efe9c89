"""Running the HTTP front: uvicorn with the guard protocol, the front door, and a shutdown that says
what happened.

SIGTERM or Ctrl-C: stop accepting connections, let running requests finish for `shutdown_timeout`
seconds, then end the rest with an explicit error (worker.stop: an error event in a stream, a 503
for a request not answered yet): a client never takes half an answer for a whole one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from dataclasses import dataclass

import uvicorn

from .app import Front, make_app
from .bridge import Bridge
from .front_door import FrontDoor, Policy
from .guard import GuardedH11Protocol, Limits
from .metrics import Metrics


@dataclass
class Timeouts:
    header: float = 10.0  # the request line and headers, from the first byte
    body: float = 60.0  # the body, from the headers
    keep_alive: float = 30.0  # an idle keep-alive connection
    shutdown: float = 30.0  # running requests may finish after SIGTERM


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one); OSError if it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    front: Front
    grace: float

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the signal once it has shut down, which would end the process before the worker
        # writes the prefix cache's RAM tier out; here a graceful shutdown returns normally.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets=None):
        front, worker = self.front, self.front.worker
        front.draining = True
        for server in self.servers:  # no new connections
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        while (worker.running or worker.waiting) and loop.time() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        worker.stop(f"the server is shutting down; this request did not finish within {self.grace:g} s "
                    "(--shutdown-timeout)")
        await super().shutdown(sockets)


def run(worker, cfg, policy: Policy, sock: socket.socket, *, timeouts: Timeouts = Timeouts(),
        max_connections: int = 1000, log=None, planned_bytes: int | None = None):
    """Serve on `sock` until SIGTERM / Ctrl-C; the worker is stopped on the way out."""
    Limits.header_timeout, Limits.body_timeout, Limits.max_connections = \
        timeouts.header, timeouts.body, max_connections
    front = Front(worker, cfg, Bridge(threads=worker.max_queue + 64), metrics=Metrics(worker))
    front.planned_bytes = planned_bytes
    app = FrontDoor(make_app(front), policy, front, log)
    Limits.log = app.connection_event
    logging.getLogger("uvicorn.error").setLevel(logging.ERROR)  # its "Invalid HTTP request" lines: the guard logs them
    config = uvicorn.Config(app, http=GuardedH11Protocol, lifespan="off", access_log=False, log_config=None,
                            log_level="warning", timeout_keep_alive=timeouts.keep_alive, server_header=False,
                            timeout_graceful_shutdown=int(timeouts.shutdown) + 10, backlog=1024)
    server = _Server(config)
    server.front, server.grace = front, timeouts.shutdown
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
        front.bridge.close()
