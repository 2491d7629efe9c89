"""The Responses API's output: the response object and its SSE events, from `stream.parsed` items.

One event machine builds both: a non-streamed request runs it and keeps the final response, so the
whole response and the last streamed event always agree. Event order (OpenAI's): response.created,
response.in_progress; per output item response.output_item.added, then for a message
response.content_part.added, response.output_text.delta..., response.output_text.done,
response.content_part.done (reasoning: the same with reasoning_text), for a function call
response.function_call_arguments.delta/.done; response.output_item.done; last response.completed,
response.incomplete (cut by max_output_tokens) or response.failed.
"""

from __future__ import annotations

import time
import uuid

from .responses_api import Call, encrypt_reasoning
from .responses_store import ResponseStore
from .worker import Failed, Finished

PING = "ping"  # the event name of an SSE comment (": ping"), written raw by the route


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class Responder:
    def __init__(self, call: Call, store: ResponseStore | None = None):
        self.call, self.store = call, store
        self.id, self.created = _id("resp"), int(time.time())
        self.output: list[dict] = []
        self.seq = 0
        self.open: dict | None = None  # the reasoning or message item being written
        self.open_kind, self.text = None, []  # its kind and text so far
        self.reasoning_tokens = self.pending_tokens = 0
        self.kind: str | None = "reasoning" if call.prompt.thinking else None  # what the tokens are writing

    # --- the response object ---------------------------------------------------------------------
    def response(self, status: str, end=None) -> dict:
        body = {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": None, "incomplete_details": None, "output": self.output, "usage": None,
                **self.call.echo}
        if status in ("completed", "incomplete"):
            body["completed_at"] = int(time.time())
        if status == "incomplete":
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        if isinstance(end, Failed):
            body["error"] = {"code": "server_error", "message": end.message}
        if isinstance(end, Finished):
            body["usage"] = self._usage(end)
        return body

    def _usage(self, end: Finished) -> dict:
        return {"input_tokens": end.prompt_tokens,
                "input_tokens_details": {"cached_tokens": end.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": end.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": min(self.reasoning_tokens, end.completion_tokens)},
                "total_tokens": end.prompt_tokens + end.completion_tokens}

    # --- events ----------------------------------------------------------------------------------
    def _event(self, kind: str, /, **payload) -> tuple[str, dict]:
        event = {"type": kind, "sequence_number": self.seq, **payload}
        self.seq += 1
        return kind, event

    def _where(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def _add(self, item: dict):
        self.output.append(item)
        yield self._event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item))

    def _open(self, kind: str):
        """Start a reasoning or message item with its one content part."""
        if kind == "reasoning":
            item = {"id": _id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": _id("msg"), "type": "message", "role": "assistant", "status": "in_progress", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield from self._add(item)
        self.open, self.open_kind, self.text = item, kind, []
        yield self._event("response.content_part.added", **self._where(item), content_index=0, part=part)

    def _delta(self, text: str):
        self.text.append(text)
        name = "response.reasoning_text.delta" if self.open_kind == "reasoning" else "response.output_text.delta"
        extra = {} if self.open_kind == "reasoning" else {"logprobs": []}
        yield self._event(name, **self._where(self.open), content_index=0, delta=text, **extra)

    def _close(self, status: str = "completed"):
        item = self.open
        if item is None:
            return
        text = "".join(self.text)
        self.open = None
        where = {**self._where(item), "content_index": 0}
        if item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            yield self._event("response.reasoning_text.done", **where, text=text)
            if self.call.encrypted:
                item["encrypted_content"] = encrypt_reasoning(text)
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            yield self._event("response.output_text.done", **where, text=text, logprobs=[])
        yield self._event("response.content_part.done", **where, part=part)
        item["content"], item["status"] = [part], status
        yield self._event("response.output_item.done", output_index=where["output_index"], item=item)

    def _function_call(self, call):
        item = {"id": "fc_" + call.id.removeprefix("call_"), "type": "function_call", "status": "in_progress",
                "call_id": call.id, "name": call.name, "arguments": ""}
        if call.name in self.call.namespaces:  # a namespaced function: its own name and its namespace
            item["namespace"], item["name"] = self.call.namespaces[call.name]
        yield from self._add(item)
        args = call.arguments_json
        yield self._event("response.function_call_arguments.delta", **self._where(item), delta=args)
        yield self._event("response.function_call_arguments.done", **self._where(item), arguments=args,
                          name=item["name"])
        item["arguments"], item["status"] = args, "completed"
        yield self._event("response.output_item.done", output_index=self.output.index(item), item=item)

    def _count(self, kind: str | None):
        """Tokens since the last event were writing `kind`: reasoning tokens for usage."""
        if kind == "reasoning":
            self.reasoning_tokens += self.pending_tokens
        self.pending_tokens = 0

    def events(self, items):
        """Yield (event name, payload); (PING, None) for a keep-alive comment."""
        yield self._event("response.created", response=self.response("in_progress"))
        yield self._event("response.in_progress", response=self.response("in_progress"))
        for kind, x in items:
            if kind == "ping":
                yield PING, None
            elif kind == "token":
                self.pending_tokens += 1
            elif kind == "event":
                self._count(x.kind)
                self.kind = x.kind
                if x.kind == "tool_call":
                    yield from self._close()
                    yield from self._function_call(x.call)
                elif x.text:
                    if self.open is None or self.open_kind != x.kind:
                        yield from self._close()
                        yield from self._open(x.kind)
                    yield from self._delta(x.text)
            else:
                self._count(self.kind)
                yield from self._end(x)
                return

    def _end(self, end):
        if isinstance(end, Failed):
            yield from self._close("incomplete")
            yield self._event("response.failed", response=self.response("failed", end))
            return
        cut = end.reason == "length"
        yield from self._close("incomplete" if cut else "completed")
        if not cut and not any(it["type"] in ("message", "function_call") for it in self.output):
            yield from self._open("content")  # an answer with no text is an empty message, not no message
            yield from self._close()
        body = self.response("incomplete" if cut else "completed", end)
        if self.store is not None and self.call.store:
            self.store.put(body, self.call.items + [_for_store(it) for it in self.output])
        yield self._event("response.incomplete" if cut else "response.completed", response=body)

    def whole(self, items) -> tuple[dict, object]:
        """(the final response, the end event) of a non-streamed request."""
        last = None
        for name, payload in self.events(items):
            if name != PING:
                last = payload
        status = last["response"]["status"]
        return last["response"], (Failed(last["response"]["error"]["message"]) if status == "failed" else None)


def _for_store(item: dict) -> dict:
    """An output item as the next turn's input (reasoning keeps its text in `content` either way)."""
    return {k: v for k, v in item.items() if k != "encrypted_content"}


def _not_found(response_id: str) -> tuple[int, dict]:
    return 404, {"error": {"message": f"Response with id '{response_id}' not found.", "type": "invalid_request_error",
                           "param": None, "code": None}}


def lookup(store: ResponseStore, path: str) -> tuple[int, dict]:
    """GET /v1/responses/{id} (the response object) and /v1/responses/{id}/input_items -> (status, body)."""
    rest = path.removeprefix("/v1/responses/")
    response_id, _, tail = rest.partition("/")
    entry = store.get(response_id)
    if entry is None or tail not in ("", "input_items"):
        return _not_found(response_id)
    if not tail:
        return 200, entry.response
    inputs = entry.items[:len(entry.items) - len(entry.response["output"])]
    data = [dict(it, id=it.get("id") or f"item_{i}") for i, it in enumerate(reversed(inputs))]  # newest first
    return 200, {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                 "last_id": data[-1]["id"] if data else None, "has_more": False}


def delete(store: ResponseStore, path: str) -> tuple[int, dict]:
    response_id = path.removeprefix("/v1/responses/")
    if "/" in response_id or not store.delete(response_id):
        return _not_found(response_id)
    return 200, {"id": response_id, "object": "response.deleted", "deleted": True}
