"""A conversation: messages, thinking mode, and a prompt cache reused across turns.

No terminal here (cli/chat.py draws it); the server reuses it per conversation too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from .generate import GenerationResponse, stream_generate
from .prompt_cache import PromptCache

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class Piece:
    kind: str  # "reasoning" or "answer"
    text: str


class _ThinkSplitter:
    """Streams text into reasoning (inside <think>...</think>) and answer pieces."""

    def __init__(self):
        self.buf, self.state = "", "start"  # start -> reasoning -> answer

    def push(self, text: str, final: bool = False) -> list[Piece]:
        self.buf += text
        out = []
        while self.buf:
            if self.state == "start":
                stripped = self.buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.buf, self.state = stripped[len(THINK_OPEN):], "reasoning"
                elif THINK_OPEN.startswith(stripped) and not final:
                    break  # could still become <think>
                else:
                    self.state = "answer"
            elif self.state == "reasoning":
                i = self.buf.find(THINK_CLOSE)
                if i >= 0:
                    if i:
                        out.append(Piece("reasoning", self.buf[:i]))
                    self.buf, self.state = self.buf[i + len(THINK_CLOSE):].lstrip("\n"), "answer"
                    continue
                keep = 0 if final else len(THINK_CLOSE) - 1  # hold a possible partial </think>
                if len(self.buf) > keep:
                    out.append(Piece("reasoning", self.buf[: len(self.buf) - keep]))
                    self.buf = self.buf[len(self.buf) - keep:]
                break
            else:
                out.append(Piece("answer", self.buf))
                self.buf = ""
        return out


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    system: str | None = None
    thinking: bool = False
    mtp: bool = True
    num_draft: int = 1
    gen_kwargs: dict = field(default_factory=dict)  # max_tokens, temp, top_p, seed, ...
    messages: list = field(default_factory=list)
    last: GenerationResponse | None = None

    def __post_init__(self):
        self.cache = PromptCache.fresh(self.model, mtp=self.mtp)

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def send(self, text: str) -> Iterator[Piece]:
        """Stream the reply to `text`. Reasoning is yielded but never fed back into the history."""
        self.messages.append({"role": "user", "content": text})
        splitter, answer = _ThinkSplitter(), []
        try:
            for r in stream_generate(self.model, self.tokenizer, self.conversation(), prompt_cache=self.cache,
                                     mtp=self.mtp, num_draft=self.num_draft, enable_thinking=self.thinking,
                                     **self.gen_kwargs):
                self.last = r
                for piece in splitter.push(r.text, final=r.finish_reason is not None):
                    if piece.kind == "answer":
                        answer.append(piece.text)
                    yield piece
        finally:  # also on Ctrl-C: keep what the user saw of the answer
            self.messages.append({"role": "assistant", "content": "".join(answer).strip()})

    def reset(self):
        self.messages.clear()
        self.cache = PromptCache.fresh(self.model, mtp=self.mtp)

    def save(self, path):
        self.cache.save(path, extra={"messages": self.messages, "system": self.system})

    def load(self, path):
        self.cache = PromptCache.load(path, self.model, mtp=self.mtp)
        self.messages = list(self.cache.extra.get("messages", []))
        self.system = self.cache.extra.get("system")
