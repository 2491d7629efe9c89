"""OpenAI API: /v1/chat/completions and /v1/completions requests in, responses and SSE chunks out."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from .fields import Fields
from .grammar import constrain, for_request, for_response_format
from .prompt import BadRequest, Prompt, check_unicode, forced_call, parse_arguments, render
from .stream import PING, ServerConfig, completion_budget, effort_budget, finish_kind, gen_request, sampling
from .worker import Finished, GenRequest

# Honoured fields (docs/api_fields.md); any other is accepted and ignored (fields.Fields), e.g. user,
# metadata, store, service_tier, prompt_cache_key, modalities, prediction, verbosity, web_search_options.
SAMPLING = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
            "logit_bias", "seed", "stop", "max_tokens", "stream", "stream_options", "n", "model"}
CHAT = SAMPLING | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                   "parallel_tool_calls", "chat_template_kwargs", "response_format", "reasoning_effort", "reasoning",
                   "functions", "function_call"}
TEXT = SAMPLING | {"prompt", "logprobs", "echo", "best_of", "suffix"}
FINISH = {"stop": "stop", "stop_sequence": "stop", "tool_calls": "tool_calls", "length": "length",
          "cancelled": "stop", "error": "error"}


@dataclass
class Call:
    prompt: Prompt
    gen: GenRequest
    stream: bool
    include_usage: bool
    tools: list | None
    chat: bool  # chat.completion or text_completion
    parallel_tool_calls: bool = True  # false: stream.parsed passes the first call only

    @property
    def top_logprobs(self) -> int | None:
        """None: no logprobs; n: the chosen token's and the n most likely (what the worker computes)."""
        return self.gen.logprobs


def _text(content, where: str) -> str:
    """A message's content: a string, or an array of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRequest(f"{where}: content part of type {kind!r} is not supported (text only)", where)
        return "".join(out)
    raise BadRequest(f"{where}: content must be a string or an array of text parts", where)


def messages(raw) -> list[dict]:
    """OpenAI messages -> the template's form (system/user/assistant with tool_calls mapping/tool)."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"{where} must be an object", where)
        role = m.get("role")
        if role in ("system", "developer"):
            out.append({"role": "system", "content": _text(m.get("content"), where)})
        elif role == "user":
            out.append({"role": "user", "content": _text(m.get("content"), where)})
        elif role == "assistant":
            msg = {"role": "assistant", "content": _text(m.get("content"), where)}
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise BadRequest(f"{where}.reasoning_content must be a string", where)
                msg["reasoning_content"] = reasoning
            calls = m.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    raise BadRequest(f"{where}.tool_calls must be an array", where)
                msg["tool_calls"] = []
                for j, c in enumerate(calls):
                    fn = c.get("function") if isinstance(c, dict) else None
                    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                        raise BadRequest(f"{where}.tool_calls[{j}] needs function.name", where)
                    args = parse_arguments(fn.get("arguments"), f"{where}.tool_calls[{j}].function")
                    msg["tool_calls"].append({"id": c.get("id"), "type": "function",
                                              "function": {"name": fn["name"], "arguments": args}})
            out.append(msg)
        elif role in ("tool", "function"):
            out.append({"role": "tool", "content": _text(m.get("content"), where),
                        "tool_call_id": m.get("tool_call_id")})
        else:
            raise BadRequest(f"{where}: unknown role {role!r} (system, developer, user, assistant, tool)", where)
    return out


def _tools(f: Fields) -> list | None:
    tools = f.typed("tools", (list,), "an array of tools")
    if tools is None and f.has("functions"):  # the deprecated form: functions=[{name, parameters}]
        legacy = f.typed("functions", (list,), "an array of functions")
        tools = [{"type": "function", "function": fn} for fn in legacy]
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}", "tools")
    return tools or None


def _tool_choice(f: Fields):
    choice = f.raw("tool_choice")
    if choice is None and f.has("function_call"):  # the deprecated form: "auto", "none" or {"name": ...}
        legacy = f.raw("function_call")
        choice = {"type": "function", "function": legacy} if isinstance(legacy, dict) else legacy
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    fn = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):  # "function" may be any JSON value: check it
        return fn["name"]
    raise BadRequest("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                     "{'name': ...}}", "tool_choice")


def _unsupported(f: Fields, text: bool):
    if f.number("n", 1, 1, 1, integer=True) != 1:
        raise BadRequest("'n' must be 1", "n")
    if not text:  # a malformed response_format is a 400 here; chat_call builds its grammar (serve/grammar.py)
        for_response_format(f.raw("response_format"))
    if text:
        if f.boolean("echo", False):
            raise BadRequest("'echo' is not supported", "echo")
        if f.number("best_of", 1, 1, 1, integer=True) != 1:
            raise BadRequest("'best_of' must be 1", "best_of")
        if f.has("suffix"):
            raise BadRequest("'suffix' is not supported", "suffix")


def _stream_flags(f: Fields) -> tuple[bool, bool]:
    stream = f.boolean("stream", False)
    opts = f.typed("stream_options", (dict,), "an object", {})
    include = opts.get("include_usage", False)
    if not isinstance(include, bool):
        raise BadRequest("'stream_options.include_usage' must be a boolean", "stream_options")
    return stream, include


def chat_call(body, cfg: ServerConfig, tokenizer) -> Call:
    f = Fields(body, CHAT, "/v1/chat/completions")
    _unsupported(f, text=False)
    msgs = messages(body.get("messages"))
    tools = _tools(f)
    forced, parse_tools, shown = forced_call(_tool_choice(f), tools)
    kwargs = {**cfg.template_args, **f.typed("chat_template_kwargs", (dict,), "an object", {})}
    thinking = kwargs.get("enable_thinking", cfg.thinking)
    effort, reasoning_budget = f.string("reasoning_effort"), None
    if effort is None:  # `reasoning: {"effort": ...}`, as some clients send it on chat completions too
        effort = (f.typed("reasoning", (dict,), "an object", {}) or {}).get("effort")
    if effort is not None:
        thinking, reasoning_budget = effort_budget(effort, "reasoning_effort")
    if not isinstance(thinking, bool):
        raise BadRequest("'chat_template_kwargs.enable_thinking' must be a boolean", "chat_template_kwargs")
    prompt = render(tokenizer, msgs, tools=shown, thinking=thinking, clear_thinking=kwargs.get("clear_thinking"),
                    forced=forced, parse_tools=parse_tools)
    asked = f.number("max_completion_tokens", None, 1, 2 ** 31, integer=True)
    key = "max_completion_tokens"
    if asked is None:
        asked, key = f.number("max_tokens", None, 1, 2 ** 31, integer=True), "max_tokens"
    logprobs = f.boolean("logprobs", False)
    top = f.number("top_logprobs", 0, 0, 20, integer=True)
    if top and not logprobs:
        raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    stream, include = _stream_flags(f)
    params = sampling(f, cfg)
    budget = completion_budget(cfg, len(prompt.ids), asked, key)
    gen = gen_request(prompt, budget, params, f.stop_strings("stop"), top if logprobs else None)
    parallel = f.boolean("parallel_tool_calls", True)
    grammar = for_request(tokenizer, prompt, tools if parse_tools else None, parallel=parallel,
                          response_format=f.raw("response_format"))
    return Call(prompt, constrain(gen, prompt, grammar, reasoning_budget), stream, include,
                tools if parse_tools else None, True, parallel)


def text_call(body, cfg: ServerConfig, tokenizer) -> Call:
    from ..generation.text import encode_prompt

    f = Fields(body, TEXT, "/v1/completions")
    _unsupported(f, text=True)
    raw = body.get("prompt")
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        raw = raw[0]
    if isinstance(raw, str) and raw:
        check_unicode(raw, "prompt")
        ids = encode_prompt(tokenizer, raw)
    elif isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
        if not all(0 <= t < cfg.vocab_size for t in raw):
            raise BadRequest(f"'prompt' token ids must be in 0..{cfg.vocab_size - 1}", "prompt")
        ids = list(raw)
    else:
        raise BadRequest("'prompt' must be a non-empty string or array of token ids (one prompt per request)",
                         "prompt")
    prompt = Prompt(ids=ids, thinking=False, forced="", parse_tools=False)
    top = f.number("logprobs", None, 0, 20, integer=True)
    stream, include = _stream_flags(f)
    params = sampling(f, cfg)
    budget = completion_budget(cfg, len(ids), f.number("max_tokens", None, 1, 2 ** 31, integer=True), "max_tokens")
    return Call(prompt, gen_request(prompt, budget, params, f.stop_strings("stop"), top), stream, include, None,
                False)


# --- responses ---------------------------------------------------------------------------------
def usage(end: Finished) -> dict:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
            "total_tokens": end.prompt_tokens + end.completion_tokens,
            # disk_cached_tokens (glm-mlx's): the part of cached_tokens read back from the SSD prefix cache
            "prompt_tokens_details": {"cached_tokens": end.cached_tokens, "disk_cached_tokens": end.disk_tokens}}


def _token_text(tokenizer, tok: int) -> str:
    return tokenizer.decode([int(tok)])


def chat_logprobs(tokenizer, delta) -> dict:
    """One token's OpenAI chat logprobs entry."""
    lp = delta.logprobs
    n = (len(lp) - 1) // 2
    text = _token_text(tokenizer, delta.token)

    def entry(t, value):
        return {"token": t, "logprob": value, "bytes": list(t.encode("utf-8"))}

    top = [entry(_token_text(tokenizer, lp[1 + i]), lp[1 + n + i]) for i in range(n)]
    return {**entry(text, lp[0]), "top_logprobs": top}


def tool_call_json(call, index: int | None = None) -> dict:
    out = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}
    return out if index is None else {"index": index, **out}


class Responder:
    """Builds one request's response (whole or as SSE chunk payloads) from `stream.parsed` items."""

    def __init__(self, call: Call, cfg: ServerConfig, tokenizer):
        self.call, self.cfg, self.tokenizer = call, cfg, tokenizer
        prefix = "chatcmpl" if call.chat else "cmpl"
        self.meta = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": cfg.model_id}
        self.calls: list = []

    def _logprobs(self, tokens: list) -> dict | None:
        if self.call.top_logprobs is None:
            return None
        if self.call.chat:
            return {"content": [chat_logprobs(self.tokenizer, d) for d in tokens]}
        entries = [chat_logprobs(self.tokenizer, d) for d in tokens]
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": []}

    def whole(self, items) -> tuple[dict, object]:
        text, reasoning, tokens, end = [], [], [], None
        for kind, x in items:
            if kind == "ping":
                continue
            if kind == "token":
                tokens.append(x)
            elif kind == "event":
                if x.kind == "tool_call":
                    self.calls.append(x.call)
                else:
                    (reasoning if x.kind == "reasoning" else text).append(x.text)
            else:
                end = x
        finish = FINISH[finish_kind(end, len(self.calls))]
        body = {**self.meta, "object": "chat.completion" if self.call.chat else "text_completion"}
        if self.call.chat:
            msg = {"role": "assistant", "content": "".join(text) or (None if self.calls else "")}
            if reasoning:
                msg["reasoning_content"] = "".join(reasoning)
            if self.calls:
                msg["tool_calls"] = [tool_call_json(c) for c in self.calls]
            body["choices"] = [{"index": 0, "message": msg, "logprobs": self._logprobs(tokens), "finish_reason": finish}]
        else:  # /v1/completions is raw text: the tokens' text verbatim (the GLM parser drops <think> tags)
            raw = "".join(d.text for d in tokens)
            body["choices"] = [{"index": 0, "text": raw, "logprobs": self._logprobs(tokens), "finish_reason": finish}]
        if isinstance(end, Finished):
            body["usage"] = usage(end)
        return body, end

    def chunks(self, items):
        """Yield SSE payload dicts; the caller writes `data: [DONE]` after the last."""
        obj = "chat.completion.chunk" if self.call.chat else "text_completion"

        def chunk(delta=None, finish=None, logprobs=None, text=None):
            choice = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
            if self.call.chat:
                choice["delta"] = delta or {}
            else:
                choice["text"] = text or ""
            return {**self.meta, "object": obj, "choices": [choice]}

        if self.call.chat:
            yield chunk({"role": "assistant", "content": ""})
        for kind, x in items:
            if kind == "ping":
                yield PING
            elif kind == "token":
                if not self.call.chat:  # raw text, token by token (as in whole())
                    if x.text or self.call.top_logprobs is not None:
                        yield chunk(text=x.text, logprobs=self._logprobs([x]))
                elif self.call.top_logprobs is not None:
                    yield chunk(logprobs=self._logprobs([x]))
            elif kind == "event":
                if not self.call.chat:
                    continue
                if x.kind == "tool_call":
                    self.calls.append(x.call)
                    yield chunk({"tool_calls": [tool_call_json(x.call, len(self.calls) - 1)]})
                elif not x.text:
                    continue
                else:
                    yield chunk({"reasoning_content" if x.kind == "reasoning" else "content": x.text})
            elif isinstance(x, Finished):
                yield chunk(finish=FINISH[finish_kind(x, len(self.calls))])
                if self.call.include_usage:
                    yield {**self.meta, "object": obj, "choices": [], "usage": usage(x)}
            else:  # Failed after the stream started: an error event, then [DONE]
                yield {"error": {"message": x.message, "type": "server_error", "param": None, "code": None}}
