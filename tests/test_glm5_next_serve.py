"""`glm-mlx serve` with a tiny GLM-5.3-Flash (glm5_next) checkpoint: OpenAI and Anthropic requests, several
at once (they batch), and prefix-cache hits on a second turn. The checkpoint is the reference's own
(tests/glm5_next_reference.py, with an MTP block) at glm-mini's vocabulary, with glm-mini's tokenizer
and chat template (GLM-5.x's format, which GLM-5.3 keeps)."""

from __future__ import annotations

import re
import shutil
import threading
import time

import pytest
from glm5_next_reference import make_reference
from server_util import Server
from test_glm5_next_parity import _add_mtp

from glm_mlx.model.reference import DEFAULT_MODEL

SYSTEM = "You are a helpful assistant. " * 6  # a few prefix-cache blocks of 16 tokens


@pytest.fixture(scope="module")
def flash_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm5_next_serve")
    ref = make_reference(path, seed=3, vocab_size=6154, eos_token_id=[0, 7, 9], max_position_embeddings=4096)
    _add_mtp(path, ref, seed=4)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(DEFAULT_MODEL / f, path / f)
    s = Server(str(path), "--prefill-step", "16", "--context", "2048", "--cache-block", "16",
               "--cache-dir", str(tmp_path_factory.mktemp("prefix")), "--cache-disk", "64MB")
    s.start()
    yield s
    log = s.stderr()
    s.stop()
    s.cleanup()
    assert "Traceback" not in log, log[-6000:]


@pytest.fixture(scope="module")
def oa(flash_server):
    import openai

    return openai.OpenAI(base_url=flash_server.url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ac(flash_server):
    import anthropic

    return anthropic.Anthropic(base_url=flash_server.url, api_key="x", max_retries=0, timeout=120)


def chat(oa, content, n=24, history=()):
    r = oa.chat.completions.create(model="x", messages=[{"role": "system", "content": SYSTEM}, *history,
                                                        {"role": "user", "content": content}],
                                   max_tokens=n, temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    return r.choices[0].message.content or "", r.usage


def test_concurrent_requests_batch_and_match_alone(oa, flash_server):
    asks = [f"Tell me about ship number {i}." for i in range(4)]
    alone = [chat(oa, a, n=48)[0] for a in asks]
    got, widest, done = {}, [0], threading.Event()

    def watch():  # the batch size the server reports while they run
        while not done.is_set():
            status, body = flash_server.get("/metrics")
            m = re.search(rb"^glm_mlx_batch_size (\d+)", body, re.M)
            widest[0] = max(widest[0], int(float(m.group(1))) if m else 0)
            time.sleep(0.005)

    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, chat(oa, asks[i], n=48)[0])) for i in range(4)]
    w = threading.Thread(target=watch)
    w.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    w.join()
    assert [got[i] for i in range(4)] == alone  # greedy: batched answers equal each one alone
    assert widest[0] >= 2


def test_second_turn_hits_the_prefix_cache(oa, ac):
    first, usage = chat(oa, "Where do the ships sail?")
    turn2, usage2 = chat(oa, "And then?", history=[{"role": "user", "content": "Where do the ships sail?"},
                                                    {"role": "assistant", "content": first}])
    assert usage2.prompt_tokens_details.cached_tokens > 0
    msg = ac.messages.create(model="x", max_tokens=16, system=SYSTEM, extra_body={"temperature": 0},
                             messages=[{"role": "user", "content": "Where do the ships sail?"}])
    assert msg.content and msg.usage.output_tokens > 0
    assert msg.usage.cache_read_input_tokens > 0  # the system prompt's blocks, written by the OpenAI turns
    more = ac.messages.create(model="x", max_tokens=16, system=SYSTEM, extra_body={"temperature": 0}, messages=[
        {"role": "user", "content": "Where do the ships sail?"},
        {"role": "assistant", "content": "".join(b.text for b in msg.content if b.type == "text") or "Far."},
        {"role": "user", "content": "Why?"}])
    assert more.usage.cache_read_input_tokens > 0


def test_streams_and_both_apis_at_once(oa, ac):
    out = {}

    def openai_stream():
        chunks = oa.chat.completions.create(model="x", messages=[{"role": "user", "content": "Sing."}], max_tokens=20,
                                            temperature=0, stream=True)
        out["oa"] = "".join((c.choices[0].delta.content or "") + (getattr(c.choices[0].delta, "reasoning_content", None) or "")
                            for c in chunks if c.choices)

    def anthropic_stream():
        with ac.messages.stream(model="x", max_tokens=20, extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": "Dance."}]) as s:
            out["ac"] = "".join(s.text_stream) + "".join(
                getattr(b, "thinking", "") or "" for b in s.get_final_message().content)

    threads = [threading.Thread(target=openai_stream), threading.Thread(target=anthropic_stream)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out.get("oa") and out.get("ac")
