"""Anthropic's Messages API on the real server, through the official `anthropic` SDK: whole and streamed
(the documented event order), stop sequences, count_tokens and cache usage, errors in Anthropic's shape.
"""

from __future__ import annotations

import uuid

import pytest

from serve_helpers import GREEDY, MODEL, POEM, SCENE, anthropic_text, chat_ids, check_event_order, no_tags, pick_stop

anthropic = pytest.importorskip("anthropic")


# --- Anthropic ---------------------------------------------------------------------------------






@pytest.mark.parametrize("thinking", [{"type": "disabled"}, {"type": "enabled", "budget_tokens": 1024}],
                         ids=["thinking-off", "thinking-on"])
def test_anthropic_whole_and_streamed(ac, tokenizer, thinking):
    msgs = [{"role": "user", "content": POEM}]
    kw = dict(model=MODEL, max_tokens=20, messages=msgs, extra_body=GREEDY, thinking=thinking)
    whole = ac.messages.create(**kw)
    assert whole.type == "message" and whole.role == "assistant" and whole.content
    assert whole.stop_reason in ("end_turn", "max_tokens")
    n_prompt = len(chat_ids(tokenizer, msgs, thinking=thinking["type"] == "enabled"))
    assert whole.usage.input_tokens + whole.usage.cache_read_input_tokens == n_prompt
    assert whole.usage.output_tokens <= 20
    kinds = [b.type for b in whole.content]
    if thinking["type"] == "disabled":
        assert kinds == ["text"]
    else:
        assert set(kinds) <= {"thinking", "text"} and kinds == sorted(kinds, key=["thinking", "text"].index)
    for b in whole.content:
        assert no_tags(b.text if b.type == "text" else b.thinking), whole.content

    with ac.messages.stream(**kw) as s:
        events = list(s)
        final = s.get_final_message()
    check_event_order(events)
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    delta = [e for e in events if e.type == "message_delta"][0]
    assert delta.delta.stop_reason == whole.stop_reason


def test_anthropic_stop_sequences(ac):
    kw = dict(model=MODEL, max_tokens=24, messages=[{"role": "user", "content": SCENE}], extra_body=GREEDY,
              thinking={"type": "disabled"})
    full = anthropic_text(ac.messages.create(**kw))
    stop = pick_stop(full)
    r = ac.messages.create(stop_sequences=[stop], **kw)
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", stop)
    assert anthropic_text(r) == full[:full.index(stop)]
    with ac.messages.stream(stop_sequences=[stop], **kw) as s:
        final = s.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


def test_anthropic_count_tokens_and_prompt_cache(ac):
    msgs = [{"role": "user", "content": f"{uuid.uuid4().hex}: {SCENE}"}]
    system = "You are a player in Shakespeare's company."
    count = ac.messages.count_tokens(model=MODEL, messages=msgs, system=system, thinking={"type": "disabled"})
    kw = dict(model=MODEL, max_tokens=8, messages=msgs, system=system, extra_body=GREEDY, thinking={"type": "disabled"})
    first = ac.messages.create(**kw)
    assert first.usage.input_tokens + first.usage.cache_read_input_tokens == count.input_tokens
    second = ac.messages.create(**kw)
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == count.input_tokens
    assert second.usage.cache_read_input_tokens >= count.input_tokens // 2, second.usage


def test_anthropic_errors_have_anthropic_shape(server, ac):
    status, body = server.post("/v1/messages", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 400
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        ac.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hi"}],
                           extra_body={"temperature": 9})
    assert e.value.status_code == 400 and e.value.body["type"] == "error"
    assert "temperature" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        ac.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "robot", "content": "Hi"}])
    assert e.value.body["error"]["type"] == "invalid_request_error"
    status, body = server.post("/v1/messages/batches", {"requests": []})
    assert status == 404 and body["type"] == "error" and body["error"]["type"] == "not_found_error"
