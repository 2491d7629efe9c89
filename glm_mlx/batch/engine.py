"""Continuous batching: sequences join and leave a running batch between decode steps.

Each sequence keeps its own PromptCache (latent KV, indexer keys, MTP state) and its own sampler.
A decode step feeds every decoding sequence's last token in one main-model pass: [B, 1] tokens over
a `DecodeGroup` (decode_group.py), per layer one padded buffer holding every sequence's rows (batch_cache.py), so
each op runs once for the batch (weights read once) while each sequence keeps its own rope offset,
its own rows and its own DSA top-k selection. Sequences of any lengths decode together, past
index_topk included. Rows move into the group when its membership changes and back into each
sequence's PromptCache when it leaves (or the group dissolves for a lone MTP sequence).
A new prompt prefills one chunk per step (`Engine.prefill_chunks`) between decode steps, so the
running streams do not stall behind a long prompt.

Plain passes are pipelined as mlx-lm decodes: a pass is built from the previous pass's tokens still on
the device and evaluated asynchronously before the host reads those tokens, so Python builds pass n+1
while the device computes pass n; a sequence's token comes out at the step after its pass. Plain
passes leave the MTP layer's slots to one batched catch-up (DecodeGroup.catch_up).

MTP: a sequence decoding alone (the only one) uses the engine's own MTP speculative decoding
(`_decode_mtp`, num_draft drafts). In a batch MTP keeps working with per-sequence acceptance
(`_mtp_step`, one draft per sequence): each pass verifies every member's [last token, draft] ([B, 2]),
a member whose draft matches its greedy token emits two tokens and the others one (their draft's
cache row is dropped), and the MTP layer writes each member's slots and drafts for the next pass in
the same graph, so a pass syncs the host once. Members that cannot draft (logits processors, logprobs,
MTP off) take one token per step from their own sampler in the same pass. Whether a pass verifies
drafts is chosen from measured pass times (batch_mtp.ModeChooser). When a second sequence
arrives, a lone drafting generator is closed (its caches settle) and the sequence rejoins through a
one- or two-token prefill of its own tokens. Greedy output is the same either way: MTP's greedy output
equals plain greedy decoding.

Knows nothing of text: the caller turns tokens into text and says when a sequence is done.
"""

from __future__ import annotations

import time

import mlx.core as mx

from . import layers as batch_layers
from .decode_group import DecodeGroup
from .mtp import ModeChooser, MTPBatching
from .prefill import JointPrefill
from ..generation.engine import Engine, StepStats, catch_up_mtp
from ..generation.prompt_cache import PromptCache
from .sequence import Sequence


class BatchEngine(MTPBatching, JointPrefill):
    """prefill_budget: prompt tokens prefilled per step while other sequences decode (their streams
    wait that long for each token); None: a whole prefill chunk (the engine's prefill_step)."""

    def __init__(self, model, max_batch: int = 8, prefill_budget: int | None = None, modes=None,
                 prefill_together: bool | None = None):
        """modes: what decides, per pass, whether a batch verifies MTP drafts (`choose(batch) -> bool`,
        `record(mtp, batch, tokens, seconds)`); default a ModeChooser, which measures.
        prefill_together: prompts arriving together prefill in one pass (True: two or more; False: never).
        None: two or more on a GPU, where a pass is bound by reading the weights; three or more on the
        CPU backend, where a pass's cost grows with its rows. There a joint pass makes the first prompt
        wait for the others' compute: for two, most of the second's prefill for a small saving
        (measured: a warm turn's first token 40 -> 65 ms); for more, the last of them waits for all
        the others either way, and they then decode in lockstep instead of joining the batch one by
        one and leaving it one by one (measured on 8 at once: see the README)."""
        self.model, self.max_batch, self.prefill_budget = model, max_batch, prefill_budget
        gpu = mx.default_device() == mx.gpu
        # the fewest prompts that prefill together (0: never)
        self.together_min = (2 if gpu else 3) if prefill_together is None else (2 if prefill_together else 0)
        if not batch_layers.joint_prefill(model):  # a recurrent state would run through the padding
            self.together_min = 0
        self.seqs: list[Sequence] = []  # in arrival order
        self.group: DecodeGroup | None = None
        self.modes = modes or ModeChooser()
        self._timing = None  # the last decode pass, timed at the next step: (MTP?, B, tokens it made, start, valid?)
        # The group whose plain pass ran last with nothing after it (its successor waits only for it);
        # None after an MTP pass or a prefill, which leave the next plain pass nothing to wait for.
        self._plain_group = None

    def __len__(self):
        return len(self.seqs)

    @property
    def full(self) -> bool:
        return len(self.seqs) >= self.max_batch

    def add(self, key, prompt: list[int], pc: PromptCache, engine: Engine, max_tokens: int) -> Sequence:
        seq = Sequence(key, list(prompt), pc, engine, max_tokens)
        seq.chunks = engine.prefill_chunks(pc, seq.prompt, seq.stats)
        self.seqs.append(seq)
        return seq

    def remove(self, key) -> Sequence | None:
        """Take a sequence out (finished or cancelled): its generators close and its cache settles,
        holding a prefix of its tokens (a prompt cache can take it up again)."""
        for seq in self.seqs:
            if seq.key == key:
                row = self.group.row_of(seq) if self.group is not None else None
                if row is not None:  # its rows back now; the others stay in the buffers until the next regroup
                    self.group.release(row)
                self.seqs.remove(seq)
                if seq.solo is not None:
                    seq.solo.close()  # settles the MTP cache (engine's finally)
                    seq.solo = None
                if seq.chunks is not None:
                    seq.chunks.close()
                    seq.chunks = None
                seq.unread = None  # a token computed past its end: dropped (its cache holds `tokens`)
                return seq
        return None

    def _rejoin(self, seq: Sequence):
        """A lone MTP sequence joins a batch: its drafting generator closes (the MTP cache settles) and it
        goes through a tiny prefill of its own tokens, which trims the cache to a valid prefix and
        recomputes the rest, ending with the logits for its next token."""
        seq.solo.close()
        seq.solo = None
        seq.chunks = seq.engine.prefill_chunks(seq.pc, seq.tokens, StepStats())

    # --- one scheduler step -------------------------------------------------------------------
    def step(self, first_tokens=None) -> list[tuple[object, int, list | None]]:
        """One prefill chunk (the oldest prefilling sequence) and one decode step for the others.
        Returns the tokens produced: (key, token, logprobs or None), in order per sequence: for a
        decoding sequence none (its first pipelined pass), one, or up to three (a pipelined token read
        before an MTP pass whose draft was accepted), and a just-prefilled sequence's first.
        `first_tokens(tokens)`, if given, receives a just-prefilled sequence's first token before the
        others' decode step runs (and it is then not returned): its time to first token does not
        include that step."""
        out = []
        if self._timing is not None:  # the last pass, from its start to here (its tokens' host work included)
            mtp, batch, made, begun, valid = self._timing
            if valid:
                self.modes.record(mtp, batch, made, time.perf_counter() - begun)
            self._timing = None
        prefilling = [s for s in self.seqs if s.prefilling]
        if prefilling:
            self._plain_group = None
        together = self._prefill_batch(prefilling)
        if len(together) > 1:
            out += self._prefill_together(together)
        elif prefilling:
            seq = prefilling[0]
            if seq.chunk is None:
                seq.chunk = seq.engine.prefill_step
            others_decode = any(not s.prefilling for s in self.seqs)
            budget = self.prefill_budget if others_decode and self.prefill_budget else seq.chunk
            seq.engine.prefill_step = min(seq.chunk, budget)
            try:
                next(seq.chunks)
            except StopIteration as done:
                seq.chunks = None
                out.append(self._first_token(seq, done.value))
        just_prefilled = {k for k, _, _ in out}
        if out and first_tokens is not None:
            first_tokens(out)
            out = []
        decoding = [s for s in self.seqs if not s.prefilling and s.key not in just_prefilled]
        if not decoding:
            return out
        # Alone: the only sequence (one that just prefilled or rejoined decodes with it next step; counting
        # it out here would send the other to MTP alone and back through a rejoin prefill every step).
        alone = len(decoding) == 1 and len(self.seqs) == 1
        seq = decoding[0]
        if alone and seq.engine.mtp and seq.pc.mtp_cache is not None:
            self._dissolve()
            out += self._settle([seq])
            return out + ([self._solo_token(seq)] if len(seq.generated) < seq.max_tokens else [])
        for s in decoding:
            if s.solo is not None:
                self._rejoin(s)
        decoding = [s for s in decoding if not s.prefilling]
        if decoding:
            out += self._batch_step(decoding)
        return out

    def _sample(self, seq: Sequence, logits: mx.array, fed: mx.array | None = None):
        """[1, V] logits after the sequence's last token -> (token [1], logprobs or None) on the device.
        fed: the token [1] this pass fed after `pc.tokens` (on the device, maybe not read yet)."""
        engine = seq.engine
        hist = engine._history(seq.pc.tokens)
        if hist is not None and fed is not None:
            hist = mx.concatenate([hist, fed.astype(hist.dtype)])
        processed = engine.sampler.process(hist, logits)
        tok = engine.sampler.sample(processed)
        return tok, engine._note_logprobs(processed, tok)

    def _emit(self, seq: Sequence, tok: int, lp) -> tuple[object, int, list | None]:
        now = time.perf_counter()
        if not seq.generated:
            seq.started = now
        seq.generated.append(tok)
        seq.stats.generated = len(seq.generated)
        seq.stats.gen_time = now - seq.started
        return seq.key, tok, lp

    def _first_token(self, seq: Sequence, logits: mx.array):
        tok, lp = self._sample(seq, logits[None])  # prefill's last-position logits [V] -> [1, V]
        mx.eval(tok) if lp is None else mx.eval(tok, lp)
        return self._emit(seq, tok[0].item(), None if lp is None else lp[0].tolist())

    def _solo_token(self, seq: Sequence):
        if seq.solo is None:
            stats = seq.stats
            stats.generated = len(seq.generated)
            seq.solo = seq.engine._decode_mtp(seq.pc, seq.generated[-1], seq.max_tokens, stats,
                                              time.perf_counter() - stats.gen_time)
        tok = next(seq.solo)
        seq.generated.append(tok)
        seq.stats.generated = len(seq.generated)
        return seq.key, tok, None

    def cache_of(self, key) -> PromptCache | None:
        """A sequence's cache as it stands: its own, or, while it decodes in the batch (its own lent to
        the batch buffers), a snapshot viewing its rows there (drop it before the next step)."""
        for seq in self.seqs:
            if seq.key == key:
                row = self.group.row_of(seq) if self.group is not None else None
                return self.group.snapshot(row) if row is not None else seq.pc
        return None

    def discard_group(self):
        """After a failed step: forget the batch buffers without writing them back (they may be half
        updated); the members' own caches are then stale and must be dropped by the caller."""
        self.group = None
        for s in self.seqs:
            s.unread = None

    def _dissolve(self):
        if self.group is not None:
            self.group.dissolve()
            self.group = None

    @staticmethod
    def _read(seqs: list[Sequence]) -> dict:
        """{key: (token, logprobs or None)} of the sequences' pipelined tokens, each pass's token array
        copied to the host once (the members of a pass share it)."""
        host, out = {}, {}
        for s in seqs:
            if s.unread is not None:
                tokens, b, lp = s.unread
                if id(tokens) not in host:
                    host[id(tokens)] = tokens.tolist()
                out[s.key] = host[id(tokens)][b], None if lp is None else lp[0].tolist()
        return out

    def _settle(self, seqs: list[Sequence]):
        """Read the sequences' pipelined tokens: each becomes the last generated token, not fed yet (the
        state MTP passes and a lone MTP sequence start from). Returns them as step output."""
        read = self._read(seqs)
        out = []
        for s in seqs:
            if s.key in read:
                s.unread = None
                out.append(self._emit(s, *read[s.key]))
        return out

    def _batch_step(self, decoding: list[Sequence]):
        """One pass for every decoding sequence: plain ([B, 1], pipelined) or, when the members can draft
        and the measured choice says so, an MTP pass ([B, 2], batch_mtp)."""
        out = []
        drafting = all(s.pc.mtp_cache is not None for s in decoding) and any(self._drafts(s) for s in decoding)
        mtp = drafting and self.modes.choose(len(decoding))
        if mtp:  # MTP passes start from host tokens: read the pipelined ones
            out = self._settle(decoding)
            decoding = [s for s in decoding if len(s.generated) < s.max_tokens]
            if not decoding:
                return out
        g = self.group
        if g is not None and {id(s) for s in g.seqs} == {id(s) for s in decoding}:
            decoding = list(g.seqs)  # the group's row order
        else:
            staying = [m for m in g.seqs if m is not None and any(m is s for s in decoding)] if g is not None else []
            joining = [s for s in decoding if not any(m is s for m in staying)]
            for s in joining:
                catch_up_mtp(self.model, s.pc)  # a prefill's deferred MTP slots
            if not (g.can_join(joining) if staying else DecodeGroup.accepts(joining)):
                raise RuntimeError("sequences in different MTP states cannot decode together")
            # Longest first: the indexer scores contiguous rows of like lengths together (BatchLayerCache.buckets).
            decoding = sorted(staying + joining, key=lambda s: -len(s.pc.tokens))
            if staying:
                self.group = g.regroup(decoding)
            else:
                self._dissolve()
                self.group = DecodeGroup(self.model, decoding)
        g = self.group
        if drafting:
            self._set_mode(decoding, mtp)
        start = time.perf_counter()
        step = self._mtp_step(decoding) if g.ahead else self._plain_step(decoding)
        # Timed at the next step. A pipelined plain pass's time is its building plus the wait for the pass
        # before it: it stands for a plain pass when that one was a plain pass of this group and no
        # prefill ran between them. An MTP pass waits for itself.
        valid = g.ahead or self._plain_group == g.serial
        self._timing = (g.ahead, len(decoding), len(step) if g.ahead else len(decoding), start, valid)
        self._plain_group = None if g.ahead else g.serial
        return out + step

    def _plain_step(self, decoding: list[Sequence]):
        """Every decoding sequence's next token in one main-model pass ([B, 1]), pipelined as mlx-lm
        decodes: the pass is built from the previous pass's tokens on the device and evaluated
        asynchronously before the host reads those tokens, so Python builds pass n+1 while the device
        computes pass n (a pass costs the larger of the two, not their sum). So a sequence's token
        comes out one call after its pass; a new member's first call only feeds its last token."""
        g = self.group
        fed = [mx.array([s.generated[-1]], dtype=mx.int32) if s.unread is None else
               s.unread[0][s.unread[1] : s.unread[1] + 1] for s in decoding]  # each [1]
        toks = mx.concatenate(fed)[:, None]  # [B, 1]
        logits, hidden = self.model(toks, cache=g.layers, return_hidden=True)  # [B, 1, V], [B, 1, hidden]
        g.plain_pass(toks, hidden)
        # Plain greedy rows share one argmax; rows with processors, sampling or logprobs sample alone.
        nxt = mx.argmax(logits[:, -1], axis=-1).astype(mx.int32)  # [B]
        alone = [b for b, s in enumerate(decoding) if not s.engine.sampler.params.greedy or
                 s.engine.sampler.processors or s.engine.logprobs is not None]
        lps = {}
        if alone:
            own = {}
            for b in alone:
                own[b], lps[b] = self._sample(decoding[b], logits[b, -1:], fed[b])
            nxt = mx.concatenate([own[b].astype(mx.int32) if b in own else nxt[b : b + 1] for b in range(len(decoding))])
        mx.async_eval(nxt, *[lp for lp in lps.values() if lp is not None], *g.arrays())
        read = self._read(decoding)  # the previous pass's tokens (this one computes meanwhile)
        out = []
        for b, s in enumerate(decoding):
            if s.key in read:
                tok, lp = read[s.key]
                s.pc.tokens.append(tok)
                out.append(self._emit(s, tok, lp))
            else:
                s.pc.tokens.append(s.generated[-1])
            s.unread = (nxt, b, lps.get(b))
        return out
