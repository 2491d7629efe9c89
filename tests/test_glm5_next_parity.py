"""GLM-5.3-Flash (glm5_next) in MLX against the reference (transformers.Glm5NextForConditionalGeneration),
fp32, on tiny checkpoints the reference writes; KDA's chunked form against its recurrence; loading."""

from __future__ import annotations

import json
import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch
from glm5_next_reference import (gaps_of, make_reference, pool_gaps, reference_greedy, reference_logits,
                                 tiny_config)
from safetensors.torch import load_file, save_file

from glm_mlx import load_model
from glm_mlx.errors import CheckpointError, ConfigError
from glm_mlx.generation.engine import Engine, StepStats
from glm_mlx.model import kda
from glm_mlx.model.glm5_next_config import Glm5NextArgs

ATOL = 1e-4
LONG = 29  # 14 complete pools of 2 > K = 8 / 2 = 4: the indexer selects
SHORT = 7  # 3 pools <= K: dense


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, 96, size=(1, n))


def load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the vision tower note
        return load_model(path, dtype=mx.float32)


def run_decode(model, toks, prefill: int):
    cache = model.make_cache()
    outs = [np.array(model(mx.array(toks[:, :prefill]), cache=cache))]
    for i in range(prefill, toks.shape[1]):
        outs.append(np.array(model(mx.array(toks[:, i : i + 1]), cache=cache)))
    return np.concatenate(outs, axis=1)


def assert_parity(ref, model, toks):
    assert min(pool_gaps(ref, toks), default=1.0) > 1e-6, "fixture has indexer ties: pick another seed"
    expected = reference_logits(ref, toks)
    full = np.array(model(mx.array(toks)))
    diffs = [np.abs(full - expected).max()]
    # Prefill past RECURRENT_MAX_TOKENS (chunked KDA, expanded MLA), within KEEP_STATES_MAX, and 1 token.
    for prefill in sorted({min(20, toks.shape[1] - 1), 5, 1}):
        diffs.append(np.abs(run_decode(model, toks, prefill) - expected).max())
    assert max(diffs) <= ATOL, diffs
    return max(diffs)


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm5_next")
    ref = make_reference(path, seed=0)
    return ref, load(path), path


@pytest.mark.parametrize("n", [SHORT, LONG])
def test_parity(flash, n):
    ref, model, _ = flash
    assert [type(layer.self_attn).__name__ for layer in model.layers] == ["KimiDeltaAttention"] * 3 + [
        "PooledMLAttention"]
    assert_parity(ref, model, tokens(n))


def test_pooled_selection_changes_the_answer(flash):
    """Guard against a vacuous fixture: past K pools, dense attention gives other logits."""
    _, model, _ = flash
    toks = tokens(LONG)
    sparse = np.array(model(mx.array(toks)))
    idx = model.layers[3].self_attn.indexer
    idx.topk = 10**6
    try:
        dense = np.array(model(mx.array(toks)))
    finally:
        idx.topk = 8
    assert np.abs(dense - sparse).max() > 1e-2


def test_shared_indexer_and_paths(tmp_path):
    # Two adjacent DSA layers, the second reusing the first's selection; the sparse gather and the
    # masked dense pass must both match.
    ref = make_reference(tmp_path, seed=2, num_hidden_layers=4, mlp_layer_types=["dense", "sparse", "sparse", "dense"],
                         layer_types=["linear_attention", "indexed_attention", "indexed_attention", "linear_attention"],
                         indexer_types=["full", "full", "shared", "full"])
    model = load(tmp_path)
    assert model.layers[2].self_attn.indexer is None
    for path in ("sparse", "dense"):
        for layer in model.layers[1:3]:
            layer.self_attn.path = path
        assert_parity(ref, model, tokens(LONG, seed=1))


def test_kda_chunked_equals_recurrent():
    B, T, H, D = 2, 37, 3, 16
    rs = np.random.RandomState(0)
    arr = lambda *s: mx.array(rs.randn(*s).astype(np.float32))  # noqa: E731
    q, k = kda.normalize_qk(arr(B, T, H, D), arr(B, T, H, D), inv_scale=D**-0.5, eps=1e-6)
    v, a, b = arr(B, T, H, D), arr(B, T, H, D), arr(B, T, H)
    A_log, dt_bias, state = arr(H, 1) * 0.5, arr(H, D), arr(B, H, D, D) * 0.1
    for lb in (-5.0, None):
        rec, states = kda.recurrent_kda(q, k, v, a, b, A_log, dt_bias, lb, state)
        g = kda.log_gate(a, A_log, dt_bias, lb)
        out, final = kda.chunk_kda(q, k, v, g, mx.sigmoid(b), state)
        assert np.abs(np.array(out) - np.array(rec)).max() < 1e-5
        assert np.abs(np.array(final) - np.array(states[-1])).max() < 1e-5
        # The reference's own recurrence (its state is [Dk, Dv]; q, k normalised inside).
        from transformers.models.glm5_next.modeling_glm5_next import recurrent_kimi_delta_attention as ref_rec

        t = lambda x: torch.tensor(np.array(x))  # noqa: E731
        ro, rs_ = ref_rec(t(q) * D**0.5, t(k), t(v), t(g), t(mx.sigmoid(b)), t(state).transpose(-1, -2), True,
                          use_qk_l2norm_in_kernel=True)
        assert np.abs(ro.numpy() - np.array(out)).max() < 1e-5
        assert np.abs(rs_.transpose(-1, -2).numpy() - np.array(final)).max() < 1e-5


def test_kda_cache_rollback(flash):
    """A multi-token update keeps its per-token states: trimming n of them equals never running them."""
    _, model, _ = flash
    toks = tokens(LONG, seed=3)
    cache = model.make_cache()
    model(mx.array(toks[:, :20]), cache=cache)
    kept = model(mx.array(toks[:, 20:24]), cache=cache)  # 4 tokens: within KEEP_STATES_MAX
    for c in cache:
        assert c.trim(3) == 3
    again = model(mx.array(toks[:, 21:23]), cache=cache)
    fresh = run_decode(model, toks[:, :23], 20)
    np.testing.assert_allclose(np.array(again), fresh[:, 21:23], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.array(kept)[:, :1], fresh[:, 20:21], atol=ATOL, rtol=0)
    with pytest.raises(ValueError):
        cache[0].trim(5)  # beyond the last multi-token update: the state is gone
    assert cache[0].trim(cache[0].offset) > 0 and cache[0].offset == 0  # a full reset always works


def test_cache_nbytes_matches_analytic(flash):
    _, model, _ = flash
    cache = model.make_cache()
    model(mx.array(tokens(LONG + 1)), cache=cache)  # 30 tokens: 15 complete pools
    mx.eval([c.state for c in cache])
    a = model.args
    dsa = [c for i, c in enumerate(cache) if a.is_indexed(i)]
    assert sum(c.nbytes for c in dsa) == model.cache_bytes_per_token() * (LONG + 1)
    assert sum(c.nbytes for c in cache) - sum(c.nbytes for c in dsa) == a.kda_state_bytes(4)


@torch.no_grad()
def _reference_mtp(ref, cfg, modules, toks):
    """h' = eh_proj([enorm(embed(t+1)); hnorm(h_t)]) -> x + attn(norm x) -> x + moe(norm x) -> norm -> head,
    from the reference's own attention / MoE / RMSNorm modules."""
    lm = ref.model.language_model
    h = lm(input_ids=torch.tensor(toks)).last_hidden_state[:, :-1]
    e = lm.embed_tokens(torch.tensor(toks[:, 1:]))
    x = modules["eh_proj"](torch.cat([modules["enorm"](e), modules["hnorm"](h)], -1))
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    x = x + modules["self_attn"](modules["input_layernorm"](x), attention_mask=mask)[0]
    x = x + modules["mlp"](modules["post_attention_layernorm"](x))
    return ref.lm_head(modules["shared_head.norm"](x)).numpy()


def _add_mtp(path, ref, seed: int):
    from transformers.models.glm5_next import modeling_glm5_next as hf

    t = ref.config.text_config
    n = t.num_hidden_layers
    cfg = tiny_config(num_hidden_layers=n + 1, layer_types=t.layer_types + ["indexed_attention"],
                      indexer_types=t.indexer_types + ["full"], mlp_layer_types=t.mlp_layer_types + ["sparse"]).text_config
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    d = cfg.hidden_size
    modules = torch.nn.ModuleDict({"self_attn": hf.Glm5NextTextAttention(cfg, n), "mlp": hf.Glm5NextTextMoE(cfg),
                                   "eh_proj": torch.nn.Linear(2 * d, d, bias=False)})
    for name in ("enorm", "hnorm", "input_layernorm", "post_attention_layernorm", "shared_head.norm"):
        modules[name.replace(".", "_")] = hf.Glm5NextTextRMSNorm(d, cfg.rms_norm_eps)
    from glm5_next_reference import _spread_weights

    _spread_weights(modules, seed)
    modules = {k.replace("shared_head_norm", "shared_head.norm"): m for k, m in modules.items()}
    tensors = {}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            if k == "experts.gate_up_proj":
                for ex in range(v.shape[0]):
                    gate, up = v[ex].chunk(2, dim=0)
                    tensors[f"{name}.experts.{ex}.gate_proj.weight"], tensors[f"{name}.experts.{ex}.up_proj.weight"] = gate, up
            elif k == "experts.down_proj":
                for ex in range(v.shape[0]):
                    tensors[f"{name}.experts.{ex}.down_proj.weight"] = v[ex]
            else:
                tensors[f"{name}.{k}"] = v
    save_file({f"model.language_model.layers.{n}.{k}": v.contiguous() for k, v in tensors.items()},
              str(path / "model-mtp.safetensors"), metadata={"format": "pt"})
    return cfg, modules


def test_mtp_block(tmp_path):
    ref = make_reference(tmp_path, seed=5)
    cfg, modules = _add_mtp(tmp_path, ref, seed=6)
    model = load(tmp_path)
    assert model.has_mtp
    toks = tokens(LONG + 1, seed=4)
    calls = []
    hook = modules["self_attn"].indexer.register_forward_hook(lambda m, a, kw, o: calls.append((m, kw)), with_kwargs=True)
    expected = _reference_mtp(ref, cfg, modules, toks)
    hook.remove()
    assert min(gaps_of(calls)) > 1e-6
    _, hidden = model(mx.array(toks), return_hidden=True)
    logits, _ = model.mtp_logits(hidden[:, :-1], mx.array(toks[:, 1:]))
    np.testing.assert_allclose(np.array(logits), expected, atol=ATOL, rtol=0)
    cache = model.make_cache(mtp=True)[-1]
    steps = [np.array(model.mtp_logits(hidden[:, i : i + 1], mx.array(toks[:, i + 1 : i + 2]), cache)[0])
             for i in range(toks.shape[1] - 1)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), expected, atol=ATOL, rtol=0)
    assert not load_model(tmp_path, dtype=mx.float32, mtp=False).has_mtp


@pytest.fixture(scope="module")
def flash_mtp(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm5_next_mtp")
    ref = make_reference(path, seed=7)
    _add_mtp(path, ref, seed=8)
    return ref, load(path)


@pytest.mark.parametrize("prefill_step", [2048, 7])
def test_engine_greedy_matches_reference(flash_mtp, prefill_step):
    ref, model = flash_mtp
    prompt = [int(t) for t in tokens(20, seed=9)[0]]
    expected = reference_greedy(ref, prompt, 20)
    assert list(Engine(model, mtp=False, prefill_step=prefill_step).generate(prompt, max_tokens=20)) == expected
    # MTP drafting: verification passes run y + drafts through the KDA layers, rejected ones roll back.
    stats = StepStats()
    got = list(Engine(model, mtp=True, num_draft=3).generate(prompt, max_tokens=20, stats=stats))
    assert got == expected and stats.drafted > 0


def test_prompt_cache_reuse_resets_kda(flash_mtp):
    """A prompt that diverges before the KDA states' reach re-prefills from the start, exactly."""
    _, model = flash_mtp
    engine = Engine(model, mtp=True)
    pc = engine.new_cache()
    prompt = [int(t) for t in tokens(20, seed=10)[0]]
    list(engine.generate(prompt, pc, max_tokens=5))
    other = prompt[:12] + [7, 8, 9]
    stats = StepStats()
    got = list(engine.generate(other, pc, max_tokens=8, stats=stats))
    assert stats.reused_tokens == 0 and got == list(Engine(model, mtp=False).generate(other, max_tokens=8))


def _fp8(w: torch.Tensor):
    m, n = w.shape
    bm, bn = -(-m // 128), -(-n // 128)
    padded = torch.zeros(bm * 128, bn * 128)
    padded[:m, :n] = w
    blocks = padded.view(bm, 128, bn, 128)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    deq = (q.float() * scale[:, None, :, None]).view_as(padded)[:m, :n]
    return q.view_as(padded)[:m, :n].contiguous(), scale, deq


def test_fp8_and_bf16_checkpoints(tmp_path):
    from transformers import Glm5NextForConditionalGeneration

    src, fp8_dir, deq_dir = tmp_path / "src", tmp_path / "fp8", tmp_path / "deq"
    make_reference(src, seed=11, hidden_size=160)  # > 128: several FP8 blocks per matrix
    state = load_file(str(src / "model.safetensors"))
    fp8, deq = {}, {}
    for k, v in state.items():
        if v.ndim == 2 and ".layers." in k and k.endswith(".weight") and ".mlp.gate." not in k and "visual" not in k:
            q, s, d = _fp8(v)
            fp8[k], fp8[k + "_scale_inv"], deq[k] = q, s, d.contiguous()
        else:
            fp8[k] = deq[k] = v
    config = json.loads((src / "config.json").read_text())
    for d, tensors, cfg in ((fp8_dir, fp8, {**config, "quantization_config": {"quant_method": "fp8"}}),
                            (deq_dir, deq, config)):
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg))
    ref = Glm5NextForConditionalGeneration.from_pretrained(deq_dir, dtype=torch.float32).eval()
    assert_parity(ref, load(fp8_dir), tokens(LONG, seed=12))
    # BF16: loads in bfloat16 where the backend allows (the MoE experts need float32 on the CPU).
    bf = tmp_path / "bf16"
    bf.mkdir()
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(bf / "model.safetensors"), metadata={"format": "pt"})
    (bf / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    with pytest.warns(UserWarning, match="vision"):
        model = load_model(bf)
    got = np.array(model(mx.array(tokens(LONG, seed=12))).astype(mx.float32))
    cpu = mx.default_device().type == mx.DeviceType.cpu
    assert model.model.norm.weight.dtype == (mx.float32 if cpu else mx.bfloat16)
    # Against the reference on the same bf16-rounded weights (rounding alone can flip a routing choice).
    rounded = Glm5NextForConditionalGeneration.from_pretrained(bf, dtype=torch.float32).eval()
    assert np.abs(got - reference_logits(rounded, tokens(LONG, seed=12))).max() < (1e-4 if cpu else 0.1)


def test_mlx_quantized_conversion(flash, tmp_path):
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    _, _, path = flash
    model = load(path)
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0
                and not p.endswith("mlp.gate"))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 32, "bits": 4}}))
    again = load_model(tmp_path, dtype=mx.float32)
    toks = mx.array(tokens(LONG, seed=13))
    np.testing.assert_allclose(np.array(again(toks)), np.array(model(toks)), atol=1e-5, rtol=0)


def _edit(path, tmp_path, fn, config=None):
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    return tmp_path


def test_load_errors(flash, tmp_path):
    _, _, path = flash
    key = "model.language_model.layers.0.self_attn.o_proj.weight"
    cases = [
        (lambda s: s.pop(key), "missing tensor model.layers.0.self_attn.o_proj.weight"),
        (lambda s: s.update({"model.language_model.layers.0.extra.weight": torch.zeros(2)}), "unexpected tensor"),
        (lambda s: s.update({key: torch.zeros(3, 3)}), "has shape (3, 3)"),
    ]
    for i, (fn, msg) in enumerate(cases):
        d = tmp_path / str(i)
        d.mkdir()
        with pytest.raises(CheckpointError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
            load(_edit(path, d, fn))
        assert "\n" not in str(e.value)
    d = tmp_path / "type"
    d.mkdir()
    with pytest.raises(ConfigError, match="model_type"):
        load(_edit(path, d, lambda s: None, lambda c: {**c, "model_type": "glm5_nexxt"}))
    with pytest.raises(ConfigError, match="model_type"):
        Glm5NextArgs.from_dict({"model_type": "glm_moe_dsa"})
    with pytest.raises(ConfigError, match="qk_rope_head_dim"):
        Glm5NextArgs.from_dict({"model_type": "glm5_next", "qk_rope_head_dim": 64})


def test_config_defaults():
    a = Glm5NextArgs.from_dict({"model_type": "glm5_next", "text_config": {"hidden_size": 4096}})
    assert a.num_hidden_layers == 45 and a.layer_types.count("linear_attention") == 34
    assert a.n_routed_experts == 288 and a.num_experts_per_tok == 8 and a.swiglu_limit == 10.0
    assert a.mlp_layer_types[:4] == ["dense"] * 3 + ["sparse"] and a.index_kpool == 16
    flat = Glm5NextArgs.from_dict({"model_type": "glm5_next", "linear_attn_config": {"num_heads": 32},
                                   "index_topk_pattern": "F" * 45})
    assert flat.linear_num_heads == 32 and flat.indexer_types == ["full"] * 45
