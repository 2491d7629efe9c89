"""SSD tier of the block prefix cache (glm_mlx.prefix.cache): one safetensors file per block, in a
directory that survives restarts.

A file `<key hex>.safetensors` holds one block's arrays (bfloat16 ones as their uint16 bits, named
in the "raw_dtypes" metadata) and metadata naming the format, root, identity, block size, key,
parent key, depth and the block's token ids: enough to validate it from its header alone (the key
is sha256(parent || tokens), the arrays match this model's layers). The header also holds an
xxh3_128 checksum of the arrays (names, dtypes, shapes and bytes), verified when the block is read
back: a block whose data went bad on disk is dropped and its prefix recomputed, never served.
Format glm-mlx-prefix/2 (/1 had no checksum: its files count as other models' and are left alone).

Writes go through one background thread, atomically (temp file `.<key>.<pid>.tmp` + fsync + rename
+ directory fsync), bounded by `limit` bytes (capped at start to what the disk has room for): the least recently used files are deleted (recency ties: the deepest
first, so a chain loses its tail before its head). A file's mtime is its last use, so the order
survives restarts; at start the index is rebuilt from the files' safetensors headers alone, and
temp files left by a writer that is gone (a kill -9 mid-write) are removed. A full disk (ENOSPC)
pauses the writes: one warning, then the next write after _FULL_RETRY_S seconds tries again (when
the disk says it has room for it).

Threading: the writer and the reader threads only ever see numpy arrays and bytes, never MLX. The
index and the counters change under the PrefixCache's lock, shared with the store, so both tiers
are seen consistent.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .. import atomic
from ..disk import fmt_bytes
from .block_file import (CHECKSUM_KEY, FORMAT, SUFFIX, Block, DiskEntry, _Corrupt, _Damaged, _Foreign,  # noqa: F401
                         _LIB_TMP, _OPEN, _OPEN_LOCK, _OUR_TMP, _pid_alive, _read_header, _write_file, check_block,
                         checksum, default_cache_dir, stamp)

_STALE_TMP_S = 3600.0  # a temp file this old is a leftover whoever wrote it (a write takes seconds)
# `.<key>.<pid>.tmp`: ours; `.tmpXXXXXX`: safetensors' own save_file temp (glm-mlx-prefix/1 wrote through it)
_FULL_RETRY_S = 30.0  # after ENOSPC, writes are skipped this long, then the next one tries again
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_KEEP_FREE = 10 * 10**9  # the disk limit leaves min(5% of the disk, this) free


class DiskStore:
    """The block files in `directory`: their index (`entries`, key -> DiskEntry; `used` bytes),
    reader threads and writer thread.

    root / identity / block_size: whose blocks these are (other files are never served nor touched).
    layer_names / mtp_names: the arrays a block holds (B rows each; MTP ones B-1 at depth 0); state_names:
    recurrent layers' states at the block's end (prefix/convert.py), whatever their shape: all or none of
    them in a block (DiskEntry.state says which).
    cond / counters: the PrefixCache's lock and counters; `entries` changes only under the lock.
    release(block): called under the lock when the writer is done with a block.
    """

    def __init__(self, directory: Path, limit: int, *, root: bytes, identity: str, block_size: int,
                 layer_names: list[str], mtp_names: list[str], cond: threading.Condition, counters: dict,
                 log, release, read_threads: int, state_names: tuple = ()):
        self.dir = directory
        self.limit = limit
        self.root = root
        self.identity = identity
        self.block_size = block_size
        self._layer_names = layer_names
        self._state_names = list(state_names)  # recurrent layers' boundary states: no token rows
        self._mtp_names = mtp_names
        self._cond = cond
        self._counters = counters
        self.log = log
        self._release = release
        self._read_threads = read_threads
        self._pool = None
        self.entries: dict[bytes, DiskEntry] = {}
        self.used = 0
        self.full_since: float | None = None  # monotonic time of the ENOSPC that paused the writes
        self._retry_at = 0.0

        self.dir.mkdir(parents=True, exist_ok=True)
        self._key = str(self.dir.resolve())
        with _OPEN_LOCK:
            self._siblings = _OPEN.get(self._key, 0)  # other stores of this process on this directory
            _OPEN[self._key] = self._siblings + 1
        try:
            self._scan()
            self._fit_limit()
            with self._cond:
                self._evict(0, None)
        except BaseException:
            self._unregister()
            raise
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._writer_loop, name="glm-mlx-prefix-writer", daemon=True)
        self._writer.start()

    # --- used by the PrefixCache ---------------------------------------------------------
    @property
    def writing(self) -> bool:
        return self._writer.is_alive()

    def put(self, b: Block):
        """(Under the lock.) Hand b to the writer."""
        b.queued = True
        self._queue.put(b)

    def touch(self, keys, tick: float):
        """(Under the lock.) Mark disk blocks used now; the file's mtime keeps it across restarts."""
        for key in keys:
            e = self.entries.get(key)
            if e is not None:
                e.tick = tick
                try:
                    os.utime(e.path, (tick, tick))
                except OSError:
                    pass

    def read(self, chain: list[DiskEntry]) -> dict[bytes, Block]:
        """Read the blocks of chain (a few reader threads, numpy only). The result ends at the first
        block that fails: its file is dropped, and so is the chain from there on."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._read_threads, thread_name_prefix="glm-mlx-prefix-read")
        futures = {e.key: self._pool.submit(self._read_block, e) for e in chain}
        read: dict[bytes, Block] = {}
        for e in chain:  # in chain order
            try:
                read[e.key] = futures[e.key].result()
            except _Damaged:
                self._forget(e, f"block file {e.path} is damaged (its data do not match their checksum); "
                                f"removed, that prefix is recomputed")
                break
            except Exception as err:  # noqa: BLE001 - a bad or vanished file is a miss from there on
                self._forget(e, f"cannot read {e.path.name} ({type(err).__name__}: {err}); dropped")
                break
        return read

    def flush(self):
        """Wait until the writer has written everything queued so far."""
        if not self._writer.is_alive():
            return
        done = threading.Event()
        self._queue.put(done)
        done.wait()

    def close(self):
        """Write what is queued, then stop the writer and the readers."""
        if self._writer.is_alive():
            self.flush()
            self._queue.put(None)
            self._writer.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._unregister()

    def _unregister(self):
        with _OPEN_LOCK:
            if self._key in _OPEN:
                _OPEN[self._key] -= 1
                if _OPEN[self._key] <= 0:
                    del _OPEN[self._key]
            self._key = ""

    # --- file format and validation ------------------------------------------------------
    def _path(self, key: bytes) -> Path:
        return self.dir / f"{key.hex()}{SUFFIX}"

    def _meta(self, b: Block) -> dict[str, str]:
        B = self.block_size
        return {"format": FORMAT, "root": self.root.hex(), "identity": self.identity, "block_size": str(B),
                "key": b.key.hex(), "parent": b.parent.hex(), "depth": str(b.depth),
                "tokens_end": str((b.depth + 1) * B), "tokens": json.dumps(b.tokens.tolist()),
                "raw_dtypes": json.dumps(b.raw), CHECKSUM_KEY: checksum(b.arrays)}

    def _check(self, path: Path, meta: dict, tensors: dict, size: int | None) -> tuple[bytes, int, np.ndarray, bool]:
        """Validate one of our block files (raises _Foreign / _Corrupt); return (key, depth, tokens, state)."""
        return check_block(path, meta, tensors, size, root=self.root, block_size=self.block_size,
                           layer_names=self._layer_names, mtp_names=self._mtp_names, state_names=self._state_names)

    # --- startup scan --------------------------------------------------------------------
    def _scan(self):
        """Rebuild the disk index from the files' headers. Unreadable files and other models' or
        block sizes' files are left alone (one warning line each / in all); ours that fail
        validation are removed."""
        foreign, first_foreign = 0, None
        for path in sorted(self.dir.iterdir()):
            name = path.name
            if name.startswith(".tmp") or (name.startswith(".") and name.endswith(".tmp")):
                self._remove_leftover_tmp(path)  # (counted nowhere: not ours to report)
                continue
            if not name.endswith(SUFFIX) or not path.is_file():
                continue
            try:
                meta, tensors, size = _read_header(path)
            except (_Corrupt, OSError) as err:
                self.log(f"prefix cache: ignoring unreadable file {path} ({err or type(err).__name__})")
                continue
            try:
                key, depth, _, state = self._check(path, meta, tensors, size)
            except _Foreign:
                foreign += 1
                first_foreign = first_foreign or name
                continue
            except (_Corrupt, OSError) as err:  # its header names our identity: ours, so it goes
                self.log(f"prefix cache: removing corrupt block file {path} ({err or type(err).__name__})")
                self._unlink(path)
                continue
            st = path.stat()
            self.entries[key] = DiskEntry(key, path, st.st_size, depth, st.st_mtime, state)
            self.used += st.st_size
        if foreign:
            self.log(f"prefix cache: ignoring {foreign} file(s) of other models or block sizes in {self.dir} "
                     f"(e.g. {first_foreign}; older cache formats than {FORMAT} count as other models')")

    def _remove_leftover_tmp(self, path: Path):
        """Remove a temp file whose writer is gone (a crash or kill -9 mid-write), whatever its age; one
        whose writer may still be writing stays unless older than an hour. Ours are `.<key>.<pid>.tmp`:
        the writer is gone when that pid runs no process, or it is this process's pid and no other store
        of this process has the directory open (a reused pid). Another process running under that pid
        (a reused pid, or another PID namespace sharing the directory) keeps the file an hour: the
        worst an error here costs is one block's write, never a bad file, since a rename of a vanished
        temp file fails. safetensors' own `.tmpXXXXXX` names say nothing of their writer: the hour."""
        name = path.name
        m = _OUR_TMP.fullmatch(name)
        if m is None and not _LIB_TMP.fullmatch(name):
            return
        try:
            if m is not None:
                pid = int(m.group(1))
                gone = (not self._siblings) if pid == os.getpid() else not _pid_alive(pid)
                if gone:
                    self._unlink(path)
                    return
            if time.time() - path.stat().st_mtime >= _STALE_TMP_S:
                self._unlink(path)
        except OSError:
            pass

    def _fit_limit(self):
        """Cap the limit to what the disk can hold: our files plus its free space, less what is kept
        free (5% of the disk, at most 10 GB). One warning when it is capped."""
        try:
            du = shutil.disk_usage(self.dir)
        except OSError:
            return
        keep = min(du.total // 20, _KEEP_FREE)
        room = self.used + max(du.free - keep, 0)
        if self.limit <= room:
            return
        self.log(f"prefix cache: the disk limit (--cache-disk) {fmt_bytes(self.limit)} is more than the disk holding "
                 f"{self.dir} has room for ({fmt_bytes(du.free)} free + {fmt_bytes(self.used)} of cached blocks, "
                 f"keeping {fmt_bytes(keep)} free); using {fmt_bytes(room)}"
                 + ("" if room else ": the SSD tier is off"))
        self.limit = room

    @staticmethod
    def _unlink(path: Path):
        try:
            path.unlink()
        except OSError:  # gone already, or cannot be removed: either way nothing more to do
            pass

    # --- eviction ------------------------------------------------------------------------
    def _evict(self, need: int, newer_than) -> bool:
        """(Under the lock.) Delete least recently used files until `need` more bytes fit; only files
        older than `newer_than` (a stamp) when given. False if they cannot be made to fit."""
        if self.used + need <= self.limit:
            return True
        for e in sorted(self.entries.values(), key=stamp):
            if newer_than is not None and stamp(e) >= newer_than:
                break
            del self.entries[e.key]
            self.used -= e.size
            self._unlink(e.path)
            self._counters["disk_evicted"] += 1
            if self.used + need <= self.limit:
                return True
        return self.used + need <= self.limit

    def _forget(self, e: DiskEntry, why: str):
        self.log(f"prefix cache: {why}")
        with self._cond:
            if self.entries.get(e.key) is e:  # (else the writer evicted it already)
                del self.entries[e.key]
                self.used -= e.size
                self._unlink(e.path)

    # --- reader and writer threads (numpy and files only) --------------------------------
    def _read_block(self, e: DiskEntry) -> Block:
        """(Reader thread.)"""
        from safetensors import safe_open

        with safe_open(str(e.path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        key, depth, tokens, _ = self._check(e.path, meta, arrays, None)
        if key != e.key:
            raise _Corrupt("key changed")
        if checksum(arrays) != meta[CHECKSUM_KEY]:
            raise _Damaged()
        return Block(key=key, parent=bytes.fromhex(meta["parent"]), depth=depth, tokens=tokens, arrays=arrays,
                     raw=json.loads(meta.get("raw_dtypes", "{}")), tick=e.tick)

    def _writer_loop(self):
        """(Writer thread.)"""
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                if self._paused(item):
                    with self._cond:
                        self._counters["disk_full_skipped"] += 1
                    continue
                self._write(item)
                if self.full_since is not None:
                    self.full_since = None
                    self.log(f"prefix cache: the disk holding {self.dir} has room again; blocks are written again")
            except OSError as err:
                with self._cond:
                    self._counters["write_errors"] += 1
                if err.errno not in _FULL_ERRNOS:
                    self.log(f"prefix cache: cannot write block {item.key.hex()[:16]} ({type(err).__name__}: {err})")
                    continue
                self._retry_at = time.monotonic() + _FULL_RETRY_S
                if self.full_since is None:
                    self.full_since = time.monotonic()
                    self.log(f"prefix cache: the disk holding {self.dir} is full ({err.strerror or err}); the SSD tier "
                             f"is paused: blocks stay in RAM only, and writes resume when the disk has room again "
                             f"(tried every {_FULL_RETRY_S:g} s)")
            except Exception as err:  # noqa: BLE001 - a failed write loses one block, not the server
                with self._cond:
                    self._counters["write_errors"] += 1
                self.log(f"prefix cache: cannot write block {item.key.hex()[:16]} ({type(err).__name__}: {err})")
            finally:
                with self._cond:
                    item.queued = False
                    self._release(item)
                    self._cond.notify_all()

    def _paused(self, b: Block) -> bool:
        """(Writer thread.) Whether b is skipped because the disk was full: until the retry time, and
        after it while the disk says it has no room for b (checked again every _FULL_RETRY_S)."""
        if self.full_since is None or time.monotonic() < self._retry_at:
            return self.full_since is not None
        try:
            free = shutil.disk_usage(self.dir).free
        except OSError:
            free = 0
        if free < 2 * b.nbytes + (1 << 20):
            self._retry_at = time.monotonic() + _FULL_RETRY_S
            return True
        return False

    def _write(self, b: Block):
        from safetensors.numpy import save

        with self._cond:
            if b.key in self.entries or b.nbytes > self.limit:  # (its file is larger still)
                return
        path = self._path(b.key)
        tmp = self.dir / f".{b.key.hex()}.{os.getpid()}.tmp"
        try:
            # serialized here and written by us (not save_file): its own temp file would be one more
            # leftover to clean, and its I/O errors are not OSErrors (ENOSPC could not be told apart)
            data = save(b.arrays, metadata=self._meta(b))
            _write_file(tmp, data)
            size = len(data)
            del data
            with self._cond:
                if b.key in self.entries or size > self.limit or not self._evict(size, stamp(b)):
                    return
                os.replace(tmp, path)
                try:
                    os.utime(path, (b.tick, b.tick))
                except OSError:
                    pass
                self.entries[b.key] = DiskEntry(b.key, path, size, b.depth, b.tick, b.state)
                self.used += size
                self._counters["blocks_written"] += 1
            atomic.fsync_dir(self.dir)
        finally:
            if tmp.exists():
                self._unlink(tmp)

