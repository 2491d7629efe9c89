"""Text generation: prompts (string, token ids or chat messages) in, text deltas out.

    from glm_mlx import load, generate
    model, tokenizer = load("path/to/model")
    print(generate(model, tokenizer, [{"role": "user", "content": "Hi!"}], max_tokens=64))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx

from .engine import Engine, StepStats
from .prompt_cache import PromptCache
from .sampling import SamplingParams


@dataclass
class GenerationResponse:
    text: str  # the new text since the previous response
    token: int | None
    finish_reason: str | None  # None, "stop" (eos or stop string) or "length"
    prompt_tokens: int
    reused_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    acceptance_rate: float  # MTP drafts accepted / drafted (0 without MTP)
    tokens_per_pass: float  # generated tokens per main-model decode pass
    logprobs: list | None = None  # with logprobs on: [chosen logprob, top ids..., top logprobs...]
    stop_sequence: str | None = None  # the stop string that ended generation, if one did


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None, **template_kwargs) -> str:
    """Chat messages (and tool declarations) as the checkpoint's chat template renders them, with the
    generation prompt. The one place messages become prompt text (the CLI, chat sessions and the server).
    None-valued keywords are left out, so the template's own defaults apply."""
    kwargs = {k: v for k, v in template_kwargs.items() if v is not None}
    return tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False,
                                         **kwargs)


def ends_in_thinking(prompt_text: str) -> bool:
    """Does the prompt leave the model inside a thinking block? (GLM-5.1 ends with <think> when thinking.)"""
    return prompt_text.rstrip().endswith("<think>")


def encode_prompt(tokenizer, prompt, enable_thinking: bool | None = None) -> list[int]:
    """str -> ids; list of ints -> as is; list of {"role","content"} -> rendered with the chat template."""
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        add = not (bos and prompt.startswith(bos))
        return list(tokenizer.encode(prompt, add_special_tokens=add))
    prompt = list(prompt)
    if prompt and isinstance(prompt[0], dict):
        text = render_chat(tokenizer, prompt, enable_thinking=enable_thinking)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return [int(t) for t in prompt]


class _StopStrings:
    """Holds back text that could still become a stop string; cuts at the first match."""

    def __init__(self, stops):
        self.stops = [s for s in (stops or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text, self.sent = "", 0

    def push(self, segment: str, final: bool) -> tuple[str, str | None]:
        """-> (text that is safe to emit, the stop string found or None)."""
        self.text += segment
        # Only the unsent tail (plus what a stop string can straddle) is searched: O(new text) per push.
        tail = max(0, self.sent - self.hold)
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, tail)) >= 0]
        if hits:
            i, s = min(hits)
            out, self.sent = self.text[self.sent : i], i
            return out, s
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : end], end
        return out, None


def stream_generate(model, tokenizer, prompt, *, max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
                    min_p: float = 0.0, top_k: int = 0, repetition_penalty: float | None = None,
                    seed: int | None = None, stop: list[str] | None = None, prompt_cache: PromptCache | None = None,
                    mtp: bool | None = None, num_draft: int = 1, prefill_step: int = 2048,
                    enable_thinking: bool | None = None) -> Iterator[GenerationResponse]:
    """Yield one GenerationResponse per generated token (the last one carries finish_reason)."""
    params = SamplingParams(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k,
                            repetition_penalty=repetition_penalty, seed=seed)
    engine = Engine(model, params, mtp=mtp, num_draft=num_draft, prefill_step=prefill_step)
    ids = encode_prompt(tokenizer, prompt, enable_thinking)
    yield from stream_text(engine, tokenizer, ids, max_tokens=max_tokens, stop=stop, prompt_cache=prompt_cache)


class TextStream:
    """One sequence's tokens as text: detokenized, cut at end-of-generation ids, stop strings and
    max_tokens. `push(token, count)` -> (text delta, finish_reason or None, stop string or None)."""

    def __init__(self, model, tokenizer, max_tokens: int, stop: list[str] | None = None):
        self.eos = set(model.args.eos_token_ids) | set(getattr(tokenizer, "eos_token_ids", None) or [])
        self.detok = tokenizer.detokenizer  # a fresh copy per call in mlx-lm's wrapper
        self.detok.reset()
        self.stops = _StopStrings(stop)
        self.max_tokens = max_tokens

    def push(self, token: int, count: int) -> tuple[str, str | None, str | None]:
        """token: the count-th generated token."""
        if token in self.eos:
            self.detok.finalize()
            text, _ = self.stops.push(self.detok.last_segment, final=True)
            return text, "stop", None
        self.detok.add_token(token)
        last = count >= self.max_tokens
        if last:
            self.detok.finalize()
        text, hit = self.stops.push(self.detok.last_segment, final=last)
        if hit is not None:
            return text, "stop", hit
        return text, "length" if last else None, None


def stream_text(engine: Engine, tokenizer, ids: list[int], *, max_tokens: int, stop: list[str] | None = None,
                prompt_cache: PromptCache | None = None) -> Iterator[GenerationResponse]:
    """An engine's tokens as text deltas: detokenized, cut at end-of-generation ids and stop strings."""
    stats = StepStats()
    text_stream = TextStream(engine.model, tokenizer, max_tokens, stop)
    mx.reset_peak_memory()

    def response(text, token, reason, stop_sequence=None):
        i = stats.generated - 1
        return GenerationResponse(
            text=text, token=token, finish_reason=reason, prompt_tokens=stats.prompt_tokens,
            reused_tokens=stats.reused_tokens,
            prompt_tps=stats.prompt_tokens / stats.prompt_time if stats.prompt_time else 0.0,
            generation_tokens=stats.generated,
            generation_tps=(stats.generated - 1) / stats.gen_time if stats.gen_time else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, acceptance_rate=stats.acceptance_rate,
            tokens_per_pass=stats.tokens_per_pass,
            logprobs=stats.logprobs[i] if 0 <= i < len(stats.logprobs) else None, stop_sequence=stop_sequence)

    tokens = engine.generate(ids, prompt_cache, max_tokens=max_tokens, stats=stats)
    try:
        for token in tokens:
            text, reason, hit = text_stream.push(token, stats.generated)
            yield response(text, token, reason, hit)
            if reason is not None:
                return
    finally:
        tokens.close()


def generate(model, tokenizer, prompt, **kwargs) -> str:
    """The whole response text (see stream_generate for the keywords)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
