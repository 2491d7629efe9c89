"""OpenAI Responses API: POST /v1/responses (what Codex CLI and the OpenAI Agents SDK speak), and
GET/DELETE /v1/responses/{id}. Requests in; the response object and its SSE events are built in
responses_output.py.

`input` items become the same internal messages openai_api.messages() produces (consecutive
function_call items merge into one assistant message with tool_calls; the reasoning item before
them becomes its reasoning_content) and render through prompt.render, so a Responses, a chat and an
Anthropic conversation with the same content share prefix-cache hits. What is honoured, ignored
and refused: docs/responses_api.md.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

from .fields import Fields
from .grammar import constrain, for_request
from .prompt import BadRequest, Prompt, forced_call, parse_arguments, render
from .responses_store import ResponseStore
from .stream import ServerConfig, completion_budget, effort_budget, gen_request, sampling
from .worker import GenRequest

ENDPOINT = "/v1/responses"
# The fields read here; any other (max_tool_calls, top_logprobs, safety_identifier, ...) is accepted and ignored.
RESPONSES = {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "max_output_tokens",
             "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
             "logit_bias", "seed", "reasoning", "text", "include", "store", "previous_response_id", "stream",
             "metadata", "user", "service_tier", "prompt_cache_key", "truncation", "background", "conversation",
             "prompt", "chat_template_kwargs"}
# Items of built-in (server-side) tools: nothing here ran them and the template has no form for them.
SKIPPED_ITEMS = {"web_search_call", "file_search_call", "image_generation_call", "code_interpreter_call",
                 "computer_call", "computer_call_output", "mcp_list_tools", "mcp_approval_request",
                 "mcp_approval_response", "mcp_call", "tool_search_call", "tool_search_output", "compaction",
                 "additional_tools"}
_TAG = "glm-mlx/reasoning/v1"


def encrypt_reasoning(text: str) -> str:
    """encrypted_content as this server writes it: not secret, just opaque to clients (base64 of JSON),
    so the reasoning comes back whole with the next request."""
    return base64.b64encode(json.dumps({"v": _TAG, "text": text}, ensure_ascii=False).encode()).decode()


def decrypt_reasoning(blob) -> str | None:
    """The reasoning text of an encrypted_content this server wrote; None for anyone else's."""
    if not isinstance(blob, str):
        return None
    try:
        value = json.loads(base64.b64decode(blob, validate=True))
    except (ValueError, binascii.Error):
        return None
    if isinstance(value, dict) and value.get("v") == _TAG and isinstance(value.get("text"), str):
        return value["text"]
    return None


def error_body(e: BadRequest) -> dict:
    return {"error": {"message": str(e), "type": "invalid_request_error" if e.status < 500 else "server_error",
                      "param": e.param, "code": getattr(e, "code", None)}}


# --- input items -> internal messages ---------------------------------------------------------------
def _text(content, where: str) -> str:
    """A message's (or a function_call_output's) content: a string or text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where}: content must be a string or an array of content parts", where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        at = f"{where}.content[{j}]"
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            out.append(part["refusal"])
        elif kind == "input_image":
            raise BadRequest(f"{at}: 'input_image' parts are not supported: images are not supported (this model "
                             "reads text only)", at)
        elif kind == "input_file":
            raise BadRequest(f"{at}: 'input_file' parts are not supported: files are not supported (send their "
                             "text as input_text)", at)
        else:
            raise BadRequest(f"{at}: content part type {kind!r} is not supported (input_text, output_text)", at)
    return "".join(out)


def _reasoning_text(item: dict, where: str) -> str:
    """A reasoning item's text: ours from encrypted_content, else its content, else its summary."""
    ours = decrypt_reasoning(item.get("encrypted_content"))
    if ours is not None:
        return ours
    for key in ("content", "summary"):
        parts = item.get(key)
        if isinstance(parts, list) and parts:
            if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts):
                raise BadRequest(f"{where}.{key}: parts must be objects with a text", where)
            return "\n\n".join(p["text"] for p in parts)
    return ""


def _call(call_id, name, arguments, where: str) -> dict:
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{where}: a function_call needs a name", where)
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": parse_arguments(arguments, where)}}


class _Conversation:
    """Builds the message list; `open` is the assistant message later output items of the same turn join."""

    def __init__(self):
        self.out: list[dict] = []
        self.reasoning: str | None = None  # a reasoning item waiting for the output it preceded
        self.open: dict | None = None

    def other(self, msg: dict):  # a user, system or tool turn
        self.flush()
        self.open = None
        self.out.append(msg)

    def flush(self):  # a reasoning item nothing followed: an assistant turn of its own
        if self.reasoning is not None:
            self.out.append({"role": "assistant", "content": "", "reasoning_content": self.reasoning})
            self.reasoning = None

    def assistant(self, content: str) -> dict:
        msg = {"role": "assistant", "content": content}
        if self.reasoning is not None:
            msg["reasoning_content"], self.reasoning = self.reasoning, None
        self.out.append(msg)
        self.open = msg
        return msg

    def tool_call(self, call: dict):
        msg = self.open if self.open is not None and self.reasoning is None else self.assistant("")
        msg.setdefault("tool_calls", []).append(call)


def messages(items: list, instructions: str | None) -> list[dict]:
    """Responses input items -> the template's form (what openai_api.messages() produces)."""
    conv = _Conversation()
    if instructions:
        conv.other({"role": "system", "content": instructions})
    for i, it in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(it, dict):
            raise BadRequest(f"{where} must be an object", where)
        kind = it.get("type", "message" if "role" in it else None)
        if kind == "message":
            role = it.get("role")
            if role in ("system", "developer"):
                conv.other({"role": "system", "content": _text(it.get("content"), where)})
            elif role == "user":
                conv.other({"role": "user", "content": _text(it.get("content"), where)})
            elif role == "assistant":
                conv.assistant(_text(it.get("content"), where))
            else:
                raise BadRequest(f"{where}: unknown role {role!r} (user, system, developer, assistant)", where)
        elif kind == "reasoning":
            conv.flush()
            conv.open, conv.reasoning = None, _reasoning_text(it, where)
        elif kind == "function_call":
            name = it.get("name")
            if isinstance(name, str) and isinstance(it.get("namespace"), str):
                name = qualified(name, it["namespace"])  # as the model was shown it
            conv.tool_call(_call(it.get("call_id"), name, it.get("arguments"), where))
        elif kind == "custom_tool_call":  # a freeform tool's input, as a function's single argument
            conv.tool_call(_call(it.get("call_id"), it.get("name"), {"input": str(it.get("input", ""))}, where))
        elif kind == "local_shell_call":
            action = it.get("action") if isinstance(it.get("action"), dict) else {}
            conv.tool_call(_call(it.get("call_id"), "local_shell", action, where))
        elif kind in ("function_call_output", "custom_tool_call_output", "local_shell_call_output"):
            conv.other({"role": "tool", "content": _text(it.get("output"), where), "tool_call_id": it.get("call_id")})
        elif kind in SKIPPED_ITEMS:
            continue
        else:
            raise BadRequest(f"{where}: input item type {kind!r} is not supported (message, function_call, "
                             "function_call_output, reasoning, item_reference)", where)
    conv.flush()
    return conv.out


# --- the request ---------------------------------------------------------------------------------
@dataclass
class Call:
    prompt: Prompt
    gen: GenRequest
    stream: bool
    tools: list | None  # function tools for the output parser (None: tool markup stays text)
    parallel_tool_calls: bool
    echo: dict  # the request's settings, as the response object repeats them
    items: list[dict]  # the conversation's input items (previous response's included), for the store
    store: bool
    encrypted: bool  # include reasoning.encrypted_content
    namespaces: dict = field(default_factory=dict)  # shown name -> (namespace, name) of namespaced functions


NAMESPACE_SEP = "__"  # a namespaced function is shown to the model as NAMESPACE__NAME (Codex's MCP spelling)


def qualified(name: str, namespace: str | None) -> str:
    return f"{namespace}{NAMESPACE_SEP}{name}" if namespace else name


def _function(fn: dict, where: str, namespace: str | None = None) -> dict:
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise BadRequest(f"{where}: a function tool needs a name", "tools")
    # the keys a chat client would send for the same tool: the rendered prompt (and its cache) match
    out = {k: fn[k] for k in ("name", "description", "parameters", "strict") if fn.get(k) is not None}
    out["name"] = qualified(fn["name"], namespace)
    return {"type": "function", "function": out}


def _tools(f: Fields) -> tuple[list, list | None, dict]:
    """(the tools as sent, for the echo; the function tools in chat's form, to render; {shown name:
    (namespace, name)} for namespaced ones). A `namespace` tool's functions (how Codex sends MCP tools)
    are shown as NAMESPACE__NAME and a call to one comes back with its `namespace`. Built-in and other
    tool types (web_search, file_search, local_shell, custom, ...) are accepted and not rendered: the
    model is never offered what nothing here runs."""
    raw = f.typed("tools", (list,), "an array of tools") or []
    functions, spaces = [], {}
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise BadRequest(f"tools[{i}] must be an object", "tools")
        kind = t.get("type", "function")
        if kind == "namespace" and isinstance(t.get("name"), str) and isinstance(t.get("tools"), list):
            for j, fn in enumerate(t["tools"]):
                if isinstance(fn, dict) and fn.get("type", "function") == "function":
                    tool = _function(fn, f"tools[{i}].tools[{j}]", t["name"])
                    functions.append(tool)
                    spaces[tool["function"]["name"]] = (t["name"], fn["name"])
            continue
        if kind != "function":
            continue
        fn = t["function"] if isinstance(t.get("function"), dict) else t  # chat's nested form, leniently
        functions.append(_function(fn, f"tools[{i}]"))
    return raw, functions or None, spaces


def _tool_choice(f: Fields):
    choice = f.raw("tool_choice")
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict):
        kind = choice.get("type")
        fn = choice.get("function") if isinstance(choice.get("function"), dict) else choice
        if kind == "function" and isinstance(fn.get("name"), str):
            return fn["name"]
        if kind == "allowed_tools" and choice.get("mode") in ("auto", "required"):
            return choice["mode"]  # every tool stays offered (the list only narrows what OpenAI's model sees)
    raise BadRequest("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...} "
                     "(a built-in tool cannot be forced here)", "tool_choice")


def response_format(text: dict) -> dict | None:
    """text.format -> chat completions' response_format shape (None: plain text)."""
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest("'text.format.type' must be 'text', 'json_object' or 'json_schema'", "text.format")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    if not isinstance(fmt.get("schema"), dict):
        raise BadRequest("'text.format.schema' must be a JSON schema object", "text.format.schema")
    return {"type": "json_schema", "json_schema": {"name": fmt.get("name") or "response", "schema": fmt["schema"],
                                                   "strict": fmt.get("strict")}}


def _thinking(f: Fields, cfg: ServerConfig, reasoning: dict) -> tuple[bool, int | None, dict]:
    """(thinking on, reasoning budget, template kwargs): reasoning.effort none/minimal is off, any other
    on; without it chat_template_kwargs.enable_thinking, else the server's default."""
    kwargs = {**cfg.template_args, **f.typed("chat_template_kwargs", (dict,), "an object", {})}
    effort = reasoning.get("effort")
    if effort is not None:
        return (*effort_budget(effort, "reasoning.effort"), kwargs)
    thinking = kwargs.get("enable_thinking", cfg.thinking)
    if not isinstance(thinking, bool):
        raise BadRequest("'chat_template_kwargs.enable_thinking' must be a boolean", "chat_template_kwargs")
    return thinking, None, kwargs


def _refused(f: Fields):
    if f.boolean("background", False):
        raise BadRequest("'background': true is not supported (responses run in the request)", "background")
    if f.has("conversation"):
        raise BadRequest("'conversation' is not supported (there is no Conversations API here); use "
                         "previous_response_id or send the whole input", "conversation")
    if f.has("prompt"):
        raise BadRequest("'prompt' (stored prompt templates) is not supported; send instructions and input",
                         "prompt")


def _input(f: Fields, store: ResponseStore) -> tuple[list, list]:
    """(the previous response's conversation, this request's items with item_reference resolved)."""
    history = []
    prev = f.string("previous_response_id")
    if prev is not None:
        entry = store.get(prev)
        if entry is None:
            raise BadRequest(f"Previous response with id '{prev}' not found.", "previous_response_id",
                             code="previous_response_not_found")
        history = entry.items
    raw = f.body.get("input")
    if isinstance(raw, str):
        new = [{"type": "message", "role": "user", "content": raw}]
    elif isinstance(raw, list):
        new = []
        for i, it in enumerate(raw):
            if isinstance(it, dict) and it.get("type") == "item_reference":
                found = store.item(it.get("id"))
                if found is None:
                    raise BadRequest(f"Item with id '{it.get('id')}' not found.", f"input[{i}]")
                it = found
            new.append(it)
    else:
        raise BadRequest("'input' must be a string or an array of input items", "input")
    if not history and not new:
        raise BadRequest("'input' must not be empty", "input")
    return history, new


def responses_call(body, cfg: ServerConfig, tokenizer, store: ResponseStore) -> Call:
    f = Fields(body, RESPONSES, ENDPOINT)
    _refused(f)
    history, new = _input(f, store)
    instructions = f.string("instructions")
    raw_tools, functions, namespaces = _tools(f)
    choice = _tool_choice(f)
    forced, parse_tools, shown = forced_call(choice, functions)
    reasoning = f.typed("reasoning", (dict,), "an object", {})
    thinking, reasoning_budget, kwargs = _thinking(f, cfg, reasoning)
    text = f.typed("text", (dict,), "an object", {})
    fmt = response_format(text)
    include = f.typed("include", (list,), "an array of strings", [])
    prompt = render(tokenizer, messages(history + new, instructions), tools=shown, thinking=thinking,
                    clear_thinking=kwargs.get("clear_thinking"), forced=forced, parse_tools=parse_tools)
    asked = f.number("max_output_tokens", None, 1, 2 ** 31, integer=True)
    params = sampling(f, cfg)
    gen = gen_request(prompt, completion_budget(cfg, len(prompt.ids), asked, "max_output_tokens"), params, [])
    parallel = f.boolean("parallel_tool_calls", True)
    # structured output and forced calls: the grammar chat_call builds for response_format / tool_choice
    grammar = for_request(tokenizer, prompt, functions if parse_tools else None, parallel=parallel,
                          response_format=fmt, param="text.format")
    constrain(gen, prompt, grammar, reasoning_budget)
    store_it = f.boolean("store", True)
    model = f.string("model", cfg.model_id)
    metadata = f.typed("metadata", (dict,), "an object of strings", {})
    echo = {"model": model, "instructions": instructions, "tools": raw_tools,
            "tool_choice": f.raw("tool_choice", "auto"), "parallel_tool_calls": parallel,
            "temperature": params.temp, "top_p": params.top_p,
            "max_output_tokens": asked, "previous_response_id": f.string("previous_response_id"),
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "text": {"format": text.get("format") or {"type": "text"}}, "store": store_it, "metadata": metadata,
            "user": f.string("user"), "service_tier": "default", "truncation": "disabled", "background": False,
            "prompt_cache_key": f.string("prompt_cache_key")}
    return Call(prompt, gen, f.boolean("stream", False), functions if parse_tools else None, parallel, echo,
                history + new, store_it, "reasoning.encrypted_content" in include, namespaces)
