"""The DSA indexer's two-stage top-k selection against a full sort of the row.

The selected set must be each row's k largest values with ties going to the lowest positions (so a
row selects the same keys however it is padded: alone or in a batch), every position once while a
row has k finite scores, and -inf picks only where a row has fewer (causal or padding masks), at
positions the caller masks.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from glm_mlx.model.dsa_topk import select_top_k


def _check(scores: np.ndarray, k: int):
    got = np.array(select_top_k(mx.array(scores), k))
    assert got.shape == scores.shape[:-1] + (k,) and got.dtype == np.int32
    T = scores.shape[-1]
    for row, picks in zip(scores.reshape(-1, T), got.reshape(-1, k)):
        assert ((picks >= 0) & (picks < T)).all()
        finite = np.isfinite(row).sum()
        want = np.sort(row)[::-1][:k]
        if finite >= k:
            assert len(set(picks.tolist())) == k  # no position twice
            np.testing.assert_array_equal(np.sort(row[picks])[::-1], want)
            best = np.lexsort((np.arange(T), -row))[:k]  # value descending, then position ascending
            assert set(picks.tolist()) == set(best.tolist())
        else:  # every finite score is picked; the rest are -inf picks
            np.testing.assert_array_equal(np.sort(row[picks])[::-1][:finite], want[:finite])


@settings(max_examples=120, deadline=None)
@given(T=st.integers(1, 700), k=st.integers(1, 64), rows=st.integers(1, 3), levels=st.sampled_from([3, 50, 0]),
       seed=st.integers(0, 2**31 - 1))
def test_matches_a_full_row_partition(T, k, rows, levels, seed):
    """Random rows, with many ties (levels: distinct values; 0 = continuous), any T against k."""
    k = min(k, T)
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, (rows, T)).astype(np.float32) if levels else rng.normal(size=(rows, T)).astype(np.float32)
    _check(scores, k)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(8, 600), k=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_causal_rows_with_fewer_than_k_keys(T, k, seed):
    """A prefill chunk's rows: query i sees the first T - L + i + 1 keys, the rest are -inf; early
    queries see fewer than k, and their extra picks must lie past their own position (masked)."""
    k = min(k, T)
    L = min(T, 2 * k + 3)
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(1, L, T)).astype(np.float32)
    seen = T - L + np.arange(L) + 1  # keys each query sees
    scores[0][np.arange(T)[None, :] >= seen[:, None]] = -np.inf
    _check(scores, k)
    got = np.array(select_top_k(mx.array(scores), k))[0]
    for i in range(L):
        if seen[i] < k:  # its finite keys, then picks past it
            assert set(range(seen[i])) <= set(got[i].tolist())
            assert (np.sort(got[i])[seen[i]:] >= seen[i]).all()


def test_glm51_sized_row():
    """GLM-5.1's index_topk over a 100K-token context: the two stages partition ~29K values, not 100K."""
    rng = np.random.default_rng(0)
    _check(rng.normal(size=(2, 100_000)).astype(np.float32), 2048)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(8, 500), pad=st.integers(1, 300), k=st.integers(1, 16), seed=st.integers(0, 2**31 - 1))
def test_padding_does_not_change_the_choice(T, pad, k, seed):
    """A row and the same row padded with -inf (a batch buffer's spare capacity) select the same keys,
    also when many scores tie (the indexer's ReLU makes exact zeros common)."""
    k = min(k, T)
    row = np.maximum(np.random.default_rng(seed).normal(size=(1, T)), 0).astype(np.float32)
    alone = np.sort(np.array(select_top_k(mx.array(row), k)), axis=-1)
    padded = np.concatenate([row, np.full((1, pad), -np.inf, np.float32)], axis=-1)
    np.testing.assert_array_equal(np.sort(np.array(select_top_k(mx.array(padded), k)), axis=-1), alone)


def test_signed_zeros_tie():
    """The indexer's ReLU sums give exact zeros of either sign (w * 0.0 with a negative head weight is
    -0.0): they are equal scores, so ties among them go to the lowest positions too."""
    row = np.array([[-0.0, 0.0, -0.0, 0.0, -0.0, 1.0, -1.0, 0.0]], np.float32)
    for k in (1, 2, 3, 5):
        _check(row, k)
        got = set(np.array(select_top_k(mx.array(row), k))[0].tolist())
        assert got == {5, *range(k - 1)}
