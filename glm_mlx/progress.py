"""Transfer progress on stderr (rich): an overall bar (bytes, bytes/s, ETA) and one line per file
in flight. Shared by downloads (hub.py) and conversions (quantize/progress.py)."""

from __future__ import annotations


class TransferBars:
    """A total bar and one line per file in flight; `enabled=False` prints nothing."""

    def __init__(self, enabled: bool, total: int, done: int, label: str):
        from rich import progress as rp
        from rich.console import Console

        columns = (rp.TextColumn("{task.description}"), rp.BarColumn(), rp.DownloadColumn(),
                   rp.TransferSpeedColumn(), rp.TextColumn("ETA"), rp.TimeRemainingColumn())
        self.progress = rp.Progress(*columns, console=Console(stderr=True), disable=not enabled)
        self.total, self.size = self.progress.add_task(label, total=total, completed=done), total

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def log(self, message: str) -> None:
        if not self.progress.disable:
            self.progress.console.print(message, highlight=False, soft_wrap=True)

    def start(self, name: str, size: int, have: int):
        return self.progress.add_task(f"  {name}", total=size, completed=have)

    def advance(self, task, n: int) -> None:
        self.progress.advance(task, n)
        self.progress.advance(self.total, n)

    def finish(self, task) -> None:
        self.progress.remove_task(task)

    def complete(self) -> None:
        self.progress.update(self.total, completed=self.size)
