"""Quantized latent KV cache (kv_cache_bits / --kv-bits 8 and 4).

Tiny fp32 checkpoints from tests/reference.py. Random tiny networks are chaotic (a small change
flips an MoE route or an indexer pick, and the logits jump), so exactness is tested against the
unquantized model fed the very rows the quantized cache returns (quantize -> dequantize), and the
distance to the unquantized cache with mean KL and top-1 agreement; glm-mini (trained) checks
greedy decoding.
"""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from reference import make_reference

from glm_mlx import load, load_model
from glm_mlx.batch.engine import BatchEngine
from glm_mlx.model.cache import DSACache
from glm_mlx.model.config import ModelArgs
from glm_mlx.generation.engine import Engine, StepStats
from glm_mlx.errors import ConfigError
from glm_mlx.prefix.cache import PrefixCache
from glm_mlx.generation.prompt_cache import PromptCache, PromptCacheError
from glm_mlx.quantize.macs import get_mac
from glm_mlx.quantize.planner import glm51_args, plan
from glm_mlx.quantize.recipe import Recipe

TOPK = 8
PROMPT = [int(t) for t in np.random.RandomState(0).randint(11, 80, size=21)]  # > index_topk


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, 96, size=(1, n))


class kv_bits:
    """with kv_bits(model, 8): caches made inside are quantized; the model is reset after."""

    def __init__(self, model, bits):
        self.model, self.bits = model, bits

    def __enter__(self):
        self.model.set_kv_cache_bits(self.bits)

    def __exit__(self, *exc):
        self.model.set_kv_cache_bits(None)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe")
    make_reference(path, seed=13)
    return load_model(path, dtype=mx.float32)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """No MoE routing to flip: the logits move only as much as attention does."""
    path = tmp_path_factory.mktemp("dense")
    make_reference(path, seed=21, first_k_dense_replace=4)
    return load_model(path, dtype=mx.float32)


@pytest.fixture(scope="module")
def mtp_model(mtp_ckpt):
    return load_model(mtp_ckpt, dtype=mx.float32)


def decode(model, toks, prefix: int, cache=None) -> np.ndarray:
    """Logits [L, V]: `prefix` tokens prefilled, then one token per step."""
    cache = cache if cache is not None else model.make_cache()
    outs = [np.array(model(mx.array(toks[:, :prefix]), cache=cache))[0]]
    for i in range(prefix, toks.shape[1]):
        outs.append(np.array(model(mx.array(toks[:, i : i + 1]), cache=cache))[0])
    return np.concatenate(outs)


def log_softmax(x):
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl(ref, other):
    a, b = log_softmax(ref), log_softmax(other)
    return (np.exp(a) * (a - b)).sum(-1)


class Dequantized(DSACache):
    """An unquantized cache holding exactly the rows a quantized one returns."""

    def __init__(self, has_indexer, index_bits, bits, group):
        super().__init__(has_indexer, index_bits)
        self.bits, self.group = bits, group

    def update_kv(self, latent, k_pe):
        q = mx.quantize(latent, group_size=self.group, bits=self.bits)
        return super().update_kv(mx.dequantize(*q, group_size=self.group, bits=self.bits), k_pe)


# --- bytes: the planner's figure ----------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_nbytes_equal_the_planner_bytes_per_token(mtp_model, bits):
    a = mtp_model.args
    n = 37
    with kv_bits(mtp_model, bits):
        pc = PromptCache.fresh(mtp_model, mtp=True)
        Engine(mtp_model, mtp=True).prefill(pc, [int(t) for t in tokens(n)[0]], StepStats())
        assert all(c.offset == n for c in pc.cache) and pc.mtp_cache.offset == n - 1
        assert sum(c.nbytes for c in pc.cache) == mtp_model.cache_bytes_per_token() * n
        # The MTP layer's cache (one slot behind the main layers) is the rest of the per-token figure.
        mtp_row = mtp_model.cache_bytes_per_token(mtp=True) - mtp_model.cache_bytes_per_token()
        assert pc.mtp_cache.nbytes == mtp_row * (n - 1)
        assert mtp_model.cache_bytes_per_token(mtp=True) == a.cache_bytes_per_token(4, mtp=True)
        # The row: C*bits/8 bytes of codes + a float32 scale and bias per group of 32 + the float32 rope key.
        C, R, g = a.kv_lora_rank, a.qk_rope_head_dim, a.kv_cache_group_size
        assert g == 32 and a.latent_bytes_per_token(4) == C * bits // 8 + 2 * (C // g) * 4 + R * 4
        assert pc.cache[0].nbytes == (a.latent_bytes_per_token(4) + a.indexer_bytes_per_token(4)) * n
    assert mtp_model.args.kv_cache_bits is None  # reset


def test_glm51_bytes_and_the_plan():
    args = glm51_args()
    base = args.cache_bytes_per_token(2, mtp=True)
    assert args.latent_bytes_per_token(2) == 1152
    mac = get_mac("m3-ultra-256")
    recipe = Recipe.uniform("affine2g64")
    p0 = plan(args, recipe, mac, 32768)
    for bits, latent in ((8, 512 + 32 + 128), (4, 256 + 32 + 128)):
        q = glm51_args()
        q.kv_cache_bits = bits
        assert q.kv_cache_group_size == 64 and q.latent_bytes_per_token(2) == latent
        p = plan(q, recipe, mac, 32768)
        assert p.kv_bits == bits and p.kv_bytes_per_token == q.cache_bytes_per_token(2, mtp=True) < base
        assert p.max_context > p0.max_context and p.total_bytes < p0.total_bytes
        assert any(f"{bits}-bit" in line for line in p.assumptions)
    assert p0.kv_bits is None


def test_validation():
    with pytest.raises(ConfigError, match="kv_cache_bits"):
        ModelArgs(kv_cache_bits=5)
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        ModelArgs(kv_lora_rank=48, kv_cache_bits=8)
    args = ModelArgs(kv_lora_rank=96, kv_cache_bits=4)
    assert args.kv_cache_group_size == 32  # 96 is no multiple of 64


def test_set_kv_cache_bits_refuses_and_keeps_the_old_value(dense):
    with pytest.raises(ConfigError):
        dense.set_kv_cache_bits(3)
    assert dense.args.kv_cache_bits is None
    assert all(c.kv_bits is None for c in dense.make_cache())


# --- exactness: the quantized cache is the unquantized one holding dequantized rows ---------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("path", ["auto", "sparse", "dense"])
def test_equals_an_unquantized_cache_of_the_dequantized_rows(moe, bits, path):
    toks = tokens(5 * TOPK + 3, seed=3)
    a = moe.args
    for layer in moe.layers:
        layer.self_attn.path = path
        layer.self_attn.query_chunk = 5  # several query chunks in the sparse prefill
    try:
        sim = [Dequantized(a.has_indexer(i), None, bits, a.kv_cache_group_size) for i in range(a.num_hidden_layers)]
        want = decode(moe, toks, 2 * TOPK + 1, cache=sim)
        with kv_bits(moe, bits):
            cache = moe.make_cache()
            got = decode(moe, toks, 2 * TOPK + 1, cache=cache)
            whole = np.array(moe(mx.array(toks), cache=moe.make_cache()))[0]  # one prefill over it all
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(whole, want, atol=1e-4, rtol=0)
        assert all(c.kv_bits == bits and c.nbytes < s.nbytes for c, s in zip(cache, sim))
    finally:
        for layer in moe.layers:
            layer.self_attn.path, layer.self_attn.query_chunk = "auto", None


# --- distance to the unquantized cache ----------------------------------------------------------
def test_close_to_the_unquantized_cache_past_index_topk(dense):
    toks = tokens(5 * TOPK, seed=5)
    exact = decode(dense, toks, 10)
    got = {}
    for bits in (8, 4):
        with kv_bits(dense, bits):
            got[bits] = decode(dense, toks, 10)
    past = slice(TOPK, None)  # positions whose queries see more than index_topk keys
    kl8, kl4 = kl(exact, got[8])[past].mean(), kl(exact, got[4])[past].mean()
    top8 = (exact.argmax(-1) == got[8].argmax(-1))[past].mean()
    top4 = (exact.argmax(-1) == got[4].argmax(-1))[past].mean()
    assert kl8 < 0.02 and top8 >= 0.9, (kl8, top8)  # measured 0.005, 0.97
    assert kl4 < 0.15 and top4 >= 0.5, (kl4, top4)  # less close, bounded: measured 0.04, 0.7
    assert kl8 < kl4 / 3
    # Before index_topk every query attends to every key (dense): there the 8-bit logits are near-exact.
    assert np.abs(exact[:TOPK] - got[8][:TOPK]).max() < 0.1


def test_greedy_8bit_on_glm_mini():
    from glm_mlx.model.reference import DEFAULT_MODEL

    model, tok = load(DEFAULT_MODEL)
    assert model.args.kv_cache_group_size == 64 and model.args.index_topk == 64
    text = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer The slings and "
            "arrows of outrageous fortune, Or to take arms against a sea of troubles And by opposing end them. To "
            "die-to sleep, No more; and by a sleep to say we end The heart-ache and the thousand natural shocks")
    prompt = list(tok.encode(text))
    assert len(prompt) > model.args.index_topk
    ref = list(Engine(model, mtp=False).generate(prompt, max_tokens=48))
    with kv_bits(model, 8):
        q8 = list(Engine(model, mtp=False).generate(prompt, max_tokens=48))
        q8_mtp = list(Engine(model, mtp=True).generate(prompt, max_tokens=48))
    assert q8_mtp == q8  # MTP's greedy output is plain greedy's, with a quantized cache too
    assert np.mean([a == b for a, b in zip(ref, q8)]) >= 0.9, (ref, q8)


# --- state: prompt cache files, prefix cache, batching ------------------------------------------
def test_prompt_cache_round_trip(mtp_model, tmp_path):
    path = tmp_path / "pc.safetensors"
    with kv_bits(mtp_model, 8):
        eng = Engine(mtp_model, mtp=True)
        pc = eng.new_cache()
        first = list(eng.generate(PROMPT, pc, max_tokens=6))
        pc.save(path)
        loaded = PromptCache.load(path, mtp_model, mtp=True)
        assert loaded.tokens == pc.tokens and loaded.nbytes == pc.nbytes
        for a, b in zip(pc.all_caches(), loaded.all_caches()):
            assert b.kv_bits == 8 and len(a.state) == len(b.state)
            for x, y in zip(a.state, b.state):
                assert x.dtype == y.dtype and np.array_equal(np.array(x), np.array(y))
        assert pc.cache[0].state[0].dtype == mx.uint32  # codes + scales + biases, packed
        turn = PROMPT + first + [17, 23, 31]
        assert list(eng.generate(turn, loaded, max_tokens=8)) == list(eng.generate(turn, pc, max_tokens=8))
        with kv_bits(mtp_model, 4), pytest.raises(PromptCacheError, match="8-bit"):  # refused, not misread
            PromptCache.load(path, mtp_model, mtp=True)
    with pytest.raises(PromptCacheError, match="8-bit"):
        PromptCache.load(path, mtp_model, mtp=True)
    plain = Engine(mtp_model, mtp=True)
    pc = plain.new_cache()
    list(plain.generate(PROMPT, pc, max_tokens=2))
    pc.save(path)
    with kv_bits(mtp_model, 8), pytest.raises(PromptCacheError, match="unquantized"):
        PromptCache.load(path, mtp_model, mtp=True)


def test_cache_state_format_is_checked():
    q = DSACache(True, kv_bits=8, kv_group_size=32)
    q.update_kv(mx.random.normal((1, 1, 5, 64)), mx.random.normal((1, 1, 5, 8)))
    q.update_index(mx.random.normal((1, 1, 5, 32)))
    with pytest.raises(ValueError, match="kv_cache_bits"):
        DSACache(True).state = q.state
    with pytest.raises(ValueError, match="kv_cache_bits"):
        DSACache(True, kv_bits=4, kv_group_size=32).state = q.state
    copy = DSACache(True, kv_bits=8, kv_group_size=32)
    copy.state = q.state
    assert copy.nbytes == q.nbytes and copy.latent_dim == 64 and copy.offset == 5
    assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(copy.state, q.state))


def test_prefix_cache_round_trip_and_identity(mtp_model, tmp_path):
    def store(disk):
        return PrefixCache(mtp_model, identity="tiny", block_size=8, mtp=True, memory_bytes=0, disk_dir=disk,
                           disk_bytes=1 << 30, log=lambda m: None)

    plain_root = store(None).root
    prompt = PROMPT + [40, 41, 42, 43, 44]
    with kv_bits(mtp_model, 8):
        ps = store(tmp_path / "q8")
        assert ps.root != plain_root and "kv_cache_bits=8" in ps.identity
        pc = Engine(mtp_model, mtp=True).new_cache()
        Engine(mtp_model, mtp=True).prefill(pc, prompt, StepStats())
        assert ps.save(pc) == 3
        ps.flush()
        restored, stats = ps.restore(prompt)  # from disk (memory_bytes=0)
        assert stats["tokens"] == 23 and stats["disk_tokens"] == 24
        for a, b in zip(pc.cache, restored.cache):
            assert b.kv_bits == 8 and b.offset == 23
            for x, y in zip(a.state, b.state):
                assert np.array_equal(np.array(x[..., :23, :]), np.array(y))
        eng = Engine(mtp_model, mtp=True)
        assert list(eng.generate(prompt, restored, max_tokens=6)) == list(eng.generate(prompt, eng.new_cache(),
                                                                                      max_tokens=6))
        ps.close()
    # The same folder seen without --kv-bits: another identity, so none of those blocks is served.
    other = store(tmp_path / "q8")
    assert other.lookup(prompt) == 0
    other.close(persist=False)


def test_batch_engine_equals_alone(mtp_model):
    rng = np.random.RandomState(2)
    prompts = [[int(t) for t in rng.randint(11, 80, size=n)] for n in (5, 21, 12, 30)]
    with kv_bits(mtp_model, 8):
        alone = [list(Engine(mtp_model, mtp=False).generate(p, max_tokens=12)) for p in prompts]
        be = BatchEngine(mtp_model, max_batch=4)
        outs = {i: [] for i in range(len(prompts))}
        for i, p in enumerate(prompts):
            be.add(i, p, PromptCache.fresh(mtp_model, mtp=False), Engine(mtp_model, mtp=False, prefill_step=8), 12)
        widest = 0
        while len(be):
            widest = max(widest, sum(not s.prefilling for s in be.seqs))
            for key, tok, _ in be.step():
                outs[key].append(tok)
                if len(outs[key]) >= 12:
                    be.remove(key)
        assert widest >= 3
        assert [outs[i] for i in range(len(prompts))] == alone


# --- glm-mlx fit --kv-bits ------------------------------------------------------------------------
def test_fit_kv_bits_reports_a_longer_context():
    def fit(*extra):
        r = subprocess.run([sys.executable, "-m", "glm_mlx.cli.app", "fit", "--mac", "m3-ultra-256", "--bits", "2",
                            "--context", "32768", "--json", *extra], capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    base, q8, q4 = fit(), fit("--kv-bits", "8"), fit("--kv-bits", "4")
    assert base["kv_bits"] is None and q8["kv_bits"] == 8 and q4["kv_bits"] == 4
    assert base["kv_bytes_per_token"] > q8["kv_bytes_per_token"] > q4["kv_bytes_per_token"]
    assert q8["max_context"] > base["max_context"]
    assert q4["max_context"] >= q8["max_context"]
    r = subprocess.run([sys.executable, "-m", "glm_mlx.cli.app", "fit", "--kv-bits", "5"], capture_output=True, check=False,
                       text=True, timeout=300)
    assert r.returncode != 0 and "--kv-bits" in r.stdout + r.stderr
