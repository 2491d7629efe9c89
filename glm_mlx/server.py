"""An OpenAI-compatible HTTP server: /v1/chat/completions (streaming SSE and not) and /v1/models.

Standard library HTTP (one process, threads for connections, one lock around the model: MLX
runs one generation at a time anyway). Prompt caches are pooled: each request continues the
cached conversation sharing its longest prefix, so a multi-turn client only pays for new tokens.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .generate import encode_prompt, stream_generate
from .prompt_cache import PromptCache


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class CachePool:
    """A few prompt caches; a request takes the one sharing the longest prefix (else the oldest)."""

    def __init__(self, model, mtp: bool, size: int = 4):
        self.model, self.mtp, self.size = model, mtp, size
        self.caches: list[PromptCache] = []

    def take(self, ids: list[int]) -> PromptCache:
        def shared(pc):
            n = 0
            for a, b in zip(pc.tokens, ids):
                if a != b:
                    break
                n += 1
            return n

        best = max(self.caches, key=shared, default=None)
        if best is not None and shared(best) > 0:
            self.caches.remove(best)
        elif len(self.caches) >= self.size:
            self.caches.pop(0)  # least recently used
            best = None
        else:
            best = None
        pc = best or PromptCache.fresh(self.model, mtp=self.mtp)
        self.caches.append(pc)
        return pc


def parse_request(body: dict) -> dict:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list", "messages")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool") \
                or not isinstance(m.get("content", ""), (str, type(None))):
            raise RequestError("each message needs a role (system/user/assistant/tool) and string content", "messages")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError("'stop' must be a string or a list of strings", "stop")

    def number(key, default, lo, hi, kind=float):
        v = body.get(key, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise RequestError(f"'{key}' must be a number in [{lo}, {hi}]", key)
        return kind(v)

    return dict(messages=[{"role": m["role"], "content": m.get("content") or ""} for m in msgs],
                stream=bool(body.get("stream", False)), stop=stop,
                max_tokens=number("max_completion_tokens", None, 1, 1 << 20, int) or number("max_tokens", 512, 1, 1 << 20, int),
                temp=number("temperature", 0.0, 0.0, 2.0), top_p=number("top_p", 1.0, 0.0, 1.0),
                seed=number("seed", None, -(1 << 63), 1 << 63, int),
                include_usage=bool((body.get("stream_options") or {}).get("include_usage", False)))


class Server:
    def __init__(self, model, tokenizer, model_id: str, mtp: bool = True, num_draft: int = 1):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.mtp, self.num_draft = mtp, num_draft
        self.pool = CachePool(model, mtp)
        self.lock = threading.Lock()

    def completions(self, req: dict):
        """Yield (text delta, finish_reason, usage) triples for one request (under the model lock)."""
        ids = encode_prompt(self.tokenizer, req["messages"])
        with self.lock:
            pc = self.pool.take(ids)
            for r in stream_generate(self.model, self.tokenizer, ids, max_tokens=req["max_tokens"], temp=req["temp"],
                                     top_p=req["top_p"], seed=req["seed"], stop=req["stop"], prompt_cache=pc,
                                     mtp=self.mtp, num_draft=self.num_draft):
                usage = {"prompt_tokens": len(ids), "completion_tokens": r.generation_tokens,
                         "total_tokens": len(ids) + r.generation_tokens}
                yield r.text, r.finish_reason, usage

    def make_handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # quiet; errors still go to stderr via send_error
                pass

            def _json(self, status: int, obj: dict):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str, param=None, kind="invalid_request_error"):
                self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._json(200, {"object": "list", "data": [
                        {"id": server.model_id, "object": "model", "created": 0, "owned_by": "glm-mlx"}]})
                else:
                    self._error(404, f"unknown path {self.path}", kind="not_found_error")

            def do_POST(self):
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._error(404, f"unknown path {self.path}", kind="not_found_error")
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = json.loads(self.rfile.read(length) or b"null")
                    if not isinstance(body, dict):
                        raise RequestError("request body must be a JSON object")
                    req = parse_request(body)
                except json.JSONDecodeError as e:
                    return self._error(400, f"invalid JSON: {e}")
                except (RequestError, ValueError) as e:
                    return self._error(getattr(e, "status", 400), str(e), getattr(e, "param", None))
                try:
                    (self._stream if req["stream"] else self._whole)(req)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away; the generation was stopped by closing the iterator

            def _meta(self):
                return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": server.model_id}

            def _whole(self, req):
                text, reason, usage = [], None, None
                for delta, reason, usage in server.completions(req):
                    text.append(delta)
                self._json(200, {**self._meta(), "object": "chat.completion", "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": "".join(text)},
                    "finish_reason": reason}], "usage": usage})

            def _stream(self, req):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                meta = {**self._meta(), "object": "chat.completion.chunk"}

                def send(choice_delta, reason=None, usage=None, choices=True):
                    chunk = {**meta, "choices": [{"index": 0, "delta": choice_delta, "finish_reason": reason}]
                             if choices else []}
                    if usage is not None:
                        chunk["usage"] = usage
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()

                send({"role": "assistant", "content": ""})
                usage = None
                for delta, reason, usage in server.completions(req):
                    send({"content": delta} if delta else {}, reason)
                if req["include_usage"]:
                    send({}, usage=usage, choices=False)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

        return Handler

    def serve(self, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
        httpd = ThreadingHTTPServer((host, port), self.make_handler())
        httpd.daemon_threads = True
        return httpd
