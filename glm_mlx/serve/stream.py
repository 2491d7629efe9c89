"""What both APIs share between a parsed request and their wire format: the limits, the sampling
settings, and the job's events turned into reasoning / content / tool-call events."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..generation.sampling import SamplingParams
from .fields import Fields
from ..generation.output_parser import OutputParser
from .prompt import BadRequest, Prompt
from .worker import Delta, Failed, Finished, GenRequest


@dataclass
class ServerConfig:
    model_id: str
    context: int  # prompt + completion tokens a request may use
    max_tokens: int  # completion tokens when a request does not say
    vocab_size: int
    thinking: bool = True  # the default when a request does not say
    temperature: float = 1.0  # defaults when a request does not say (from generation_config.json)
    top_p: float = 1.0
    template_args: dict = field(default_factory=dict)  # --chat-template-args: defaults for chat_template_kwargs
    max_body: int = 32 * 1024 * 1024  # bytes
    max_depth: int = 64  # JSON nesting
    keepalive: float = 5.0  # seconds without an event before a stream sends a keep-alive (long prefills)


class PromptTooLong(BadRequest):
    """The prompt alone leaves no room for one token. Worded as Anthropic's API words it
    (`prompt is too long: N tokens > M maximum`), which agents recognise to compact their history;
    OpenAI clients look for the code `context_length_exceeded`."""

    def __init__(self, prompt_tokens: int, context: int):
        super().__init__(f"prompt is too long: {prompt_tokens} tokens > {context - 1} maximum (this server's "
                         f"context is {context} tokens, --context; one is kept for the answer)", "messages",
                         code="context_length_exceeded")


def completion_budget(cfg: ServerConfig, prompt_tokens: int, asked: int | None, param: str) -> int:
    """max_tokens for a prompt, cut to what the context leaves (agents ask a fixed budget, e.g. Claude
    Code's 32,000, whatever the prompt's length). A cut answer that runs out ends with reason "length"
    (`finish_reason: "length"`, `stop_reason: "max_tokens"`), never looking finished. A prompt that
    alone fills the context is refused before any prefill."""
    if prompt_tokens >= cfg.context:
        raise PromptTooLong(prompt_tokens, cfg.context)
    return min(cfg.max_tokens if asked is None else asked, cfg.context - prompt_tokens)


# Reasoning effort (OpenAI `reasoning_effort` / `reasoning.effort`, Anthropic `output_config.effort`):
# GLM's template has one switch (enable_thinking), so an effort is a thinking switch plus a cap on
# the reasoning's tokens, after which `</think>` is forced. None: no cap.
EFFORT_BUDGET = {"none": 0, "minimal": 0, "low": 1024, "medium": 4096, "high": None, "xhigh": None, "max": None}


def effort_budget(effort, param: str) -> tuple[bool, int | None]:
    """effort -> (thinking on, reasoning budget or None)."""
    if effort not in EFFORT_BUDGET:
        raise BadRequest(f"'{param}' must be one of {', '.join(EFFORT_BUDGET)}, got {effort!r}", param)
    budget = EFFORT_BUDGET[effort]
    return budget != 0, budget or None


def sampling(f: Fields, cfg: ServerConfig) -> SamplingParams:
    """The sampling parameters both APIs take (Anthropic's subset is a subset of these names)."""
    params = SamplingParams(
        temp=f.number("temperature", cfg.temperature, 0.0, 2.0),
        top_p=f.number("top_p", cfg.top_p, 0.0, 1.0),
        top_k=f.number("top_k", 0, 0, cfg.vocab_size, integer=True),
        min_p=f.number("min_p", 0.0, 0.0, 1.0),
        repetition_penalty=f.number("repetition_penalty", None, 0.0, 10.0),
        presence_penalty=f.number("presence_penalty", None, -2.0, 2.0),
        frequency_penalty=f.number("frequency_penalty", None, -2.0, 2.0),
        logit_bias=f.logit_bias("logit_bias", cfg.vocab_size),
        seed=f.number("seed", None, -(2 ** 63), 2 ** 64 - 1, integer=True),
    )
    if params.top_p == 0.0:
        params.top_p = 1.0  # 0 means "off" for some clients; top_p=0 would keep nothing
    if params.seed is not None:
        params.seed %= 2 ** 64  # mx.random.seed takes an unsigned 64-bit seed
    return params


def gen_request(prompt: Prompt, max_tokens: int, params: SamplingParams, stop: list[str],
                logprobs: int | None = None) -> GenRequest:
    return GenRequest(prompt=prompt.ids, max_tokens=max_tokens, sampling=params, stop=stop, logprobs=logprobs)


PING = object()  # the relay's keep-alive marker (stream.parsed turns it into a ("ping", None) item)


def parsed(events, prompt: Prompt, tools: list[dict] | None, parallel_tool_calls: bool = True):
    """Job events -> ("event", parsers.Event) / ("token", Delta) / ("end", Finished | Failed), in order.

    Every Delta is passed on (for logprobs and counting); its text goes through the GLM parser.
    Without parallel tool calls only the first call is passed on. PING from the relay (nothing
    happened for `ServerConfig.keepalive` seconds, e.g. a long prefill) becomes ("ping", None)."""
    parser = OutputParser(tools, thinking=prompt.thinking, parse_tools=prompt.parse_tools)
    calls = 0

    def keep(evs):
        nonlocal calls
        for e in evs:
            if e.kind == "tool_call":
                calls += 1
                if calls > 1 and not parallel_tool_calls:
                    continue
            yield "event", e

    yield from keep(parser.feed(prompt.forced))
    for ev in events:
        if ev is PING:
            yield "ping", None
        elif isinstance(ev, Delta):
            yield "token", ev
            yield from keep(parser.feed(ev.text))
        else:
            if isinstance(ev, Finished):
                yield from keep(parser.finish())
            yield "end", ev
            return


def finish_kind(end: Finished | Failed, tool_calls: int) -> str:
    """One vocabulary for both APIs: stop, tool_calls, length, stop_sequence, cancelled, error."""
    if isinstance(end, Failed):
        return "error"
    if end.reason in ("stop", "stop_sequence") and tool_calls:
        return "tool_calls"
    return end.reason
