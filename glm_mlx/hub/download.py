"""Hugging Face Hub access: list a repo's files, check disk space, download resumably, find cached models.

Everything goes through huggingface_hub and its cache (or a folder the user names). One gap is filled here:
huggingface_hub 2.x does not resume a file across runs (each transfer goes to a process-unique temporary file,
deleted on failure), which for 5 GB weight shards means an interruption throws away up to 8 x 5 GB. So the LFS
files (the weights) are fetched here first, into a stable `<etag>.incomplete` file that the next run continues
with an HTTP Range request, and then renamed to where huggingface_hub expects them; `snapshot_download`
finishes the job (small files, refs, snapshot links; for `local_dir` it checks each weight's sha256).
Remote file names, etags and the commit id become paths on disk, so all are checked first (`check_repo_path`,
`check_etag`): a repo serving `../x` or an etag `../..` is refused whole, before a byte is written.
"""

from __future__ import annotations

import contextlib
import glob
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import httpx2
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from ..disk import check_writable, fmt_bytes, free_bytes
from .remote_paths import _COMMIT, UnsafeRepoError, _join, check_etag, check_repo_path  # noqa: F401 - re-exported
from ..errors import CheckpointError, GlmMlxError
from .transfer import HubError, _Entry, _fetch_weight, _head, _Layout, _Quiet, _size
from ..progress import TransferBars


class DiskSpaceError(GlmMlxError):
    """Not enough free disk space for what is left to download."""


class ModelNotFoundError(CheckpointError):
    """Neither a local model folder nor a repo present in the local Hugging Face cache."""


class RepoFile(NamedTuple):
    path: str
    size: int


@dataclass
class DownloadResult:
    path: Path
    files: int
    bytes: int


@dataclass
class DownloadPlan:
    """What a download would fetch (`--dry-run`): each file's size and the bytes of it already on disk."""

    repo_id: str
    commit: str
    path: Path  # where the files land: the local dir, or the cache's snapshot folder
    files: list[tuple[str, int, int]]  # (path, size, bytes already on disk)
    free: int  # free bytes on the disk that holds them

    @property
    def bytes(self) -> int:
        return sum(f[1] for f in self.files)

    @property
    def have(self) -> int:
        return sum(f[2] for f in self.files)

    @property
    def needed(self) -> int:
        return self.bytes - self.have

    @property
    def fits(self) -> bool:
        return self.needed <= self.free


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None):
    """Turn huggingface_hub / network exceptions into one-line HubErrors with a hint."""
    rev = revision or "main"
    try:
        yield
    except GatedRepoError as e:  # before RepositoryNotFoundError: it is a subclass
        raise HubError(
            f"{repo_id} is a gated repository and this account has no access to it",
            hint=f"Accept its terms on {constants.ENDPOINT}/{repo_id}, then log in (`hf auth login` or set HF_TOKEN)"
            " and re-run.",
        ) from e
    except RepositoryNotFoundError as e:
        raise HubError(
            f"repository not found on the Hub: {repo_id}",
            hint="Check the repo id (owner/name). For a private repo, log in with `hf auth login` or set HF_TOKEN.",
        ) from e
    except RevisionNotFoundError as e:
        raise HubError(f"revision '{rev}' not found in {repo_id}",
                       hint="Pass a branch, tag or commit that exists (default: main).") from e
    except RemoteEntryNotFoundError as e:
        raise HubError(f"a file listed in {repo_id}@{rev} is missing on the Hub ({e.response.url})",
                       hint="The repo may have changed while downloading; re-run to fetch its current state.") from e
    except HFValidationError as e:
        raise HubError(f"not a valid repo id: {repo_id!r}", hint="Use the form owner/name: zai-org/GLM-5.1.") from e
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, httpx2.ConnectError, httpx2.TimeoutException) as e:
        raise HubError(
            f"cannot reach the Hub at {constants.ENDPOINT}",
            hint="Check the network (or HF_ENDPOINT, HF_HUB_OFFLINE, proxy settings), then re-run: downloads resume.",
        ) from e
    except httpx2.TransportError as e:  # connection dropped mid-transfer after huggingface_hub's own retries
        raise HubError(f"download interrupted: {e}") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        detail = f" ({e.server_message})" if e.server_message else ""
        auth = status in (401, 403)
        hint = "Check your token (`hf auth login` or HF_TOKEN) and its access to this repo." if auth else None
        raise HubError(f"the Hub answered HTTP {status} for {repo_id}{detail}", hint=hint) from e
    except OSError as e:
        if "Consistency check failed" in str(e):  # a transfer ended with the wrong size
            raise HubError(f"download of {repo_id} ended early or with the wrong size") from e
        raise


def _listing(repo_id: str, revision: str | None, include, exclude, token: str | None = None,
             files: Sequence[str] | None = None) -> tuple[str, list[_Entry]]:
    """(commit sha, selected files) from one model_info call, filtered like snapshot_download filters.

    `files`: only these (exact repo paths; a folder name selects the files under it), each of which must exist;
    include/exclude then filter them further."""
    with hub_errors(repo_id, revision):
        info = HfApi(token=token).model_info(repo_id, revision=revision, files_metadata=True)
    if not isinstance(info.sha, str) or not _COMMIT.fullmatch(info.sha):
        raise UnsafeRepoError(f"{repo_id} serves an unsafe commit id {info.sha!r} (not a 40-digit sha1);"
                              " refusing the download")
    entries = {}
    for s in info.siblings or []:
        # Every file, before the include/exclude filter: a repo serving one unsafe name is refused as a whole.
        check_repo_path(repo_id, s.rfilename)
        size, etag = (s.lfs.size, s.lfs.sha256) if s.lfs else (s.size or 0, s.blob_id or "")
        etag = check_etag(repo_id, s.rfilename, etag)
        entries[s.rfilename] = _Entry(s.rfilename, size, etag, s.lfs is not None)
    include, exclude = list(include or []), list(exclude or [])
    rev = revision or "main"
    named = entries
    if files:
        named = {}
        for name in files:
            folder = name.rstrip("/") + "/"
            hits = [p for p in entries if p == name or p.startswith(folder)]
            if not hits:
                raise HubError(f"no file {name!r} in {repo_id}@{rev}",
                               hint=f"See the file list at {constants.ENDPOINT}/{repo_id}/tree/{rev}.")
            named.update((p, entries[p]) for p in hits)
    keep = set(filter_repo_objects(named, allow_patterns=include or None, ignore_patterns=exclude or None))
    if not keep:
        what = " ".join([*(f"--include {p}" for p in include), *(f"--exclude {p}" for p in exclude)])
        raise HubError(f"no files in {repo_id}@{rev} match {what or 'the request'}",
                       hint=f"See the file list at {constants.ENDPOINT}/{repo_id}/tree/{rev} and adjust the patterns.")
    return info.sha, [e for p, e in entries.items() if p in keep]


def repo_files(repo_id: str, revision: str | None = None, include=None, exclude=None, token: str | None = None,
               files: Sequence[str] | None = None) -> list[RepoFile]:
    """The repo's files as (path, size), after include/exclude globs (huggingface_hub's allow/ignore_patterns)."""
    return [RepoFile(e.path, e.size) for e in _listing(repo_id, revision, include, exclude, token, files)[1]]


def check_disk(files: Iterable[Sequence], target_dir: str | Path, done: int | None = None) -> int:
    """Refuse (DiskSpaceError, with the numbers) unless target_dir's disk holds what is left of `files`.

    `files` are (path, size) pairs; `done` is how many of their bytes are already on disk (finished or partial
    files), which need no new space. By default it counts files already at `target_dir/path`. Returns the bytes
    still needed.
    """
    files = list(files)
    total = sum(f[1] for f in files)
    if done is None:
        done = sum(min(f[1], _size(Path(target_dir, f[0]))) for f in files)
    needed, free = max(total - done, 0), free_bytes(target_dir)
    if needed > free:
        check_writable(target_dir)  # read-only, /proc-like or a file: say so, not "0 B free"
        raise DiskSpaceError(
            f"not enough disk space in {target_dir}: need {fmt_bytes(needed)} more, only {fmt_bytes(free)} free "
            f"({fmt_bytes(total)} in total, {fmt_bytes(done)} already downloaded)",
            hint=f"Free at least {fmt_bytes(needed - free)}, or download to another disk with --local-dir/--dir DIR"
            " or --cache-dir DIR (or set HF_HUB_CACHE).",
        )
    return needed


def _wait_all(futures) -> None:
    """Wait for the futures, raising the first failure."""
    pending = set(futures)
    while pending:  # short waits: the main thread must stay free to take Ctrl-C
        finished, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
        for fut in finished:
            fut.result()


def _prepare(repo_id, revision, include, exclude, local_dir, cache_dir, token, files):
    commit, entries = _listing(repo_id, revision, include, exclude, token, files)
    layout = _Layout(repo_id, commit, Path(local_dir).expanduser().absolute() if local_dir else None, cache_dir, token)
    return commit, entries, layout, {e.path: layout.done_bytes(e) for e in entries}


def plan_download(repo_id: str, revision: str | None = None, include=None, exclude=None,
                  local_dir: str | Path | None = None, *, cache_dir: str | Path | None = None,
                  token: str | None = None, files: Sequence[str] | None = None) -> DownloadPlan:
    """What `download_repo` with these arguments would fetch, from the listing alone: writes nothing."""
    commit, entries, layout, done = _prepare(repo_id, revision, include, exclude, local_dir, cache_dir, token, files)
    path = layout.local_dir or layout.storage / "snapshots" / commit
    return DownloadPlan(repo_id, commit, path, [(e.path, e.size, done[e.path]) for e in entries], free_bytes(layout.target))


def download_repo(repo_id: str, revision: str | None = None, include=None, exclude=None,
                  local_dir: str | Path | None = None, progress: bool = True,
                  max_workers: int = 8, *, cache_dir: str | Path | None = None, token: str | None = None,
                  files: Sequence[str] | None = None) -> DownloadResult:
    """`download`, also returning how many files and bytes the selection holds (for `--json`).

    `cache_dir`: another Hugging Face cache than HF_HUB_CACHE; `token`: instead of the logged-in one;
    `files`: only these repo paths (a folder selects what is under it), as `hf download REPO FILE...`."""
    include, exclude = list(include or []) or None, list(exclude or []) or None
    commit, entries, layout, done = _prepare(repo_id, revision, include, exclude, local_dir, cache_dir, token, files)
    total, have = sum(e.size for e in entries), sum(done.values())
    check_disk(entries, layout.target, done=have)
    todo = [e for e in entries if e.lfs and done[e.path] < e.size]
    cancel = threading.Event()
    with TransferBars(progress, total, have, f"{repo_id}@{commit[:8]}") as bars, hub_errors(repo_id, revision):
        bars.log(f"Downloading {repo_id}@{commit[:8]}: {len(entries)} files, {fmt_bytes(total)}"
                 f" ({fmt_bytes(have)} already here) -> {layout.target}")
        if todo:
            pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="glm-mlx-download")
            try:
                # All HEADs first: an unsafe etag then stops the run before any transfer has written a byte.
                heads = [pool.submit(_head, repo_id, e, layout) for e in todo]
                _wait_all(heads)
                _wait_all([pool.submit(_fetch_weight, repo_id, e, layout, bars, cancel, *h.result())
                           for e, h in zip(todo, heads, strict=True)])
            except BaseException:
                cancel.set()  # stop the other transfers at their next chunk; partial files stay for the next run
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        # Weights are in place: huggingface_hub links them into the snapshot and fetches the small files.
        if files:  # exactly the selected files (escaped: a name is not a pattern)
            include, exclude = [glob.escape(e.path) for e in entries], None
        path = snapshot_download(repo_id, revision=revision, local_dir=layout.local_dir, allow_patterns=include,
                                 ignore_patterns=exclude, max_workers=max_workers, tqdm_class=_Quiet,
                                 cache_dir=str(layout.cache) if cache_dir else None, token=token)
        bars.complete()
    return DownloadResult(Path(path), len(entries), total)


def download(repo_id: str, revision: str | None = None, include=None, exclude=None,
             local_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Download a model repo from the Hub; return its local folder.

    Files go to the Hugging Face cache (HF_HUB_CACHE) unless `local_dir` is given. Free disk space is checked
    against the files' sizes first (DiskSpaceError with the numbers). Interrupted? Call again: finished files
    are skipped and partial weight files continue where they stopped. Progress (bytes/s, ETA) goes to stderr.
    """
    return download_repo(repo_id, revision, include, exclude, local_dir, progress).path


def _looks_like_repo_id(s: str) -> bool:
    if s.startswith((".", "/", "~")) or s.count("/") > 1:
        return False
    try:
        validate_repo_id(s)
    except HFValidationError:
        return False
    return True


def resolve_model_path(path_or_repo: str | Path) -> Path:
    """A local model folder: an existing folder as is, else a repo id looked up in the local cache (offline)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if path.exists():
        raise ModelNotFoundError(f"{name} is a file, not a checkpoint folder",
                                 hint="Pass the folder holding config.json and the *.safetensors files.")
    if not _looks_like_repo_id(name):
        raise ModelNotFoundError(f"no checkpoint folder at {name}", hint="Check the path, or pass a Hub repo id"
                                 " (owner/name) fetched with `glm-mlx download REPO`.")
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except IncompleteSnapshotError as e:  # fetched with --include: the loader says what is missing, if anything
        return Path(e.snapshot_path)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise ModelNotFoundError(
            f"{name} is not a local folder and not in the Hugging Face cache ({constants.HF_HUB_CACHE})",
            hint=f"Download it first: glm-mlx download {name}",
        ) from e
