"""Progress on stderr (rich): the whole conversion and the shard being written, with bytes/s and ETA."""

from __future__ import annotations

import shutil
from pathlib import Path

from glm_mlx.progress import TransferBars


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def free_bytes(path: Path) -> int:
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


class Bars(TransferBars):
    """A bar for the whole conversion and one for the shard being written (disabled: no output)."""

    def __init__(self, enabled: bool, total: int, done: int, label: str):
        super().__init__(enabled, total, done, f"convert {label}")

    def start(self, name: str, size: int, header: int):
        self.progress.advance(self.total, header)  # a shard's header bytes count as written at once
        return super().start(name, size, header)
