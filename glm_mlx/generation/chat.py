"""A conversation: messages, thinking mode, and a prompt cache reused across turns.

No terminal here (cli/chat.py draws it); the server reuses it per conversation too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .text import GenerationResponse, ends_in_thinking, render_chat, stream_generate
from .prompt_cache import PromptCache
from .output_parser import OutputParser


@dataclass
class Piece:
    kind: str  # "reasoning" or "answer"
    text: str


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    system: str | None = None
    thinking: bool = False
    mtp: bool = True
    num_draft: int = 1
    gen_kwargs: dict = field(default_factory=dict)  # max_tokens, temp, top_p, seed, ...
    template_args: dict = field(default_factory=dict)  # chat template keywords (enable_thinking is `thinking`)
    messages: list = field(default_factory=list)
    last: GenerationResponse | None = None

    def __post_init__(self):
        self.cache = PromptCache.fresh(self.model, mtp=self.mtp)

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def send(self, text: str) -> Iterator[Piece]:
        """Stream the reply to `text`. Reasoning is yielded but never fed back into the history."""
        self.messages.append({"role": "user", "content": text})
        prompt = render_chat(self.tokenizer, self.conversation(), **{**self.template_args, "enable_thinking": self.thinking})
        ids = list(self.tokenizer.encode(prompt, add_special_tokens=False))
        # The same GLM output parser as the server (reasoning vs answer; tool markup stays text here).
        parser, answer = OutputParser(thinking=ends_in_thinking(prompt), parse_tools=False), []
        try:
            for r in stream_generate(self.model, self.tokenizer, ids, prompt_cache=self.cache,
                                     mtp=self.mtp, num_draft=self.num_draft, **self.gen_kwargs):
                self.last = r
                events = parser.feed(r.text) + (parser.finish() if r.finish_reason is not None else [])
                for e in events:
                    piece = Piece("reasoning" if e.kind == "reasoning" else "answer", e.text)
                    if piece.kind == "answer":
                        answer.append(piece.text)
                    yield piece
        finally:  # also on Ctrl-C: keep what the user saw of the answer
            self.messages.append({"role": "assistant", "content": "".join(answer).strip()})

    def reset(self):
        self.messages.clear()
        self.last = None  # /stats must not show the forgotten conversation's last answer
        self.cache = PromptCache.fresh(self.model, mtp=self.mtp)

    def save(self, path) -> Path:
        path = session_file(path)
        self.cache.save(path, extra={"messages": self.messages, "system": self.system})
        return path

    def load(self, path) -> Path:
        path = session_file(path, existing=True)
        self.cache = PromptCache.load(path, self.model, mtp=self.mtp)
        self.last = None
        self.messages = list(self.cache.extra.get("messages", []))
        self.system = self.cache.extra.get("system")
        return path


SUFFIX = ".safetensors"


def session_file(name, existing: bool = False) -> Path:
    """A saved conversation's file: `name` as given when it has a suffix (or, loading, exists as
    given), else `name.safetensors`, so `/save notes` and `/load notes` meet."""
    path = Path(name).expanduser()
    if path.suffix or (existing and path.is_file()):
        return path
    return path.with_name(path.name + SUFFIX)
