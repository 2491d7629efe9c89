"""Continuous batching: every sequence's greedy output equals running it alone, whatever joins or
leaves the batch around it (mixed lengths, past index_topk, with and without MTP)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from glm_mlx import load_model
from glm_mlx.batch import cache as batch_cache
from glm_mlx.batch.engine import BatchEngine
from glm_mlx.generation.engine import Engine, StepStats, catch_up_mtp
from glm_mlx.generation.prompt_cache import PromptCache
from glm_mlx.generation.sampling import SamplingParams

LENGTHS = (3, 20, 7, 40, 12, 5, 30, 9)  # index_topk is 8: most run past it, one prefill spans chunks
N = 20


@pytest.fixture(scope="module")
def model(mtp_ckpt):
    return load_model(mtp_ckpt, dtype=mx.float32)


def prompts():
    rng = np.random.RandomState(1)
    return [[int(t) for t in rng.randint(11, 80, size=n)] for n in LENGTHS]


def run_batch(model, prompts, mtp, arrive_every=3, n=N, leave_early=None, engine_kwargs=None):
    """Staggered arrivals; returns {index: tokens} and the largest batch seen decoding together."""
    be = BatchEngine(model, max_batch=8)
    outs = {i: [] for i in range(len(prompts))}
    todo, step, widest = list(range(len(prompts))), 0, 0
    while todo or len(be):
        if todo and step % arrive_every == 0:
            i = todo.pop(0)
            eng = Engine(model, mtp=mtp, prefill_step=8, **(engine_kwargs or {}))
            be.add(i, prompts[i], PromptCache.fresh(model, mtp=mtp), eng, n)
        widest = max(widest, sum(not s.prefilling for s in be.seqs))
        for key, tok, _ in be.step():
            if key not in [s.key for s in be.seqs]:  # it left at the step's first of two tokens
                continue
            outs[key].append(tok)
            if len(outs[key]) >= n or (leave_early and leave_early(key, outs[key])):
                be.remove(key)
        step += 1
    return outs, widest


def drain(be, count: int, n: int = N) -> list[list[int]]:
    """Step until every sequence (keys 0..count-1, added already) has its n tokens; their outputs."""
    outs = {i: [] for i in range(count)}
    while len(be):
        for key, tok, _ in be.step():
            outs[key].append(tok)
            if len(outs[key]) == n:
                be.remove(key)
    return [outs[i] for i in range(count)]


@pytest.mark.parametrize("mtp", [False, True])
@pytest.mark.parametrize("buckets", [False, True])
def test_greedy_batch_equals_alone(model, mtp, buckets, monkeypatch):
    """buckets: rows of like lengths are scored over their own longest row, and kept in buffers of their
    own, wherever lengths differ 2x (on this tiny model padding never costs enough to split by default)."""
    if buckets:  # and in buffers of their own
        monkeypatch.setattr(batch_cache, "BUCKET_MIN_MACS", 0)
        monkeypatch.setattr(batch_cache, "RAGGED_MIN_BYTES", 0)
    ps = prompts()
    alone = [list(Engine(model, mtp=mtp).generate(p, max_tokens=N)) for p in ps]
    outs, widest = run_batch(model, ps, mtp)
    assert widest >= 4  # sequences really decoded together
    assert [outs[i] for i in range(len(ps))] == alone


def test_leaving_early_does_not_disturb_the_rest(model):
    """Sequences that stop early (as on a stop string or a cancel) leave; the others continue exactly."""
    ps = prompts()
    alone = [list(Engine(model, mtp=True).generate(p, max_tokens=N)) for p in ps]
    outs, _ = run_batch(model, ps, True, arrive_every=1, leave_early=lambda k, toks: k % 3 == 0 and len(toks) == 4)
    for i in range(len(ps)):
        assert outs[i] == alone[i][: len(outs[i])] and len(outs[i]) == (4 if i % 3 == 0 else N)


def test_cache_after_batch_continues_the_conversation(model):
    """A sequence's cache after batched decoding holds what a solo run's does: the next turn reuses it
    and decodes the same as a cold run over the whole history."""
    ps = prompts()
    be = BatchEngine(model, max_batch=4)
    pcs = [PromptCache.fresh(model, mtp=True) for _ in ps[:4]]
    outs = {i: [] for i in range(4)}
    for i in range(4):
        be.add(i, ps[i], pcs[i], Engine(model, mtp=True, prefill_step=8), N)
    while len(be):
        for key, tok, _ in be.step():
            outs[key].append(tok)
            if len(outs[key]) >= N:
                be.remove(key)
    for i in range(4):
        history = ps[i] + outs[i] + [11, 12, 13]
        warm = list(Engine(model, mtp=True).generate(history, pc=pcs[i], max_tokens=8))
        cold = list(Engine(model, mtp=True).generate(history, max_tokens=8))
        assert warm == cold and len(pcs[i].tokens) >= len(ps[i]) + N


def test_logprobs_and_sampling_in_a_batch(model):
    """Each sequence samples from its own sampler; logprobs come per token, and greedy logprobs name
    the chosen token as the most likely."""
    ps = prompts()[:3]
    outs, _ = run_batch(model, ps, False, arrive_every=1, n=6, engine_kwargs={"logprobs": 3})
    assert [outs[i] for i in range(3)] == [list(Engine(model, logprobs=3).generate(p, max_tokens=6)) for p in ps]
    be = BatchEngine(model, max_batch=4)
    for i, p in enumerate(ps):
        be.add(i, p, PromptCache.fresh(model, mtp=False), Engine(model, SamplingParams(temp=0.0), logprobs=3), 6)
    seen = []
    while len(be):
        for key, tok, lp in be.step():
            assert lp is not None and len(lp) == 7 and int(lp[1]) == tok and lp[0] == pytest.approx(lp[4])
            assert lp[4] >= lp[5] >= lp[6]
            seen.append(key)
            if seen.count(key) >= 6:
                be.remove(key)
    assert sorted(set(seen)) == [0, 1, 2]


def test_long_prompt_prefills_within_the_budget_while_others_decode(model):
    """A running stream gets a token every step while a long prompt prefills, budget tokens at a time;
    both outputs stay what they are alone."""
    ps = prompts()
    long_prompt = ps[3] * 3  # 120 tokens
    alone = [list(Engine(model, mtp=False).generate(p, max_tokens=N)) for p in (ps[0], long_prompt)]
    be = BatchEngine(model, max_batch=4, prefill_budget=16)
    be.add("a", ps[0], PromptCache.fresh(model, mtp=False), Engine(model, mtp=False, prefill_step=64), N)
    outs = {"a": [], "b": []}
    for _ in range(2):  # a's first token; its first decode pass (pipelined: that token comes with the next step)
        for key, tok, _ in be.step():
            outs[key].append(tok)
    be.add("b", long_prompt, PromptCache.fresh(model, mtp=False), Engine(model, mtp=False, prefill_step=64), N)
    steps_prefilling = 0
    while len(be):
        was_prefilling = any(s.prefilling for s in be.seqs)
        got = be.step()
        if was_prefilling and any(k == "b" for k, _, _ in got) is False:
            steps_prefilling += 1
            assert [k for k, _, _ in got] == ["a"]  # a decodes on every prefill step
        for key, tok, _ in got:
            outs[key].append(tok)
            if len(outs[key]) >= N:
                be.remove(key)
    assert steps_prefilling >= 120 // 16 - 1  # 16 tokens per step, not one 64-token chunk
    assert [outs["a"], outs["b"]] == alone


GLM_MINI = Path(__file__).resolve().parents[1] / "glm_mlx" / "data" / "glm-mini"


class Always:
    """A mode chooser that verifies drafts in every pass (True) or never (False)."""

    def __init__(self, mtp: bool):
        self.mtp = mtp

    def choose(self, batch):
        return self.mtp

    def record(self, *args):
        pass


class Alternating(Always):
    """Switches between MTP passes and plain passes every `every` passes."""

    def __init__(self, every: int):
        self.every, self.n = every, 0

    def choose(self, batch):
        self.n += 1
        return (self.n // self.every) % 2 == 0


def test_batched_mtp_accepts_drafts_and_equals_alone():
    """The trained glm-mini drafts well (acceptance ~0.8): in a batch every greedy sequence verifies its
    own draft and emits two tokens where it is accepted, and its output is still exactly what it
    decodes alone (prompts of several lengths, past index_topk = 64). A sampled member drafts and
    verifies by speculative sampling: at a near-zero temperature it must reproduce greedy decoding (its
    target and draft logits are paired right). Members that do not draft (one asking for logprobs, one
    without MTP, sampled with a seed) take one token per step from their own sampler, as alone."""
    from mlx_lm.utils import load_tokenizer

    model = load_model(GLM_MINI, dtype=mx.float32)
    words = (Path(__file__).parent / "data" / "glm_mini_heldout.txt").read_text().split()
    tok = load_tokenizer(GLM_MINI)
    ps = [tok.encode(" ".join(words[i * 97 : i * 97 + n]))[:n] for i, n in enumerate((12, 70, 30, 150, 5, 90))]
    n = 24
    cold = SamplingParams(temp=1e-3)  # sampled, but every distribution is one token

    def make(defer=False):  # the batch's engines defer their prefill's MTP slots, as the server's do
        return ([Engine(model, mtp=True, defer_mtp=defer) for _ in ps[:-1]] + [Engine(model, cold, mtp=True, defer_mtp=defer)]
                + [Engine(model, logprobs=2, defer_mtp=defer),
                   Engine(model, SamplingParams(temp=1.0, seed=7), mtp=False, defer_mtp=defer)])

    engines, fresh = make(defer=True), make()
    fresh[len(ps) - 1] = Engine(model, mtp=True)  # alone: greedy
    prompts_all = ps + [ps[1], ps[3]]
    alone = [list(e.generate(p, max_tokens=n)) for e, p in zip(fresh, prompts_all)]
    be = BatchEngine(model, max_batch=8, modes=Always(True), prefill_together=True)
    for i, (e, p) in enumerate(zip(engines, prompts_all)):
        be.add(i, p, PromptCache.fresh(model, mtp=True), e, n)
    outs, stats, doubles = {i: [] for i in range(len(engines))}, {}, 0
    while len(be):
        got = be.step()
        keys = [k for k, _, _ in got]
        doubles += sum(keys.count(k) == 2 for k in set(keys))
        for key, t, _ in got:
            outs[key].append(t)
            if len(outs[key]) == n:
                stats[key] = be.remove(key).stats
    assert [outs[i] for i in range(len(engines))] == alone
    drafted = sum(stats[i].drafted for i in range(len(ps)))
    accepted = sum(stats[i].accepted for i in range(len(ps)))
    assert drafted > 0 and accepted >= 0.5 * drafted and doubles >= accepted // 2, (drafted, accepted, doubles)
    assert all(stats[i].drafted == 0 for i in (len(ps), len(ps) + 1))  # the non-drafting members


@pytest.mark.parametrize("every,lazy", [(1, None), (3, None), (7, 2)])
def test_switching_between_mtp_and_plain_passes_keeps_greedy_output(model, every, lazy, monkeypatch):
    """The running group switches between verifying drafts and plain passes (as the measured choice
    does) without a rebuild: every sequence's output is still what it decodes alone. Plain passes leave
    their MTP slots to a batched catch-up (before drafting, or every `lazy` passes): the drafts after
    it must be what a fed MTP layer drafts (a wrong slot shows as a changed acceptance, not output, so
    the drafts are compared too)."""
    import glm_mlx.batch.decode_group as decode_group

    if lazy:
        monkeypatch.setattr(decode_group, "LAZY_MTP_PASSES", lazy)
    ps = prompts()
    alone = [list(Engine(model, mtp=True).generate(p, max_tokens=N)) for p in ps]
    be = BatchEngine(model, max_batch=8, modes=Alternating(every))
    pcs = [PromptCache.fresh(model, mtp=True) for _ in ps]
    for i, p in enumerate(ps):
        be.add(i, p, pcs[i], Engine(model, mtp=True, prefill_step=8), N)
    assert drain(be, len(ps)) == alone
    for pc in pcs:  # every MTP slot the batch wrote is the one a feeding prefill of its tokens writes
        fed = PromptCache.fresh(model, mtp=True)
        Engine(model, mtp=True).prefill(fed, pc.tokens, StepStats())
        catch_up_mtp(model, pc)
        q = pc.mtp_cache.offset
        assert q == fed.mtp_cache.offset == len(pc.tokens) - 1
        for x, y in zip(fed.mtp_cache.state, pc.mtp_cache.state):
            np.testing.assert_allclose(np.array(x[..., :q, :]), np.array(y[..., :q, :]), atol=1e-4)


def test_mode_chooser_fits_pass_times_and_probes_the_other():
    """Each mode's pass time is fitted as a line in the batch size (a fixed cost plus a cost per member),
    so sizes never measured are predicted; the faster predicted mode is taken and the other probed."""
    from glm_mlx.batch.mtp import ModeChooser

    c = ModeChooser(probe=4, ema=0.5)
    assert c.choose(4) is True  # nothing measured: MTP first
    c.record(True, 4, tokens=7, seconds=0.01)  # 700 tok/s
    assert c.choose(4) is False  # then plain
    c.record(False, 4, tokens=4, seconds=0.005)  # 800 tok/s
    picks = [c.choose(4) for _ in range(8)]
    assert picks == [False, False, False, True] * 2  # the slower, every 4th pass
    # A CPU-like machine: an MTP pass costs 0.5 ms + 4 ms per member (1.75 tokens each), a plain pass
    # 4 ms + 0.25 ms per member. MTP wins at 1 (1.75 / 4.5 ms against 1 / 4.25 ms) and plain from 2 on
    # (3.5 / 8.5 ms against 2 / 4.5 ms), for sizes measured or not.
    c = ModeChooser(probe=1000)
    for b in (1, 3):
        c.record(True, b, tokens=1.75 * b, seconds=0.0005 + 0.004 * b)
        c.record(False, b, tokens=b, seconds=0.004 + 0.00025 * b)
    assert [c.choose(b) for b in (1, 2, 5, 8, 16)] == [True, False, False, False, False]
    # MTP measured at one size only: its cost per member is borrowed from plain's fit, per row (two per
    # member): plain 2 ms + 1 ms per member, so MTP 4 ms at 1 grows 2 ms per member; plain wins at 8.
    c = ModeChooser(probe=1000)
    c.record(True, 1, tokens=1.75, seconds=0.004)
    for b in (1, 3):
        c.record(False, b, tokens=b, seconds=0.002 + 0.001 * b)
    assert [c.choose(b) for b in (1, 8)] == [True, False]
    # A Mac-like machine, bound by reading the weights: the passes cost about the same; MTP wins throughout.
    c = ModeChooser(probe=1000)
    for b in (2, 6):
        c.record(True, b, tokens=1.8 * b, seconds=0.05 + 0.001 * b)
        c.record(False, b, tokens=b, seconds=0.05 + 0.0005 * b)
    assert all(c.choose(b) for b in (1, 2, 4, 8, 12))


def test_prompts_arriving_together_prefill_in_one_pass(model, monkeypatch):
    """Requests that arrive together prefill in one padded pass (each row at its own offset: some
    continue a cached conversation, some start empty; lengths past index_topk), and each then decodes
    exactly what it decodes alone."""
    ps = prompts()
    histories = [PromptCache.fresh(model, mtp=True) for _ in range(3)]
    for pc, p in zip(histories, ps[:3]):  # three conversations with a cached first turn
        list(Engine(model, mtp=True).generate(p, pc=pc, max_tokens=4))
    # their next turns (8 new tokens each) and three new prompts of like length (rows are padded)
    turns = [pc.tokens + list(range(21, 29)) for pc in histories] + [ps[i][:n] for i, n in ((3, 9), (4, 11), (6, 12))]
    alone = [list(Engine(model, mtp=True).generate(t, max_tokens=N)) for t in turns]
    calls = []
    real = BatchEngine._prefill_together
    monkeypatch.setattr(BatchEngine, "_prefill_together", lambda self, seqs: calls.append(len(seqs)) or real(self, seqs))
    be = BatchEngine(model, max_batch=8, prefill_together=True)  # the default on a GPU
    caches = histories + [PromptCache.fresh(model, mtp=True) for _ in range(3)]
    for i, (t, pc) in enumerate(zip(turns, caches)):
        be.add(i, t, pc, Engine(model, mtp=True, defer_mtp=i % 2 == 0), N)
    outs = drain(be, len(turns))
    assert calls == [len(turns)]
    assert outs == alone


def test_how_many_prompts_prefill_together(model, monkeypatch):
    """The default: on a GPU two or more arriving prompts prefill together; on the CPU backend three or
    more (two would make the first wait for the second's compute for a small saving)."""
    ps = [p[:9] for p in prompts() if len(p) >= 9]  # like lengths
    calls = []
    real = BatchEngine._prefill_together
    monkeypatch.setattr(BatchEngine, "_prefill_together", lambda self, seqs: calls.append(len(seqs)) or real(self, seqs))
    for device, n, joint in (("cpu", 2, []), ("cpu", 3, [3]), ("gpu", 2, [2])):
        calls.clear()
        with monkeypatch.context() as m:
            m.setattr(mx, "default_device", lambda: mx.gpu if device == "gpu" else mx.cpu)
            be = BatchEngine(model, max_batch=8)
        for i in range(n):
            be.add(i, ps[i], PromptCache.fresh(model, mtp=False), Engine(model, mtp=False), 3)
        drain(be, n, 3)
        assert calls == joint, (device, n)


def test_history_dependent_sampling_in_a_batch_equals_alone(model):
    """Logits processors read the token history: in a pipelined batch pass the token just fed is still
    on the device, and the history must end with it (a repetition penalty shows an off-by-one)."""
    ps = prompts()[:4]
    params = SamplingParams(temp=0.0, repetition_penalty=1.8, presence_penalty=0.5)
    alone = [list(Engine(model, params, mtp=False).generate(p, max_tokens=N)) for p in ps]
    assert alone != [list(Engine(model, mtp=False).generate(p, max_tokens=N)) for p in ps]  # the penalty acts
    be = BatchEngine(model, max_batch=4)
    for i, p in enumerate(ps):
        be.add(i, p, PromptCache.fresh(model, mtp=False), Engine(model, params, mtp=False), N)
    assert drain(be, len(ps)) == alone


def test_a_batch_holds_each_cache_once(model):
    """While sequences decode together their rows live in the batch buffers only: each one's own cache
    is lent (the memory plan counts one copy per sequence, not two). A snapshot views a member's rows
    there, and what it shows equals the cache the member gets back when it leaves."""
    rng = np.random.RandomState(3)
    ps = [[int(t) for t in rng.randint(11, 80, size=n)] for n in (700, 500, 300, 600)]
    mx.eval(model.parameters())
    mx.clear_cache()
    baseline = mx.get_active_memory()
    be = BatchEngine(model, max_batch=4)
    for i, p in enumerate(ps):
        be.add(i, p, PromptCache.fresh(model, mtp=True), Engine(model, mtp=True, prefill_step=256), 40)
    while not (be.group is not None and len(be.group.seqs) == 4):
        be.step()
    for _ in range(3):
        be.step()
    g = be.group
    mx.eval(g.arrays())
    per_token = model.cache_bytes_per_token(mtp=True)
    group_bytes = sum(a.nbytes for a in g.arrays() if a is not g.pending)
    assert group_bytes <= per_token * 4 * g.layers[0].capacity  # the padded buffers, nothing more
    assert all(s.pc.nbytes == 0 for s in be.seqs)  # lent: no second copy
    # Live memory says the same (two copies would be twice the buffers).
    mx.clear_cache()
    assert mx.get_active_memory() - baseline < 1.4 * group_bytes
    snap = be.cache_of(2)
    n = snap.cache[0].offset
    want = [np.array(c.kv_parts()[0]) for c in snap.cache]
    assert n == len(snap.tokens)
    seq = be.remove(2)
    assert seq.pc.cache[0].offset == n
    for c, w in zip(seq.pc.cache, want):
        np.testing.assert_array_equal(np.array(c.kv_parts()[0]), w)
    assert be.cache_of(0) is not None and be.cache_of(99) is None


def test_membership_changes_keep_the_group_and_move_rows_once(model):
    """A request cancelled while it prefills leaves the decoding group as it was (same buffers); a
    member that leaves gets its rows back at once and the next step rebuilds the buffers from the old
    ones, with the joiner's rows; every output still equals running alone."""
    ps = prompts()
    alone = [list(Engine(model, mtp=True).generate(p, max_tokens=N)) for p in ps[:4]]
    be = BatchEngine(model, max_batch=8)
    for i in range(3):
        be.add(i, ps[i], PromptCache.fresh(model, mtp=True), Engine(model, mtp=True, prefill_step=8), N)
    outs = {i: [] for i in range(4)}

    def collect(out):
        for key, tok, _ in out:
            outs[key].append(tok)

    while not (be.group is not None and len(be.group.seqs) == 3):
        collect(be.step())
    g, buffers = be.group, [id(a) for a in be.group.layers[0].kv]
    be.add(9, ps[7], PromptCache.fresh(model, mtp=True), Engine(model, mtp=True, prefill_step=8), N)
    collect(be.step())  # one prefill chunk of the newcomer
    assert be.remove(9).pc.tokens == ps[7][:8]  # cancelled mid-prefill: its finished chunk kept
    assert be.group is g and [id(a) for a in g.layers[0].kv] == buffers  # nothing rebuilt for it
    row = [s.key for s in g.seqs].index(1)
    leaver = be.remove(1)
    assert g.seqs[row] is None and leaver.pc.nbytes > 0 and len(leaver.pc.cache[0].kv_parts()[0][0, 0]) == len(leaver.pc.tokens)
    be.add(3, ps[3], PromptCache.fresh(model, mtp=True), Engine(model, mtp=True, prefill_step=8), N)
    while len(be):
        for key, tok, _ in be.step():
            if key in outs and key != 1:
                outs[key].append(tok)
                if len(outs[key]) >= N:
                    be.remove(key)
    assert outs[0] == alone[0] and outs[2] == alone[2] and outs[3] == alone[3]
    assert outs[1] == alone[1][: len(outs[1])]


def test_rows_are_scored_in_ranges_of_like_length(monkeypatch):
    """Contiguous ranges, each over its own longest row (at least k keys), split only where the rows
    after are under half as long and the saving is worth BUCKET_MIN_MACS."""
    from glm_mlx.batch.cache import BatchLayerCache

    layer = BatchLayerCache(True, None, [], [], [5000, 4000, 300, 200, 40], 8)
    layer._capacity = 5120
    assert layer.buckets(4096, 64) == [(0, 2, 5000), (2, 5, 300)]  # 40 vs 300: saving too small to split
    monkeypatch.setattr(batch_cache, "BUCKET_MIN_MACS", 0)
    assert layer.buckets(4096, 64) == [(0, 2, 5000), (2, 4, 300), (4, 5, 64)]
    assert layer.buckets(1, 8) == [(0, 2, 5000), (2, 4, 300), (4, 5, 40)]
    monkeypatch.setattr(batch_cache, "BUCKET_MIN_MACS", 1 << 40)
    assert layer.buckets(4096, 64) == [(0, 5, 5000)]


def test_rows_of_very_different_lengths_keep_buffers_of_their_own(model, monkeypatch):
    """One long sequence beside short ones: the group keeps the ranges in buffers of their own (sizes
    add up; not every row padded to the longest), and outputs still equal running alone."""
    monkeypatch.setattr(batch_cache, "RAGGED_MIN_BYTES", 0)
    rng = np.random.RandomState(5)
    ps = [[int(t) for t in rng.randint(11, 80, size=n)] for n in (600, 20, 16, 24)]
    alone = [list(Engine(model, mtp=True).generate(p, max_tokens=12)) for p in ps]
    be = BatchEngine(model, max_batch=4)
    for i, p in enumerate(ps):
        be.add(i, p, PromptCache.fresh(model, mtp=True), Engine(model, mtp=True, prefill_step=256), 12)
    outs = {i: [] for i in range(4)}
    seen = False
    while len(be):
        for key, tok, _ in be.step():
            outs[key].append(tok)
            if len(outs[key]) >= 12:
                be.remove(key)
        g = be.group
        if g is not None and len([s for s in g.seqs if s is not None]) == 4 and not seen:
            seen = True
            layer = g.layers[0]
            assert isinstance(layer, batch_cache.RaggedLayerCache)
            assert [len(p.lengths) for p in layer.parts] == [1, 3]  # longest first: the long one alone
            assert [p.capacity for p in layer.parts] == [768, 256]
    assert seen and [outs[i] for i in range(4)] == alone
