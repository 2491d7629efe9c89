"""One prefix-cache block file: its format (a safetensors file whose metadata name the format, the
cache's root and identity, the block's key, parent, depth and tokens, and an xxh3_128 checksum of its
arrays), its header read without its data, and the in-memory forms of a block (Block) and of a file
in the disk index (DiskEntry). The store (store.py) decides what to write, read, evict and trust."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

FORMAT = "glm-mlx-prefix/2"  # /2: the data checksum (CHECKSUM_KEY) in every file
SUFFIX = ".safetensors"
CHECKSUM_KEY = "data_xxh3_128"
_OUR_TMP = re.compile(r"\.[0-9a-f]{64}\.(\d+)\.tmp")
_LIB_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")
_MAX_HEADER = 64 << 20  # bytes: a larger safetensors header is not one of ours
# A recurrent layer's boundary state in a block: arrays `layer.<i>.conv` and `layer.<i>.recurrent` (prefix/
# convert.py). A block carries them for every recurrent layer or for none (prefix/cache.py: `state_every`).
STATE_ARRAYS = ("conv", "recurrent")


def is_state(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in STATE_ARRAYS


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """xxh3_128 (hex) of a block's arrays: each one's name, dtype and shape, then its bytes, in name order."""
    h = xxhash.xxh3_128()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _write_file(path: Path, data: bytes):
    """Write and fsync a new file (a full disk raises OSError ENOSPC here, from write or fsync)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(eq=False)
class Block:
    """A block in memory. Arrays are numpy (bfloat16 ones as their uint16 bits, named in `raw`):
    numpy arrays belong to no thread, so the writer takes them as they are (no second conversion
    when spilling, and write-through shares them); each block owns its bytes (no view pinning a
    whole cache buffer), so the RAM bound is exact; and they do not count against MLX's device
    memory limit, which the model and the live caches need. The price: one host copy (numpy ->
    MLX) on restore, small next to a prefill."""

    key: bytes
    parent: bytes
    depth: int
    tokens: np.ndarray  # int32 [B]
    arrays: dict[str, np.ndarray]
    raw: dict[str, str]  # array name -> MLX dtype stored as raw bits ("bfloat16" as uint16)
    tick: float
    resident: bool = True  # in the RAM tier (else kept only until the writer is done with it)
    queued: bool = False  # the writer holds it
    nbytes: int = field(init=False)
    state: bool = field(init=False)  # carries recurrent layers' boundary states (a hit may end here)

    def __post_init__(self):
        self.nbytes = sum(a.nbytes for a in self.arrays.values())
        self.state = any(is_state(n) for n in self.arrays)


@dataclass(eq=False)
class DiskEntry:
    key: bytes
    path: Path
    size: int
    depth: int
    tick: float
    state: bool = False  # as Block.state


def stamp(x: Block | DiskEntry) -> tuple:
    # least recently used first; among blocks touched together, the deepest first
    return (x.tick, -x.depth)


class _Corrupt(Exception):
    pass


class _Foreign(Exception):
    pass


class _Damaged(_Corrupt):
    """The arrays do not match the header's checksum."""


def _read_header(path: Path) -> tuple[dict, dict, int]:
    """(metadata, tensor entries, expected file size) from a safetensors header (no data read)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _Corrupt("shorter than a safetensors header")
        n = int.from_bytes(raw, "little")
        if n <= 0 or n > _MAX_HEADER:
            raise _Corrupt(f"header length {n}")
        body = f.read(n)
    if len(body) < n:
        raise _Corrupt("truncated header")
    try:
        hdr = json.loads(body)
    except ValueError:
        raise _Corrupt("header is not JSON") from None
    if not isinstance(hdr, dict):
        raise _Corrupt("header is not a JSON object")
    meta = hdr.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(t, dict) for t in hdr.values()):
        raise _Corrupt("bad header layout")
    try:
        end = max((int(t["data_offsets"][1]) for t in hdr.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise _Corrupt("bad tensor entry") from None
    return meta, hdr, 8 + n + end


def check_block(path: Path, meta: dict, tensors: dict, size: int | None, *, root: bytes, block_size: int,
                layer_names: list[str], mtp_names: list[str], state_names: list[str]) -> tuple[bytes, int, np.ndarray, bool]:
    """Validate a block file's header (metadata and tensor entries, or the arrays read) as one of this
    cache's (raises _Foreign when it is another model's or block size's, _Corrupt when it is ours and bad);
    return (key, depth, tokens, whether it carries the recurrent layers' states). Rows: B per layer array,
    MTP ones B-1 at depth 0; state arrays ([1, K-1, C] conv inputs, [1, H, Dv, Dk]): all of them or none."""
    if meta.get("format") != FORMAT or meta.get("root") != root.hex() or meta.get("block_size") != str(block_size):
        raise _Foreign()
    try:
        key, parent = bytes.fromhex(meta["key"]), bytes.fromhex(meta["parent"])
        depth = int(meta["depth"])
        tokens = np.asarray(json.loads(meta["tokens"]), dtype="<i4")
    except (KeyError, ValueError, TypeError, OverflowError):
        raise _Corrupt("bad metadata") from None
    if not re.fullmatch(r"[0-9a-f]{32}", str(meta.get(CHECKSUM_KEY, ""))):
        raise _Corrupt("no data checksum")
    if path.name != f"{meta['key']}{SUFFIX}" or tokens.shape != (block_size,) or depth < 0:
        raise _Corrupt("name, tokens or depth do not match")
    if hashlib.sha256(parent + tokens.tobytes()).digest() != key or (depth == 0) != (parent == root):
        raise _Corrupt("key does not match its parent and tokens")
    want = {n: block_size for n in layer_names}
    want.update({n: block_size - 1 if depth == 0 else block_size for n in mtp_names})
    state = bool(state_names) and state_names[0] in tensors
    if state:
        want.update({n: None for n in state_names})
    if set(tensors) != set(want):
        raise _Corrupt("arrays do not match this model's layers")
    for name, t in tensors.items():
        shape = t["shape"] if isinstance(t, dict) else list(t.shape)
        if want[name] is None:  # a boundary state
            if len(shape) not in (3, 4) or shape[0] != 1:
                raise _Corrupt(f"array {name} has shape {shape}")
        elif len(shape) != 4 or shape[2] != want[name]:
            raise _Corrupt(f"array {name} has shape {shape}")
    if size is not None and os.path.getsize(path) != size:
        raise _Corrupt("file size does not match its header (truncated?)")
    return key, depth, tokens, state


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs (True where it cannot be told: Windows, another user's process)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, someone else's
        return True
    return True


# Directories this process has a DiskStore open on (resolved path -> count): a temp file named with our
# own pid is a live write only while another store of ours writes there.
_OPEN: dict[str, int] = {}
_OPEN_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    """The per-user cache folder for prefix blocks (what platformdirs' user_cache_dir gives):
    `$XDG_CACHE_HOME/glm-mlx/prefix` when XDG_CACHE_HOME is set (absolute), else
    `~/Library/Caches/glm-mlx/prefix` on macOS, `%LOCALAPPDATA%\\glm-mlx\\prefix` on Windows,
    `~/.cache/glm-mlx/prefix` elsewhere."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        base = Path(xdg)
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path.home() / ".cache"
    return base / "glm-mlx" / "prefix"
