"""Progress on stderr (rich): the whole conversion and the shard being written, with bytes/s and ETA."""

from __future__ import annotations

import shutil
from pathlib import Path


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


class Bars:
    """A bar for the whole conversion and one for the shard being written (disabled: no output)."""

    def __init__(self, enabled: bool, total: int, done: int, label: str):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn())
        self.progress = Progress(*columns, console=Console(stderr=True), disable=not enabled)
        self.total = self.progress.add_task(f"convert {label}", total=total, completed=done)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def log(self, message: str) -> None:
        if not self.progress.disable:
            self.progress.console.print(message, highlight=False, soft_wrap=True)

    def start(self, name: str, size: int, header: int):
        self.progress.advance(self.total, header)
        return self.progress.add_task(f"  {name}", total=size, completed=header)

    def advance(self, task, n: int) -> None:
        self.progress.advance(task, n)
        self.progress.advance(self.total, n)

    def finish(self, task) -> None:
        self.progress.remove_task(task)
