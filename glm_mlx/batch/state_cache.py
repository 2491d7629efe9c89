"""Batch caches for GLM-5.3-Flash's layers (model/glm5_next_cache.py), beside GLM-5.1's (cache.py).

BatchKDACache (KDA layers): the members' fixed-size states stacked per row, conv [B, K-1, C] and
recurrent [B, H, Dv, Dk]; the KDA layer runs them as one batch (it reads `conv`, `recurrent`, `cuts`
and calls `commit`, as on one sequence's KDACache). A multi-token pass (MTP verification: y + draft)
keeps its per-token states, so `trim(b, n)` rolls back row b alone, exactly. Each row's boundary
states (prefix-cache block ends) go into its own KDACache's `marks` as the row crosses them (`add_mark`
keeps the sparse ones, the pin and the latest few).
Joining and leaving copies one state per member (its size does not grow with the context).

BatchPooledCache (DSA layers): GLM-5.1's padded batch buffers (BatchLayerCache: latent rows and
indexer rows [key | gate]) plus each row's pooled keys [B, 1, Pcap + 1, D] (the last slot takes the
writes of rows that complete no group): a pass pools, per row, only the groups its new tokens
complete (one gather and one scatter of at most L // p + 1 groups per row), as PooledDSACache does for
one sequence.

Neither can take a joint prefill's padded rows (batch/prefill.py): padding would run through the
recurrence, and pools are written per row only here.
"""

from __future__ import annotations

import mlx.core as mx

from .cache import BatchLayerCache
from ..model.glm5_next_cache import KDACache, PooledDSACache, mark_points


class BatchPooledCache(BatchLayerCache):
    joint_prefill = False

    @classmethod
    def of(cls, caches: list[PooledDSACache], moved: dict | None = None) -> "BatchPooledCache":
        moved = moved or {}
        batch = super().of(caches, moved)
        def moved_pools(layer, b):  # from a BatchPooledCache, or the one of a RaggedLayerCache's parts holding row b
            part, row = layer._at(b) if hasattr(layer, "parts") else (layer, b)
            return part.pool_rows(row)

        pools = [moved_pools(*moved[i]) if i in moved else cls.pools_from(c) for i, c in enumerate(caches)]
        batch.kpool = caches[0].kpool
        batch.n_pooled = [n for _, n in pools]
        batch._pools = None
        held = next((p for p, _ in pools if p is not None), None)
        if held is not None:
            buf = mx.zeros((len(caches), 1, batch.capacity // batch.kpool + 1, held.shape[-1]), held.dtype)
            for b, (p, n) in enumerate(pools):
                if n:
                    buf[b : b + 1, :, :n] = p
            batch._pools = buf
        return batch

    @staticmethod
    def pools_from(cache: PooledDSACache):
        n = cache.n_pooled if cache.has_indexer else 0
        return (cache._pools.valid(n) if n else None), n

    def pool_rows(self, b: int):
        n = self.n_pooled[b]
        return (self._pools[b : b + 1, :, :n] if n else None), n

    @staticmethod
    def lend(cache: PooledDSACache):
        BatchLayerCache.lend(cache)
        cache._pools.data = None

    def store_row(self, b: int, cache: PooledDSACache):
        super().store_row(b, cache)
        pools, n = self.pool_rows(b)
        cache._pools.data, cache.n_pooled = (mx.contiguous(pools) if n else None), n

    def view(self, b: int, cache: PooledDSACache, ahead: bool = False) -> PooledDSACache:
        out = PooledDSACache(cache.has_indexer, cache.kpool)
        out.latent_dim = cache.latent_dim
        kv, index = self.rows(b)
        for buf, part in zip(out._kv + out._index, kv + index):
            buf.data = part
        out.offset = self.lengths[b] - ahead
        pools, n = self.pool_rows(b)
        out._pools.data, out.n_pooled = pools, min(n, out.offset // cache.kpool)
        return out

    def update_pooled(self, rows: mx.array, pool) -> mx.array:
        """Write the new tokens' [B, 1, L, 2D] indexer rows (after update_kv); pool the groups each row
        completes; return the pooled keys [B, Pmax, D] (row b's first n_pooled[b] are its own)."""
        index = self.update_index(rows)  # [B, 1, Tcap, 2D]
        B, p = rows.shape[0], self.kpool
        new = [n // p for n in self.lengths]
        slots = self.capacity // p + 1  # the last one: where rows that complete nothing write
        if self._pools is None or self._pools.shape[2] < slots:
            grown = mx.zeros((B, 1, slots, rows.shape[-1] // 2), rows.dtype)
            if self._pools is not None:
                grown[:, :, : self._pools.shape[2]] = self._pools
            self._pools = grown
        m = max(n - o for n, o in zip(new, self.n_pooled))
        if m > 0:
            ids = mx.array(self.n_pooled)[:, None] + mx.arange(m)  # [B, m]: the groups to pool
            pos = mx.minimum((ids[..., None] * p + mx.arange(p)).reshape(B, m * p), self.capacity - 1)
            pooled = pool(mx.take_along_axis(index[:, 0], pos[..., None], axis=1))  # [B, m*p, 2D] -> [B, m, D]
            target = mx.where(ids < mx.array(new)[:, None], ids, slots - 1)
            self._pools[mx.arange(B)[:, None], 0, target] = pooled.astype(self._pools.dtype)
            self.n_pooled = new
        return self._pools[:, 0, : max(new)]

    def trim(self, b: int, n: int):
        super().trim(b, n)
        self.n_pooled[b] = min(self.n_pooled[b], self.lengths[b] // self.kpool)

    def arrays(self) -> list[mx.array]:
        return super().arrays() + ([self._pools] if self._pools is not None else [])


class BatchKDACache:
    layout = "recurrent"
    joint_prefill = False

    def __init__(self, conv: mx.array, recurrent: mx.array, lengths: list[int], owners: list[KDACache]):
        self.conv, self.recurrent = conv, recurrent  # [B, K-1, C], [B, H, Dv, Dk] float32
        self.lengths = list(lengths)
        self.owners = owners  # each row's own KDACache: where its boundary states go (`marks`)
        self.keep = conv.shape[1]
        self._history, self._kept = None, []  # as KDACache's, with a kept count per row

    @classmethod
    def of(cls, caches: list[KDACache], moved: dict | None = None, ranges=None) -> "BatchKDACache":
        moved = moved or {}
        rows = [moved[i][0].rows(moved[i][1]) if i in moved else cls.rows_from(c) for i, c in enumerate(caches)]
        return cls(mx.concatenate([r[0] for r in rows]), mx.concatenate([r[1] for r in rows]),
                   [r[2] for r in rows], [r[3] for r in rows])

    @staticmethod
    def rows_from(cache: KDACache):
        if cache.recurrent is None:
            raise ValueError("a KDA cache that never ran cannot decode in a batch")
        return cache.conv, cache.recurrent, cache.offset, cache

    def rows(self, b: int):
        return self.conv[b : b + 1], self.recurrent[b : b + 1], self.lengths[b], self.owners[b]

    @staticmethod
    def lend(cache: KDACache):
        cache.conv = cache.recurrent = None  # the batch holds them (offset and marks stay)
        cache._history, cache._kept = None, 0

    def store_row(self, b: int, cache: KDACache):
        cache.conv, cache.recurrent = mx.contiguous(self.conv[b : b + 1]), mx.contiguous(self.recurrent[b : b + 1])
        cache.offset, cache._history, cache._kept = self.lengths[b], None, 0

    def view(self, b: int, cache: KDACache, ahead: bool = False) -> KDACache:
        out = KDACache(cache.keep + 1)
        out.conv, out.recurrent, out.offset = self.conv[b : b + 1], self.recurrent[b : b + 1], self.lengths[b]
        out.marks = cache.marks  # shared: the prefix cache drops them
        out.keep_boundaries(cache.every, cache.phase, cache.sparse, cache.pin)
        return out

    # --- what the KDA layer calls --------------------------------------------------------------
    def cuts(self, L: int) -> list[int]:
        return []  # one token per row, or a kept-states update (MTP verification): every state is at hand

    def commit(self, conv_input: mx.array, states: list, at: dict | None = None):
        L = conv_input.shape[1] - self.keep
        for b, c in enumerate(self.owners):
            for r in mark_points(self.lengths[b], L, c.every, c.phase):
                if r == L or len(states) == L:
                    c.add_mark(self.lengths[b] + r, conv_input[b : b + 1, r : r + self.keep],
                               mx.contiguous(states[r - 1 if len(states) == L else -1][b : b + 1]), at_hand=True)
        before = self.recurrent
        self.conv, self.recurrent = conv_input[:, L:], states[-1]
        if len(states) == L > 1:
            self._history, self._kept = (conv_input, [before] + states), [L] * len(self.lengths)
        else:
            self._history, self._kept = None, []
        self.lengths = [n + L for n in self.lengths]

    def trim(self, b: int, n: int):
        """Row b goes back n tokens of the last multi-token pass (a rejected draft)."""
        if n == 0:
            return
        if self._history is None or self._kept[b] < n:
            raise ValueError(f"a batched KDA state cannot go back {n} tokens")
        conv_input, states = self._history
        k = self._kept[b] = self._kept[b] - n
        self.conv[b : b + 1] = conv_input[b : b + 1, k : k + self.keep]
        self.recurrent[b : b + 1] = states[k][b : b + 1]
        self.lengths[b] -= n
        for m in [m for m in self.owners[b].marks if m > self.lengths[b]]:
            del self.owners[b].marks[m]

    def arrays(self) -> list[mx.array]:
        return [self.conv, self.recurrent]
