"""One sequence in a batch: what the batch engine, its MTP passes and its joint prefill all read and
write. Its own module so each of them imports it, and none imports the others for its types."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..generation.engine import Engine, StepStats
from ..generation.prompt_cache import PromptCache


@dataclass
class Sequence:
    key: object
    prompt: list[int]
    pc: PromptCache
    engine: Engine  # this sequence's sampler, logprobs setting, MTP and prefill settings
    max_tokens: int
    generated: list[int] = field(default_factory=list)
    stats: StepStats = field(default_factory=StepStats)
    chunks: object = None  # the prefill generator while prefilling (or rejoining)
    solo: object = None  # the MTP generator while decoding alone
    started: float = 0.0  # when its first token came
    chunk: int | None = None  # its engine's own prefill chunk (the budget may shrink it for a step)
    # A pipelined plain pass's token for this sequence, computed but not read yet: (the pass's tokens [B]
    # on the device, this sequence's row, its logprobs [1, 1+2n] or None). Its cache holds `tokens`.
    unread: tuple | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def prefilling(self) -> bool:
        return self.chunks is not None
