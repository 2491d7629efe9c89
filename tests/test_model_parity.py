"""Our MLX model against the reference implementation (transformers.GlmMoeDsaForCausalLM), fp32."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from reference import add_mtp_layer, index_gaps, make_reference, reference_logits
from safetensors.torch import load_file, save_file

from glm_mlx import load_model
from glm_mlx.model.sanitize import FP8_BLOCK

ATOL = 1e-4
TOPK = 8  # tiny index_topk
SHORT = 7  # context shorter than index_topk
LONG = 3 * TOPK + 5  # where DSA decides


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, 96, size=(1, n))


def run_full(model, toks):
    return np.array(model(mx.array(toks)))


def run_decode(model, toks, prefill: int):
    """Prefill `prefill` tokens through the cache, then one token at a time."""
    cache = model.make_cache()
    outs = [np.array(model(mx.array(toks[:, :prefill]), cache=cache))]
    for i in range(prefill, toks.shape[1]):
        outs.append(np.array(model(mx.array(toks[:, i : i + 1]), cache=cache)))
    return np.concatenate(outs, axis=1)


def assert_parity(ref, model, toks):
    assert min(index_gaps(ref, toks), default=1.0) > 1e-6, "fixture has indexer ties: pick another seed"
    expected = reference_logits(ref, toks)
    np.testing.assert_allclose(run_full(model, toks), expected, atol=ATOL, rtol=0)
    # Prefill longer than ABSORBED_MAX_TOKENS (expanded path) and shorter (absorbed path).
    for prefill in {min(20, toks.shape[1] - 1), 3}:
        np.testing.assert_allclose(run_decode(model, toks, prefill), expected, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def glm51(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm51")
    ref = make_reference(path, seed=0)
    return ref, load_model(path, dtype=mx.float32), path


@pytest.mark.parametrize("n", [SHORT, LONG])
def test_glm51_style(glm51, n):
    ref, model, _ = glm51
    assert_parity(ref, model, tokens(n))


def test_dsa_changes_the_answer(glm51):
    """Guard against a vacuous fixture: past index_topk, dense attention must give other logits."""
    ref, model, _ = glm51
    toks = tokens(LONG)
    sparse = run_full(model, toks)
    for layer in model.layers:
        if layer.self_attn.indexer is not None:
            layer.self_attn.indexer.topk = 10**6  # never sparse
    try:
        dense = run_full(model, toks)
    finally:
        for layer in model.layers:
            if layer.self_attn.indexer is not None:
                layer.self_attn.indexer.topk = TOPK
    assert np.abs(dense - sparse).max() > 1e-2


def test_shared_indexer_layers(tmp_path):
    # GLM-5.2 IndexCache: layers 1 and 3 have no indexer and reuse the previous full layer's top-k.
    ref = make_reference(tmp_path, seed=2, index_topk_freq=2, index_skip_topk_offset=1)
    assert ref.config.indexer_types == ["full", "shared", "full", "shared"]
    model = load_model(tmp_path, dtype=mx.float32)
    assert [layer.self_attn.indexer is None for layer in model.layers] == [False, True, False, True]
    assert_parity(ref, model, tokens(LONG, seed=1))


def test_grouped_routing(tmp_path):
    ref = make_reference(tmp_path, seed=3, n_group=4, topk_group=2)
    model = load_model(tmp_path, dtype=mx.float32)
    assert_parity(ref, model, tokens(LONG, seed=2))


def _fp8_quantize(w: torch.Tensor):
    """DeepSeek-V3 FP8: float8_e4m3 weights and one float32 scale per 128x128 block."""
    m, n = w.shape
    bm, bn = -(-m // FP8_BLOCK), -(-n // FP8_BLOCK)
    padded = torch.zeros(bm * FP8_BLOCK, bn * FP8_BLOCK)
    padded[:m, :n] = w
    blocks = padded.view(bm, FP8_BLOCK, bn, FP8_BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # e4m3 max
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    deq = (q.float() * scale[:, None, :, None]).view_as(padded)[:m, :n]
    return q.view_as(padded)[:m, :n].contiguous(), scale, deq


def test_fp8_checkpoint(tmp_path):
    src = tmp_path / "bf"
    ref = make_reference(src, seed=4, hidden_size=160)  # 160 > 128: several blocks per matrix
    state = load_file(str(src / "model.safetensors"))
    fp8, dequantized = {}, {}
    for k, v in state.items():
        if v.ndim == 2 and k.startswith("model.layers.") and ".mlp.gate." not in k:
            q, scale, deq = _fp8_quantize(v)
            fp8[k], fp8[k + "_scale_inv"] = q, scale
            dequantized[k] = deq
        else:
            fp8[k] = dequantized[k] = v
    dst = tmp_path / "fp8"
    dst.mkdir()
    save_file(fp8, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(config))
    # The reference runs on the dequantized weights.
    ref.model.load_state_dict({k[len("model."):]: v for k, v in _hf_packed(dequantized, ref).items()
                               if k.startswith("model.")}, strict=False)
    ref.lm_head.weight.data.copy_(dequantized["lm_head.weight"])
    model = load_model(dst, dtype=mx.float32)
    assert_parity(ref, model, tokens(LONG, seed=3))


def _hf_packed(flat: dict, ref) -> dict:
    """Per-expert checkpoint tensors -> the reference's packed in-memory expert parameters."""
    out = dict(flat)
    for name, p in ref.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            pre = name[: -len("gate_up_proj")]
            out[name] = torch.stack([torch.cat([flat.pop(f"{pre}{e}.gate_proj.weight"), flat.pop(f"{pre}{e}.up_proj.weight")])
                                     for e in range(p.shape[0])])
        elif name.endswith("experts.down_proj"):
            pre = name[: -len("down_proj")]
            out[name] = torch.stack([flat.pop(f"{pre}{e}.down_proj.weight") for e in range(p.shape[0])])
    return {k: v for k, v in out.items() if ".experts." not in k or k.endswith(("gate_up_proj", "experts.down_proj"))}


@torch.no_grad()
def _reference_mtp(ref, mtp, toks):
    """Direct MTP computation: h' = eh_proj([enorm(embed(t+1)); hnorm(h_t)]) -> layer -> norm -> head."""
    out = ref.model(torch.tensor(toks))
    h = out.last_hidden_state[:, :-1]
    nxt = torch.tensor(toks[:, 1:])
    rms = lambda x, w, eps=1e-5: w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # noqa: E731
    x = torch.cat([rms(ref.model.embed_tokens(nxt), mtp["enorm.weight"]), rms(h, mtp["hnorm.weight"])], -1)
    x = x @ mtp["eh_proj.weight"].T
    L = x.shape[1]
    pos = torch.arange(L)[None]
    mask = torch.full((L, L), torch.finfo(torch.float32).min).triu(1)[None, None]
    y, _ = mtp["layer"](x, attention_mask=mask, position_ids=pos,
                        position_embeddings=ref.model.rotary_emb(x, pos))
    return ref.lm_head(rms(y, mtp["shared_head.norm.weight"])).numpy()


def test_mtp_layer(tmp_path):
    ref = make_reference(tmp_path, seed=5)
    mtp = add_mtp_layer(tmp_path, ref, seed=6)
    model = load_model(tmp_path, dtype=mx.float32)
    assert model.has_mtp
    toks = tokens(LONG + 1, seed=4)
    expected = _reference_mtp(ref, mtp, toks)
    _, hidden = model(mx.array(toks), return_hidden=True)
    logits, _ = model.mtp_logits(hidden[:, :-1], mx.array(toks[:, 1:]))
    np.testing.assert_allclose(np.array(logits), expected, atol=ATOL, rtol=0)
    # Token by token through the MTP layer's own cache.
    cache = model.make_cache(mtp=True)[-1]
    steps = [np.array(model.mtp_logits(hidden[:, i : i + 1], mx.array(toks[:, i + 1 : i + 2]), cache)[0])
             for i in range(toks.shape[1] - 1)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), expected, atol=ATOL, rtol=0)
    # Without MTP weights the model loads with MTP unavailable.
    assert not load_model(tmp_path, dtype=mx.float32, mtp=False).has_mtp


@pytest.mark.parametrize("overrides", [{}, {"index_topk_freq": 2, "index_skip_topk_offset": 1}])
def test_cache_nbytes_matches_analytic(tmp_path, overrides):
    make_reference(tmp_path, seed=7, **overrides)
    model = load_model(tmp_path, dtype=mx.float32)
    cache = model.make_cache()
    n = 0
    for chunk in (LONG, 1, 1, 300):  # crosses the 256-token growth step
        model(mx.array(tokens(chunk)), cache=cache)
        n += chunk
        mx.eval([c.state for c in cache])
        assert sum(c.nbytes for c in cache) == model.cache_bytes_per_token() * n
    a = model.args
    per_layer = [c.nbytes // n for c in cache]
    full = (a.kv_lora_rank + a.qk_rope_head_dim + a.index_head_dim) * 4
    shared = (a.kv_lora_rank + a.qk_rope_head_dim) * 4
    assert per_layer == [full if a.has_indexer(i) else shared for i in range(a.num_hidden_layers)]
    assert cache[0].trim(5) == 5 and cache[0].nbytes == full * (n - 5)


def test_matches_mlx_lm(glm51):
    """mlx-lm's glm_moe_dsa on the same checkpoint (GLM-5.1-style config)."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    _, model, path = glm51
    # Keys the real GLM-5.1 config.json has and mlx-lm requires (transformers does not write them).
    theirs, _ = mlx_lm_load_model(path, model_config={"topk_method": "noaux_tc", "scoring_func": "sigmoid",
                                                      "moe_layer_freq": 1})
    toks = tokens(LONG, seed=5)
    ours = run_full(model, toks)
    np.testing.assert_allclose(np.array(theirs(mx.array(toks))), ours, atol=1e-3, rtol=0)
    # mlx-lm's indexer LayerNorm uses eps 1e-5 (the reference: 1e-6), hence the looser tolerance;
    # the argmax agrees everywhere.
    assert (np.array(theirs(mx.array(toks))).argmax(-1) == ours.argmax(-1)).all()
