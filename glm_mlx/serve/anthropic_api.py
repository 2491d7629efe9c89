"""Anthropic Messages API: /v1/messages and /v1/messages/count_tokens (what Claude-Code-style agents
speak). Messages become the same internal form as OpenAI's, so both render the same prompt."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from .fields import Fields
from .grammar import constrain, for_request
from .prompt import BadRequest, Prompt, forced_call, render
from .stream import ServerConfig, completion_budget, effort_budget, finish_kind, gen_request, sampling
from .worker import Finished, GenRequest

# Honoured fields (docs/api_fields.md): any other is accepted and ignored (fields.Fields), e.g. metadata,
# service_tier, container, speed, inference_geo, diagnostics, user_profile_id, top-level cache_control.
MESSAGES = {"model", "messages", "system", "max_tokens", "stop_sequences", "stream", "temperature", "top_p", "top_k",
            "tools", "tool_choice", "thinking", "output_config", "context_management", "output_format",
            # glm-mlx's own (the sampling fields OpenAI's API takes), through extra_body
            "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "seed"}
COUNT = {"model", "messages", "system", "tools", "tool_choice", "thinking", "output_config", "context_management"}
# Tools Anthropic's servers run (web search, code execution, ...): nothing here can run them, so they are
# accepted and not shown to the model (it cannot call what it is not told of).
SERVER_TOOLS = ("web_search", "web_fetch", "code_execution", "mcp_toolset", "tool_search", "memory")
STOP = {"stop": "end_turn", "stop_sequence": "stop_sequence", "tool_calls": "tool_use", "length": "max_tokens",
        "cancelled": "end_turn", "error": "end_turn"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "request_too_large",
               415: "invalid_request_error", 421: "permission_error", 503: "overloaded_error", 500: "api_error"}


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


@dataclass
class Call:
    prompt: Prompt
    gen: GenRequest | None
    stream: bool
    tools: list | None
    parallel_tool_calls: bool = True  # false: stream.parsed passes the first call only
    model: str = ""  # the request's model name, echoed (agents send claude-* names; any is accepted)


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
        if isinstance(m, dict) and m.get("role") == "system":
            # Claude Code sends its environment block this way. GLM's template renders a system turn anywhere,
            # so it stays where it stands (hoisting it would change the prompt's prefix turn by turn).
            out.append({"role": "system", "content": _text_blocks(m.get("content"), where)})
            continue
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise BadRequest(f"{where}: role must be 'user', 'assistant' or 'system'", where)
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
        if isinstance(t.get("type"), str) and t["type"].startswith(SERVER_TOOLS):
            continue
        if t.get("defer_loading"):  # (Anthropic's tool search) hidden until loaded: here, never shown
            continue
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


def _thinking(f: Fields, cfg: ServerConfig) -> tuple[bool, int | None]:
    """-> (thinking on, reasoning budget in tokens or None). Absent `thinking` means no thinking, as
    Anthropic defines it (the server's --reasoning default is the OpenAI APIs'); `enabled` with
    `budget_tokens` caps the reasoning (then `</think>` is forced and the answer follows); `adaptive`
    lets the model decide. `output_config.effort` caps the reasoning further (stream.EFFORT_BUDGET);
    it never turns thinking on."""
    t = f.typed("thinking", (dict,), "an object")
    on, budget = False, None
    if t is not None:
        if t.get("type") not in ("enabled", "disabled", "adaptive"):
            raise BadRequest("'thinking.type' must be 'enabled', 'adaptive' or 'disabled'", "thinking")
        on = t["type"] != "disabled"
        if t["type"] == "enabled" and t.get("budget_tokens") is not None:
            budget = t["budget_tokens"]
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise BadRequest("'thinking.budget_tokens' must be a positive integer", "thinking")
    effort = (f.typed("output_config", (dict,), "an object", {}) or {}).get("effort")
    if effort is not None and on:
        _, cap = effort_budget(effort, "output_config.effort")
        if cap is not None:
            budget = cap if budget is None else min(budget, cap)
    elif effort is not None:
        effort_budget(effort, "output_config.effort")  # still checked
    return on, budget


def _clear_thinking(f: Fields, cfg: ServerConfig) -> bool | None:
    """context_management's `clear_thinking` edit -> the template's clear_thinking: earlier turns' reasoning
    dropped, unless the edit keeps all of it. Other edit types (tool-result clearing, ...) are accepted and
    ignored: they change what an agent's history holds, which the agent sends anyway."""
    cm = f.typed("context_management", (dict,), "an object", {}) or {}
    edits = cm.get("edits") or []
    for e in edits if isinstance(edits, list) else []:
        if isinstance(e, dict) and str(e.get("type", "")).startswith("clear_thinking"):
            return e.get("keep") != "all"
    return cfg.template_args.get("clear_thinking")


def prompt_of(body, cfg: ServerConfig, tokenizer, allowed: set[str]):
    """-> (fields, prompt, tools to parse, parallel tool calls, reasoning budget)."""
    f = Fields(body, allowed, "/v1/messages")
    msgs = messages(body.get("messages"), body.get("system"))
    tools = _tools(f)
    choice, parallel = _tool_choice(f)
    forced, parse_tools, shown = forced_call(choice, tools)
    thinking, budget = _thinking(f, cfg)
    prompt = render(tokenizer, msgs, tools=shown, thinking=thinking, clear_thinking=_clear_thinking(f, cfg),
                    forced=forced, parse_tools=parse_tools)
    return f, prompt, tools if parse_tools else None, parallel, budget


def count_tokens(body, cfg: ServerConfig, tokenizer) -> dict:
    _, prompt, _, _, _ = prompt_of(body, cfg, tokenizer, COUNT)
    return {"input_tokens": len(prompt.ids)}


def messages_call(body, cfg: ServerConfig, tokenizer) -> Call:
    f, prompt, tools, parallel, reasoning_budget = prompt_of(body, cfg, tokenizer, MESSAGES)
    asked = f.number("max_tokens", None, 1, 2 ** 31, integer=True, required=True)
    stream = f.boolean("stream", False)
    params = sampling(f, cfg)
    budget = completion_budget(cfg, len(prompt.ids), asked, "max_tokens")
    model = body.get("model") if isinstance(body.get("model"), str) else cfg.model_id
    gen = gen_request(prompt, budget, params, f.stop_strings("stop_sequences"))
    # A forced call (tool_choice any / tool) is held to a declared tool and its schema (serve/grammar.py).
    fmt = _output_format(f)
    gen = constrain(gen, prompt, for_request(tokenizer, prompt, tools, parallel=parallel, response_format=fmt,
                                             param="output_config.format"), reasoning_budget)
    return Call(prompt, gen, stream, tools, parallel, model)


def _output_format(f: Fields) -> dict | None:
    """Anthropic's structured outputs: `output_config.format` ({"type": "json_schema", "schema": ...}), or the
    beta's top-level `output_format` -> OpenAI's response_format shape, enforced while decoding."""
    fmt = (f.typed("output_config", (dict,), "an object", {}) or {}).get("format") or f.raw("output_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise BadRequest("'output_config.format' must be {'type': 'json_schema', 'schema': {...}}",
                         "output_config.format")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.get("schema") or {"type": "object"}}}


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
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.call.model or self.cfg.model_id,
                "content": content,
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
            if kind == "ping":  # a long prefill: message_start first (the SDKs expect it before any event)
                if not started:
                    started = True
                    yield start()
                yield "ping", {"type": "ping"}
                continue
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
