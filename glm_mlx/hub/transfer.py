"""One weight file's resumable transfer (hub.py says why it is not huggingface_hub's): where it lands
(the HF cache's blob or a local_dir), its `<etag>.incomplete` file and lock, the HEAD that names its
blob, and the GET that continues it, stopping at its next chunk when the run is cancelled.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import NamedTuple

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.file_download import http_get, repo_folder_name
from huggingface_hub.utils import WeakFileLock, build_hf_headers
from tqdm.auto import tqdm

from .. import atomic
from ..disk import fmt_bytes
from ..errors import GlmMlxError
from ..progress import TransferBars
from .remote_paths import _join, check_etag

RESUME_HINT = "Re-run the same command: finished files and partial downloads are kept and it resumes."


class HubError(GlmMlxError):
    """The Hub refused or failed a request (missing repo, gated, network, interrupted transfer)."""

    hint = RESUME_HINT


class _Entry(NamedTuple):
    path: str
    size: int
    etag: str  # sha256 for LFS files, git blob id otherwise: the blob's name in the cache
    lfs: bool


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _Quiet(tqdm):
    """huggingface_hub's own bars off: progress is drawn by rich here."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


class _Cancelled(Exception):
    pass


class _Tracked:
    """The file http_get writes to: counts bytes for the progress bar and stops when the run is cancelled."""

    def __init__(self, fh, advance, cancel: threading.Event):
        self._fh, self._advance, self._cancel = fh, advance, cancel

    def write(self, chunk: bytes) -> int:
        if self._cancel.is_set():
            raise _Cancelled()
        n = self._fh.write(chunk)
        self._advance(len(chunk))
        return n

    def truncate(self, size=None) -> int:  # http_get restarts at 0 if a server ignores the Range header
        before = os.fstat(self._fh.fileno()).st_size
        after = self._fh.truncate(size)
        self._advance(after - before)
        return after

    def __getattr__(self, name):
        return getattr(self._fh, name)


class _Layout:
    """Where a weight file ends up and where its partial download lives, for the cache or a local_dir."""

    def __init__(self, repo_id: str, commit: str, local_dir: Path | None, cache_dir: str | Path | None = None,
                 token: str | None = None):
        self.repo_id = repo_id
        self.local_dir = local_dir
        self.cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser().absolute()
        self.headers = build_hf_headers(token=token)
        self.storage = self.cache / repo_folder_name(repo_id=repo_id, repo_type="model")
        self.commit = commit
        self.target = local_dir or self.cache  # the disk that must hold the download

    # Every path is built by _join, so even a name that slipped past the checks cannot leave its folder.
    def final(self, e: _Entry, etag: str) -> Path:
        if self.local_dir:
            return _join(self.repo_id, self.local_dir, e.path)
        return _join(self.repo_id, self.storage / "blobs", etag)

    def partial(self, etag: str) -> Path:
        if self.local_dir:
            return _join(self.repo_id, self.local_dir / ".cache" / "glm-mlx", f"{etag}.incomplete")
        return _join(self.repo_id, self.storage / "blobs", f"{etag}.incomplete")

    def lock(self, etag: str) -> Path:  # in the cache: the lock huggingface_hub itself takes for this blob
        if self.local_dir:
            return _join(self.repo_id, self.local_dir / ".cache" / "glm-mlx", f"{etag}.lock")
        return _join(self.repo_id, self.cache / ".locks" / self.storage.name, f"{etag}.lock")

    def done_bytes(self, e: _Entry) -> int:
        """Bytes of `e` already on disk: all of it when finished, the partial file's size otherwise."""
        if self.local_dir:
            final = self.final(e, e.etag)
            finished = final.is_file() and _size(final) == e.size
        else:
            snapshot = _join(self.repo_id, self.storage / "snapshots" / self.commit, e.path)
            blob = self.final(e, e.etag)
            finished = snapshot.exists() or blob.exists()
        if finished:
            return e.size
        return min(_size(self.partial(e.etag)), e.size) if e.lfs else 0


def _head(repo_id: str, e: _Entry, layout: _Layout) -> tuple[str, int]:
    """(etag, size) of one LFS file from a HEAD request; the etag, the blob's name, checked like the listing's."""
    meta = get_hf_file_metadata(hf_hub_url(repo_id, e.path, revision=layout.commit), headers=layout.headers)
    etag = check_etag(repo_id, e.path, meta.etag) if meta.etag else e.etag
    return etag, meta.size if meta.size is not None else e.size


def _fetch_weight(repo_id: str, e: _Entry, layout: _Layout, bars: TransferBars, cancel: threading.Event,
                  etag: str, size: int) -> None:
    """Download one LFS file (etag and size from `_head`) into its final place, continuing a partial file."""
    url = hf_hub_url(repo_id, e.path, revision=layout.commit)
    headers = layout.headers
    final, partial = layout.final(e, etag), layout.partial(etag)
    if final.is_file() and _size(final) == size:
        return
    partial.parent.mkdir(parents=True, exist_ok=True)
    layout.lock(etag).parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(str(layout.lock(etag))):  # another glm-mlx/hf process on the same blob waits here
        if final.is_file() and _size(final) == size:
            return
        have = _size(partial)
        if have > size:  # not a prefix of this file: start over
            partial.unlink()
            have = 0
        task = bars.start(e.path, size, have)
        try:
            # GET the /resolve URL, not the CDN location the HEAD saw: each (re)try then gets a freshly signed
            # redirect, which matters for hour-long shards; httpx drops the token when the redirect leaves the Hub.
            with open(partial, "ab") as fh:
                http_get(url, _Tracked(fh, lambda n: bars.advance(task, n), cancel), resume_size=have,
                         headers=headers, expected_size=size, displayed_filename=e.path, tqdm_class=_Quiet)
        finally:
            bars.finish(task)
        got = _size(partial)
        if got != size:
            partial.unlink()
            raise HubError(f"{e.path}: downloaded {fmt_bytes(got)}, expected {fmt_bytes(size)}")
        final.parent.mkdir(parents=True, exist_ok=True)
        atomic.replace(partial, final)  # fsyncs the data, then the folder: the rename survives a power cut
