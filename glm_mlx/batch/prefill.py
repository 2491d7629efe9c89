"""Prompts arriving together prefill in one padded pass (BatchEngine's mixin): the weights are read once
for all of them, each row at its own offset after its reused prefix."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import mlx.core as mx

from .cache import BatchLayerCache
from ..generation.engine import defer_mtp, feed_mtp
from ..generation.prompt_cache import common_prefix

if TYPE_CHECKING:
    from .sequence import Sequence


class JointPrefill:
    def _prefill_batch(self, prefilling: list["Sequence"]) -> list["Sequence"]:
        """The not-yet-started prefills to run in one pass (arrival order), when more than one fits: the
        step's prefill budget bounds their new tokens together (a whole chunk when nobody decodes), and
        the unchunked batch indexer's scores ([B, L, T] float32) stay within its per-chunk budget."""
        from ..model.attention import INDEX_SCORE_BUDGET

        fresh = [s for s in prefilling if s.chunk is None]
        if not self.together_min or len(fresh) < self.together_min:
            return []
        others_decode = any(not s.prefilling for s in self.seqs)
        budget = self.prefill_budget if others_decode and self.prefill_budget else fresh[0].engine.prefill_step
        h = self.model.args.index_n_heads
        todo = {id(s): len(s.prompt) - min(common_prefix(s.pc.tokens, s.prompt), len(s.prompt) - 1) for s in fresh}
        first = todo[id(fresh[0])]
        # Rows are padded to the longest: only prompts of like length (within 2x of the oldest's) go together.
        alike = [s for s in fresh if first / 2 <= todo[id(s)] <= 2 * first]
        chosen, total, longest, context = [], 0, 0, 0
        for s in alike:
            t, lng, ctx = total + todo[id(s)], max(longest, todo[id(s)]), max(context, len(s.prompt))
            if t > budget or (len(chosen) + 1) * lng * ctx * h > INDEX_SCORE_BUDGET:
                break
            chosen, total, longest, context = chosen + [s], t, lng, ctx
        return chosen if len(chosen) >= max(2, self.together_min) else []

    def _prefill_together(self, seqs: list["Sequence"]):
        """Prefill several prompts in one main-model pass ([B, L], right-padded; each row at its own
        offset after its reused prefix, its padding's cache rows dropped), feed each MTP cache, sample
        each first token. Weights are read once for all of them, as in a decode step."""
        start = time.perf_counter()
        todos = []
        for s in seqs:
            s.chunks.close()  # not started: nothing to undo
            s.chunks, s.chunk = None, s.engine.prefill_step
            reused = s.pc.reuse(s.prompt, self.model)
            s.stats.reused_tokens, s.stats.prompt_tokens = reused, len(s.prompt) - reused
            todos.append(s.prompt[reused:])
        L = max(len(t) for t in todos)
        layers = [BatchLayerCache.of([s.pc.cache[i] for s in seqs]) for i in range(self.model.args.num_hidden_layers)]
        for s in seqs:
            for cache in s.pc.cache:
                BatchLayerCache.lend(cache)  # the padded buffers hold the rows until they are stored back
        hidden = self.model.model(mx.array([t + [0] * (L - len(t)) for t in todos]), layers)  # [B, L, hidden]
        last = mx.array([len(t) - 1 for t in todos])[:, None, None]  # [B, 1, 1]
        logits = self.model.lm_head(mx.take_along_axis(hidden, last, axis=1))[:, 0]  # [B, V]
        out = []
        for b, (s, todo) in enumerate(zip(seqs, todos)):
            for layer, cache in zip(layers, s.pc.cache):
                layer.trim(b, L - len(todo))  # the padding's rows
                BatchLayerCache.store(cache, layer.rows(b))
            (defer_mtp if s.engine.defer_mtp else feed_mtp)(self.model, s.pc, todo, hidden[b : b + 1, : len(todo)])
            mx.eval(logits[b], s.pc.arrays())
            s.stats.prompt_time = time.perf_counter() - start
            out.append(self._first_token(s, logits[b]))
        return out
