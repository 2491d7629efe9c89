"""Token-level generation: chunked prefill, prompt-cache reuse, MTP speculative decoding.

Knows nothing of tokenizers or terminals (generate.py adds text). State lives in a
`PromptCache`; its invariant between calls:
  * `cache` (main layers) holds exactly `tokens`;
  * `mtp_cache` holds slot i = (h_i, tokens[i+1]) for positions 0..q-1, q = mtp_cache.offset;
  * `pending` holds h for positions q..len(tokens)-1, whose slots wait for the next tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx

from ..model.glm_moe_dsa import Model
from .prompt_cache import PromptCache
from .sampling import Sampler, SamplingParams, accept_prefix, verify_drafts


@dataclass
class StepStats:
    prompt_tokens: int = 0  # prompt tokens actually prefilled (reused ones excluded)
    reused_tokens: int = 0
    prompt_time: float = 0.0
    generated: int = 0
    gen_time: float = 0.0
    main_passes: int = 0  # main-model decode passes
    drafted: int = 0
    accepted: int = 0
    accepted_per_pos: list = field(default_factory=list)
    # with Engine(logprobs=n): per generated token [chosen logprob, n top ids, n top logprobs]
    logprobs: list = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        # The first token comes from the prefill pass; count tokens per decode pass after it.
        return (self.generated - 1) / self.main_passes if self.main_passes else 0.0


def feed_mtp(model, pc: PromptCache, toks: list[int], hidden: mx.array):
    """After the main model ran toks (hidden [1, L, hidden]), write the MTP slots they complete and
    keep the last position pending; append toks to pc.tokens. MTP slot i pairs h_i with token i+1:
    the pending positions and every new position but the last (whose next token is not known yet)."""
    if pc.mtp_cache is not None:
        if pc.pending is None:
            hs, nxt = hidden[:, :-1], toks[1:]
        else:
            hs = mx.concatenate([pc.pending, hidden[:, :-1]], axis=1)
            nxt = pc.tokens[pc.mtp_cache.offset + 1 :] + toks
        if nxt:
            # only the cache writes matter: mtp_draft's head covers one row (in a pipeline,
            # the logits shared between ranks are [1, V], not [1, L, V])
            model.mtp_draft(hs, mx.array([nxt]), pc.mtp_cache)
        pc.pending = hidden[:, -1:]
    pc.tokens.extend(toks)


# Prefill keeps at most this many positions' h pending before writing their MTP slots.
DEFERRED_MTP_ROWS = 2048


def defer_mtp(model, pc: PromptCache, toks: list[int], hidden: mx.array):
    """Prefill's MTP part, deferred: keep h of the new positions pending and append toks. Their MTP
    slots are written by `catch_up_mtp` once the first token is out (or when more than
    DEFERRED_MTP_ROWS wait), so the MTP layer is off the time to first token. The invariant holds:
    pending is h of positions mtp_cache.offset .. len(tokens) - 1."""
    if pc.mtp_cache is not None:
        if pc.pending is not None and pc.pending.shape[1] + hidden.shape[1] > DEFERRED_MTP_ROWS:
            catch_up_mtp(model, pc)
        pc.pending = hidden if pc.pending is None else mx.concatenate([pc.pending, hidden], axis=1)
    pc.tokens.extend(toks)


def catch_up_mtp(model, pc: PromptCache):
    """Write the MTP slots of every pending position but the last (whose next token is not known
    yet), as feed_mtp does while decoding."""
    if pc.mtp_cache is None or pc.pending is None or pc.pending.shape[1] <= 1:
        return
    q = pc.mtp_cache.offset
    model.mtp_draft(pc.pending[:, :-1], mx.array([pc.tokens[q + 1 :]]), pc.mtp_cache)
    pc.pending = pc.pending[:, -1:]


class Engine:
    def __init__(self, model: Model, params: SamplingParams | None = None, *, mtp: bool | None = None,
                 num_draft: int = 1, prefill_step: int = 2048, logprobs: int | None = None,
                 defer_mtp: bool = False):
        """defer_mtp: prefill leaves the MTP slots of its positions for `catch_up_mtp` (a server writes them
        after the first token is out); the drafting steps catch up by themselves."""
        self.model = model
        self.sampler = Sampler(params or SamplingParams())
        self.mtp = model.has_mtp if mtp is None else (mtp and model.has_mtp)
        # Log-probabilities come from plain decoding: every token's distribution is the main model's
        # own, one token per pass (with MTP the accepted drafts' rows would need re-gathering).
        self.logprobs = logprobs
        if logprobs is not None:
            self.mtp = False
        self.num_draft = max(1, num_draft)
        self.prefill_step = prefill_step
        self.defer_mtp = defer_mtp

    def _history(self, tokens: list[int], *more: int) -> mx.array | None:
        """The token history for logits processors; None (no O(context) copy) when there are none."""
        return mx.array(tokens + list(more)) if self.sampler.processors else None

    def new_cache(self) -> PromptCache:
        return PromptCache.fresh(self.model, mtp=self.mtp)

    # --- prefill ---------------------------------------------------------------------------
    def _forward(self, pc: PromptCache, toks: list[int], defer: bool = False) -> mx.array:
        """Run the main model on toks (appending to the cache) and feed the MTP layer (or, with defer,
        leave that for later: see defer_mtp); return the last position's logits [1, 1, V]."""
        logits, hidden = self.model(mx.array([toks]), cache=pc.cache, return_hidden=True, last_only=True)
        (defer_mtp if defer else feed_mtp)(self.model, pc, toks, hidden)
        return logits

    def prefill_chunks(self, pc: PromptCache, prompt: list[int], stats: StepStats):
        """Reuse the common prefix, prefill the rest chunk by chunk, yielding after each evaluated
        chunk (a scheduler interleaves other work there); returns the last position's logits [V]."""
        start = time.perf_counter()
        reused = pc.reuse(prompt, self.model)
        todo = prompt[reused:]
        stats.reused_tokens, stats.prompt_tokens = reused, len(todo)
        logits, done = None, 0
        while done < len(todo):
            step = self.prefill_step  # read per chunk: a scheduler may shrink it while others decode
            logits = self._forward(pc, todo[done : done + step], defer=self.defer_mtp)[0, -1]
            # Evaluate and free between chunks: peak memory stays at one chunk's activations.
            mx.eval(logits, pc.arrays())
            mx.clear_cache()
            stats.prompt_time = time.perf_counter() - start
            done += step
            if done < len(todo):
                yield done
        return logits

    def prefill(self, pc: PromptCache, prompt: list[int], stats: StepStats) -> mx.array:
        """Reuse the common prefix, prefill the rest in chunks; return the last position's logits [V].
        (To stop between chunks, drive `prefill_chunks` and close it: the cache keeps the chunks done.)"""
        chunks = self.prefill_chunks(pc, prompt, stats)
        while True:
            try:
                next(chunks)
            except StopIteration as done:
                return done.value

    # --- decode ----------------------------------------------------------------------------
    def _note_logprobs(self, logits: mx.array, tok: mx.array) -> mx.array | None:
        """[1, V] processed logits, [1] token -> [1, 1+2n] on the device (None when not asked for)."""
        if self.logprobs is None:
            return None
        return Sampler.token_logprobs(logits, tok, self.logprobs)

    def generate(self, prompt: list[int], pc: PromptCache | None = None, max_tokens: int = 256,
                 stats: StepStats | None = None) -> Iterator[int]:
        """Yield generated token ids. The caller stops iterating when it sees a stop token (closing the
        generator between tokens leaves the cache consistent)."""
        pc = pc if pc is not None else self.new_cache()
        stats = stats if stats is not None else StepStats()
        if not prompt:
            raise ValueError("empty prompt")
        if hasattr(self.model, "on_generate"):  # pipeline leader: followers replay this call
            self.model.on_generate(prompt, pc, max_tokens, self)
        logits = self.prefill(pc, prompt, stats)
        processed = self.sampler.process(self._history(prompt), logits[None])
        tok = self.sampler.sample(processed)
        lp = self._note_logprobs(processed, tok)
        y = tok[0].item()
        start = time.perf_counter()
        stats.generated, stats.main_passes = 1, 0
        stats.logprobs = [] if lp is None else [lp[0].tolist()]
        yield y
        if self.mtp and pc.mtp_cache is not None:
            yield from self._decode_mtp(pc, y, max_tokens, stats, start)
        else:
            yield from self._decode_plain(pc, y, max_tokens, stats, start)

    def _decode_plain(self, pc, y, max_tokens, stats, start):
        if pc.mtp_cache is not None:  # the cache keeps its MTP layer fed for a later MTP turn
            yield from self._decode_plain_feeding_mtp(pc, y, max_tokens, stats, start)
            return

        def step(tok: mx.array):  # tok [1] on the device -> (next token [1], its logprobs or None)
            logits = self.model(tok[None], cache=pc.cache)[0, -1:]
            hist = None if not self.sampler.processors else mx.concatenate([mx.array(pc.tokens), tok])
            processed = self.sampler.process(hist, logits)
            nxt = self.sampler.sample(processed)
            lp = self._note_logprobs(processed, nxt)
            mx.async_eval(nxt) if lp is None else mx.async_eval(nxt, lp)
            return nxt, lp

        if stats.generated >= max_tokens:
            return
        # mlx-lm's pipelining: the next step is built from the device token before the host reads
        # the current one, so Python builds step n+1 while the device evaluates step n. A token
        # joins pc.tokens once its step is built (step's history is pc.tokens + that token).
        nxt = step(mx.array([y]))
        pc.tokens.append(y)
        while stats.generated < max_tokens:
            cur, cur_lp = nxt
            feed = stats.generated + 1 < max_tokens  # is another token needed after this one?
            if feed:
                nxt = step(cur)
            tok = cur.item()
            if cur_lp is not None:
                stats.logprobs.append(cur_lp[0].tolist())
            if feed:
                pc.tokens.append(tok)  # the cache holds exactly pc.tokens
            stats.main_passes += 1
            stats.generated += 1
            stats.gen_time = time.perf_counter() - start
            yield tok

    def _decode_plain_feeding_mtp(self, pc, y, max_tokens, stats, start):
        tok = y
        while stats.generated < max_tokens:
            logits = self._forward(pc, [tok])[0, -1:]  # appends tok to pc.tokens: the history below has it
            logits = self.sampler.process(self._history(pc.tokens), logits)
            nxt = self.sampler.sample(logits)
            lp = self._note_logprobs(logits, nxt)
            if lp is not None:
                stats.logprobs.append(lp[0].tolist())
            tok = nxt[0].item()
            stats.main_passes += 1
            stats.generated += 1
            stats.gen_time = time.perf_counter() - start
            yield tok

    def _draft(self, pc: PromptCache, y: int, first=None) -> tuple[mx.array, mx.array]:
        """k draft tokens ([k] on the device: no host sync between steps) and their logits [k, V].

        Step 1 either was drafted ahead (`first` = (token, logits, h), see _draft_ahead) or here
        writes the MTP slots of every pending position (the main model's true hidden states) and
        of y's. Later steps feed the MTP layer its own output; their slots are trimmed after
        verification.
        """
        hist = self._history(pc.tokens, y)
        if first is None:
            toks = mx.array([pc.tokens[pc.mtp_cache.offset + 1 :] + [y]])
            logits, hidden = self.model.mtp_draft(pc.pending, toks, pc.mtp_cache)
            logits = self.sampler.process(hist, logits)
            first, pc.pending = (self.sampler.sample(logits).astype(mx.int32), logits, hidden), None
        tok, logits, hidden = first
        drafts, logits_all = [tok], [logits]
        for _ in range(self.num_draft - 1):
            logits, hidden = self.model.mtp_draft(hidden, drafts[-1][None], pc.mtp_cache)
            logits = self.sampler.process(hist if hist is None else mx.concatenate([hist, *drafts]), logits)
            drafts.append(self.sampler.sample(logits).astype(mx.int32))
            logits_all.append(logits)
        if len(drafts) == 1:
            return drafts[0], logits_all[0]
        return mx.concatenate(drafts), mx.concatenate(logits_all, axis=0)

    def _draft_ahead(self, pc: PromptCache, hidden: mx.array, drafts: mx.array, verdict: mx.array):
        """The next pass's first draft step, built from device arrays before the host reads the
        verdict, so the device drafts while the host accepts and builds the next verification.

        Verification row j (h at y's position + j) pairs with the token after it: draft j while
        j < a, then the verdict's next token, whose row drafts; rows past a are trimmed once the
        host knows a. Returns (draft [1], logits [1, V], h [1, 1, hidden]).
        """
        k = self.num_draft
        a = mx.cumprod(verdict[:k]).sum(keepdims=True)  # [1]: accepted drafts
        cand = verdict[k:]  # [k+1] candidate next tokens
        toks = mx.where(mx.arange(k + 1) < a, mx.concatenate([drafts, cand[-1:]]), cand)  # [k+1]
        logits, h = self.model.mtp_draft(hidden, toks[None], pc.mtp_cache, row=a)
        return self.sampler.sample(logits).astype(mx.int32), logits, h

    def _decode_mtp(self, pc, y, max_tokens, stats, start):
        k = self.num_draft
        stats.accepted_per_pos = [0] * k
        ahead = not self.sampler.processors  # processors need the (host) history to draft
        first = None
        try:
            while stats.generated < max_tokens:
                pc.ahead = None  # its slot now pairs with y, which this pass puts in tokens
                drafts, draft_logits = self._draft(pc, y, first)
                mx.async_eval(drafts)  # the device drafts while Python builds the verification graph
                # Verify y and all drafts in one main-model pass (y sits at position len(pc.tokens)).
                inputs = mx.concatenate([mx.array([y], dtype=mx.int32), drafts])
                logits, hidden = self.model(inputs[None], cache=pc.cache, return_hidden=True)
                stats.main_passes += 1
                target = logits[0]  # [k+1, V]
                if self.sampler.processors:  # position j's history ends with y and drafts before j
                    hist = self._history(pc.tokens, y)
                    target = mx.concatenate([self.sampler.process(mx.concatenate([hist, drafts[:j]]), target[j : j + 1])
                                             for j in range(k + 1)], axis=0)
                verdict = verify_drafts(self.sampler, target, draft_logits, drafts)
                result = mx.concatenate([drafts, verdict])  # drafts, accept flags, candidate next tokens
                mx.async_eval(result)  # its own evaluation, so reading it never waits for the drafting
                if ahead:
                    pc.mtp_cache.trim(k - 1)  # this pass's later draft slots
                    first = self._draft_ahead(pc, hidden, drafts, verdict)
                    mx.async_eval(first[0])
                verdict = result.tolist()  # the one host sync per pass
                draft_ids = verdict[:k]
                a, nxt = accept_prefix(verdict[k:], k)
                stats.drafted += k
                stats.accepted += a
                for j in range(a):
                    stats.accepted_per_pos[j] += 1
                # Roll back rejected positions: the main cache keeps y + a drafts. The MTP cache
                # keeps slots up to y + a; drafted ahead, the last pairs with nxt (pc.ahead holds
                # its h), otherwise positions y..y+a wait (pending) for the next first draft step.
                for c in pc.cache:
                    c.trim(k - a)
                if ahead:
                    pc.mtp_cache.trim(k - a)
                    pc.ahead = hidden[:, a : a + 1]
                else:
                    pc.mtp_cache.trim(k - 1)
                    pc.pending = hidden[:, : a + 1]
                pc.tokens.extend([y] + draft_ids[:a])
                for tok in draft_ids[:a] + [nxt]:
                    if stats.generated >= max_tokens:
                        return
                    stats.generated += 1
                    stats.gen_time = time.perf_counter() - start
                    yield tok
                y = nxt
        finally:
            pc.settle()  # a drafted-ahead slot pairs with a token that is not in the cache
