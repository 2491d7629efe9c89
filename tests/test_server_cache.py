"""The server's prefix cache as users meet it: a conversation's blocks serve another conversation
that shares its head, survive a restart (read back from the SSD tier), and a hit answers exactly
what a cold server answers."""

from __future__ import annotations

import openai
import pytest
from server_util import Server

SYSTEM = {"role": "system", "content": "You are a careful assistant who answers in one line. " * 12}
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def ask(server, question, history=(), system=SYSTEM):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="m", messages=[system, *history, {"role": "user", "content": question}],
                                       max_tokens=12, temperature=0, extra_body=NO_THINK)
    d = r.usage.prompt_tokens_details
    return r.choices[0].message.content, r.usage.prompt_tokens, d.cached_tokens, d.model_extra["disk_cached_tokens"]


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "prefix")


def test_prefix_cache_hits_across_conversations_and_restarts(cache_dir):
    args = ("--cache-dir", cache_dir, "--cache-block", "16", "--cache-slots", "1")
    server = Server(*args).start()
    try:
        first, n, cached, _ = ask(server, "Name a king.")
        assert cached == 0
        # another conversation sharing the system prompt: served from the blocks of the first
        _, n2, cached, disk = ask(server, "Name a queen.")
        assert 16 <= cached < n2 and cached % 16 == 15 and disk == 0
        again, _, cached, _ = ask(server, "Name a king.")
        assert again == first and cached >= n - 16
    finally:
        assert server.stop() == 0
    restarted = Server(*args).start()
    try:
        after, n3, cached, disk = ask(restarted, "Name a king.")
        assert after == first  # exact: what the cold server answered
        assert cached >= n3 - 16 and disk == cached  # everything reused came from the SSD tier
        assert "cached=" in restarted.stderr()
    finally:
        restarted.stop()
    cold = Server("--no-prefix-cache").start()
    try:
        assert ask(cold, "Name a king.")[0] == first
    finally:
        cold.stop()


def test_next_turn_reuses_its_conversation_when_the_reply_comes_back_rendered_otherwise():
    """GLM's template drops past reasoning from the history: the reply's tokens are not in the next
    prompt. The conversation's own cache still serves the whole previous prompt (only the reply's rows
    go), with no prefix cache to fall back on."""
    server = Server("--no-prefix-cache").start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        history, previous = [SYSTEM, {"role": "user", "content": "Name a king."}], 0
        for turn in range(3):
            r = client.chat.completions.create(model="m", messages=history, max_tokens=10, temperature=0)
            reasoning = r.choices[0].message.model_extra.get("reasoning_content")
            if turn == 0:
                assert reasoning, "thinking is on by default: the reply starts with reasoning"
            else:  # the previous prompt up to its assistant header came from the cache (less the one
                # token MTP recomputes at a cut: PromptCache.reuse)
                assert r.usage.prompt_tokens_details.cached_tokens >= previous - 2, (turn, r.usage, previous)
            previous = r.usage.prompt_tokens
            history += [{"role": "assistant", "content": r.choices[0].message.content or "",
                         "reasoning_content": reasoning}, {"role": "user", "content": f"And another, {turn}?"}]
    finally:
        assert server.stop() == 0


def test_conversations_restored_from_the_prefix_cache_do_not_crowd_out_live_ones(cache_dir):
    """Three cache slots: an unrelated conversation, then three sharing a head. The 2nd and 3rd start
    from the prefix cache's blocks and take one slot each (no empty cache left behind per restore);
    the 3rd finds every slot taken and evicts the least recently used (the unrelated one) rather than
    trim the 1st to the shared head, so the 1st conversation's next turn still continues its own
    cache: the whole previous prompt is reused, not only the whole blocks of it."""
    server = Server("--cache-dir", cache_dir, "--cache-block", "16", "--cache-slots", "3", "--max-batch", "1").start()
    try:
        ask(server, "Say hello.", system={"role": "system", "content": "Answer in French, briefly. " * 10})
        answer, n, _, _ = ask(server, "Name a king.")
        for other in ("Name a queen.", "Name a river."):
            _, _, cached, _ = ask(server, other)
            assert cached % 16 == 15  # restored from the blocks
        history = [{"role": "user", "content": "Name a king."}, {"role": "assistant", "content": answer}]
        _, _, cached, _ = ask(server, "And another?", history)
        assert cached >= n - 2, (cached, n)
    finally:
        assert server.stop() == 0


def test_port_in_use_is_a_clean_error():
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "glm_mlx.cli.app", "serve", "--port", str(port), "--no-prefix-cache"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "Hint:" in r.stderr
