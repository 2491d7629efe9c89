"""One layer's cache for a batch of sequences decoding together, each at its own length.

Why not a list of per-sequence DSACaches: then every attention op runs once per sequence, and on
small models (or many sequences) the per-op cost of B small ops outweighs the work. Here the
sequences' rows sit in one [B, 1, Tcap, D] buffer (right-padded: row b holds lengths[b] valid
tokens), each decode step writes one row per sequence at its own position (a scatter), and
attention runs once for the batch with a per-row validity mask. Sequences join and leave between
steps (`BatchLayerCache.build` / `rows_of`): a membership change copies rows once, a decode step
copies nothing. Growth follows DSACache (256-token steps). A quantized cache (kv_bits) keeps its
four latent-KV parts (codes, scales, biases, rope keys) as four such buffers, and quantizes each
step's new rows as DSACache does.
"""

from __future__ import annotations

import itertools

import mlx.core as mx

from .cache import GROWTH_STEP, DSACache, QuantizedKV, quantize_latent


# The indexer scores a batch's rows over their own range's longest row (contiguous rows; a group keeps its
# rows longest first) where padding every row to the longest of all would cost at least this many
# multiply-adds per layer: a 100K-token conversation decoding beside short ones is not scored 8 times.
BUCKET_MIN_MACS = 1 << 24


def _pad(a: mx.array, T: int) -> mx.array:
    """[1, 1, t, D] -> [1, 1, T, D] with zero rows after t."""
    t = a.shape[2]
    if t == T:
        return a
    return mx.concatenate([a, mx.zeros(a.shape[:2] + (T - t,) + a.shape[3:], a.dtype)], axis=2)


class BatchLayerCache:
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
        """[(first row, end row, keys to score)]: contiguous row ranges, each scored over its own longest
        row (at least `at_least` keys, so a top-k fits) rather than every row over the longest of all;
        a range ends where the rows after it are under half its longest and the padding saved is worth
        BUCKET_MIN_MACS (one range for small batches, contexts or models)."""
        n, out, s = self.lengths, [], 0
        while s < len(n):
            e = len(n)
            for i in range(s + 1, len(n)):
                head, tail = max(n[s:i]), max(n[i:])
                if head > 2 * tail and (head - tail) * (len(n) - i) * macs_per_key >= BUCKET_MIN_MACS:
                    e = i
                    break
            out.append((s, e, min(self.capacity, max(at_least, max(n[s:e])))))
            s = e
        return out

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


# Plain passes leave their MTP slots for one batched MTP pass, after at most this many passes.
LAZY_MTP_PASSES = 32


class DecodeGroup:
    """The decoding sequences' caches as batch buffers: one BatchLayerCache per layer (and for the MTP
    layer, when every member has an MTP cache).

    Built in the plain state: `pending` [B, m, hidden] holds h of each member's last m positions, whose
    MTP slots wait for the tokens after them. Plain passes do not run the MTP layer: they append their
    h to `pending` and their tokens to `fed`, and `catch_up` writes those slots in one [B, m-1] pass
    (before drafting, when the group dissolves, or every LAZY_MTP_PASSES passes): one MTP pass
    instead of one per token. Drafting state (`ahead`, MTP passes; see batch_mtp): each member's slot
    at its last position is written, paired with the token to verify next (not in the members' tokens
    yet), and `drafts` [B] / `draft_logits` [B, V] hold each member's draft. Dissolving settles it
    back to the plain state.

    Membership changes move rows once: a leaving member's rows go back to its own cache at once
    (`release`, its row left dead), and the next step's `regroup` builds the buffers of the new
    membership from these buffers and the joiners' own caches."""

    serials = itertools.count()

    def __init__(self, model, seqs: list, old: "DecodeGroup | None" = None):
        """seqs: the members, in row order. old: a settled group (plain state, caught up) whose members
        among seqs bring their rows from its buffers; the others from their own caches."""
        self.model, self.seqs, self.serial = model, list(seqs), next(DecodeGroup.serials)
        n = model.args.num_hidden_layers
        held = {id(s): b for b, s in enumerate(old.seqs) if s is not None} if old is not None else {}  # id(member) -> its row in old
        at = {i: held[id(s)] for i, s in enumerate(seqs) if id(s) in held}  # new row -> old row

        def layer_of(caches, old_layer):
            return BatchLayerCache.of(caches, {i: (old_layer, b) for i, b in at.items()})

        self.layers = [layer_of([s.pc.cache[i] for s in seqs], old.layers[i] if old else None) for i in range(n)]
        with_mtp = all(s.pc.mtp_cache is not None for s in seqs)
        self.mtp = layer_of([s.pc.mtp_cache for s in seqs], old.mtp if old else None) if with_mtp else None
        self.pending = mx.concatenate([old.pending[at[i]][None] if i in at else s.pc.pending
                                       for i, s in enumerate(seqs)], axis=0) if with_mtp else None
        self.fed: list[mx.array] = []  # tokens [B, 1] of plain passes whose MTP slots wait (catch_up)
        self.ahead, self.drafts, self.draft_logits = False, None, None
        for i, s in enumerate(seqs):
            if i not in at:
                for cache in s.pc.all_caches():
                    BatchLayerCache.lend(cache)

    def regroup(self, seqs: list) -> "DecodeGroup":
        """The group with these members (row order as given): members that leave get their rows back, the
        ones that stay move from these buffers into the new group's and joiners bring theirs, a single
        copy of the batch (dissolving and rebuilding copied every member's rows out and back in).
        The new group starts in the plain state."""
        if self.mtp is not None:
            self.catch_up()
        self.settle()
        staying = {id(s) for s in seqs}
        for b, s in enumerate(self.seqs):
            if s is not None and id(s) not in staying:
                self._store(b)
        return DecodeGroup(self.model, seqs, old=self)

    def release(self, b: int):
        """Member b leaves now (finished or cancelled): its rows go back to its own cache, caught up and
        settled; its row stays in the buffers, dead, until the next regroup drops it."""
        if self.mtp is not None:
            self.catch_up()
        self.settle()
        self._store(b)
        self.seqs[b] = None

    def can_join(self, seqs: list) -> bool:
        """Whether sequences can join this group: in the plain state one position behind, with MTP caches
        iff the members have them."""
        return DecodeGroup.accepts(seqs) and all((s.pc.mtp_cache is not None) == (self.mtp is not None) for s in seqs)

    def settle(self):
        """Drafting state -> plain: each member's drafted-ahead MTP slot goes (its h stays pending)."""
        if self.ahead:
            for b in range(len(self.seqs)):
                self.mtp.trim(b, 1)
            self.ahead, self.drafts, self.draft_logits = False, None, None

    @staticmethod
    def accepts(seqs: list) -> bool:
        """Members' MTP state must be uniform and one position behind (as after a prefill or a step)."""
        has = [s.pc.mtp_cache is not None for s in seqs]
        if any(has) and not all(has):
            return False
        return all(s.pc.pending is not None and s.pc.pending.shape[1] == 1 and
                   s.pc.mtp_cache.offset == len(s.pc.tokens) - 1 for s in seqs) if all(has) else True

    def plain_pass(self, toks: mx.array, hidden: mx.array):
        """A plain pass fed toks [B, 1] and gave hidden [B, 1, hidden]: their MTP slots wait."""
        if self.mtp is not None:
            self.pending = mx.concatenate([self.pending, hidden], axis=1)
            self.fed.append(toks)
            if len(self.fed) >= LAZY_MTP_PASSES:
                self.catch_up()

    def catch_up(self):
        """Write the MTP slots plain passes left, each pending h with the token fed after it, in one pass."""
        if self.fed:
            self.model.mtp_hidden(self.pending[:, :-1], mx.concatenate(self.fed, axis=1), cache=self.mtp)
            self.pending, self.fed = self.pending[:, -1:], []

    def dissolve(self):
        """Every member's rows back into its own PromptCache, in the plain state."""
        if self.mtp is not None:
            self.catch_up()
        self.settle()
        for b, s in enumerate(self.seqs):
            if s is not None:
                self._store(b)

    def _store(self, b: int):
        """Member b's rows back into its own PromptCache (caught up and settled)."""
        s = self.seqs[b]
        for layer, cache in zip(self.layers, s.pc.cache):
            BatchLayerCache.store(cache, layer.rows(b))
        if self.mtp is not None:
            BatchLayerCache.store(s.pc.mtp_cache, self.mtp.rows(b))
            s.pc.pending = self.pending[b : b + 1]

    def snapshot(self, b: int):
        """Member b's cache as a PromptCache viewing its rows in the batch buffers (its own are lent), for
        the prefix cache to copy blocks out while it decodes. Drop it before the next pass: a view
        alive then makes the pass copy a buffer instead of writing it in place."""
        from .prompt_cache import PromptCache

        seq = self.seqs[b]

        def view(cache: DSACache, batch: BatchLayerCache, ahead: bool) -> DSACache:
            out = DSACache(cache.has_indexer, cache.index_bits, cache.kv_bits, cache.kv_group_size)
            out.latent_dim = cache.latent_dim
            kv, index = batch.rows(b)
            for buf, part in zip(out._kv + out._index, kv + index):
                buf.data = part
            out.offset = batch.lengths[b] - ahead  # a drafted-ahead MTP slot pairs with a token not in `tokens`
            return out

        caches = [view(c, layer, False) for c, layer in zip(seq.pc.cache, self.layers)]
        mtp = view(seq.pc.mtp_cache, self.mtp, self.ahead) if self.mtp is not None else None
        return PromptCache(cache=caches, mtp_cache=mtp, tokens=list(seq.pc.tokens))

    def arrays(self) -> list[mx.array]:
        caches = self.layers + ([self.mtp] if self.mtp is not None else [])
        return [a for c in caches for a in c.arrays()] + ([self.pending] if self.pending is not None else [])
