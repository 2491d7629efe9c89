"""Sampling as distributions, so speculative decoding can use the exact acceptance rule.

mlx-lm's samplers return a token; speculative sampling needs the (filtered, tempered)
probabilities of both the draft and the target. So the filters are mlx-lm's own
(`apply_top_p`, `apply_min_p`, `apply_top_k` on log-probabilities, `make_logits_processors`
for the repetition penalty), composed here into `logprobs()`; sampling draws from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors


@dataclass
class SamplingParams:
    temp: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    presence_penalty: float | None = None  # OpenAI's: subtracted once from every token seen in the window
    frequency_penalty: float | None = None  # subtracted per occurrence in the window
    penalty_context_size: int = 1024  # tokens the presence/frequency penalties look back over
    logit_bias: dict | None = None  # {token id: bias added to its logit}
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temp == 0


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        bias = {int(k): float(v) for k, v in params.logit_bias.items()} if params.logit_bias else None
        self.processors = make_logits_processors(
            logit_bias=bias, repetition_penalty=params.repetition_penalty,
            repetition_context_size=params.repetition_context_size,
            presence_penalty=params.presence_penalty or None, presence_context_size=params.penalty_context_size,
            frequency_penalty=params.frequency_penalty or None, frequency_context_size=params.penalty_context_size)
        # A seeded sampler draws from its own key, so its numbers do not depend on what else samples
        # in the process (other sequences of a batch); unseeded ones use MLX's global generator.
        self.key = mx.random.key(params.seed) if params.seed is not None else None

    def reseed(self, seed: int):
        self.params.seed = seed
        self.key = mx.random.key(seed)

    def next_key(self) -> mx.array | None:
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub

    def process(self, history: mx.array, logits: mx.array) -> mx.array:
        """Apply logits processors (history: [n] int tokens so far; logits [1, V])."""
        for proc in self.processors:
            logits = proc(history, logits)
        return logits

    def logprobs(self, logits: mx.array) -> mx.array:
        """[..., V] logits -> log-probabilities of the distribution actually sampled from."""
        p = self.params
        logprobs = logits.astype(mx.float32) / p.temp
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        if 0 < p.top_p < 1.0:
            logprobs = apply_top_p(logprobs, p.top_p)
        if p.min_p:
            logprobs = apply_min_p(logprobs, p.min_p)
        if p.top_k > 0:
            logprobs = apply_top_k(logprobs, p.top_k)
        return logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)

    @staticmethod
    def token_logprobs(logits: mx.array, tokens: mx.array, top: int) -> mx.array:
        """[n, V] logits (after processors, before temperature) and [n] chosen ids -> [n, 1 + 2*top]
        float32: the chosen token's log-probability, then the `top` best ids and their log-probabilities
        (OpenAI's `logprobs`/`top_logprobs`). Stays on the device; the consumer reads it with the token."""
        lp = logits.astype(mx.float32)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(lp, tokens.reshape(-1, 1).astype(mx.int32), axis=-1)  # [n, 1]
        if top <= 0:
            return chosen
        ids = mx.argpartition(-lp, kth=top - 1, axis=-1)[:, :top]  # [n, top], unordered
        vals = mx.take_along_axis(lp, ids, axis=-1)
        order = mx.argsort(-vals, axis=-1)
        ids, vals = mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(vals, order, axis=-1)
        return mx.concatenate([chosen, ids.astype(mx.float32), vals], axis=-1)

    def sample(self, logits: mx.array) -> mx.array:
        """[..., V] -> [...] token ids."""
        if self.params.greedy:
            return mx.argmax(logits, axis=-1)
        return mx.random.categorical(self.logprobs(logits), key=self.next_key())


def verify_drafts(sampler: Sampler, target_logits: mx.array, draft_logits: mx.array, drafts: mx.array) -> mx.array:
    """Standard speculative-sampling verification (Leviathan et al. / Chen et al.), on the device.

    target_logits [k+1, V] (processed), draft_logits [k, V] (processed), drafts [k] token ids.
    Returns [2k+1] int32: k accept flags, then k+1 candidate next tokens: at j < k the target's
    correction if draft j is the first rejection (sampled from max(0, p_j - q_j) renormalised),
    at k the bonus token from p_k. Everything stays on the device so the engine syncs once per
    verification; `accept_prefix` reads the result. Greedy: exact-match rule, candidates = argmax.
    """
    if sampler.params.greedy:
        targets = mx.argmax(target_logits, axis=-1).astype(mx.int32)  # [k+1]
        return mx.concatenate([(targets[:-1] == drafts).astype(mx.int32), targets])
    p = mx.exp(sampler.logprobs(target_logits))  # [k+1, V]
    q = mx.exp(sampler.logprobs(draft_logits))  # [k, V]
    idx = drafts[:, None]
    ratio = (mx.take_along_axis(p[:-1], idx, axis=-1) / mx.take_along_axis(q, idx, axis=-1))[:, 0]
    ok = mx.random.uniform(shape=ratio.shape, key=sampler.next_key()) < ratio
    # A rejection implies p_j(d) < q_j(d), so the residual has mass wherever it is used; the
    # samples at positions that are not the first rejection are discarded.
    residual = mx.maximum(p[:-1] - q, 0.0)
    corrections = mx.random.categorical(mx.log(residual / mx.maximum(residual.sum(axis=-1, keepdims=True), 1e-30)),
                                        key=sampler.next_key())
    bonus = mx.random.categorical(mx.log(p[-1:]), key=sampler.next_key())
    return mx.concatenate([ok.astype(mx.int32), corrections.astype(mx.int32), bonus.astype(mx.int32)])


def accept_prefix(verdict: list[int], k: int) -> tuple[int, int]:
    """verify_drafts' result on the host -> (number of drafts accepted a, next token)."""
    a = 0
    while a < k and verdict[a]:
        a += 1
    return a, verdict[k + a]

