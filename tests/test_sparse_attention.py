"""Sparse (gathered top-k, latent-space) attention against the dense masked path and the reference.

Tiny fp32 checkpoints from tests/reference.py (tie-free: asserted via index_gaps). Chunk sizes are
forced small so every query-chunk boundary case (chunks that see fewer than index_topk keys,
chunks straddling a cache prefix) is crossed.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from reference import index_gaps, make_reference, reference_logits

from glm_mlx import load_model
from glm_mlx.model.attention import MLAttention
from glm_mlx.model.config import ModelArgs

TOPK = 8
ATOL = 1e-4


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, 96, size=(1, n))


def configure(model, path: str, attn_chunk=None, index_chunk=None):
    for layer in model.layers:
        layer.self_attn.path = path
        layer.self_attn.query_chunk = attn_chunk
        if layer.self_attn.indexer is not None:
            layer.self_attn.indexer.query_chunk = index_chunk


def run(model, toks, prefix: int, step: int | None = None):
    """Logits for toks: `prefix` tokens first, then the rest in pieces of `step` (all at once if None)."""
    cache = model.make_cache()
    outs = [np.array(model(mx.array(toks[:, :prefix]), cache=cache))] if prefix else []
    step = step or toks.shape[1]
    for i in range(prefix, toks.shape[1], step):
        outs.append(np.array(model(mx.array(toks[:, i : i + step]), cache=cache)))
    return np.concatenate(outs, axis=1)


@pytest.fixture(scope="module", params=["full", "shared"])
def fixture(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    extra = {"index_topk_freq": 2, "index_skip_topk_offset": 1} if request.param == "shared" else {}
    ref = make_reference(path, seed=11, **extra)
    model = load_model(path, dtype=mx.float32)
    if request.param == "shared":
        assert [layer.self_attn.indexer is None for layer in model.layers] == [False, True, False, True]
    yield ref, model
    configure(model, "auto")


# (length, prefix, step): single prefill at several lengths, a prefix shorter and longer than
# index_topk, chunked prefill, and token-by-token decode.
CASES = [(TOPK + 1, 0, None), (2 * TOPK + 3, 0, None), (5 * TOPK, 0, None), (5 * TOPK, 5, None),
         (5 * TOPK, 3 * TOPK, None), (5 * TOPK, 2 * TOPK + 1, 7), (3 * TOPK + 2, 2 * TOPK, 1)]


@pytest.mark.parametrize("n,prefix,step", CASES)
def test_sparse_matches_dense_and_reference(fixture, n, prefix, step):
    ref, model = fixture
    toks = tokens(n, seed=n + prefix)
    assert min(index_gaps(ref, toks), default=1.0) > 1e-6, "fixture has indexer ties: pick another seed"
    configure(model, "dense")
    dense = run(model, toks, prefix, step)
    configure(model, "sparse", attn_chunk=3, index_chunk=5)
    sparse = run(model, toks, prefix, step)
    np.testing.assert_allclose(sparse, dense, atol=ATOL, rtol=0)
    np.testing.assert_allclose(sparse, reference_logits(ref, toks), atol=ATOL, rtol=0)
    configure(model, "auto")  # default budgets: one chunk here
    np.testing.assert_allclose(run(model, toks, prefix, step), sparse, atol=ATOL, rtol=0)


def test_indexer_chunking_selects_the_same_keys(fixture):
    ref, model = fixture
    toks = tokens(6 * TOPK, seed=3)
    assert min(index_gaps(ref, toks), default=1.0) > 1e-6
    attn = model.layers[0].self_attn
    x = model.model.embed_tokens(mx.array(toks))
    x = model.layers[0].input_layernorm(x)
    qr = attn.q_a_layernorm(attn.q_a_proj(x))
    picks = []
    causal = np.arange(toks.shape[1])[:, None]  # query i sees keys 0..i
    for chunk in (None, 1, 4, 7):
        attn.indexer.query_chunk = chunk
        p = np.array(attn.indexer(x, qr, 0, None))
        # Picks past a query's own position (a query with fewer than k causal keys gets some) are
        # masked by attention: which ones is arbitrary.
        picks.append(np.sort(np.where(p <= causal, p, -1), axis=-1))
    attn.indexer.query_chunk = None
    for p in picks[1:]:
        np.testing.assert_array_equal(p, picks[0])
    # Queries with fewer than k causal keys select all of them.
    for i in range(TOPK - 1):
        assert set(range(i + 1)) <= set(picks[0][0, i].tolist())


def test_default_path_is_sparse_past_index_topk():
    """GLM-5.1 shapes: the per-call cost model picks the gathered path for decode and long prefill."""
    attn = MLAttention(ModelArgs(), has_indexer=True)  # parameters stay lazy: never evaluated
    k = 2048
    # Past k the gathered path wins everywhere for these shapes: a short chunk would pay for
    # expanding every cached latent, a long one would build a huge [L, T] score block.
    for L in (1, 4, 16, 17, 64, 512, 2048):
        for T in (k + 1, 2 * k, 4 * k, 16 * k):
            assert attn._use_sparse(L, max(T, L), k), (L, T)
    attn.path = "dense"
    assert not attn._use_sparse(1, 16 * k, k)  # the override (used by the tests) still works


def test_sparse_working_memory_is_not_quadratic(tmp_path):
    """One sparse attention layer: peak memory grows ~linearly with the prompt (O(chunk x T) indexer
    scores, O(chunk x k) gathered latents) and stays well below the dense [H, L, T] score block."""
    make_reference(tmp_path, seed=12, index_topk=16)
    model = load_model(tmp_path, dtype=mx.float32)
    attn = model.layers[0].self_attn
    attn.query_chunk = attn.indexer.query_chunk = 64  # the default budgets are sized for 32-64 heads
    used = {}
    for L in (1024, 2048):
        x = mx.random.normal((1, L, model.args.hidden_size))
        mx.eval(x)
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        out, topk = attn(x)
        mx.eval(out, topk)
        used[L] = mx.get_peak_memory() - base
        assert topk.shape == (1, L, 16)
    dense_scores = 2048 * 2048 * attn.num_heads * 4
    assert used[2048] < dense_scores / 2, (used, dense_scores)
    assert used[2048] < 3 * used[1024], used  # dense would be ~4x


def test_8bit_index_cache(tmp_path):
    make_reference(tmp_path, seed=13)
    model = load_model(tmp_path, dtype=mx.float32)
    toks = tokens(4 * TOPK + 3, seed=5)
    exact = run(model, toks, 0)
    model.set_index_cache_bits(8)
    try:
        full = run(model, toks, 0)
        # Cached prefill then decode, with a save/restore of the packed cache state in between.
        cache = model.make_cache()
        first = np.array(model(mx.array(toks[:, :20]), cache=cache))
        restored = model.make_cache()
        for new, old in zip(restored, cache):
            new.state = old.state
            assert new.nbytes == old.nbytes
        rest = [np.array(model(mx.array(toks[:, i : i + 1]), cache=restored)) for i in range(20, toks.shape[1])]
        np.testing.assert_allclose(np.concatenate([first] + rest, axis=1), full, atol=ATOL, rtol=0)
        n = toks.shape[1]
        assert sum(c.nbytes for c in restored) == model.cache_bytes_per_token() * n
        a = model.args
        assert restored[0].nbytes == (a.kv_lora_rank + a.qk_rope_head_dim) * 4 * n + (a.index_head_dim + 8) * n
        # The fused 8-bit scores equal float scores on the dequantized keys.
        idx = model.layers[0].self_attn.indexer
        k = idx.keys(mx.random.normal((1, 40, a.hidden_size)), 0)
        codes = idx.stored_keys(k)
        deq = mx.dequantize(*codes, group_size=a.index_head_dim, bits=8)
        q = mx.random.normal((1, 3, idx.n_heads, a.index_head_dim))
        w = mx.random.normal((1, 3, idx.n_heads))
        np.testing.assert_allclose(np.array(idx._score(q, w, codes, 40)), np.array(idx._score(q, w, deq[:, 0], 40)),
                                   atol=1e-4, rtol=1e-4)
    finally:
        model.set_index_cache_bits(None)
    np.testing.assert_allclose(run(model, toks, 0), exact, atol=0, rtol=0)  # default untouched
    assert model.cache_bytes_per_token() == model.args.cache_bytes_per_token(4)
