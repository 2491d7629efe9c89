"""Remote names that become paths on disk: checked before anything is written (glm_mlx.hub.download).

A repo that lists `../x.safetensors`, an absolute path, or an etag of `../..` would otherwise place files
outside the download folder or the cache.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import GlmMlxError


class UnsafeRepoError(GlmMlxError):
    """The repo lists a file name, etag or commit that would put a file outside the download folder or cache."""

    hint = ("The repository serves an unsafe file name or blob id (a hostile or broken repo), so nothing was"
            " downloaded. Do not use it; report it to its owner or to the Hub.")


# Remote names become paths on disk, so they are checked before anything is written (issue #15). A file path must
# be a plain relative POSIX path: non-empty, '/'-separated components that are each non-empty and not '.' or '..'
# (so no leading '/', no '//', no trailing '/'), no backslash (a separator on Windows), no NUL or other control
# character (NUL cuts C paths; newlines forge log lines), no drive prefix like 'C:' in any component (Windows
# reads 'C:x' as drive-relative). Joined to a folder it must then still lie under that folder (`_join`).
_BAD_CHAR = re.compile(r"[\x00-\x1f\x7f\\]")
_DRIVE = re.compile(r"[A-Za-z]:")
# An etag names a blob file: after huggingface_hub's normalisation (drop a `W/` prefix and the quotes), it must be
# a git blob sha1 (regular files) or a sha256 (LFS files): 40 or 64 hex digits, nothing else.
_ETAG = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")
_COMMIT = re.compile(r"[0-9a-fA-F]{40}")  # a git commit sha1: the snapshot folder's name


def _path_problem(path: str) -> str | None:
    """Why `path` is not a safe relative repo path, or None if it is (the rules above)."""
    if not isinstance(path, str) or not path:
        return "an empty name"
    if _BAD_CHAR.search(path):
        return "a backslash or control character"
    if path.startswith("/"):
        return "an absolute path"
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return f"a {part!r} path component" if part else "an empty path component"
        if _DRIVE.match(part):
            return "a drive prefix"
    return None


def check_repo_path(repo_id: str, path: str) -> str:
    """`path` as is if it is a safe relative repo file path, else UnsafeRepoError naming it."""
    problem = _path_problem(path)
    if problem:
        raise UnsafeRepoError(f"{repo_id} serves an unsafe file path {path!r} ({problem}); refusing the download")
    return path


def check_etag(repo_id: str, path: str, etag: str | None) -> str:
    """The normalised etag of `path` if it is a sha1/sha256 hex digest, else UnsafeRepoError naming it."""
    norm = etag.removeprefix("W/").strip('"') if isinstance(etag, str) else ""
    if not _ETAG.fullmatch(norm):
        raise UnsafeRepoError(f"{repo_id} serves an unsafe etag {etag!r} for {path!r} (not a sha1 or sha256 hex"
                              " digest); refusing the download")
    return norm


def _join(repo_id: str, root: Path, path: str) -> Path:
    """root / path, refused unless it stays under root (lexically: a user's own symlinks there are theirs)."""
    check_repo_path(repo_id, path)
    base = os.path.normpath(root)
    joined = os.path.normpath(os.path.join(base, path))
    if os.path.commonpath([base, joined]) != base or joined == base:  # the rules above should make this unreachable
        raise UnsafeRepoError(f"{repo_id} serves an unsafe file path {path!r} (outside {root}); refusing the download")
    return Path(root, path)  # not the normpath: 'link/..' in a user's --dir means what the OS says it means
