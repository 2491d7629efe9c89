"""Generation engine: MTP speculative decoding, prompt-cache reuse, sampling, text streaming."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from glm_mlx import load, load_model
from glm_mlx.generation.engine import Engine, StepStats
from glm_mlx.generation.text import generate, stream_generate
from glm_mlx.generation.prompt_cache import PromptCache, common_prefix
from glm_mlx.generation.sampling import Sampler, SamplingParams, accept_prefix, verify_drafts

PROMPT = [int(t) for t in np.random.RandomState(0).randint(11, 80, size=20)]  # > index_topk (8)


@pytest.fixture(scope="module")
def ckpt(mtp_ckpt):
    return mtp_ckpt


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt, dtype=mx.float32)


def plain(model, prompt, n):
    return list(Engine(model, mtp=False).generate(prompt, max_tokens=n))


def oracle_drafter(model, monkeypatch, truth: list[int], hit=lambda s: s % 10 >= 3):
    """Make the MTP layer's drafts right ~70% of the time, so acceptance and rejection both occur.

    The real MTP layer still runs (its cache is exercised); only its logits are replaced: the slot
    at position s predicts position s+2, correctly when hit(s).
    """
    real = model.mtp_draft

    def fake(hidden, next_tokens, cache=None, row=None):
        drafting = next_tokens.shape[1] - 1 if row is None else row.item()
        s = (cache.offset if cache is not None else 0) + drafting  # the drafting slot's position
        logits, h = real(hidden, next_tokens, cache, row)
        V = logits.shape[-1]
        want = truth[s + 2] if s + 2 < len(truth) and hit(s) else (truth[min(s + 2, len(truth) - 1)] + 1) % V
        return mx.eye(V)[mx.array([want])] * 10.0, h

    monkeypatch.setattr(model, "mtp_draft", fake)


@pytest.mark.parametrize("num_draft", [1, 3])
def test_mtp_greedy_equals_plain(model, monkeypatch, num_draft):
    expected = plain(model, PROMPT, 200)
    oracle_drafter(model, monkeypatch, PROMPT + expected)
    stats = StepStats()
    got = list(Engine(model, mtp=True, num_draft=num_draft).generate(PROMPT, max_tokens=200, stats=stats))
    assert got == expected
    assert 0 < stats.accepted < stats.drafted  # both paths taken
    assert stats.main_passes < 200 and stats.tokens_per_pass > 1.2


def test_mtp_with_real_layer_is_exact(model):
    """Without the oracle (random MTP weights: mostly rejected) the output is still exact."""
    stats = StepStats()
    got = list(Engine(model, mtp=True, num_draft=2).generate(PROMPT, max_tokens=60, stats=stats))
    assert got == plain(model, PROMPT, 60) and stats.drafted > 0


def test_prompt_cache_reuse_multi_turn(model):
    engine = Engine(model, mtp=True)
    pc = engine.new_cache()
    turn1 = list(engine.generate(PROMPT, pc, max_tokens=12))
    # Turn 2 re-sends the conversation plus new tokens: only the new ones are prefilled.
    prompt2 = PROMPT + turn1 + [5, 6, 7]
    stats = StepStats()
    turn2 = list(engine.generate(prompt2, pc, max_tokens=12, stats=stats))
    assert stats.reused_tokens >= len(PROMPT) + len(turn1) - 1
    assert stats.prompt_tokens == len(prompt2) - stats.reused_tokens
    assert turn2 == plain(model, prompt2, 12)
    # A diverging prompt trims every cache back to the common prefix.
    prompt3 = PROMPT[:15] + [9, 9, 9]
    stats = StepStats()
    turn3 = list(engine.generate(prompt3, pc, max_tokens=12, stats=stats))
    assert stats.reused_tokens in (14, 15)
    assert turn3 == plain(model, prompt3, 12)
    pending = pc.pending.shape[1] if pc.pending is not None else 0
    assert pc.mtp_cache.offset + pending == len(pc.tokens)
    assert all(c.offset == len(pc.tokens) for c in pc.cache)


def test_mtp_state_after_early_stop(model, monkeypatch):
    """Drafting ahead writes an MTP slot for a token that is not in the cache yet. A consumer that
    stops early leaves a settled cache: every MTP slot equals what a fresh prefill of the same
    tokens writes, and the next turn still decodes exactly."""
    expected = plain(model, PROMPT, 40)
    oracle_drafter(model, monkeypatch, PROMPT + expected)
    engine = Engine(model, mtp=True)
    pc = engine.new_cache()
    gen = engine.generate(PROMPT, pc, max_tokens=40)
    got = [t for _, t in zip(range(17), gen)]
    gen.close()
    assert got == expected[:17] and pc.ahead is None
    pending = pc.pending.shape[1] if pc.pending is not None else 0
    assert pc.mtp_cache.offset + pending == len(pc.tokens)
    assert all(c.offset == len(pc.tokens) for c in pc.cache)
    fresh = engine.new_cache()
    engine.prefill(fresh, pc.tokens, StepStats())
    q = pc.mtp_cache.offset
    assert q > len(PROMPT)  # slots written while decoding are compared too
    for ours, ref in zip(pc.mtp_cache.state, fresh.mtp_cache.state):
        np.testing.assert_allclose(np.array(ours[..., :q, :]), np.array(ref[..., :q, :]), atol=1e-4)
    prompt2 = PROMPT + got + [5, 6]
    assert list(engine.generate(prompt2, pc, max_tokens=20)) == plain(model, prompt2, 20)


def test_prompt_cache_save_load(model, tmp_path):
    engine = Engine(model, mtp=True)
    pc = engine.new_cache()
    list(engine.generate(PROMPT, pc, max_tokens=8))
    pc.save(tmp_path / "conv.safetensors")
    loaded = PromptCache.load(tmp_path / "conv.safetensors", model, mtp=True)
    assert loaded.tokens == pc.tokens and loaded.nbytes == pc.nbytes
    nxt = pc.tokens + [4, 5]
    stats = StepStats()
    assert list(engine.generate(nxt, loaded, max_tokens=8, stats=stats)) == plain(model, nxt, 8)
    assert stats.reused_tokens == len(pc.tokens)


def test_chunked_prefill_matches(model):
    long = PROMPT * 3
    chunked = list(Engine(model, mtp=False, prefill_step=7).generate(long, max_tokens=10))
    assert chunked == plain(model, long, 10)


def _empirical(fn, trials, V):
    counts = np.zeros(V)
    for _ in range(trials):
        counts[fn()] += 1
    return counts / trials


@pytest.mark.parametrize("k", [1, 2])
def test_speculative_sampling_preserves_distribution(k):
    """Tokens emitted through draft-then-verify follow the target distribution (V = 5)."""
    mx.random.seed(0)
    V = 5
    sampler = Sampler(SamplingParams(temp=1.0))
    target = mx.array(np.random.RandomState(1).randn(k + 1, V) * 1.5, dtype=mx.float32)
    draft = mx.array(np.random.RandomState(2).randn(k, V) * 1.5, dtype=mx.float32)
    p = np.array(mx.softmax(target, axis=-1))

    def first_token():
        drafts = sampler.sample(draft).tolist()
        a, nxt = accept_prefix(verify_drafts(sampler, target, draft, mx.array(drafts, dtype=mx.int32)).tolist(), k)
        return drafts[0] if a >= 1 else nxt

    emp = _empirical(first_token, 6000, V)
    assert 0.5 * np.abs(emp - p[0]).sum() < 0.03  # total variation distance
    q0 = np.array(mx.softmax(draft, axis=-1))[0]
    assert 0.5 * np.abs(q0 - p[0]).sum() > 0.15  # the draft alone is measurably different


def test_stream_generate_text_stops_and_stats(ckpt):
    model, tokenizer = load(ckpt, dtype=mx.float32)
    messages = [{"role": "user", "content": "hello"}]
    responses = list(stream_generate(model, tokenizer, messages, max_tokens=20))
    tokens = [r.token for r in responses]
    eos = set(model.args.eos_token_ids) | set(tokenizer.eos_token_ids or [])
    # This fixture's greedy reply never reaches an eos id, so the budget ends it: exactly 20 tokens, "length".
    assert len(tokens) == 20 and not eos & set(tokens)
    assert responses[-1].finish_reason == "length"
    assert all(r.finish_reason is None for r in responses[:-1])
    text = "".join(r.text for r in responses)
    assert text == generate(model, tokenizer, messages, max_tokens=20)
    last = responses[-1]
    assert last.prompt_tokens > 0 and last.generation_tokens == len(responses) and last.peak_memory > 0
    # A stop string cuts the text before it and ends with "stop".
    assert len(text) > 4, text
    stop = text[2:4]
    cut = list(stream_generate(model, tokenizer, messages, max_tokens=20, stop=[stop]))
    assert "".join(r.text for r in cut) == text[: text.find(stop)] and cut[-1].finish_reason == "stop"
    # An eos id from the config ends generation there, with "stop", and is not printed.
    saved, model.args.eos_token_id = model.args.eos_token_id, tokens[5]
    try:
        ended = list(stream_generate(model, tokenizer, messages, max_tokens=20))
    finally:
        model.args.eos_token_id = saved
    assert [r.token for r in ended] == tokens[: tokens.index(tokens[5]) + 1]
    assert ended[-1].finish_reason == "stop" and not ended[-1].text


def test_sampling_is_seeded(model):
    a = list(Engine(model, SamplingParams(temp=0.8, top_p=0.9, seed=7), mtp=True).generate(PROMPT, max_tokens=15))
    b = list(Engine(model, SamplingParams(temp=0.8, top_p=0.9, seed=7), mtp=True).generate(PROMPT, max_tokens=15))
    assert a == b


def test_repetition_penalty_mtp_equals_plain(model, monkeypatch):
    """Logits processors see the same history (drafts included) with and without MTP."""
    params = SamplingParams(repetition_penalty=1.5)
    expected = list(Engine(model, params, mtp=False).generate(PROMPT, max_tokens=60))
    assert expected != plain(model, PROMPT, 60)  # the penalty changes the output
    oracle_drafter(model, monkeypatch, PROMPT + expected)
    stats = StepStats()
    got = list(Engine(model, SamplingParams(repetition_penalty=1.5), mtp=True, num_draft=2).generate(
        PROMPT, max_tokens=60, stats=stats))
    assert got == expected and stats.accepted > 0


def test_logits_processors_see_exactly_the_tokens_so_far(model):
    """Pipelined plain decoding hands every logits processor the prompt and the tokens emitted
    before (MTP's histories are checked by test_repetition_penalty_mtp_equals_plain)."""
    engine = Engine(model, SamplingParams(repetition_penalty=1.1), mtp=False)
    seen = []
    engine.sampler.processors = [lambda tokens, logits: seen.append(tokens.tolist()) or logits]
    got = list(engine.generate(PROMPT, max_tokens=12))
    assert seen == [PROMPT + got[:i] for i in range(len(got))]


@given(st.lists(st.integers(0, 3), max_size=60), st.lists(st.integers(0, 3), max_size=60), st.integers(0, 60))
def test_common_prefix_is_the_shared_head(a, tail, cut):
    """The binary search over slices agrees with a plain scan (prompt-cache reuse and the server's
    cache pool find the reusable head of a 100K-token conversation with it)."""
    b = a[:cut] + tail
    want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert common_prefix(a, b) == common_prefix(b, a) == want


def test_deferred_mtp_slots_catch_up_exactly(model):
    """A server's prefill leaves the MTP layer for after the first token (defer_mtp): the prompt's h
    stay pending, and catch_up_mtp then writes the same slots a feeding prefill writes; decoding from a
    deferred prefill (MTP drafting catches up by itself) is still plain greedy decoding."""
    from glm_mlx.generation.engine import catch_up_mtp

    prompt = PROMPT * 2
    fed, deferred = Engine(model, mtp=True), Engine(model, mtp=True, defer_mtp=True, prefill_step=7)
    a, b = fed.new_cache(), deferred.new_cache()
    la, lb = fed.prefill(a, prompt, StepStats()), deferred.prefill(b, prompt, StepStats())
    np.testing.assert_allclose(np.array(la), np.array(lb), atol=1e-5)
    assert b.mtp_cache.offset == 0 and b.pending.shape[1] == len(prompt) and b.tokens == a.tokens
    catch_up_mtp(model, b)
    assert b.mtp_cache.offset == a.mtp_cache.offset == len(prompt) - 1 and b.pending.shape[1] == 1
    for x, y in zip(a.mtp_cache.state, b.mtp_cache.state):
        np.testing.assert_allclose(np.array(x[..., : len(prompt) - 1, :]), np.array(y[..., : len(prompt) - 1, :]), atol=1e-4)
    np.testing.assert_allclose(np.array(a.pending), np.array(b.pending), atol=1e-5)
    assert list(Engine(model, mtp=True, defer_mtp=True).generate(prompt, max_tokens=20)) == plain(model, prompt, 20)
