"""Messages and tools through the chat template: the one place a request becomes prompt token ids.

Both APIs convert their messages to one internal form (OpenAI-style dicts, which is what GLM's
template iterates) and render here, so an OpenAI and an Anthropic conversation with the same
content produce the same tokens (and share prefix-cache hits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..generation.text import ends_in_thinking, render_chat
from .tokens import encode_prompt


class BadRequest(Exception):
    """A 400 (or `status`) naming the offending parameter; each API shapes it its own way."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass
class Prompt:
    ids: list[int]
    thinking: bool  # the prompt ends inside <think>: the output starts as reasoning
    forced: str  # text the prompt ends with on the model's behalf (a forced tool call's opening)
    parse_tools: bool  # tool markup in the output becomes tool calls


def tool_functions(tools: list[dict] | None) -> list[dict]:
    """OpenAI tools -> their function declarations (name, description, parameters)."""
    return [t["function"] if "function" in t else t for t in tools or []]


def parse_arguments(arguments, where: str) -> dict:
    """A tool call's arguments as a mapping: OpenAI clients send a JSON string, the template iterates a
    mapping (rendering the string character by character is a common bug in other servers)."""
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except json.JSONDecodeError:
            raise BadRequest(f"{where}: arguments are not valid JSON", where) from None
        if isinstance(value, dict):
            return value
    raise BadRequest(f"{where}: arguments must be a JSON object", where)


def check_unicode(text: str, param: str):
    """JSON may carry lone UTF-16 surrogates ("\\ud800"), which the tokenizer refuses with a TypeError: a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"'{param}' holds invalid Unicode (a lone surrogate)", param) from None


def render(tokenizer, messages: list[dict], *, tools: list[dict] | None, thinking: bool, clear_thinking: bool | None,
           forced: str = "", parse_tools: bool = True) -> Prompt:
    """Render with the checkpoint's own chat template (GLM-5.1's: tools block, tool calls, observations,
    thinking) and tokenize. `forced` is appended after the generation prompt (tool_choice)."""
    try:
        # The tools as OpenAI sends them ({"type": "function", "function": {...}}): what vLLM, mlx-lm and
        # transformers hand GLM's template, and what glm-mini was fine-tuned on.
        text = render_chat(tokenizer, messages, tools, enable_thinking=thinking,
                           clear_thinking=clear_thinking)
    except Exception as e:  # noqa: BLE001 - jinja raises many kinds for a message the template cannot render
        raise BadRequest(f"the chat template cannot render these messages: {e}", "messages") from None
    in_think = ends_in_thinking(text)
    if forced:
        if in_think:  # a forced call skips reasoning: close the block the template opened
            text, in_think = text + "</think>", False
        text += forced
    check_unicode(text, "messages")
    ids = encode_prompt(tokenizer, text)  # earlier turns' ids reused (tokens.py)
    return Prompt(ids=ids, thinking=in_think, forced=forced, parse_tools=parse_tools)


def forced_call(tool_choice, tools: list[dict] | None) -> tuple[str, bool, list[dict] | None]:
    """tool_choice -> (forced prefix, parse tools?, tools to render).

    none: tools are not shown and markup is not parsed; auto: the model decides; required: the answer
    starts with a tool call; a named function: the answer starts with a call to it. Every tool stays
    in the prompt (a turn that changes tool_choice keeps its prefix-cache hit).
    """
    if not tools:
        return "", False, None
    if tool_choice in (None, "auto"):
        return "", True, tools
    if tool_choice == "none":
        return "", False, None
    if tool_choice == "required":
        return "<tool_call>", True, tools
    name = tool_choice  # a function name
    chosen = [t for t in tools if tool_functions([t])[0].get("name") == name]
    if not chosen:
        raise BadRequest(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return f"<tool_call>{name}", True, tools
