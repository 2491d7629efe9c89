"""Constrained decoding: logits processors that enforce a grammar (llguidance) and a reasoning budget.

Both are mlx-lm-style logits processors, `(history [n] ids, logits [1, V]) -> logits`, appended to a
sequence's `Sampler.processors`, so every decode path that applies processors enforces them: the
batch's first token, plain passes, MTP batch passes for non-drafting members, and the single-sequence
Engine. The grammar text is plain Python (an llguidance Lark grammar, built in glm_mlx/serve/grammar.py
in the handler thread); the matcher lives in the thread that samples (the worker).

llguidance rather than xgrammar: llguidance computes the token mask on the CPU from a Lark/JSON-schema
grammar with no framework dependency (its `llguidance.mlx` helper is what LM Studio's mlx-engine and
vllm-mlx use); xgrammar's MLX path is an example depending on torch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import mlx.core as mx
import numpy as np

_lock = threading.Lock()
_tokenizers: dict = {}  # (id(tokenizer), eos) -> (tokenizer, LLTokenizer): the tokenizer is kept so its id stays its own
_matchers: OrderedDict = OrderedDict()  # (id(LLTokenizer), grammar) -> a fresh LLMatcher, copied per request
_MAX_CACHED = 64


def eos_ids(tokenizer, model=None) -> list[int]:
    """End-of-generation ids (what TextStream stops on): the model's and the tokenizer's."""
    ids = set(getattr(getattr(model, "args", None), "eos_token_ids", None) or [])
    ids |= set(getattr(tokenizer, "eos_token_ids", None) or [])
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    if not ids and getattr(hf, "eos_token_id", None) is not None:
        ids.add(hf.eos_token_id)
    return sorted(int(i) for i in ids)


def ll_tokenizer(tokenizer, eos: list[int] | None = None):
    """The llguidance tokenizer for an mlx-lm TokenizerWrapper or a HF fast tokenizer (built once, ~50 ms
    on glm-mini). GLM's added special tokens (`<tool_call>`, `</arg_value>`, `</think>`, ...) are special
    tokens for llguidance: Lark names them as `<tool_call>` (or by id, `<[6144]>`), and text regexes never
    match them."""
    import llguidance.hf

    eos = tuple(eos or eos_ids(tokenizer))
    key = (id(tokenizer), eos)
    with _lock:
        hit = _tokenizers.get(key)
        if hit is not None:
            return hit[1]
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    ll = llguidance.hf.from_tokenizer(hf, eos_token=list(eos) if eos else None)
    with _lock:
        _tokenizers[key] = (tokenizer, ll)
    return ll


def grammar_error(grammar: str, tokenizer) -> str | None:
    """None if the Lark grammar compiles for this tokenizer, else llguidance's message (plain Python:
    handler threads call it to answer 400 before any generation)."""
    import llguidance

    try:
        bad, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(
            llguidance.LLMatcher.grammar_from_lark(grammar), ll_tokenizer(tokenizer))
    except Exception as e:  # noqa: BLE001 - malformed input of any kind is the client's
        return str(e)
    return msgs[0] if bad else None


def matcher(grammar: str, tokenizer, eos: list[int] | None = None):
    """A fresh LLMatcher for a Lark grammar; compiled grammars are cached by their text (a copy of the
    cached initial matcher is handed out). Raises ValueError if the grammar does not compile."""
    import llguidance

    ll = ll_tokenizer(tokenizer, eos)
    key = (id(ll), grammar)
    with _lock:
        base = _matchers.get(key)
        if base is not None:
            _matchers.move_to_end(key)
    if base is None:
        base = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
        if base.is_error():
            raise ValueError(f"grammar does not compile: {base.get_error()}")
        with _lock:
            _matchers[key] = base
            while len(_matchers) > _MAX_CACHED:
                _matchers.popitem(last=False)
    return base.deep_copy()


class GrammarProcessor:
    """Masks the logits to the tokens the grammar allows next (EOS only where it accepts).

    start: the prompt's length; the history's tokens past it are the output, consumed by the matcher as
    they arrive. Reading them syncs that row (the mask for token t+1 needs token t on the host), so a
    constrained row loses the pipelining of plain passes for itself. A matcher that errs (it should not:
    only allowed tokens are sampled) allows only EOS, ending the sequence."""

    def __init__(self, matcher, start: int, eos: list[int]):
        self.m, self.start, self.eos = matcher, start, list(eos)
        self.consumed = 0
        self.error: str | None = None

    def _advance(self, history: mx.array):
        n = history.shape[0] - self.start
        if n < self.consumed:  # a caller re-scored an earlier position
            self.m.rollback(self.consumed - n)
            self.consumed = n
        if n > self.consumed:
            new = history[self.start + self.consumed :].tolist()
            if not self.m.consume_tokens([int(t) for t in new]) and self.error is None:
                self.error = self.m.get_error()
            self.consumed = n

    def allowed(self, vocab: int) -> np.ndarray:
        """[vocab] bool: what the grammar allows after the tokens consumed."""
        if self.m.is_error():
            mask = np.zeros(vocab, dtype=bool)
            mask[[e for e in self.eos if e < vocab]] = True
            return mask
        bits = np.unpackbits(np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        if bits.shape[0] >= vocab:
            return bits[:vocab].astype(bool)
        return np.concatenate([bits.astype(bool), np.zeros(vocab - bits.shape[0], dtype=bool)])

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        self._advance(history)
        mask = mx.array(self.allowed(logits.shape[-1]))
        return mx.where(mask, logits, mx.array(-mx.inf, dtype=logits.dtype))


class ReasoningBudget:
    """Once `budget` tokens were generated inside the reasoning (the output starts there) with no
    `close` (`</think>`) among them, only `close` may come next. On the device: no host sync."""

    def __init__(self, start: int, budget: int, close: int):
        self.start, self.budget, self.close = start, budget, close

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        n = history.shape[0] - self.start
        if n < self.budget:
            return logits
        closed = mx.any(history[self.start :] == self.close)
        ids = mx.arange(logits.shape[-1])
        forced = mx.where(ids == self.close, mx.array(0.0, logits.dtype), mx.array(-mx.inf, logits.dtype))
        return mx.where(closed, logits, forced)


def think_close_id(tokenizer) -> int | None:
    """The id of `</think>` as a single token, or None."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        ids = hf.encode("</think>", add_special_tokens=False)
    except Exception:  # noqa: BLE001
        return None
    return ids[0] if len(ids) == 1 else None


def processors(tokenizer, model, prompt_len: int, grammar: str | None = None,
               reasoning_budget: int | None = None) -> list:
    """The processors a request's sampler gets (grammar first: the budget may then force `</think>`,
    which a grammar with reasoning allows there). Raises ValueError for a grammar that does not compile."""
    out = []
    if grammar is not None:
        eos = eos_ids(tokenizer, model)
        out.append(GrammarProcessor(matcher(grammar, tokenizer, eos), prompt_len, eos))
    if reasoning_budget is not None:
        close = think_close_id(tokenizer)
        if close is not None:
            out.append(ReasoningBudget(prompt_len, reasoning_budget, close))
    return out
