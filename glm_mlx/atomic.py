"""Atomic file writes: after a crash or power cut a path holds either its old or its new content.

The recipe is the POSIX one (temp file in the same folder, fsync it, rename over the target, fsync
the folder so the rename itself is durable). Every file this project writes for a user goes
through here; nothing else in the code renames or writes final files directly.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_dir(folder: str | Path) -> None:
    """Make renames and creations in `folder` durable. A no-op where folders cannot be opened (Windows)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (tmpfs on old kernels, FUSE) refuse fsync on folders
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def replace(tmp: str | Path, final: str | Path, synced: bool = False) -> None:
    """Rename a fully written `tmp` over `final` durably (`synced`: the caller already fsynced `tmp`)."""
    if not synced:
        fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary user files
        replace(tmp, path, synced=True)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")
