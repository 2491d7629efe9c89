"""GLM-5.3-Flash (glm5_next) in continuous batching: KDA states stacked per row, DSA rows in padded
buffers with per-row pooled keys. Every sequence's greedy output equals decoding it alone, whatever
joins or leaves around it (mixed lengths, past the pooled top-k, with and without MTP, splits forced)."""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np
import pytest
from glm5_next_reference import make_reference
from test_glm5_next_parity import _add_mtp

from glm_mlx import load_model
from glm_mlx.batch import cache as batch_cache
from glm_mlx.batch.engine import BatchEngine
from glm_mlx.batch.state_cache import BatchKDACache, BatchPooledCache
from glm_mlx.generation.engine import Engine
from glm_mlx.generation.prompt_cache import PromptCache

LENGTHS = (3, 20, 7, 40, 12, 5, 30, 9)  # K = 8 / 2 = 4 pools: most rows select, one prefill spans chunks
N = 14


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm5_next_batch")
    _add_mtp(path, make_reference(path, seed=7), seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(path, dtype=mx.float32)


def prompts():
    rng = np.random.RandomState(1)
    return [[int(t) for t in rng.randint(3, 96, size=n)] for n in LENGTHS]


class AlwaysMTP:
    """Every batched pass verifies drafts (the measured choice would mostly pick plain passes here)."""

    def choose(self, batch):
        return True

    def record(self, *a):
        pass


def run_batch(model, ps, mtp, arrive_every=3, n=N, leave_early=None):
    be = BatchEngine(model, max_batch=8, modes=AlwaysMTP() if mtp else None)
    outs = {i: [] for i in range(len(ps))}
    todo, step, widest = list(range(len(ps))), 0, 0
    while todo or len(be):
        if todo and step % arrive_every == 0:
            i = todo.pop(0)
            be.add(i, ps[i], PromptCache.fresh(model, mtp=mtp), Engine(model, mtp=mtp, prefill_step=8), n)
        widest = max(widest, sum(not s.prefilling for s in be.seqs))
        batched = len(be.group.seqs) > 1 if be.group is not None else False
        for key, tok, _ in be.step():
            if key not in [s.key for s in be.seqs]:
                continue
            outs[key].append(tok)
            if len(outs[key]) >= n or (leave_early and leave_early(key, outs[key])):
                seq = be.remove(key)
                be.drafted = getattr(be, "drafted", 0) + seq.stats.drafted
                be.rejected = getattr(be, "rejected", 0) + seq.stats.drafted - seq.stats.accepted
        step += 1
        be.batched = getattr(be, "batched", False) or batched
    return outs, widest, be


@pytest.mark.parametrize("mtp", [False, True])
@pytest.mark.parametrize("split", [False, True])
def test_greedy_batch_equals_alone(model, mtp, split, monkeypatch):
    """split: rows of unlike lengths in DSA buffers of their own (RaggedLayerCache) wherever lengths differ 2x."""
    if split:
        monkeypatch.setattr(batch_cache, "BUCKET_MIN_MACS", 0)
        monkeypatch.setattr(batch_cache, "RAGGED_MIN_BYTES", 0)
    ps = prompts()
    alone = [list(Engine(model, mtp=mtp).generate(p, max_tokens=N)) for p in ps]
    outs, widest, be = run_batch(model, ps, mtp)
    assert widest >= 4
    assert be.together_min == 0  # no joint padded prefill: the padding would run through the KDA recurrence
    assert [outs[i] for i in range(len(ps))] == alone
    if mtp:  # drafts verified in batched passes ([B, 2]), rejected ones rolled back per row (KDA states included)
        assert be.drafted > 0 and be.rejected > 0


def test_batch_caches_are_the_glm5_next_ones(model):
    ps = prompts()[:3]
    be = BatchEngine(model, max_batch=4)
    for i, p in enumerate(ps):
        be.add(i, p, PromptCache.fresh(model, mtp=False), Engine(model, mtp=False), 4)
    for _ in range(6):
        be.step()
    kinds = {type(layer).__name__ for layer in be.group.layers}
    assert kinds == {BatchKDACache.__name__, BatchPooledCache.__name__}


def test_leaving_early_and_continuing(model):
    """Members leave early; the others go on exactly; a cache after batched decoding continues the
    conversation as a cold run over the whole history does."""
    ps = prompts()
    alone = [list(Engine(model, mtp=True).generate(p, max_tokens=N)) for p in ps]
    outs, _, _ = run_batch(model, ps, True, arrive_every=1, leave_early=lambda k, t: k % 3 == 0 and len(t) == 4)
    for i in range(len(ps)):
        assert outs[i] == alone[i][: len(outs[i])] and len(outs[i]) == (4 if i % 3 == 0 else N)
    be = BatchEngine(model, max_batch=4)
    pcs = [PromptCache.fresh(model, mtp=True) for _ in ps[:4]]
    got = {i: [] for i in range(4)}
    for i in range(4):
        be.add(i, ps[i], pcs[i], Engine(model, mtp=True, prefill_step=8), N)
    while len(be):
        for key, tok, _ in be.step():
            got[key].append(tok)
            if len(got[key]) >= N:
                be.remove(key)
    for i in range(4):
        history = ps[i] + got[i] + [11, 12, 13]
        warm = list(Engine(model, mtp=True).generate(history, pc=pcs[i], max_tokens=6))
        assert warm == list(Engine(model, mtp=True).generate(history, max_tokens=6))
