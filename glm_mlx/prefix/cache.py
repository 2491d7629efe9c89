"""Block prefix cache: reuse the longest cached prefix of any prompt, from RAM or from an SSD
directory that survives restarts.

Coding agents resend a whole conversation (often 100K tokens) every turn; re-prefilling it costs
minutes. Here cache state is stored in fixed blocks of `block_size` tokens keyed by a hash chain
(root = sha256(identity), key_j = sha256(key_{j-1} || block j's token ids as little-endian int32)),
so a request reuses the longest cached prefix of its prompt at block granularity, whatever
conversation wrote it - a prompt that is a prefix of an earlier prompt + reply included.

What a block holds. Block j covers positions s = jB .. e = (j+1)B:
  * every main layer's cache `state` rows [s, e) (latent, rope key, indexer keys where the layer
    has them; 8-bit indexer keys are one packed uint32 array);
  * the MTP cache's slots [max(s-1, 0), e-1): slot i pairs h_i with token i+1, so slot s-1 pairs
    h_{s-1} with this block's first token - determined by the chain, like the rest;
  * with recurrent layers (GLM-5.3-Flash's KDA, prefix/convert.py), their states after e-1 tokens - in
    every `state_every`-th block (j+1 a multiple of it) and in the last full block of each saved prompt
    only: a state is as large as the whole sequence's recurrent cache (141 MiB for GLM-5.3-Flash, 34
    blocks of its DSA rows). A hit for such a model ends at the deepest matched block carrying them
    (SGLang's MambaRadixCache: the deepest node whose mamba value is not a tombstone); the rest is
    prefilled. The default state_every is the vLLM hybrid cache's rule (an attention page at least as
    large as a mamba state): the fewest blocks whose DSA rows weigh as much as one state, so states take
    at most as many bytes per cached token as the rows (see `default_state_every`).
Restoring k blocks gives a PromptCache holding kB-1 tokens (the main caches' last row trimmed,
as PromptCache.reuse leaves at least one token to process), MTP slots [0, kB-1), nothing pending:
the engine invariant holds (mtp_cache.offset == len(tokens)) and its next `_forward` recomputes
position kB-1 and writes that slot. No hidden state is stored. k blocks are usable for a prompt iff
kB <= len(prompt).

Tiers. The RAM tier keeps blocks as numpy arrays (see `Block`), bounded by `memory_bytes`; the
least recently used spill to the SSD tier in `disk_dir` (glm_mlx.prefix.store: one safetensors file
per block, written atomically by a background thread), bounded by `disk_bytes` (least recently used
files deleted). Recency ties (blocks touched by the same call) evict the deepest block first, so a
chain loses its tail before its head and no cached block is orphaned behind a missing parent.

Threading: every MLX call (slicing, evaluating, converting, building the restored caches) happens
in the calling thread (the server's worker, which owns all MLX arrays). The writer and the disk
readers only ever see numpy arrays and bytes. Call a PrefixCache from one thread.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .convert import build_cache, layer_names, slice_blocks, with_states
from .store import FORMAT, Block, DiskEntry, DiskStore, stamp
from .block_file import default_cache_dir as default_cache_dir  # noqa: F401 - public here: the serve CLI's --cache-dir default
from ..generation.prompt_cache import PromptCache


class PrefixCache:
    """Block prefix cache (see the module docstring).

    identity: names the weights (e.g. repo@revision + quantization); the store appends what else
    decides the cache contents (MTP on/off, layer count, index cache bits, KV cache bits, dtype). Blocks of
    another identity or block size are never served, nor touched on disk.
    memory_bytes: RAM tier bound (blocks waiting for the disk writer count too: when the disk
    lags, `save` waits for it rather than exceed the bound).
    disk_dir / disk_bytes: the SSD tier (off when disk_dir is None or disk_bytes <= 0); disk_bytes is
    capped at start to what the disk has room for (one warning; `disk_limit` is what is used).
    write_through: queue every new block for the disk at once (survives a crash), not only on
    spill / close.
    state_every: with recurrent layers, every how many blocks one carries their states (None: the
    model's default_state_every; the last full block of a saved prompt always does). Blocks of any
    spacing are served alike (a restart with another one reads the old files).
    """

    def __init__(self, model, *, identity: str, block_size: int = 256, mtp: bool, memory_bytes: int,
                 disk_dir: str | Path | None = None, disk_bytes: int = 0, log=None,
                 write_through: bool = False, read_threads: int = 4, state_every: int | None = None):
        if block_size < 2:
            raise ValueError(f"block_size={block_size}: must be >= 2")
        self.model = model
        self.block_size = int(block_size)
        self.mtp = bool(mtp and getattr(model, "has_mtp", False))
        self.memory_bytes = max(int(memory_bytes), 0)
        self.disk_limit = max(int(disk_bytes), 0)
        self.write_through = write_through
        self.log = log if log is not None else (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.identity = self._full_identity(model, identity, self.mtp)
        self.root = hashlib.sha256(self.identity.encode()).digest()

        # Layout: which arrays a block holds, as a fresh cache tells (2 + has_indexer rows per DSA layer,
        # conv + recurrent state per recurrent layer: see convert.py).
        fresh = PromptCache.fresh(model, mtp=self.mtp)
        self._names = [layer_names(c, i) for i, c in enumerate(fresh.cache)]
        states = [n for c, ns in zip(fresh.cache, self._names) if c.block_layout == "boundary" for n in ns]
        self.recurrent = bool(states)  # blocks carry boundary states: a hit ends at one that does
        self.state_every = max(int(state_every or default_state_every(model, self.block_size, self.mtp)), 1)
        self._mtp_names = ([f"mtp.{j}" for j in range(2 + fresh.mtp_cache.has_indexer)]
                           if fresh.mtp_cache is not None else [])

        self._cond = threading.Condition()  # guards everything below that the writer touches
        self._mem: dict[bytes, Block] = {}
        self._mem_bytes = 0
        self._last_tick = 0.0
        self._closed = False
        self._counters = {k: 0 for k in ("lookups", "hits", "hit_tokens", "ram_blocks_read", "disk_blocks_read",
                                          "blocks_saved", "blocks_written", "blocks_spilled", "ram_dropped",
                                          "disk_evicted", "write_errors", "disk_full_skipped")}

        self.disk_dir = Path(disk_dir).expanduser() if disk_dir is not None and self.disk_limit > 0 else None
        self._store = None
        if self.disk_dir is not None:
            self._store = DiskStore(self.disk_dir, self.disk_limit, root=self.root, identity=self.identity,
                                    block_size=self.block_size,
                                    layer_names=[n for ns in self._names for n in ns if n not in states], state_names=states,
                                    mtp_names=self._mtp_names, cond=self._cond, counters=self._counters,
                                    log=self.log, release=self._written, read_threads=max(1, read_threads))
            self.disk_limit = self._store.limit  # (capped to what the disk has room for)
        # the disk index (the store's own dict, changed under self._cond); empty without a disk tier
        self._disk: dict[bytes, DiskEntry] = self._store.entries if self._store is not None else {}

    # --- identity and keys ---------------------------------------------------------------
    @staticmethod
    def _full_identity(model, identity: str, mtp: bool) -> str:
        parts = [FORMAT, f"identity={identity}", f"mtp={int(mtp)}"]
        args = getattr(model, "args", None)
        if args is not None:
            parts.append(f"layers={getattr(args, 'num_hidden_layers', '?')}")
            parts.append(f"index_cache_bits={getattr(args, 'index_cache_bits', None) or 0}")
            kv_bits = getattr(args, "kv_cache_bits", None)
            if kv_bits:  # (absent when off, so unquantized blocks saved before this option stay valid)
                parts.append(f"kv_cache_bits={kv_bits}/g{args.kv_cache_group_size}")
        try:
            parts.append(f"dtype={str(model.model.norm.weight.dtype).rsplit('.', 1)[-1]}")
        except AttributeError:
            pass
        return "\n".join(parts)

    def _keys(self, tokens, nblocks: int) -> list[bytes]:
        B = self.block_size
        ids = np.asarray(tokens[: nblocks * B], dtype="<i4")
        keys, key = [], self.root
        for j in range(nblocks):
            key = hashlib.sha256(key + ids[j * B : (j + 1) * B].tobytes()).digest()
            keys.append(key)
        return keys

    def _now(self) -> float:
        self._last_tick = max(time.time(), self._last_tick + 1e-6)
        return self._last_tick

    def _cached_chain(self, prompt) -> list[bytes]:
        """Keys of the longest cached block prefix of prompt that leaves >= 1 token to process (with
        recurrent layers: up to its deepest block that carries their states)."""
        out, usable = [], 0
        for key in self._keys(prompt, len(prompt) // self.block_size):
            b = self._mem.get(key) or self._disk.get(key)
            if b is None:
                break
            out.append(key)
            if b.state or not self.recurrent:
                usable = len(out)
        return out[:usable]

    def _sparse(self, j: int) -> bool:
        """Whether block j carries the recurrent states whatever follows it (every state_every-th)."""
        return (j + 1) % self.state_every == 0

    # --- public API ----------------------------------------------------------------------
    def lookup(self, prompt: list[int]) -> int:
        """Tokens (a multiple of block_size) of the longest cached prefix of prompt; k blocks count
        iff k * block_size <= len(prompt) (and, with recurrent layers, block k carries their states).
        `restore` then yields one token less."""
        with self._cond:
            return len(self._cached_chain(prompt)) * self.block_size

    def restore(self, prompt: list[int]) -> tuple[PromptCache | None, dict]:
        """A PromptCache holding the longest cached prefix of prompt minus one token (None when no
        block hits) and stats {"blocks", "tokens", "ram_tokens", "disk_tokens", "seconds"}. Disk
        blocks are read here (a few reader threads, numpy only) and promoted to RAM."""
        self._check_open()
        start = time.perf_counter()
        B = self.block_size
        stats = {"blocks": 0, "tokens": 0, "ram_tokens": 0, "disk_tokens": 0, "seconds": 0.0}
        with self._cond:
            self._counters["lookups"] += 1
            chain = self._cached_chain(prompt)
            sources = [self._mem.get(k) or self._disk[k] for k in chain]
        to_read = [s for s in sources if isinstance(s, DiskEntry)]
        read = self._store.read(to_read) if to_read else {}  # the chain ends at the first block that fails
        blocks = []
        for s in sources:
            b = s if isinstance(s, Block) else read.get(s.key)
            if b is None:
                break
            blocks.append(b)
        while self.recurrent and blocks and not blocks[-1].state:  # a read failed past the last state
            blocks.pop()
        if not blocks:
            stats["seconds"] = time.perf_counter() - start
            return None, stats
        k = len(blocks)
        tick = self._now()
        with self._cond:
            for b in blocks:
                if b.key in read:  # promote to RAM (it stays on disk too)
                    if b.key not in self._mem:
                        self._mem[b.key] = b
                        self._mem_bytes += b.nbytes
                else:
                    b.resident = True
                b.tick = tick
            self._touch_disk([b.key for b in blocks], tick)
            self._counters["hits"] += 1
            self._counters["hit_tokens"] += k * B - 1
            n_disk = sum(b.key in read for b in blocks)
            self._counters["disk_blocks_read"] += n_disk
            self._counters["ram_blocks_read"] += k - n_disk

        pc = self._build(blocks, prompt[: k * B - 1], prompt)
        self._enforce_ram()
        stats.update(blocks=k, tokens=k * B - 1, ram_tokens=(k - n_disk) * B, disk_tokens=n_disk * B,
                     seconds=time.perf_counter() - start)
        return pc, stats

    def save(self, pc: PromptCache) -> int:
        """Store every complete block of pc not stored yet (also of a partly prefilled prompt: whatever
        the caches hold consistently with pc.tokens); return how many blocks were added."""
        self._check_open()
        if (pc.mtp_cache is not None) != self.mtp:
            raise ValueError(f"this prefix cache is {'with' if self.mtp else 'without'} MTP, the prompt cache "
                             f"{'with' if pc.mtp_cache is not None else 'without'}")
        if len(pc.cache) != len(self._names):
            raise ValueError(f"prompt cache has {len(pc.cache)} layers, the prefix cache {len(self._names)}")
        B = self.block_size
        n = min([len(pc.tokens)] + [c.offset for c in pc.cache])
        if pc.mtp_cache is not None:
            n = min(n, pc.mtp_cache.offset + 1)  # block j needs MTP slots up to e-2
        keys = self._keys(pc.tokens, n // B)
        tick = self._now()
        with self._cond:
            new = [j for j, key in enumerate(keys) if key not in self._mem and key not in self._disk]
            for key in keys:
                b = self._mem.get(key)
                if b is not None:
                    b.tick, b.resident = tick, True
            self._touch_disk(keys, tick)
        if not new:
            self._forget_boundaries(pc, keys)
            return 0
        # (recurrent layers: the blocks that carry their states, where the prompt cache kept them)
        states = with_states(pc, [j for j in new if self._sparse(j) or j == len(keys) - 1], B) if self.recurrent else set()
        blocks = slice_blocks(pc, self._names, self._mtp_names, new, keys, self.root, B, tick, states)
        with self._cond:
            for b in blocks:
                self._mem[b.key] = b
                self._mem_bytes += b.nbytes
                if self.write_through and self._store is not None:
                    self._store.put(b)
            self._counters["blocks_saved"] += len(blocks)
        self._forget_boundaries(pc, keys)
        self._enforce_ram()
        return len(blocks)

    def track(self, pc: PromptCache, prompt: list[int] | None = None):
        """Have pc's recurrent layers keep their states at the block boundaries (where a restore of whole
        blocks ends) of the blocks `save` gives them: every state_every-th, and the last full block of
        `prompt` (the prompt pc is about to prefill), plus the latest ones decoding passes; a no-op on caches
        whose rows are their state. A prefill of N tokens so holds N // (state_every*B) + 1 states."""
        B = self.block_size
        pin = (len(prompt) // B) * B - 1 if prompt is not None and len(prompt) >= B else None
        for c in pc.cache:
            c.keep_boundaries(B, B - 1, sparse=self.state_every, pin=pin)

    def _forget_boundaries(self, pc: PromptCache, stored: list[bytes]):
        """Boundary states of blocks stored (or saved now) are not needed again: their memory goes."""
        with self._cond:
            held = 0
            for key in stored:
                if key not in self._mem and key not in self._disk:
                    break
                held += 1
        for c in pc.cache:
            if c.block_layout == "boundary" and held:
                c.forget_boundaries(held * self.block_size - 1)

    def flush(self):
        """Wait until the writer has written everything queued so far."""
        if self._store is not None:
            self._store.flush()

    def close(self, persist: bool = True):
        """Stop the writer; with persist (and a disk tier) first write the RAM blocks not on disk yet,
        so a restart finds them (within disk_bytes: the least recently used go first)."""
        if self._closed:
            return
        if self._store is not None:
            if persist and self._store.writing:
                with self._cond:
                    for b in sorted(self._mem.values(), key=stamp, reverse=True):
                        if b.resident and not b.queued and b.key not in self._disk:
                            self._store.put(b)
            self._store.close()
        with self._cond:
            self._mem.clear()
            self._mem_bytes = 0
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def ram_bytes(self) -> int:
        """Bytes of blocks held in memory (RAM tier + blocks waiting for the writer)."""
        return self._mem_bytes

    def disk_bytes_used(self) -> int:
        return self._store.used if self._store is not None else 0

    def stats(self) -> dict:
        with self._cond:
            return dict(self._counters, block_size=self.block_size, state_every=self.state_every if self.recurrent else None,
                        ram_blocks=sum(b.resident for b in self._mem.values()),
                        ram_state_blocks=sum(b.resident and b.state for b in self._mem.values()),
                        queued_blocks=sum(b.queued for b in self._mem.values()),
                        ram_bytes=self._mem_bytes, memory_bytes=self.memory_bytes,
                        disk_blocks=len(self._disk), disk_bytes=self.disk_bytes_used(), disk_limit=self.disk_limit,
                        disk_full=self._store is not None and self._store.full_since is not None,
                        disk_dir=str(self.disk_dir) if self.disk_dir else None)

    def _build(self, blocks: list[Block], tokens: list[int], prompt: list[int]) -> PromptCache:
        pc = PromptCache.fresh(self.model, mtp=self.mtp)
        build_cache(pc, blocks, self._names, self._mtp_names, self.block_size)
        pc.tokens = list(tokens)
        pc.pending = None
        self.track(pc, prompt)
        assert all(c.offset == len(tokens) for c in pc.all_caches()), "restored caches out of step"
        return pc

    # --- RAM tier ------------------------------------------------------------------------
    def _enforce_ram(self):
        """Spill (or drop) the least recently used blocks until the RAM bound holds; when only
        blocks waiting for the writer remain over it, wait for the writer."""
        with self._cond:
            if self._mem_bytes <= self.memory_bytes:
                return
            for b in sorted((b for b in self._mem.values() if b.resident), key=stamp):
                if self._mem_bytes <= self.memory_bytes:
                    break
                b.resident = False
                if b.queued:
                    continue  # the writer frees it
                if self._store is not None and b.key not in self._disk:
                    self._counters["blocks_spilled"] += 1
                    self._store.put(b)
                else:
                    self._drop_mem(b)
                    self._counters["ram_dropped"] += 1
            while self._mem_bytes > self.memory_bytes and self._store is not None and self._store.writing:
                self._cond.wait(1.0)

    def _drop_mem(self, b: Block):
        if self._mem.get(b.key) is b:
            del self._mem[b.key]
            self._mem_bytes -= b.nbytes

    def _touch_disk(self, keys, tick: float):
        """(Under the lock.) Mark disk blocks used now (their files keep it across restarts)."""
        if self._store is not None:
            self._store.touch(keys, tick)

    def _written(self, b: Block):
        """(Under the lock; writer thread.) The writer is done with b: a spilled block leaves RAM now."""
        if not b.resident:
            self._drop_mem(b)

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this PrefixCache is closed")


def default_state_every(model, block_size: int, mtp: bool) -> int:
    """Every how many blocks one carries the recurrent states, by default: the fewest blocks whose rows (the
    DSA layers' latent and indexer rows, the MTP layer's with MTP: what a block holds per token) weigh at
    least one state of all recurrent layers, so states add at most the rows' bytes per cached token (vLLM's
    hybrid rule: its attention block grows until a page holds as much as a mamba state). GLM-5.3-Flash
    (bfloat16): 141 MiB of state, 4.5 MiB of rows per 256-token block with MTP (4.1 without): 32 blocks
    (35). 1 for a model without recurrent layers."""
    a = getattr(model, "args", None)
    if not hasattr(a, "kda_state_bytes"):
        return 1
    try:
        d = model.model.norm.weight.dtype.size
    except AttributeError:
        d = 2
    layers = [i for i in range(a.num_hidden_layers) if a.is_indexed(i)]
    layers += [a.num_hidden_layers] if mtp and a.num_nextn_predict_layers else []
    rows = block_size * sum(a.kv_lora_rank * d + (2 * a.index_head_dim * d if a.has_indexer(i) else 0) for i in layers)
    return max(1, -(-a.kda_state_bytes(d) // max(rows, 1)))
