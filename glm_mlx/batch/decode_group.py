"""The decoding sequences of a batch: their caches as batch buffers, one per layer (batch_cache.py), and
the MTP layer's lazily written slots. Members join and leave between steps; rows move once per change."""

from __future__ import annotations

import itertools

import mlx.core as mx

from . import cache as batch_cache
from . import layers as batch_layers
from .cache import like_length_ranges

# Plain passes leave their MTP slots for one batched MTP pass, after at most this many passes.
LAZY_MTP_PASSES = 32


class DecodeGroup:
    """The decoding sequences' caches as batch buffers: one BatchLayerCache per layer (a RaggedLayerCache
    where rows of very different lengths keep buffers of their own), and one for the MTP layer when
    every member has an MTP cache. Rows are kept longest first.

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

        # Rows (longest first) in ranges of like length, each in buffers of its own where padding would
        # hold RAGGED_MIN_BYTES per layer.
        per_token = model.cache_bytes_per_token() // n  # one layer's bytes per cached token
        ranges = like_length_ranges(tuple(len(s.pc.tokens) for s in seqs), per_token, batch_cache.RAGGED_MIN_BYTES)

        def layer_of(caches, old_layer):
            return batch_layers.layer_of(caches, {i: (old_layer, b) for i, b in at.items()}, ranges)

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
                    batch_layers.lend(cache)

    def regroup(self, seqs: list) -> "DecodeGroup":
        """The group with these members (row order as given): members that leave get their rows back, the
        ones that stay move from these buffers into the new group's and joiners bring theirs, a single
        copy of the batch (dissolving and rebuilding copied every member's rows out and back in).
        The new group starts in the plain state."""
        self._to_plain()
        staying = {id(s) for s in seqs}
        for b, s in enumerate(self.seqs):
            if s is not None and id(s) not in staying:
                self._store(b)
        return DecodeGroup(self.model, seqs, old=self)

    def release(self, b: int):
        """Member b leaves now (finished or cancelled): its rows go back to its own cache, caught up and
        settled; its row stays in the buffers, dead, until the next regroup drops it."""
        self._to_plain()
        self._store(b)
        self.seqs[b] = None

    def row_of(self, seq) -> int | None:
        """The row of a live member (None: not in the group)."""
        return next((b for b, s in enumerate(self.seqs) if s is seq), None)

    def can_join(self, seqs: list) -> bool:
        """Whether sequences can join this group: in the plain state one position behind, with MTP caches
        iff the members have them."""
        return DecodeGroup.accepts(seqs) and all((s.pc.mtp_cache is not None) == (self.mtp is not None) for s in seqs)

    def _to_plain(self):
        """Caught up and settled: every MTP slot plain passes left written, no drafted-ahead slot."""
        self.catch_up()
        self.settle()

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
        self._to_plain()
        for b, s in enumerate(self.seqs):
            if s is not None:
                self._store(b)

    def _store(self, b: int):
        """Member b's rows back into its own PromptCache (caught up and settled)."""
        s = self.seqs[b]
        for layer, cache in zip(self.layers, s.pc.cache):
            layer.store_row(b, cache)
        if self.mtp is not None:
            self.mtp.store_row(b, s.pc.mtp_cache)
            s.pc.pending = self.pending[b : b + 1]

    def snapshot(self, b: int):
        """Member b's cache as a PromptCache viewing its rows in the batch buffers (its own are lent), for
        the prefix cache to copy blocks out while it decodes. Drop it before the next pass: a view
        alive then makes the pass copy a buffer instead of writing it in place."""
        from ..generation.prompt_cache import PromptCache

        seq = self.seqs[b]
        caches = [layer.view(b, c) for c, layer in zip(seq.pc.cache, self.layers)]
        # a drafted-ahead MTP slot pairs with a token not in `tokens`
        mtp = self.mtp.view(b, seq.pc.mtp_cache, self.ahead) if self.mtp is not None else None
        return PromptCache(cache=caches, mtp_cache=mtp, tokens=list(seq.pc.tokens))

    def arrays(self) -> list[mx.array]:
        caches = self.layers + ([self.mtp] if self.mtp is not None else [])
        return [a for c in caches for a in c.arrays()] + ([self.pending] if self.pending is not None else [])
