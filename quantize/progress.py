"""Progress on stderr (rich): the whole conversion and the shard being written, with bytes/s and ETA."""

from __future__ import annotations

from glm_mlx.progress import TransferBars


class Bars(TransferBars):
    """A bar for the whole conversion and one for the shard being written (disabled: no output)."""

    def __init__(self, enabled: bool, total: int, done: int, label: str):
        super().__init__(enabled, total, done, f"convert {label}")

    def start(self, name: str, size: int, header: int):
        self.progress.advance(self.total, header)  # a shard's header bytes count as written at once
        return super().start(name, size, header)
