"""One layer's cache for a batch of sequences decoding together, each at its own length.

Why not a list of per-sequence DSACaches: then every attention op runs once per sequence, and on
small models (or many sequences) the per-op cost of B small ops outweighs the work. Here the
sequences' rows sit in one [B, 1, Tcap, D] buffer (right-padded: row b holds lengths[b] valid
tokens), each decode step writes one row per sequence at its own position (a scatter), and
attention runs once for the batch with a per-row validity mask. Sequences join and leave between
steps (`BatchLayerCache.build` / `rows_of`): a membership change copies rows once, a decode step
copies nothing. Growth follows DSACache (256-token steps). A quantized cache (kv_bits) keeps its
four latent-KV parts (codes, scales, biases, rope keys) as four such buffers, and quantizes each
step's new rows as DSACache does. Rows of very different lengths go in buffers of their own
(`RaggedLayerCache`), and the indexer scores rows of like length over their own length (`buckets`).
The decode group that holds one such cache per layer is in decode_group.py.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from ..model.cache import GROWTH_STEP, DSACache, QuantizedKV, quantize_latent


# The indexer scores a batch's rows over their own range's longest row (contiguous rows; a group keeps its
# rows longest first) where padding every row to the longest of all would cost at least this many
# multiply-adds per layer: a 100K-token conversation decoding beside short ones is not scored 8 times.
BUCKET_MIN_MACS = 1 << 24
# A decode group keeps such ranges in buffers of their own (RaggedLayerCache) where padding would hold
# at least this many bytes per layer: memory is the ranges' sizes, not every row at the longest's.
RAGGED_MIN_BYTES = 1 << 24


@functools.lru_cache(maxsize=64)  # every layer of a pass asks with the same lengths
def like_length_ranges(lengths: tuple[int, ...], per_key: int, min_saving: int) -> tuple[tuple[int, int], ...]:
    """Contiguous row ranges ((start, end), ...) of rows of like length: a range ends where the rows after
    it are under half its longest and padding them to its longest would cost at least min_saving (per_key
    for each padded key). One range for small batches, contexts or models."""
    out, s = [], 0
    while s < len(lengths):
        e = len(lengths)
        for i in range(s + 1, len(lengths)):
            head, tail = max(lengths[s:i]), max(lengths[i:])
            if head > 2 * tail and (head - tail) * (len(lengths) - i) * per_key >= min_saving:
                e = i
                break
        out.append((s, e))
        s = e
    return tuple(out)


def _pad(a: mx.array, T: int) -> mx.array:
    """[1, 1, t, D] -> [1, 1, T, D] with zero rows after t."""
    t = a.shape[2]
    if t == T:
        return a
    return mx.concatenate([a, mx.zeros(a.shape[:2] + (T - t,) + a.shape[3:], a.dtype)], axis=2)


class BatchLayerCache:
    layout = "batch"  # how attention reads it (model/attention.py)
    joint_prefill = True  # padded [B, L] prefills may write it (batch/prefill.py)

    def __init__(self, has_indexer: bool, index_bits: int | None, kv: list[mx.array], index: list[mx.array],
                 lengths: list[int], latent_dim: int, kv_bits: int | None = None, kv_group_size: int = 64):
        self.has_indexer, self.index_bits = has_indexer, index_bits
        self.kv_bits, self.kv_group_size = kv_bits or None, kv_group_size
        # [B, 1, Tcap, C+R] (or its quantized parts: codes, scales, biases, rope keys); [B, 1, Tcap, .] per indexer part
        self.kv, self.index = list(kv), index
        self.lengths = list(lengths)
        self.latent_dim = latent_dim

    # --- joining and leaving -----------------------------------------------------------------
    @classmethod
    def build(cls, rows: list[tuple[list[mx.array], list[mx.array]]], lengths: list[int], has_indexer: bool,
              index_bits: int | None, latent_dim: int, kv_bits: int | None = None,
              kv_group_size: int = 64) -> "BatchLayerCache":
        """rows[b] = (latent-KV parts [1, 1, t_b, .], indexer parts [1, 1, t_b, .]) -> one padded batch buffer."""
        T = max(GROWTH_STEP, -(-(max(lengths) + 1) // GROWTH_STEP) * GROWTH_STEP)

        def stack(parts):
            """Per part, one [B, 1, T, .] buffer, each row written into it in place (padded copies of every
            row alive at once would be a third copy of the batch); an empty cache's row (None: it never
            held a token) stays zero, and a part no row holds yet stays None until the first write."""
            out = []
            for group in zip(*parts):
                held = next((p for p in group if p is not None), None)
                if held is None:
                    out.append(None)
                    continue
                buf = mx.zeros((len(group), 1, T) + held.shape[3:], held.dtype)
                for b, p in enumerate(group):
                    if p is not None and p.shape[2]:
                        buf[b : b + 1, :, : p.shape[2]] = p
                out.append(buf)
            return out

        batch = cls(has_indexer, index_bits, stack([r[0] for r in rows]), stack([r[1] for r in rows]), lengths,
                    latent_dim, kv_bits, kv_group_size)
        batch._capacity = T
        return batch

    @classmethod
    def of(cls, caches: list[DSACache], moved: "dict[int, tuple[BatchLayerCache, int]] | None" = None) -> "BatchLayerCache":
        """One layer's batch buffer from each sequence's own cache of that layer; moved: {i: (another
        batch buffer, row)} for members whose rows are there instead (their own caches are lent)."""
        c, moved = caches[0], moved or {}
        if any((x.kv_bits, x.kv_group_size) != (c.kv_bits, c.kv_group_size) for x in caches):
            raise ValueError("caches with different kv_cache_bits cannot decode in one batch")
        rows = [moved[i][0].rows(moved[i][1]) if i in moved else cls.rows_from(x) for i, x in enumerate(caches)]
        lengths = [moved[i][0].lengths[moved[i][1]] if i in moved else x.offset for i, x in enumerate(caches)]
        return cls.build(rows, lengths, c.has_indexer, c.index_bits, c.latent_dim, c.kv_bits, c.kv_group_size)

    @staticmethod
    def rows_from(cache: DSACache) -> tuple[list[mx.array], list[mx.array]]:
        """A sequence's own cache as (latent-KV parts, indexer parts), its valid rows only."""
        n = cache.offset
        if n == 0:  # never written: no arrays to take a shape from
            return [None] * len(cache._kv), [None] * len(cache._index)
        return cache.kv_parts(n), [b.valid(n) for b in cache._index]

    def rows(self, b: int) -> tuple[list[mx.array], list[mx.array]]:
        """Row b's valid part, as rows_from gives it."""
        n = self.lengths[b]
        return [p[b : b + 1, :, :n] for p in self.kv], [p[b : b + 1, :, :n] for p in self.index]

    @staticmethod
    def lend(cache: DSACache):
        """A sequence's rows are in a batch buffer now: its own buffers go (its offset stays), so every
        cache is held once, as the memory plan counts it, not twice for as long as the batch decodes.
        `store` gives them back when it leaves."""
        for buf in cache._kv + cache._index:
            buf.data = None

    @staticmethod
    def store(cache: DSACache, rows: tuple[list[mx.array], list[mx.array]]):
        """Write a batch row back into a sequence's own cache (it leaves the batch)."""
        kv, index = rows
        n = kv[0].shape[2]
        T = -(-n // GROWTH_STEP) * GROWTH_STEP  # the growth invariant: a multiple of the step

        def own(a):  # a copy of its own, not a view that keeps the whole batch buffer alive
            return _pad(a, T) if T != n else mx.contiguous(a)

        for buf, part in zip(cache._kv, kv):
            buf.data = own(part)
        cache.offset = n
        for buf, part in zip(cache._index, index):
            buf.data = own(part)

    def store_row(self, b: int, cache: DSACache):
        """Row b back into the sequence's own cache (it leaves the batch)."""
        self.store(cache, self.rows(b))

    def view(self, b: int, cache: DSACache, ahead: bool = False) -> DSACache:
        """A cache like the sequence's own viewing row b here (its own are lent), for the prefix cache to
        copy blocks out while it decodes; ahead: its last row pairs with a token not in `tokens` yet."""
        out = DSACache(cache.has_indexer, cache.index_bits, cache.kv_bits, cache.kv_group_size)
        out.latent_dim = cache.latent_dim
        kv, index = self.rows(b)[:2]
        for buf, part in zip(out._kv + out._index, kv + index):
            buf.data = part
        out.offset = self.lengths[b] - ahead
        return out

    # --- one decode step -----------------------------------------------------------------------
    @property
    def offsets(self) -> mx.array:
        """[B] int32: where each sequence's new token goes (its rope offset)."""
        return mx.array(self.lengths, dtype=mx.int32)

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    @property
    def capacity(self) -> int:
        """Tcap: rows per sequence in the padded buffers."""
        return self._capacity

    def arrays(self) -> list[mx.array]:
        return [a for a in (*self.kv, *self.index) if a is not None]

    def buckets(self, macs_per_key: int, at_least: int) -> list[tuple[int, int, int]]:
        """[(first row, end row, keys to score)]: like_length_ranges, each scored over its own longest row
        (at least `at_least` keys, so a top-k fits) rather than every row over the longest of all."""
        n = self.lengths
        return [(s, e, min(self.capacity, max(at_least, max(n[s:e]))))
                for s, e in like_length_ranges(tuple(n), macs_per_key, BUCKET_MIN_MACS)]

    def _grow(self, n: int):
        T = self.capacity
        if self.max_length + n <= T:
            return
        extra = -(-(self.max_length + n - T) // GROWTH_STEP) * GROWTH_STEP

        def grow(a):
            if a is None:
                return None
            return mx.concatenate([a, mx.zeros(a.shape[:2] + (extra,) + a.shape[3:], a.dtype)], axis=2)

        self.kv = [grow(p) for p in self.kv]
        self.index = [grow(p) for p in self.index]
        self._capacity += extra

    def _scatter(self, buf: mx.array | None, new: mx.array, pos: mx.array) -> mx.array:
        B, L = new.shape[0], new.shape[2]
        if buf is None:  # the first write to caches that held nothing
            buf = mx.zeros((B, 1, self.capacity, new.shape[-1]), new.dtype)
        if L == 1:
            buf[mx.arange(B), 0, pos] = new[:, 0, 0]  # new [B, 1, 1, D] -> row b at pos[b]
        else:  # new [B, 1, L, D] -> row b at pos[b] .. pos[b] + L - 1
            buf[mx.arange(B)[:, None], 0, pos[:, None] + mx.arange(L)] = new[:, 0]
        return buf

    def update_kv(self, latent: mx.array, k_pe: mx.array):
        """Write each sequence's L new tokens ([B, 1, L, C], [B, 1, L, R]: one per decode step, two
        when MTP verifies a draft); return the whole buffer (a QuantizedKV of it with kv_bits)."""
        L = latent.shape[2]
        self._grow(L)
        self.latent_dim = latent.shape[-1]
        self._pos = self.offsets
        if self.kv_bits:
            parts = quantize_latent(latent, k_pe, self.kv_bits, self.kv_group_size)
        else:
            parts = (mx.concatenate([latent, k_pe], axis=-1),)
        self.kv = [self._scatter(buf, p, self._pos) for buf, p in zip(self.kv, parts)]
        self.lengths = [n + L for n in self.lengths]
        if self.kv_bits:
            return QuantizedKV(*self.kv, self.kv_bits, self.kv_group_size)
        return self.kv[0]

    def update_index(self, keys):
        """The new tokens' indexer keys (written at the positions update_kv just used)."""
        parts = keys if isinstance(keys, tuple) else (keys,)
        self.index = [self._scatter(buf, p, self._pos) for buf, p in zip(self.index, parts)]
        return tuple(self.index) if isinstance(keys, tuple) else self.index[0]

    def valid(self, L: int = 1) -> mx.array:
        """[B, L, Tcap] bool, after this step's write of L tokens per sequence: the keys new token j of
        sequence b sees (its own rows up to itself)."""
        last = mx.array(self.lengths)[:, None] - L + mx.arange(L)  # [B, L]: each new token's position
        return mx.arange(self.capacity)[None, None, :] <= last[:, :, None]

    def trim(self, b: int, n: int):
        """Drop sequence b's last n rows (a rejected draft); the buffer keeps them, masked, until overwritten."""
        self.lengths[b] -= n


class RaggedLayerCache:
    """One layer's cache for a decode group whose rows (longest first) fall in ranges of very different
    lengths: each range a BatchLayerCache of its own, with its own capacity. Memory is the sum of the
    ranges' padded sizes, not every row padded to the longest, and a range grows (reallocates) alone.
    Attention runs per range (MLAttention); everything else in a pass runs once for all rows."""

    layout = "ragged"

    def __init__(self, parts: list[BatchLayerCache]):
        self.parts = parts
        self.joint_prefill = parts[0].joint_prefill

    @classmethod
    def of(cls, caches: list[DSACache], moved: "dict[int, tuple] | None" = None,
           ranges: "tuple[tuple[int, int], ...] | None" = None, part=BatchLayerCache):
        """part.of (a BatchLayerCache or a subclass) over each range of rows (one range: a plain part)."""
        moved = moved or {}
        if ranges is None or len(ranges) == 1:
            return part.of(caches, moved)
        return cls([part.of(caches[s:e], {i - s: moved[i] for i in range(s, e) if i in moved})
                    for s, e in ranges])

    def store_row(self, b: int, cache):
        part, row = self._at(b)
        part.store_row(row, cache)

    def view(self, b: int, cache, ahead: bool = False):
        part, row = self._at(b)
        return part.view(row, cache, ahead)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        out, s = [], 0
        for p in self.parts:
            out.append((s, s + len(p.lengths)))
            s += len(p.lengths)
        return out

    def _at(self, b: int) -> tuple[BatchLayerCache, int]:
        for (s, e), p in zip(self.ranges, self.parts):
            if s <= b < e:
                return p, b - s
        raise IndexError(b)

    @property
    def lengths(self) -> list[int]:
        return [n for p in self.parts for n in p.lengths]

    def rows(self, b: int):
        part, row = self._at(b)
        return part.rows(row)

    def trim(self, b: int, n: int):
        part, row = self._at(b)
        part.trim(row, n)

    def arrays(self) -> list[mx.array]:
        return [a for p in self.parts for a in p.arrays()]
