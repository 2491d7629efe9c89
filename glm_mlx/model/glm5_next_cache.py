"""Per-layer caches for GLM-5.3-Flash: a fixed-size KDA state per sequence, DSA KV on DSA layers only.

KDACache (KDA layers): the conv state (the last K-1 conv inputs, [B, K-1, 3*H*Dk], model dtype) and
the recurrent state ([B, H, Dv, Dk] float32). Its size does not grow with the context.

Rollback (MTP verification): a recurrent state cannot be "trimmed". A multi-token update of at most
kda.KEEP_STATES_MAX tokens (the verification pass: y + drafts) runs the recurrence token by token and
keeps the state after each token plus the one before, and the update's conv input; `trim(n)` then
restores the state n tokens back, exactly, with no replay. Cost: (L+1) recurrent states per KDA
layer alive until the next update (GLM-5.3-Flash: 4 MiB each, 34 layers: ~136 MiB per kept token),
no extra compute. Beyond the last update the state is gone: `trim_floor` says how far back a trim
can go, and trimming the whole cache (to offset 0) is always possible (a reset). Prompt caches that
diverge further back re-prefill from the start (PromptCache.reuse reads trim_floor).

Boundary states (the prefix cache): with `keep_boundaries(every, phase, sparse, pin)` the cache keeps its
state (conv, recurrent) after n tokens for n on the grid n % every == phase (`marks`: n -> [conv, recurrent]),
as the KDA layer passes them (it splits its recurrence there: no extra forward pass). The prefix cache asks
for every = its block size, phase every-1 (a restore of k blocks holds k*every - 1 tokens, leaving the
block's last token to process), and sparse = its state_every: only every sparse-th grid point is kept
(`kept_point`), plus `pin` (the prompt's last block boundary), plus, when an update has the state after
each of its tokens anyway (decoding: one token, or an MTP verification pass), the grid points it crosses -
of those "loose" marks only the LOOSE_MARKS latest stay (the block a save may end at, one behind for a
row whose last token is drafted ahead). A prefill of N tokens so holds at most N // (every*sparse) + 1
marks. Marks past a trim go; `forget_boundaries` drops those the prefix cache has copied. Each mark is one
KDA state per layer (the size of the whole cache, its own buffers), held until the prefix cache takes it.

PooledDSACache (DSA layers): GLM-5.1's DSACache (the latent KV, no rope key since
qk_rope_head_dim is 0) whose indexer buffer holds each token's [indexer key | pool gate score]
(2 * index_head_dim), plus the pooled keys of the complete index_kpool groups, pooled once when a
group completes (decode does not re-pool the whole context each token).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache

from .cache import DSACache, _GrowingBuffer


LOOSE_MARKS = 2  # decode-time marks kept beside the sparse ones and the pin (see the module docstring)


def mark_points(offset: int, L: int, every: int | None, phase: int) -> list[int]:
    """r in 1..L such that the state after offset + r tokens is kept (offset + r = phase mod every)."""
    if not every:
        return []
    first = offset + 1 + (phase - offset - 1) % every
    return [n - offset for n in range(first, offset + L + 1, every)]


class KDACache(_BaseCache):
    batch_kind = "recurrent"  # batch/layers.py: rows stacked in a batch KDA cache
    block_layout = "boundary"  # a prefix block holds the state at its boundary, not rows

    def __init__(self, kernel: int):
        self.keep = kernel - 1  # conv inputs carried between calls
        self.every, self.phase, self.sparse, self.pin = None, 0, 1, None  # keep_boundaries
        self.marks: dict[int, list] = {}
        self._reset()

    def _reset(self):
        self.offset = 0
        self.conv: mx.array | None = None  # [B, K-1, C]
        self.recurrent: mx.array | None = None  # [B, H, Dv, Dk] float32
        # After a multi-token update that kept per-token states: (conv input [B, K-1+L, C],
        # [state before, after token 1, ..., after token L]) and how many of its tokens are kept.
        self._history: tuple[mx.array, list] | None = None
        self._kept = 0
        self.marks.clear()

    # --- boundary states (see the module docstring) --------------------------------------------
    def keep_boundaries(self, every: int | None, phase: int = 0, sparse: int = 1, pin: int | None = None):
        self.every, self.phase, self.sparse, self.pin = every, phase, max(int(sparse), 1), pin

    def kept_point(self, n: int) -> bool:
        """Whether grid point n is one of the sparse ones (kept whatever comes after it)."""
        return ((n - self.phase) // self.every + 1) % self.sparse == 0

    def cuts(self, L: int) -> list[int]:
        """Where inside an update of L tokens (r < L) the KDA layer must stop its recurrence: the states
        after offset + r tokens are kept (sparse points and the pin only)."""
        return [r for r in mark_points(self.offset, L, self.every, self.phase)
                if r < L and (self.kept_point(self.offset + r) or self.offset + r == self.pin)]

    def add_mark(self, n: int, conv, recurrent, at_hand: bool):
        """Keep the state after n tokens (a grid point) if wanted: a sparse point, the pin, or a loose one
        whose state the update had at hand (at_hand); then only the LOOSE_MARKS latest loose ones stay.
        The conv slice is copied: a view would keep the update's whole conv input alive."""
        loose = not self.kept_point(n) and n != self.pin
        if loose and not at_hand:
            return
        self.marks[n] = [mx.contiguous(conv), recurrent]
        if loose:
            for m in sorted(m for m in self.marks if not self.kept_point(m) and m != self.pin)[:-LOOSE_MARKS]:
                del self.marks[m]

    def boundary_state(self, n: int) -> list | None:
        """[conv [1, K-1, C], recurrent [1, H, Dv, Dk]] after n tokens, if kept (n == offset: the state)."""
        if n == self.offset and self.recurrent is not None:
            return [self.conv, self.recurrent]
        return self.marks.get(n)

    def forget_boundaries(self, upto: int):
        for n in [n for n in self.marks if n <= upto]:
            del self.marks[n]

    def restore_boundary(self, arrays: list, n: int):
        """Take the state after n tokens (a prefix-cache restore)."""
        self._reset()
        self.conv, self.recurrent = arrays
        self.offset = n

    def commit(self, conv_input: mx.array, states: list, at: dict | None = None):
        """After a KDA layer ran L tokens: conv_input [B, K-1+L, C], states = the recurrent state after
        each token (L of them: rollback possible) or after the last one only; at: {r: the state after r
        of them} at `cuts(L)`."""
        L = conv_input.shape[1] - self.keep
        for r in mark_points(self.offset, L, self.every, self.phase):
            st = states[r - 1] if len(states) == L else (states[-1] if r == L else (at or {}).get(r))
            if st is not None:
                self.add_mark(self.offset + r, conv_input[:, r : r + self.keep], st, at_hand=len(states) == L)
        before = self.recurrent
        # the last K-1 inputs (copied after a multi-token update: a view would keep its whole conv input alive)
        self.conv = conv_input[:, L:] if L == 1 else mx.contiguous(conv_input[:, L:])
        self.recurrent = states[-1]
        if len(states) == L > 1:
            self._history, self._kept = (conv_input, [before] + states), L
        else:
            self._history, self._kept = None, 0
        self.offset += L

    @property
    def trim_floor(self) -> int:
        """The smallest offset a trim can reach without a reset (0 is always reachable)."""
        return self.offset - (self._kept if self._history is not None else 0)

    def can_trim_to(self, offset: int) -> bool:
        return offset == 0 or self.trim_floor <= offset <= self.offset

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        if n == 0:
            return 0
        if n == self.offset:  # back to empty: always possible
            self._reset()
            return n
        if not self.can_trim_to(self.offset - n):
            raise ValueError(f"a KDA state cannot go back {n} tokens (at most {self.offset - self.trim_floor}: "
                             "the last multi-token update's)")
        conv_input, states = self._history
        self._kept -= n
        self.offset -= n
        self.conv = conv_input[:, self._kept : self._kept + self.keep]  # [B, K-1, C] ending at the new last token
        self.recurrent = states[self._kept]  # states[0]: before the update
        for m in [m for m in self.marks if m > self.offset]:
            del self.marks[m]
        return n

    def is_trimmable(self) -> bool:
        return True

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def state(self):
        return [] if self.recurrent is None else [self.conv, self.recurrent]

    @state.setter
    def state(self, arrays):
        self.conv, self.recurrent = arrays
        self._history, self._kept = None, 0
        self.marks.clear()

    @property
    def meta_state(self):
        return f"{self.offset},{self.keep}"

    @meta_state.setter
    def meta_state(self, v):
        offset, keep = str(v).split(",")
        self.offset, self.keep = int(offset), int(keep)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class PooledDSACache(DSACache):
    def __init__(self, has_indexer: bool, kpool: int):
        super().__init__(has_indexer)
        self.kpool = kpool
        self._pools = _GrowingBuffer()  # [B, 1, P, D] pooled keys of the complete groups
        self.n_pooled = 0

    def update_pooled(self, raw: mx.array, pool) -> mx.array:
        """Append the new tokens' [B, 1, L, 2D] (key | gate) rows (after update_kv wrote their latents);
        pool the groups they complete with `pool` ([B, n*kpool, 2D] -> [B, n, D]); return every
        complete group's pooled key [B, P, D], P = offset // kpool."""
        rows = self.update_index(raw)  # [B, 1, T, 2D]
        P = self.offset // self.kpool
        if P > self.n_pooled:
            new = pool(rows[:, 0, self.n_pooled * self.kpool : P * self.kpool])  # [B, P - n_pooled, D]
            self._pools.write(self.n_pooled, new[:, None])
            self.n_pooled = P
        return self._pools.valid(P)[:, 0] if P else None

    batch_kind = "pooled_kv"

    def trim(self, n: int) -> int:
        n = super().trim(n)
        self.n_pooled = min(self.n_pooled, self.offset // self.kpool)  # a pool past the cut is re-pooled
        return n

    def row_state(self) -> list[mx.array]:
        """The per-token rows only: the pooled keys are pooled again from them after a restore."""
        return DSACache.state.fget(self)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self._pools.bytes_for(self.n_pooled)

    @property
    def state(self):
        s = super().state
        return s + [self._pools.valid(self.n_pooled)] if s and self.n_pooled else s

    @state.setter
    def state(self, arrays):
        n = 3 if self.has_indexer else 2
        DSACache.state.fset(self, arrays[:n])
        if len(arrays) > n:
            self._pools.data, self.n_pooled = arrays[n], arrays[n].shape[2]
        else:
            self.n_pooled = 0
