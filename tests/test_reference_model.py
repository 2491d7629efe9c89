"""The shipped glm-mini reference model: loads, chats, predicts held-out text, matches transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from glm_mlx.generation.text import stream_generate
from glm_mlx.model.loading import load
from glm_mlx.model.reference import DEFAULT_MODEL, data_path

# A few KB of the held-out split (public-domain Shakespeare and Chinese poems / sayings).
SAMPLE = Path(__file__).parent / "data" / "glm_mini_heldout.txt"
CTX = 256  # the training context (index_topk 64: DSA is active past position 64)


@pytest.fixture(scope="module")
def mini():
    return load(DEFAULT_MODEL, dtype=mx.float32)


@pytest.fixture(scope="module")
def sample_ids(mini):
    _, tok = mini
    return tok.encode(SAMPLE.read_text(), add_special_tokens=False)


def test_checkpoint_files():
    assert data_path() == DEFAULT_MODEL
    names = {p.name for p in DEFAULT_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training_log.txt"} <= names
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size <= 20 * 2**20
    cfg = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert cfg["model_type"] == "glm_moe_dsa" and cfg["num_nextn_predict_layers"] == 1
    tok = json.loads((DEFAULT_MODEL / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert cfg["eos_token_id"] == [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    for t in ("[gMASK]", "<sop>", "<|system|>", "<|assistant|>", "<think>", "</think>"):
        assert t in ids


def test_architecture(mini):
    model, _ = mini
    a = model.args
    assert model.has_mtp
    assert a.first_k_dense_replace >= 1 and "sparse" in a.mlp_layer_types and a.n_shared_experts == 1
    assert all(layer.self_attn.indexer is not None for layer in model.layers)
    assert a.index_topk < CTX


def test_chat_template(mini):
    _, tok = mini
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    on = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    off = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert on == "[gMASK]<sop><|system|>Be brief.<|user|>Hi<|assistant|><think>"  # GLM-5.x: thinking on by default
    assert off == "[gMASK]<sop><|system|>Be brief.<|user|>Hi<|assistant|></think>"


def test_generates_from_chat_prompt(mini):
    model, tok = mini
    msgs = [{"role": "user", "content": "Continue this scene from Hamlet:\n\nHORATIO.\nMy lord, I came to see your father's funeral."}]
    out = list(stream_generate(model, tok, msgs, max_tokens=64, enable_thinking=False))
    text = "".join(r.text for r in out)
    assert out[-1].finish_reason == "stop", text  # it ends its turn with one of GLM's eos tokens
    # A 5.6M-parameter model: ask for English words in the play's format, not for sense.
    first_turn = text.split("<|")[0]
    assert len([w for w in first_turn.split() if w.strip(".,!?;:'").isalpha()]) >= 3, text


def perplexity(model, ids) -> float:
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, CTX):
        w = ids[s : s + CTX + 1]
        logits = model(mx.array([w[:-1]]))
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll -= float(mx.take_along_axis(lp, mx.array([w[1:]])[..., None], axis=-1).sum())
        n += len(w) - 1
    return math.exp(nll / n)


def test_heldout_perplexity_far_below_unigram(mini, sample_ids):
    model, _ = mini
    ppl = perplexity(model, sample_ids)
    # Baseline: a unigram fitted on the sample itself (in-sample, so it flatters the baseline).
    counts = np.bincount(sample_ids)
    p = counts[counts > 0] / len(sample_ids)
    unigram = math.exp(-(p * np.log(p)).sum())
    assert ppl < unigram / 3, (ppl, unigram)


def index_gaps(model, ids) -> list[np.ndarray]:
    """Per main layer and query t: (k-th - (k+1)-th index score) / top score; inf where t < k."""
    h = model.model.embed_tokens(mx.array([ids]))
    L, out = len(ids), []
    for dec in model.layers:
        x, at = dec.input_layernorm(h), dec.self_attn
        idx = at.indexer
        qr = at.q_a_layernorm(at.q_a_proj(x))
        q = idx.rope(idx.wq_b(qr).reshape(1, L, idx.n_heads, idx.head_dim).transpose(0, 2, 1, 3), offset=0)
        s = mx.maximum(q @ idx.keys(x, 0).swapaxes(-1, -2), 0.0) * idx.head_dim**-0.5
        w = idx.weights_proj(x) * idx.n_heads**-0.5
        scores = np.array((w.transpose(0, 2, 1)[..., None] * s).sum(axis=1))[0]
        gaps = np.full(L, np.inf)
        for t in range(idx.topk, L):
            r = np.sort(scores[t, : t + 1])[::-1]
            gaps[t] = (r[idx.topk - 1] - r[idx.topk]) / (abs(r[0]) + 1e-30)
        out.append(gaps)
        h, _ = dec(h)
    return out


def decided_positions(model, ids) -> np.ndarray:
    """Positions whose logits cannot depend on how a near-tie in the DSA top-k is broken.

    Trained indexers give many keys a ReLU'd score of exactly 0, so a top-k boundary can fall in a
    tie that torch and MLX break differently. A tie in a lower layer reaches every later position
    (through attention); one in the last layer only its own.
    """
    tied = [g < 1e-5 for g in index_gaps(model, ids)]
    cut = min((int(np.argmax(t)) if t.any() else len(ids)) for t in tied[:-1])
    return (np.arange(len(ids)) < cut) & ~tied[-1]


def test_transformers_loads_it_with_matching_logits(mini, sample_ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()  # it reports the MTP layer's tensors as unused
    model, _ = mini
    ref = transformers.GlmMoeDsaForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()

    def both(ids):
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits.numpy()[0]
        return np.array(model(mx.array([ids])))[0], expected

    k = model.args.index_topk
    ours, theirs = both(sample_ids[:k])  # dense: every weight but the indexer's
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    # Sparse (DSA active): the first window where most positions past k are out of reach of a near-tie.
    for start in range(0, len(sample_ids) - CTX, 128):
        window = sample_ids[start : start + CTX]
        mask = decided_positions(model, window)
        if mask[k:].sum() >= (CTX - k) // 2:
            break
    else:
        pytest.fail("no window with enough tie-free sparse positions to compare")
    ours, theirs = both(window)
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=1e-3, rtol=0)
