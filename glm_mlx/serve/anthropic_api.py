"""Anthropic Messages API: /v1/messages and /v1/messages/count_tokens (what Claude-Code-style agents
speak). Messages become the same internal form as OpenAI's, so both render the same prompt."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from .fields import Fields
from .prompt import BadRequest, Prompt, forced_call, render
from .stream import ServerConfig, completion_budget, finish_kind, gen_request, sampling
from .worker import Finished, GenRequest

MESSAGES = {"model", "messages", "system", "max_tokens", "stop_sequences", "stream", "temperature", "top_p", "top_k",
            "tools", "tool_choice", "thinking", "metadata", "service_tier"}
COUNT = {"model", "messages", "system", "tools", "tool_choice", "thinking"}
STOP = {"stop": "end_turn", "stop_sequence": "stop_sequence", "tool_calls": "tool_use", "length": "max_tokens",
        "cancelled": "end_turn", "error": "end_turn"}
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "request_too_large", 503: "overloaded_error", 500: "api_error"}


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


@dataclass
class Call:
    prompt: Prompt
    gen: GenRequest | None
    stream: bool
    tools: list | None
    parallel_tool_calls: bool = True  # false: stream.parsed passes the first call only


def _text_blocks(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for b in content:
            if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
                raise BadRequest(f"{where}: only text blocks are supported here", where)
            out.append(b["text"])
        return "".join(out)
    if content is None:
        return ""
    raise BadRequest(f"{where}: content must be a string or an array of blocks", where)


def messages(raw, system) -> list[dict]:
    """Anthropic messages -> the template's form: tool_result blocks become tool messages, tool_use
    blocks an assistant's tool_calls, thinking blocks its reasoning_content."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    out = []
    if system:
        out.append({"role": "system", "content": _text_blocks(system, "system")})
    for i, m in enumerate(raw):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise BadRequest(f"{where}: role must be 'user' or 'assistant'", where)
        content = m.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise BadRequest(f"{where}.content must be a string or an array of blocks", where)
        text, reasoning, calls = [], [], []
        for j, b in enumerate(blocks):
            kind = b.get("type") if isinstance(b, dict) else None
            at = f"{where}.content.{j}"
            if kind == "text" and isinstance(b.get("text"), str):
                text.append(b["text"])
            elif kind == "tool_result" and m["role"] == "user":
                result = _text_blocks(b.get("content"), at)
                if b.get("is_error"):
                    result = f"Error: {result}"
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": result})
            elif kind == "tool_use" and m["role"] == "assistant":
                if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                    raise BadRequest(f"{at}: tool_use needs a name and an object input", at)
                calls.append({"id": b.get("id"), "type": "function",
                              "function": {"name": b["name"], "arguments": b.get("input", {})}})
            elif kind == "thinking" and m["role"] == "assistant":
                reasoning.append(str(b.get("thinking", "")))
            elif kind == "redacted_thinking" and m["role"] == "assistant":
                continue  # opaque to any model but the one that wrote it
            else:
                raise BadRequest(f"{at}: block type {kind!r} is not supported in a {m['role']} message", at)
        if m["role"] == "user":
            if text or not any(b.get("type") == "tool_result" for b in blocks if isinstance(b, dict)):
                out.append({"role": "user", "content": "".join(text)})
        else:
            msg = {"role": "assistant", "content": "".join(text)}
            if reasoning:
                msg["reasoning_content"] = "".join(reasoning)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def _tools(f: Fields) -> list | None:
    tools = f.typed("tools", (list,), "an array of tools")
    out = []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise BadRequest(f"tools.{i} needs a name", "tools")
        if t.get("type") not in (None, "custom"):
            raise BadRequest(f"tools.{i}: server tool type {t.get('type')!r} is not supported", "tools")
        out.append({"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                      "parameters": t.get("input_schema") or {"type": "object"}}})
    return out or None


def _tool_choice(f: Fields):
    choice = f.typed("tool_choice", (dict,), "an object")
    if choice is None:
        return None, True
    parallel = not choice.get("disable_parallel_tool_use", False)
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return choice["name"], parallel
    raise BadRequest("'tool_choice.type' must be auto, any, tool (with a name) or none", "tool_choice")


def _thinking(f: Fields, cfg: ServerConfig) -> bool:
    t = f.typed("thinking", (dict,), "an object")
    if t is None:
        return cfg.template_args.get("enable_thinking", cfg.thinking)
    if t.get("type") not in ("enabled", "disabled", "adaptive"):
        raise BadRequest("'thinking.type' must be 'enabled' or 'disabled'", "thinking")
    return t["type"] != "disabled"


def prompt_of(body, cfg: ServerConfig, tokenizer, allowed: set[str]) -> tuple[Fields, Prompt, list | None, bool]:
    f = Fields(body, allowed, "/v1/messages")
    msgs = messages(body.get("messages"), body.get("system"))
    tools = _tools(f)
    choice, parallel = _tool_choice(f)
    forced, parse_tools, shown = forced_call(choice, tools)
    prompt = render(tokenizer, msgs, tools=shown, thinking=_thinking(f, cfg),
                    clear_thinking=cfg.template_args.get("clear_thinking"), forced=forced, parse_tools=parse_tools)
    return f, prompt, tools if parse_tools else None, parallel


def count_tokens(body, cfg: ServerConfig, tokenizer) -> dict:
    _, prompt, _, _ = prompt_of(body, cfg, tokenizer, COUNT)
    return {"input_tokens": len(prompt.ids)}


def messages_call(body, cfg: ServerConfig, tokenizer) -> Call:
    f, prompt, tools, parallel = prompt_of(body, cfg, tokenizer, MESSAGES)
    asked = f.number("max_tokens", None, 1, 2 ** 31, integer=True, required=True)
    stream = f.boolean("stream", False)
    params = sampling(f, cfg)
    budget = completion_budget(cfg, len(prompt.ids), asked, "max_tokens")
    return Call(prompt, gen_request(prompt, budget, params, f.stop_strings("stop_sequences")), stream, tools, parallel)


def usage(end: Finished | None) -> dict:
    if end is None:
        return {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    # Anthropic counts cache reads apart from input_tokens (input = the uncached part).
    return {"input_tokens": end.prompt_tokens - end.cached_tokens, "output_tokens": end.completion_tokens,
            "cache_read_input_tokens": end.cached_tokens, "cache_creation_input_tokens": 0}


class Responder:
    def __init__(self, call: Call, cfg: ServerConfig):
        self.call, self.cfg = call, cfg
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.calls: list = []

    @staticmethod
    def _tool_use(call) -> dict:
        return {"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"), "name": call.name,
                "input": call.arguments}

    def _message(self, content, end) -> dict:
        kind = finish_kind(end, len(self.calls)) if end is not None else None
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.cfg.model_id, "content": content,
                "stop_reason": STOP.get(kind), "stop_sequence": getattr(end, "stop_sequence", None),
                "usage": usage(end if isinstance(end, Finished) else None)}

    def whole(self, items) -> tuple[dict, object]:
        blocks, end = [], None
        for kind, x in items:
            if kind == "event":
                if x.kind == "tool_call":
                    self.calls.append(x.call)
                    blocks.append(self._tool_use(x.call))
                elif x.text:
                    key = "thinking" if x.kind == "reasoning" else "text"
                    if blocks and blocks[-1]["type"] == key:
                        blocks[-1][key] += x.text
                    else:
                        blocks.append({"type": key, key: x.text, **({"signature": ""} if key == "thinking" else {})})
            elif kind == "end":
                end = x
        return self._message(blocks, end), end

    def events(self, items):
        """Yield (event name, payload) in the documented order."""
        open_kind, index, started = None, -1, False

        def start(cached=None):
            msg = self._message([], None)
            if cached is not None:  # the prompt is prefilled: its split is known (message_delta repeats it)
                n = len(self.call.prompt.ids)
                msg["usage"].update(input_tokens=n - cached, cache_read_input_tokens=cached)
            return "message_start", {"type": "message_start", "message": msg}

        def close():
            return "content_block_stop", {"type": "content_block_stop", "index": index}

        for kind, x in items:
            if kind == "token":
                if not started:
                    started = True
                    yield start(x.cached_tokens)
                continue
            if kind == "end":
                if not started:
                    yield start()
                if open_kind is not None:
                    yield close()
                if isinstance(x, Finished):
                    msg = self._message([], x)
                    yield "message_delta", {"type": "message_delta", "delta": {"stop_reason": msg["stop_reason"],
                                            "stop_sequence": msg["stop_sequence"]}, "usage": msg["usage"]}
                    yield "message_stop", {"type": "message_stop"}
                else:
                    yield "error", {"type": "error", "error": {"type": "api_error", "message": x.message}}
                return
            if not started:
                started = True
                yield start()
            if x.kind == "tool_call":
                self.calls.append(x.call)
                if open_kind is not None:
                    yield close()
                index, open_kind = index + 1, None
                block = self._tool_use(x.call)
                yield "content_block_start", {"type": "content_block_start", "index": index,
                                              "content_block": {**block, "input": {}}}
                yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
                    "type": "input_json_delta", "partial_json": json.dumps(x.call.arguments, ensure_ascii=False)}}
                yield close()
                continue
            if not x.text:
                continue
            key = "thinking" if x.kind == "reasoning" else "text"
            if open_kind != key:
                if open_kind is not None:
                    yield close()
                index, open_kind = index + 1, key
                block = {"type": "thinking", "thinking": "", "signature": ""} if key == "thinking" else \
                    {"type": "text", "text": ""}
                yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
            delta = {"type": "thinking_delta", "thinking": x.text} if key == "thinking" else \
                {"type": "text_delta", "text": x.text}
            yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
