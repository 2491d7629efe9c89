"""Continuous batching: sequences join and leave a running batch between decode steps.

Each sequence keeps its own PromptCache (latent KV, indexer keys, MTP state) and its own sampler.
A decode step feeds every decoding sequence's last token in one main-model pass: [B, 1] tokens over
a `DecodeGroup`, per layer one padded buffer holding every sequence's rows (batch_cache.py), so
each op runs once for the batch (weights read once) while each sequence keeps its own rope offset,
its own rows and its own DSA top-k selection. Sequences of any lengths decode together, past
index_topk included. Rows move into the group when its membership changes and back into each
sequence's PromptCache when it leaves (or the group dissolves for a lone MTP sequence).
A new prompt prefills one chunk per step (`Engine.prefill_chunks`) between decode steps, so the
running streams do not stall behind a long prompt.

MTP: a sequence decoding alone (nothing else decoding or prefilling) uses MTP speculative decoding
(the engine's own `_decode_mtp`). While the batch holds more than one sequence MTP is off and each
step keeps every sequence's MTP cache fed (`feed_mtp`), so a sequence that is alone again drafts at
once. When a second sequence arrives, the drafting generator is closed (its caches settle) and the
sequence rejoins through a one- or two-token prefill of its own tokens. Greedy output is the same
either way: MTP's greedy output equals plain greedy decoding.

Knows nothing of text: the caller turns tokens into text and says when a sequence is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx

from .batch_cache import BatchLayerCache
from .engine import Engine, StepStats
from .prompt_cache import PromptCache


@dataclass
class Sequence:
    key: object
    prompt: list[int]
    pc: PromptCache
    engine: Engine  # this sequence's sampler, logprobs setting, MTP and prefill settings
    max_tokens: int
    generated: list[int] = field(default_factory=list)
    stats: StepStats = field(default_factory=StepStats)
    chunks: object = None  # the prefill generator while prefilling (or rejoining)
    solo: object = None  # the MTP generator while decoding alone
    started: float = 0.0  # when its first token came
    chunk: int | None = None  # its engine's own prefill chunk (the budget may shrink it for a step)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def prefilling(self) -> bool:
        return self.chunks is not None


class DecodeGroup:
    """The decoding sequences' caches as batch buffers: one BatchLayerCache per layer (and for the MTP
    layer, with the pending hidden states [B, 1, hidden], when every member has an MTP cache)."""

    def __init__(self, model, seqs: list[Sequence]):
        self.seqs = list(seqs)
        n = model.args.num_hidden_layers

        self.layers = [BatchLayerCache.of([s.pc.cache[layer] for s in seqs]) for layer in range(n)]
        with_mtp = all(s.pc.mtp_cache is not None for s in seqs)
        self.mtp = BatchLayerCache.of([s.pc.mtp_cache for s in seqs]) if with_mtp else None
        self.pending = mx.concatenate([s.pc.pending for s in seqs], axis=0) if with_mtp else None

    @staticmethod
    def accepts(seqs: list[Sequence]) -> bool:
        """Members' MTP state must be uniform and one position behind (as after a prefill or a step)."""
        has = [s.pc.mtp_cache is not None for s in seqs]
        if any(has) and not all(has):
            return False
        return all(s.pc.pending is not None and s.pc.pending.shape[1] == 1 and
                   s.pc.mtp_cache.offset == len(s.pc.tokens) - 1 for s in seqs) if all(has) else True

    def dissolve(self):
        """Every member's rows back into its own PromptCache."""
        for b, s in enumerate(self.seqs):
            for layer, cache in zip(self.layers, s.pc.cache):
                BatchLayerCache.store(cache, layer.rows(b))
            if self.mtp is not None:
                BatchLayerCache.store(s.pc.mtp_cache, self.mtp.rows(b))
                s.pc.pending = self.pending[b : b + 1]

    def arrays(self) -> list[mx.array]:
        caches = self.layers + ([self.mtp] if self.mtp is not None else [])
        return [a for c in caches for a in c.arrays()] + ([self.pending] if self.pending is not None else [])


class BatchEngine:
    """prefill_budget: prompt tokens prefilled per step while other sequences decode (their streams
    wait that long for each token); None: a whole prefill chunk (the engine's prefill_step)."""

    def __init__(self, model, max_batch: int = 8, prefill_budget: int | None = None):
        self.model, self.max_batch, self.prefill_budget = model, max_batch, prefill_budget
        self.seqs: list[Sequence] = []  # in arrival order
        self.group: DecodeGroup | None = None

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
                self._dissolve()
                self.seqs.remove(seq)
                if seq.solo is not None:
                    seq.solo.close()  # settles the MTP cache (engine's finally)
                    seq.solo = None
                if seq.chunks is not None:
                    seq.chunks.close()
                    seq.chunks = None
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
        Returns the tokens produced: (key, token, logprobs or None), at most one per sequence, except
        a sequence that finishes its prefill, which may also decode in the same step.
        `first_tokens(tokens)`, if given, receives a just-prefilled sequence's first token before the
        others' decode step runs (and it is then not returned): its time to first token does not
        include that step."""
        out = []
        prefilling = [s for s in self.seqs if s.prefilling]
        if prefilling:
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
        alone = len(decoding) == 1 and not any(s.prefilling for s in self.seqs)
        seq = decoding[0]
        if alone and seq.engine.mtp and seq.pc.mtp_cache is not None:
            self._dissolve()
            return out + [self._solo_token(seq)]
        for s in decoding:
            if s.solo is not None:
                self._rejoin(s)
        decoding = [s for s in decoding if not s.prefilling]
        if decoding:
            out += self._batch_step(decoding)
        return out

    def _sample(self, seq: Sequence, logits: mx.array):
        """[1, V] logits after the sequence's last token -> (token [1], logprobs or None) on the device."""
        engine = seq.engine
        hist = engine._history(seq.pc.tokens)
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

    def discard_group(self):
        """After a failed step: forget the batch buffers without writing them back (they may be half
        updated); the members' own caches are then stale and must be dropped by the caller."""
        self.group = None

    def _dissolve(self):
        if self.group is not None:
            self.group.dissolve()
            self.group = None

    def _batch_step(self, decoding: list[Sequence]):
        """Every decoding sequence's last token in one main-model pass ([B, 1])."""
        if self.group is None or [s.key for s in self.group.seqs] != [s.key for s in decoding]:
            self._dissolve()
            if not DecodeGroup.accepts(decoding):
                raise RuntimeError("sequences in different MTP states cannot decode together")
            self.group = DecodeGroup(self.model, decoding)
        g = self.group
        toks = mx.array([[s.generated[-1]] for s in decoding])  # [B, 1]
        logits, hidden = self.model(toks, cache=g.layers, return_hidden=True)  # [B, 1, V], [B, 1, hidden]
        if g.mtp is not None:  # MTP slot at each previous position pairs its h with this token
            self.model.mtp_hidden(g.pending, toks, cache=g.mtp)
            g.pending = hidden
        for s in decoding:
            s.pc.tokens.append(s.generated[-1])
        # Plain greedy rows share one argmax; rows with processors, sampling or logprobs sample alone.
        plain = [b for b, s in enumerate(decoding) if s.engine.sampler.params.greedy and
                 not s.engine.sampler.processors and s.engine.logprobs is None]
        results = [None] * len(decoding)
        if plain:
            picks = mx.argmax(logits[mx.array(plain), -1], axis=-1)  # [len(plain)]
            for i, b in enumerate(plain):
                results[b] = (picks[i : i + 1], None)
        for b, s in enumerate(decoding):
            if results[b] is None:
                results[b] = self._sample(s, logits[b, -1:])
        mx.eval([t for t, _ in results] + [lp for _, lp in results if lp is not None] + g.arrays())
        return [self._emit(s, tok[0].item(), None if lp is None else lp[0].tolist())
                for s, (tok, lp) in zip(decoding, results)]
