"""The OpenAI API's features on the real server: reasoning split, logprobs, stop strings, seeds (alone and
batched), logit_bias, and the text completions endpoint.
"""

from __future__ import annotations

import threading

import pytest

from serve_helpers import (MODEL, NO_THINK, POEM, SCENE, chat_ids, expected_split, forced_token, ids_of, no_tags,
    pick_stop, rendered, stream_chat, whole_chat)

openai = pytest.importorskip("openai")


# --- OpenAI features ---------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", [SCENE, POEM], ids=["scene", "poem"])
@pytest.mark.parametrize("thinking", [True, False])
def test_reasoning_split(oa, tokenizer, prompt, thinking):
    """The chat answer is the raw completion of the same prompt split at </think>: reasoning_content present
    exactly when the model wrote reasoning, and no <think>/</think> in content."""
    msgs = [{"role": "user", "content": prompt}]
    text = rendered(tokenizer, msgs, thinking)
    raw = oa.completions.create(model=MODEL, prompt=ids_of(tokenizer, text), max_tokens=24, temperature=0)
    raw_text = raw.choices[0].text
    reasoning, content = expected_split(raw_text, text.rstrip().endswith("<think>"))
    r = whole_chat(oa, messages=msgs, max_tokens=24, temperature=0,
                   extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
    assert r.usage.prompt_tokens == raw.usage.prompt_tokens
    assert (r.reasoning, r.content) == (reasoning, content), raw_text
    assert no_tags(r.content) and no_tags(r.reasoning), raw_text
    streamed = stream_chat(oa, messages=msgs, max_tokens=24, temperature=0,
                           extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
    assert (streamed.reasoning, streamed.content) == (reasoning, content)


def test_reasoning_effort_none_turns_thinking_off(oa, tokenizer):
    msgs = [{"role": "user", "content": POEM}]
    r = whole_chat(oa, messages=msgs, max_tokens=4, extra_body={"reasoning_effort": "none"})
    assert r.usage.prompt_tokens == len(chat_ids(tokenizer, msgs, thinking=False))


def test_logprobs_shape(oa):
    msgs = [{"role": "user", "content": SCENE}]
    for call in (whole_chat, stream_chat):
        r = call(oa, messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, extra_body=NO_THINK)
        entries = r.logprobs.content if call is whole_chat else r.logprobs
        assert len(entries) == r.usage.completion_tokens == 6
        for e in entries:
            assert e.logprob <= 0 and len(e.top_logprobs) == 3
            tops = [t.logprob for t in e.top_logprobs]
            assert tops == sorted(tops, reverse=True)
            assert e.top_logprobs[0].token == e.token and e.logprob == pytest.approx(tops[0])  # greedy
            assert e.bytes == list(e.token.encode())
        # the tokens' text makes up the answer (the bundled model writes no reasoning with thinking off)
        assert "".join(e.token for e in entries) == r.content
    plain = whole_chat(oa, messages=msgs, max_tokens=6, temperature=0, extra_body=NO_THINK)
    assert plain.logprobs is None


def test_stop_strings(oa):
    msgs = [{"role": "user", "content": SCENE}]
    full = whole_chat(oa, messages=msgs, max_tokens=24, temperature=0, extra_body=NO_THINK)
    stop = pick_stop(full.content)
    for call in (whole_chat, stream_chat):
        r = call(oa, messages=msgs, max_tokens=24, temperature=0, stop=[stop, "zzzz"], extra_body=NO_THINK)
        assert r.content == full.content[:full.content.index(stop)]
        assert r.finish == "stop"
        assert r.usage.completion_tokens < 24


def test_seed_reproducible_at_temperature_1(oa):
    msgs = [{"role": "user", "content": "Hi"}]
    outs = {}
    for seed in (11, 11, 12, 13):
        r = whole_chat(oa, messages=msgs, max_tokens=16, temperature=1, seed=seed, extra_body=NO_THINK)
        outs.setdefault(seed, []).append(r.content)
    assert outs[11][0] == outs[11][1]
    assert len({outs[11][0], outs[12][0], outs[13][0]}) > 1, outs  # the seed matters


def test_seed_reproducible_when_batched(server):
    requests = [dict(messages=[{"role": "user", "content": f"Tell me story number {i}"}], max_tokens=16,
                     temperature=1, seed=100 + i, extra_body=NO_THINK) for i in range(4)]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    alone = [whole_chat(client, **r).content for r in requests]
    results, barrier = [None] * len(requests), threading.Barrier(len(requests))

    def run(i):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        barrier.wait(timeout=30)
        results[i] = whole_chat(c, **requests[i]).content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == alone


def test_logit_bias_forces_a_token_and_max_tokens_is_honoured(oa, tokenizer):
    tok = forced_token(tokenizer)
    for call in (whole_chat, stream_chat):
        r = call(oa, messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0,
                 logit_bias={str(tok): 100}, extra_body=NO_THINK)
        assert r.content == "hi" * 5
        assert r.finish == "length" and r.usage.completion_tokens == 5


def test_text_completions_whole_and_stream(oa, tokenizer):
    kw = dict(model=MODEL, prompt="The king said", max_tokens=10, temperature=0)
    whole = oa.completions.create(**kw)
    c = whole.choices[0]
    assert c.text and c.finish_reason == "length" and whole.object == "text_completion"
    assert whole.usage.prompt_tokens == len(tokenizer.encode("The king said"))
    assert whole.usage.completion_tokens == 10
    pieces, finish, usage = [], None, None
    for ch in oa.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage
        for x in ch.choices:
            pieces.append(x.text)
            finish = x.finish_reason or finish
    assert "".join(pieces) == c.text and finish == "length" and usage.completion_tokens == 10
    # raw text: <think> tags and the newlines around them are the model's output, not reasoning to split off
    chat_prompt = rendered(tokenizer, [{"role": "user", "content": "Hi"}], thinking=True)
    raw = oa.completions.create(model=MODEL, prompt=chat_prompt, max_tokens=6, temperature=0, logprobs=2)
    lp = raw.choices[0].logprobs
    assert "".join(lp.tokens) == raw.choices[0].text and len(lp.tokens) == 6
    assert all(len(t) == 2 for t in lp.top_logprobs)
