"""Per-layer caches for GLM-MoE-DSA.

Each decoder layer caches its compressed latent KV (kv_lora_rank latent + qk_rope_head_dim rope
key, a single "head" shared by all heads: that is what MLA saves) and, only on layers with their
own indexer, the indexer keys (index_head_dim per token). Shared-indexer layers (GLM-5.2) reuse
an earlier layer's top-k and keep no indexer keys.

Why not mlx-lm's KVCache/CacheList: those report the bytes of their whole pre-allocated buffer
and need a values tensor for every cache; here `nbytes` must be the bytes held for the cached
tokens (the planner's analytic figure), and the indexer cache has keys only. Growth follows
mlx-lm's KVCache (256-token steps) so decode does not reallocate every token.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache


class _GrowingBuffer:
    """A [B, 1, T, D] array that grows along T in fixed steps (like mlx-lm's KVCache)."""

    step = 256

    def __init__(self):
        self.data: mx.array | None = None

    def write(self, offset: int, x: mx.array) -> mx.array:
        """Write x ([B, 1, L, D]) at [offset, offset+L) and return the valid prefix [B, 1, offset+L, D]."""
        end = offset + x.shape[2]
        if self.data is None or end > self.data.shape[2]:
            B, H, _, D = x.shape
            grown = mx.zeros((B, H, -(-end // self.step) * self.step, D), x.dtype)
            if self.data is not None and offset:
                grown[..., :offset, :] = self.data[..., :offset, :]
            self.data = grown
        self.data[..., offset:end, :] = x
        return self.data[..., :end, :]

    def valid(self, n: int) -> mx.array:
        return self.data[..., :n, :]

    def bytes_for(self, n: int) -> int:
        if self.data is None or n == 0:
            return 0
        return n * self.data.shape[0] * self.data.shape[1] * self.data.shape[3] * self.data.dtype.size

    @property
    def reserved_bytes(self) -> int:
        return 0 if self.data is None else self.data.nbytes


class DSACache(_BaseCache):
    """One layer's cache: latent KV + rope key, and indexer keys when the layer has an indexer."""

    def __init__(self, has_indexer: bool):
        self.has_indexer = has_indexer
        self.offset = 0
        self._latent = _GrowingBuffer()
        self._rope = _GrowingBuffer()
        self._index = _GrowingBuffer() if has_indexer else None

    # Attention writes its latents first, then the indexer writes its keys, for the same tokens.
    def update_latent(self, latent: mx.array, k_pe: mx.array) -> tuple[mx.array, mx.array]:
        """Append [B,1,L,kv_lora] latents and [B,1,L,rope] keys; return the full cached arrays."""
        lat = self._latent.write(self.offset, latent)
        pe = self._rope.write(self.offset, k_pe)
        self.offset += latent.shape[2]
        return lat, pe

    def update_index(self, keys: mx.array) -> mx.array:
        """Append [B,1,L,index_head_dim] indexer keys for the tokens just added by update_latent."""
        return self._index.write(self.offset - keys.shape[2], keys)

    # --- mlx-lm cache protocol ---------------------------------------------------------------
    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.offset == 0

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        """Bytes held for the cached tokens (what the planner predicts per token)."""
        total = self._latent.bytes_for(self.offset) + self._rope.bytes_for(self.offset)
        if self._index is not None:
            total += self._index.bytes_for(self.offset)
        return total

    @property
    def reserved_nbytes(self) -> int:
        """Bytes actually allocated (rounded up to the 256-token growth step)."""
        bufs = [self._latent, self._rope] + ([self._index] if self._index is not None else [])
        return sum(b.reserved_bytes for b in bufs)

    @property
    def state(self):
        arrays = [self._latent.valid(self.offset), self._rope.valid(self.offset)]
        if self._index is not None:
            arrays.append(self._index.valid(self.offset))
        return arrays if self.offset else []

    @state.setter
    def state(self, arrays):
        self._latent.data, self._rope.data = arrays[0], arrays[1]
        if self._index is not None:
            self._index.data = arrays[2]
        self.offset = arrays[0].shape[2]

    @property
    def meta_state(self):
        return str(int(self.has_indexer))

    @meta_state.setter
    def meta_state(self, v):
        self.has_indexer = bool(int(v))
