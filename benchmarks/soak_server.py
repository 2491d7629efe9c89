"""Soak: leave `glm-mlx serve` running under a mixed load and see what breaks. Loopback only, bounded in
count (--requests) and time (--minutes); it stops by itself.

    python benchmarks/soak_server.py --requests 1000 --minutes 20

The load, from --clients threads at once: OpenAI chat completions, the Responses API and Anthropic
messages, streamed and not, conversations that grow turn by turn (so the prefix cache serves them),
and every --disconnect-every'th stream dropped mid-answer. Then the server is killed (SIGKILL) and
restarted on the same prefix cache, and a few greedy questions must get the answers they got before.
Reports requests, failures (any non-2xx, any stream that did not end as its API ends one), tracebacks
in the server's log, the server's RSS over the run (it should level off), and the restart check.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe  # noqa: E402

WORDS = (ROOT / "tests" / "data" / "glm_mini_heldout.txt").read_text().split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cache_dir: str, port: int):
        self.cache_dir, self.port, self.log = cache_dir, port, Path(cache_dir) / "serve.log"

    def start(self):
        cmd = [sys.executable, "-m", "glm_mlx.cli.app", "serve", "--port", str(self.port), "--context", "4096",
               "--prefill-step", "64", "--cache-dir", self.cache_dir, "--cache-disk", "512MB"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "a"),
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if request(self.port, "GET", "/health", None)[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start:\n" + self.log.read_text()[-3000:])

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0


def request(port: int, method: str, path: str, body, *, drop_after: int | None = None, timeout: float = 300):
    """(status, text). drop_after: close the connection after that many bytes of the answer."""
    data = b"" if body is None else json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
            if drop_after is not None and len(got) > drop_after:
                return -1, ""
    finally:
        s.close()
    head, _, rest = got.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest.decode(errors="replace")


def ended_well(api: str, stream: bool, status: int, text: str) -> bool:
    if status != 200:
        return False
    if not stream:
        return True
    if api == "anthropic":
        return "event: message_stop" in text
    if api == "responses":
        return "event: response.completed" in text or "event: response.incomplete" in text
    return "data: [DONE]" in text and '"finish_reason": "' in text


def body_for(api: str, history: list[dict], stream: bool) -> tuple[str, dict]:
    common = {"model": "glm-mini", "stream": stream, "temperature": 0}
    if api == "anthropic":
        return "/v1/messages", {**common, "max_tokens": 24, "messages": history}
    if api == "responses":
        return "/v1/responses", {**common, "max_output_tokens": 24, "input": history, "reasoning": {"effort": "none"}}
    return "/v1/chat/completions", {**common, "max_tokens": 24, "messages": history,
                                    "chat_template_kwargs": {"enable_thinking": False}}


def soak(port: int, n: int, minutes: float, clients: int, disconnect_every: int, stats: dict):
    deadline = time.monotonic() + minutes * 60
    lock, counter = threading.Lock(), [0]

    def client(seed: int):
        rng = random.Random(seed)
        history: list[dict] = []
        while time.monotonic() < deadline:
            with lock:
                if counter[0] >= n:
                    return
                counter[0] += 1
                i = counter[0]
            if len(history) > 8 or rng.random() < 0.15:
                history = []  # a new conversation
            start = rng.randrange(len(WORDS) - 60)
            history.append({"role": "user", "content": " ".join(WORDS[start : start + rng.randrange(5, 60)])})
            api = rng.choice(["openai", "anthropic", "responses"])
            stream = rng.random() < 0.6
            path, body = body_for(api, history, stream)
            drop = 300 if stream and disconnect_every and i % disconnect_every == 0 else None
            try:
                status, text = request(port, "POST", path, body, drop_after=drop)
            except OSError as e:
                with lock:
                    stats["failures"].append(f"{api} stream={stream}: {type(e).__name__}: {e}")
                continue
            with lock:
                stats["requests"] += 1
                if drop is not None:
                    stats["disconnects"] += 1
                elif not ended_well(api, stream, status, text):
                    stats["failures"].append(f"{api} stream={stream}: {status} {text[:200]!r}")
            history.append({"role": "assistant", "content": "ok"})  # the agent's turn, as it would send it

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    return threads


QUESTIONS = ["Who is Hamlet?", "Continue: To be, or not to be", "床前明月光"]


def answers(port: int) -> list[str]:
    out = []
    for q in QUESTIONS:
        status, text = request(port, "POST", "/v1/chat/completions", {
            "model": "glm-mini", "max_tokens": 16, "temperature": 0, "chat_template_kwargs": {"enable_thinking": False},
            "messages": [{"role": "system", "content": " ".join(WORDS[:300])}, {"role": "user", "content": q}]})
        out.append(json.loads(text)["choices"][0]["message"]["content"] if status == 200 else f"HTTP {status}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--disconnect-every", type=int, default=13)
    a = p.parse_args()
    print(describe(), flush=True)
    with tempfile.TemporaryDirectory(prefix="glm-mlx-soak-") as cache:
        server = Server(cache, free_port())
        server.start()
        before = answers(server.port)
        stats = {"requests": 0, "disconnects": 0, "failures": []}
        t0 = time.monotonic()
        threads = soak(server.port, a.requests, a.minutes, a.clients, a.disconnect_every, stats)
        rss = []
        while any(t.is_alive() for t in threads):
            rss.append((time.monotonic() - t0, server.rss_mb()))
            time.sleep(2)
        elapsed = time.monotonic() - t0
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        restarted = Server(cache, free_port())
        restarted.start()
        after = answers(restarted.port)
        restarted.proc.send_signal(signal.SIGTERM)
        restarted.proc.wait(timeout=60)
        log = server.log.read_text()
        tracebacks = log.count("Traceback")
    quarter = max(1, len(rss) // 4)
    print(f"{stats['requests']} requests in {elapsed:.0f} s from {a.clients} clients ({stats['disconnects']} "
          f"dropped mid-stream on purpose): {len(stats['failures'])} failures, {tracebacks} tracebacks in the log")
    for f in stats["failures"][:10]:
        print("  failure:", f)
    if rss:
        first = sum(r for _, r in rss[:quarter]) / quarter
        last = sum(r for _, r in rss[-quarter:]) / quarter
        print(f"server RSS: first quarter {first:.0f} MB, last quarter {last:.0f} MB, peak {max(r for _, r in rss):.0f} MB")
    same = before == after
    print(f"after kill -9 and a restart on the same prefix cache: answers {'identical' if same else 'DIFFER'}")
    if not same:
        print(" before:", before, "\n after: ", after)
    sys.exit(0 if same and not stats["failures"] and not tracebacks else 1)


if __name__ == "__main__":
    main()
