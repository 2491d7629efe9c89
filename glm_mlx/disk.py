"""Disk space in the units the Hub shows, and why a folder cannot take files. The space checks (download, convert) ask before they report "not enough
disk space": a read-only mount or /proc says "0 B free", which hides the real cause."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from glm_mlx.errors import GlmMlxError


class OutputPathError(GlmMlxError):
    """Nothing can be written at the output path, whatever the free space."""

    hint = "Choose an output folder on a writable disk."


def fmt_bytes(n: float) -> str:
    """Decimal units, as the Hub shows sizes: 1.40 TB, 5.37 GB, 312.5 kB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def free_bytes(path: str | Path) -> int:
    """Free space on the disk that holds `path` (or its nearest existing parent)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_writable(path: str | Path) -> None:
    """Raise OutputPathError when nothing can be written at `path` (or its nearest existing parent): a file
    where a folder should be, a read-only mount, a pseudo file system with no storage (/proc, /sys), or a
    folder without write permission. Returns quietly otherwise."""
    target = Path(path).expanduser().absolute()
    p = target
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise OutputPathError(f"{p} is a file, not a folder" + ("" if p == target else f", so {target} cannot be written"),
                              "Choose another output path, or remove the file.")
    st = os.statvfs(p)
    if st.f_flag & os.ST_RDONLY:
        raise OutputPathError(f"{target} is on a read-only file system")
    if st.f_blocks == 0:  # proc, sysfs and the like report no storage at all
        raise OutputPathError(f"{target} is on a pseudo file system with no storage (like /proc or /sys)")
    if not os.access(p, os.W_OK):
        raise OutputPathError(f"no permission to write in {p}", "Choose a folder you can write to, or fix its permissions.")
