"""The HTTP front: a starlette ASGI app served by uvicorn (h11 parsing, keep-alive, SSE).

Handlers never touch MLX: they read and check the body, build the request (the chat template and the
tokenizer, in a relay thread so a long prompt does not hold the event loop), submit a job to the
worker and relay its events (bridge.py). Around them: the guard (guard.py: header and body timeouts,
a bound on connections, malformed requests as 400s) and the front door (front_door.py: API keys,
Host and Origin checks, the access log, metrics).
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import anthropic_api, openai_api, responses_api, responses_output
from .bridge import Bridge, ClientGone, relay
from .fields import json_depth
from .prompt import BadRequest
from .responses_store import ResponseStore
from .stream import PING, ServerConfig, parsed
from .worker import Busy, Failed, Worker

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Front:
    """What the routes share."""

    worker: Worker
    cfg: ServerConfig
    bridge: Bridge
    store: ResponseStore = field(default_factory=ResponseStore)
    draining: bool = False  # shutting down: new generation requests get 503
    metrics: object = None  # metrics.Metrics, or None


def anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(status: int, message: str, path: str, param=None, code=None, headers=None) -> JSONResponse:
    """An error in the shape of the API the path belongs to."""
    if anthropic_path(path):
        body = anthropic_api.error_body(status, message)
    else:
        kind = {401: "authentication_error", 404: "not_found_error", 503: "server_busy"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def read_json(request, cfg: ServerConfig):
    """The body as JSON, within the size and nesting caps (413 / 400)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cfg.max_body:
        raise BadRequest(f"request body is {declared} bytes; the limit is {cfg.max_body}", status=413)
    parts, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > cfg.max_body:
                raise BadRequest(f"request body over {cfg.max_body} bytes", status=413)
            parts.append(chunk)
    except ClientDisconnect:  # gone (or timed out by the guard) mid-body: nobody to answer
        raise ClientGone from None
    raw = b"".join(parts)
    try:
        body = json.loads(raw or b"null")
    except RecursionError:
        raise BadRequest(f"JSON nested deeper than {cfg.max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as e:  # ValueError: also an integer past Python's 4,300 digits
        raise BadRequest(f"invalid JSON: {e}") from None
    if json_depth(body) > cfg.max_depth:
        raise BadRequest(f"JSON nested deeper than {cfg.max_depth} levels")
    return body


# --- the three generation APIs: (build the call, make the responder, SSE lines) ------------------
def _openai_lines(call, responder, items):
    for payload in responder.chunks(items):
        yield ": ping\n\n" if payload is PING else f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


def _named_lines(events):
    for name, payload in events:
        if name == responses_output.PING and payload is None:
            yield ": ping\n\n"
        else:
            yield f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


class API:
    def __init__(self, name: str, build, responder, lines):
        self.name, self.build, self.responder, self.lines = name, build, responder, lines


def _apis(front: Front) -> dict[str, API]:
    cfg = front.cfg

    def tok():
        return front.worker.tokenizer

    return {
        "/v1/chat/completions": API("chat", lambda b: openai_api.chat_call(b, cfg, tok()),
                                    lambda c: openai_api.Responder(c, cfg, tok()),
                                    lambda c, r, items: _openai_lines(c, r, items)),
        "/v1/completions": API("completions", lambda b: openai_api.text_call(b, cfg, tok()),
                               lambda c: openai_api.Responder(c, cfg, tok()),
                               lambda c, r, items: _openai_lines(c, r, items)),
        "/v1/messages": API("messages", lambda b: anthropic_api.messages_call(b, cfg, tok()),
                            lambda c: anthropic_api.Responder(c, cfg),
                            lambda c, r, items: _named_lines(r.events(items))),
        "/v1/responses": API("responses", lambda b: responses_api.responses_call(b, cfg, tok(), front.store),
                             lambda c: responses_output.Responder(c, front.store),
                             lambda c, r, items: _named_lines(r.events(items))),
    }


def make_app(front: Front, middleware=None) -> Starlette:
    cfg, worker, bridge = front.cfg, front.worker, front.bridge
    apis = _apis(front)
    loop_pool = bridge.pool

    async def generate(request):
        path = request.url.path.rstrip("/")
        api = apis[path]
        state = request.scope.setdefault("state", {})
        state["api"] = api.name
        try:
            body = await read_json(request, cfg)
            call = await asyncio.get_running_loop().run_in_executor(loop_pool, api.build, body)
            if front.draining:
                return error_response(503, "the server is shutting down; try again shortly", path)
            job = worker.submit(call.gen)
        except BadRequest as e:  # 413: the rest of the body is not read, so the connection is closed
            return error_response(e.status, str(e), path, e.param, e.code,
                                  headers={"Connection": "close"} if e.status == 413 else None)
        except Busy as e:
            return error_response(503, f"server busy: {e}", path, headers={"Retry-After": "1"})
        except ClientGone:
            state["gone"] = True
            return Response(status_code=499)
        seen = state.setdefault("seen", {})
        responder = api.responder(call)

        def items():
            return parsed(relay(job, cfg.keepalive, call.stream, seen), call.prompt, call.tools,
                          call.parallel_tool_calls)

        if call.stream:
            return StreamingResponse(bridge.stream(job, lambda: api.lines(call, responder, items())),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            out, end = await bridge.whole(request, job, lambda: responder.whole(items()))
        except ClientGone:
            state["gone"] = True
            return Response(status_code=499)
        if isinstance(end, Failed):
            return error_response(getattr(end, "status", 500), end.message, path)
        return JSONResponse(out)

    async def count_tokens(request):
        path = request.url.path.rstrip("/")
        try:
            body = await read_json(request, cfg)
            out = await asyncio.get_running_loop().run_in_executor(
                loop_pool, anthropic_api.count_tokens, body, cfg, worker.tokenizer)
        except BadRequest as e:
            return error_response(e.status, str(e), path, e.param, e.code)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse(out)

    def model_card() -> dict:
        return {"id": cfg.model_id, "object": "model", "created": 0, "owned_by": "glm-mlx",
                "context_length": cfg.context, "max_model_len": cfg.context}

    async def models(request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request):
        name = request.path_params["name"]
        if name != cfg.model_id:
            return error_response(404, f"unknown model {name!r} (this server serves {cfg.model_id!r})",
                                  request.url.path)
        return JSONResponse(model_card())

    async def health(request):
        return JSONResponse({"status": "draining" if front.draining else "ok", "model": cfg.model_id,
                             "waiting": worker.waiting})

    async def stored_response(request):
        path = request.url.path.rstrip("/")
        fn = responses_output.delete if request.method == "DELETE" else responses_output.lookup
        status, out = fn(front.store, path)
        return JSONResponse(out, status_code=status)

    async def status_page(request):
        from .status_page import PAGE

        return HTMLResponse(PAGE)

    async def status(request):
        from .status_page import snapshot

        return JSONResponse(snapshot(front))

    async def metrics(request):
        if front.metrics is None:
            return error_response(404, "metrics are off", request.url.path)
        data, kind = front.metrics.render()
        return Response(data, media_type=kind)

    post = ["POST"]
    routes = [Route(p, generate, methods=post) for p in apis]
    routes += [
        Route("/v1/messages/count_tokens", count_tokens, methods=post),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/responses/{rest:path}", stored_response, methods=["GET", "DELETE"]),
        Route("/", status_page, methods=["GET"]),
        Route("/status", status, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]

    async def not_found(request, exc):
        return error_response(404, f"unknown path {request.url.path}", request.url.path)

    async def not_allowed(request, exc):
        allowed = getattr(exc, "headers", None) or {}
        return error_response(405, f"method {request.method} is not allowed on {request.url.path}",
                              request.url.path, headers=allowed)

    async def crashed(request, exc):  # a bug: say so, keep serving
        traceback.print_exception(exc, file=sys.stderr)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", request.url.path)

    return Starlette(routes=routes, middleware=middleware or [],
                     exception_handlers={404: not_found, 405: not_allowed, Exception: crashed})
