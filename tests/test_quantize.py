"""Quantizer (plain and importance-weighted), importance matrix, and measured-sensitivity allocation."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from reference import add_mtp_layer, make_reference

from glm_mlx import load_model
from glm_mlx.model.config import ModelArgs
from glm_mlx.quantize.allocate import allocate, groups, measured_factors
from glm_mlx.quantize.formats import parse_format
from glm_mlx.quantize.imatrix import Importance, calibrate, collect
from glm_mlx.quantize.planner import price
from glm_mlx.quantize.quantizer import dequantize, pack, quantize, weighted_error
from glm_mlx.quantize.recipe import Recipe, RecipeError
from glm_mlx.quantize.source import Source

FORMATS = ["affine2g64", "affine3g32", "affine4g64", "affine4g128", "affine5g64", "affine6g32", "affine8g64",
           "mxfp4", "nvfp4", "mxfp8"]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_is_mlx_layout(bits):
    w = mx.random.normal((8, 128), key=mx.random.key(bits))
    q, s, b = mx.quantize(w, 32, bits)
    codes = mx.round((mx.dequantize(q, s, b, 32, bits) - mx.repeat(b, 32, -1)) / mx.repeat(s, 32, -1))
    assert mx.array_equal(pack(codes.astype(mx.uint32), bits), q)


@pytest.mark.parametrize("name", FORMATS)
def test_iq_arrays_run_through_mlx_kernels(name):
    """Same arrays, dtypes and shapes as mx.quantize; quantized_matmul and gather_qmm consume them."""
    fmt = parse_format(name)
    k = mx.random.split(mx.random.key(1), 3)
    w = mx.random.normal((2, 32, 256), key=k[0]).astype(mx.bfloat16)  # two stacked experts
    imp = mx.exp(2 * mx.random.normal((2, 1, 256), key=k[1]))
    plain, iq = quantize(w, fmt, method="rtn"), quantize(w, fmt, imp, method="iq")
    assert {n: (a.shape, a.dtype) for n, a in plain.items()} == {n: (a.shape, a.dtype) for n, a in iq.items()}
    x = mx.random.normal((3, 256), key=k[2])
    deq = dequantize(iq, fmt)
    b = iq.get("biases")
    y = mx.quantized_matmul(x, iq["weight"][1], iq["scales"][1], None if b is None else b[1], transpose=True,
                            group_size=fmt.group_size, bits=fmt.bits, mode=fmt.mode)
    close = lambda a, b: float(mx.abs(a - b).max()) <= 1e-2 * float(mx.abs(b).max())  # the kernels round in bf16
    assert close(y, x @ deq[1].T)
    g = mx.gather_qmm(x[:, None], iq["weight"], iq["scales"], b, rhs_indices=mx.array([0, 1, 1]), transpose=True,
                      group_size=fmt.group_size, bits=fmt.bits, mode=fmt.mode)
    assert g.shape == (3, 1, 32) and close(g[1, 0], x[1] @ deq[1].T)
    # MLX's own choice is always a candidate: never worse in the weighted error, for every format.
    assert weighted_error(w, iq, fmt, imp) <= weighted_error(w, plain, fmt, imp) * (1 + 1e-6)


@pytest.mark.parametrize("name,bound", [("affine4g64", 0.75), ("affine3g64", 0.75), ("nvfp4", 0.85), ("mxfp4", 0.95)])
def test_skewed_importance_is_what_lowers_the_error(name, bound):
    """A 1/16 of the channels carry 1000x the importance. iq must cut the weighted error well below
    plain rounding, and must do so because of the importance (iq told 'uniform' does worse)."""
    fmt = parse_format(name)
    k = mx.random.split(mx.random.key(7), 2)
    w = mx.random.normal((256, 512), key=k[0]) * mx.exp(0.5 * mx.random.normal((1, 512), key=k[1]))
    imp = mx.where(mx.arange(512) % 16 == 3, 1000.0, 1.0)
    plain = weighted_error(w, quantize(w, fmt, method="rtn"), fmt, imp)
    skewed = weighted_error(w, quantize(w, fmt, imp, method="iq"), fmt, imp)
    blind = weighted_error(w, quantize(w, fmt, None, method="iq"), fmt, imp)
    assert skewed < bound * plain, (skewed / plain)
    assert skewed < 0.97 * blind, (skewed / blind)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("imatrix")
    ref = make_reference(path, seed=2, n_routed_experts=16, num_experts_per_tok=1)
    add_mtp_layer(path, ref, seed=3)
    return path


def test_layer_by_layer_calibration_equals_the_in_memory_pass(tiny):
    rng = np.random.RandomState(0)
    chunks = [[int(t) for t in rng.randint(0, 96, size=n)] for n in (12, 5)]  # few tokens: some experts unused
    streamed = calibrate(Source(tiny), chunks)
    model = load_model(tiny, dtype=mx.float32)
    held = collect(model, chunks)
    assert type(model.model.layers[0].self_attn.q_a_proj).__name__ == "Linear"  # recorders removed
    assert set(streamed.imp) == set(held.imp)
    for k, v in held.imp.items():
        assert mx.allclose(streamed.imp[k], v, rtol=1e-4, atol=1e-6), k
    args = ModelArgs.from_file(tiny)
    n = args.num_hidden_layers
    assert f"model.layers.{n}.eh_proj" in streamed.imp and streamed.imp["lm_head"].shape == (args.hidden_size,)
    assert streamed.imp["model.layers.1.self_attn.embed_q"].shape == (args.num_attention_heads, args.qk_nope_head_dim)
    assert streamed.imp["model.layers.1.mlp.switch_mlp.down_proj"].shape == (16, args.moe_intermediate_size)
    # Never-routed experts: recorded, and given the pooled importance of the routed ones.
    key = "model.layers.1.mlp.switch_mlp.gate_proj"
    counts = streamed.counts[key]
    assert sum(counts) == 17 and 0 in counts and "never routed" in streamed.defaults[key]
    unused, used = counts.index(0), [e for e, c in enumerate(counts) if c]
    pooled = sum(streamed.imp[key][e] * counts[e] for e in used) / sum(counts)
    assert mx.allclose(streamed.imp[key][unused], pooled, rtol=1e-4)
    # Round trip through the file the converter keeps.
    streamed.save(tiny / "imatrix.safetensors")
    again = Importance.load(tiny / "imatrix.safetensors")
    assert again.defaults == streamed.defaults and mx.array_equal(again.imp[key], streamed.imp[key])


def test_measured_sensitivities_steer_the_allocation(tiny):
    args = ModelArgs.from_file(tiny)
    gs = groups(args)
    imp = Importance(wimp={t.module: 1.0 * t.numel for g in gs for t in g.tensors})
    hot = [g for g in gs if g.key == "routed down" and g.layer == 2][0]
    for t in hot.tensors:
        imp.wimp[t.module] *= 50  # layer 2's experts carry far more energy than their peers
    assert measured_factors(gs, imp)[id(hot)] > 2.5  # 50 / mean(50, 1, 1)
    budget = price(args, Recipe.uniform("affine3g64")).total
    recipe = allocate(args, budget, importance=imp)
    assert price(args, recipe).total <= budget
    fmt = {l: recipe.format_for(t) for g in gs if g.key == "routed down" for l, t in [(g.layer, g.tensors[0])]}
    assert fmt[2].bits > min(f.bits for f in fmt.values())
    assert allocate(args, budget).to_dict() != recipe.to_dict()  # without it: the default sensitivities


def test_recipe_method_round_trips(tmp_path):
    r = Recipe.uniform("affine4g64")
    r.method = "iq"
    r.save(tmp_path / "r.json")
    assert Recipe.load(tmp_path / "r.json").method == "iq"
    with pytest.raises(RecipeError, match="method must be one of"):
        Recipe.from_dict({"default": "affine4g64", "method": "gptq"})


GLM_MINI = Path(__file__).resolve().parents[1] / "glm_mlx" / "data" / "glm-mini"


@pytest.mark.skipif(not (GLM_MINI / "config.json").exists(), reason="the trained reference model glm-mini is not built")
def test_iq_lowers_activation_weighted_error_on_the_trained_reference_model():
    """glm-mini: importance from one text, error weighted by the activations of another text, for the
    weights of every kind (attention, indexer, dense MLP, routed and shared experts, head)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    src = Source(GLM_MINI)
    tok = load_tokenizer(GLM_MINI)
    root = Path(__file__).resolve().parents[1]
    ids = tok.encode("\n".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]))
    half = min(len(ids) // 2, 512)
    calib = calibrate(src, [ids[i:i + 128] for i in range(0, half, 128)])
    held = calibrate(src, [ids[i:i + 128] for i in range(half, 2 * half, 128)])
    args = ModelArgs.from_dict(src.config)
    moe = args.mlp_layer_types.index("sparse")
    busy = max(range(args.n_routed_experts), key=lambda e: held.counts[f"model.layers.{moe}.mlp.switch_mlp.up_proj"][e])
    cases = [(n + ".weight", n, None) for n in (
        "model.layers.0.self_attn.q_a_proj", "model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.indexer.wq_b", f"model.layers.{moe}.mlp.shared_experts.up_proj", "lm_head")]
    cases.append((f"model.layers.{moe}.mlp.experts.{busy}.up_proj.weight", f"model.layers.{moe}.mlp.switch_mlp.up_proj", busy))
    for fmt in map(parse_format, ("affine4g32", "nvfp4")):
        ratios = []
        for name, key, e in cases:
            w = src.read(name)
            assert fmt.fits(w.shape), (name, w.shape)
            imp_c, imp_h = (calib.imp[key], held.imp[key]) if e is None else (calib.imp[key][e], held.imp[key][e])
            ratios.append(weighted_error(w, quantize(w, fmt, imp_c, method="iq"), fmt, imp_h)
                          / weighted_error(w, quantize(w, fmt, method="rtn"), fmt, imp_h))
        assert max(ratios) < 1.0 and np.mean(ratios) < 0.9, (fmt.name, ratios)
