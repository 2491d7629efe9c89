"""Incremental prompt tokenization (glm_mlx/serve/tokens.py): a conversation's next turn reuses the
ids of its earlier renders, and the ids are always exactly those of encoding the whole text."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glm_mlx.serve.tokens import TokenCache

GLM_MINI = Path(__file__).resolve().parents[1] / "glm_mlx" / "data" / "glm-mini"


@pytest.fixture(scope="module")
def tokenizer():
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(GLM_MINI)


def whole(tokenizer, text):
    return list(tokenizer.encode(text, add_special_tokens=False))


# Content that stresses the cuts: markers inside content, text glued to markers, other added tokens,
# unicode, whitespace runs.
PIECES = st.sampled_from(["<|user|>", "<|assistant|>", "<|observation|>", "<|system|>", "<think>", "</think>",
                          "<tool_call>", "\n", " ", "  ", "hello", "world", "Hello,", "é", "日本", "🙂", "<", "|",
                          "user", "<|", "|>", "123", "\t"])
CONTENT = st.lists(PIECES, max_size=12).map("".join)


@settings(max_examples=60, deadline=None)
@given(turns=st.lists(st.tuples(CONTENT, CONTENT), min_size=1, max_size=5), edit=st.integers(0, 4))
def test_every_turn_encodes_exactly_as_the_whole_text(tokenizer, turns, edit):
    """A conversation growing turn by turn, and one whose earlier reply comes back edited (as GLM's
    template drops past reasoning): each render's ids equal a whole encode of it."""
    cache = TokenCache(tokenizer, size=4)
    text = "[gMASK]<sop><|system|>\nsystem prompt"
    for i, (user, reply) in enumerate(turns):
        text += f"<|user|>\n{user}<|assistant|>\n"
        assert cache.encode(text) == whole(tokenizer, text)
        text += reply
        if i == edit:  # an earlier part of the conversation changes: only the shared prefix may be reused
            text = text.replace("system prompt", "system prompt, edited")
    assert cache.encode(text) == whole(tokenizer, text)


def test_a_long_conversation_tokenizes_only_its_new_turn(tokenizer, monkeypatch):
    words = (Path(__file__).parent / "data" / "glm_mini_heldout.txt").read_text()
    text = "[gMASK]<sop><|system|>\n" + words
    cache = TokenCache(tokenizer)
    seen = []
    real = cache._encode
    monkeypatch.setattr(cache, "_encode", lambda t: seen.append(len(t)) or real(t))
    for i in range(4):
        text += f"<|user|>\nturn {i} " + words[:200] + "<|assistant|>\n"
        assert cache.encode(text) == whole(tokenizer, text)
        text += "a reply " * 10
    assert seen[0] == len("[gMASK]<sop><|system|>\n" + words) + len("<|user|>\nturn 0 ") + 200 + len("<|assistant|>\n")
    assert all(n < 400 for n in seen[1:])  # later turns: from their last shared marker on


def test_a_tokenizer_without_offsets_encodes_whole(tokenizer, monkeypatch):
    """A slow tokenizer gives no token offsets: every text is encoded whole, with the same ids."""
    cache = TokenCache(tokenizer)
    monkeypatch.setattr(type(cache.hf), "is_fast", property(lambda self: False))
    slow = TokenCache(tokenizer)
    assert slow.marker_re is None
    text = "[gMASK]<sop><|system|>\nhi<|user|>\nhello<|assistant|>\n"
    assert slow.encode(text) == whole(tokenizer, text) == cache.encode(text)
