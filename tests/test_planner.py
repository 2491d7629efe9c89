"""Inventory, recipes, Mac catalog and the memory planner, checked against real MLX models and
the published GLM-5 / GLM-5.1 figures in shared/reference/README.md."""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import glm_moe_dsa

from glm_mlx.model.config import ModelArgs
from glm_mlx.quantize.allocate import allocate, error_of
from glm_mlx.quantize.inventory import MTP, inventory, param_count, params_by_group
from glm_mlx.quantize.macs import GiB, MacError, custom_mac, default_wired_limit, get_mac, parse_size, sysctl_command
from glm_mlx.quantize.planner import (PUBLISHED_M3_ULTRA, PlanError, best_recipe_for, calibration, glm51_args, plan, plan_pipeline, price)
from glm_mlx.quantize.recipe import (Recipe, RecipeError, default_recipe, quantization_config, recipe_from_quantization,
                                     resolve)

TINY = dict(
    model_type="glm_moe_dsa", vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
    kv_lora_rank=64, q_lora_rank=32, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32, num_experts_per_tok=2,
    first_k_dense_replace=1, max_position_embeddings=4096, index_topk=8, index_head_dim=32, index_n_heads=2,
    num_nextn_predict_layers=1, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, dtype="bfloat16")
MLX_LM_EXTRA = dict(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, n_group=1, topk_group=1,
                    moe_layer_freq=1, routed_scaling_factor=2.5, rms_norm_eps=1e-5, attention_bias=False)


@pytest.fixture(scope="module")
def glm():
    return glm51_args()


@pytest.fixture(scope="module")
def tiny():
    return ModelArgs.from_dict(TINY)


def _mlx_lm_model():
    """mlx-lm's glm_moe_dsa at the tiny config, in bf16 with the router bias kept float32."""
    model = glm_moe_dsa.Model(glm_moe_dsa.ModelArgs.from_dict({**TINY, **MLX_LM_EXTRA}))
    model.set_dtype(mx.bfloat16)
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.e_score_correction_bias = layer.mlp.gate.e_score_correction_bias.astype(mx.float32)
    return model


# --- inventory ------------------------------------------------------------------------------------
def test_inventory_counts_the_published_parameters(glm):
    full, main = inventory(glm, mtp=True), inventory(glm, mtp=False)
    assert param_count(full) == 753_864_139_008  # zai-org/GLM-5.1, MTP layer included
    assert param_count(full) - param_count(main) == params_by_group(full)[MTP]
    # embed_q + unembed_out hold exactly kv_b_proj's [H * (nope + v), kv_lora] parameters
    split = sum(t.numel for t in main if t.name.startswith("model.layers.0.self_attn.") and "embed" in t.name)
    assert split == glm.num_attention_heads * (glm.qk_nope_head_dim + glm.v_head_dim) * glm.kv_lora_rank


def test_inventory_matches_the_mlx_lm_model(tiny):
    params = dict(tree_flatten(_mlx_lm_model().parameters()))
    inv = {t.name: t for t in inventory(tiny, mtp=False)}
    assert set(params) == set(inv)
    for name, t in inv.items():
        assert tuple(params[name].shape) == t.shape and params[name].dtype.size == t.dtype_bytes, name


@pytest.mark.parametrize("recipe", [Recipe.uniform("affine4g64"), Recipe.uniform("affine3g128"), Recipe.uniform("mxfp4"),
                                    Recipe.uniform("nvfp4"), Recipe.uniform("mxfp8"), default_recipe()],
                         ids=lambda r: r.name)
def test_price_is_byte_exact_on_a_quantized_mlx_model(tiny, recipe):
    """quantization_config applied the way mlx-lm's loader does gives exactly the priced bytes."""
    model, q = _mlx_lm_model(), quantization_config(tiny, recipe, mtp=False)
    nn.quantize(model, group_size=q["group_size"], bits=q["bits"], mode=q["mode"],
                class_predicate=lambda p, m: q[p] if p in q else hasattr(m, "to_quantized"))
    assert sum(v.nbytes for _, v in tree_flatten(model.parameters())) == price(tiny, recipe, mtp=False).total


# --- recipes --------------------------------------------------------------------------------------
def test_recipe_rules_first_match_and_never_quantize(tiny):
    r = Recipe.from_dict({"default": "affine4g64", "rules": [
        {"match": "*.mlp.gate", "format": "affine8g64"},  # the router: ignored, never quantized
        {"match": "model.layers.1.mlp.switch_mlp.down_proj", "format": "affine8g32"},
        {"component": "routed experts", "format": "affine2g32"},
        {"component": "routed_experts", "format": "affine3g32"}]})  # shadowed by the rule above
    res = resolve(tiny, r)
    assert "model.layers.1.mlp.gate" not in res.formats
    assert res.formats["model.layers.1.mlp.switch_mlp.down_proj"].name == "affine8g32"
    assert res.formats["model.layers.2.mlp.switch_mlp.up_proj"].name == "affine2g32"
    # embed_q's last dim is qk_nope_head_dim = 32: group 64 cannot store it
    assert res.formats["model.layers.0.self_attn.embed_q"].name == "bf16"
    assert "not divisible" in res.kept["model.layers.0.self_attn.embed_q"]
    assert res.unused_rules == [0, 3]  # the router rule never applies; rule 3 is shadowed by rule 2
    q = quantization_config(tiny, r)
    assert q["model.layers.1.mlp.gate"] is False and q["model.layers.0.self_attn.embed_q"] is False
    assert q["model.layers.2.mlp.switch_mlp.up_proj"] == {"group_size": 32, "bits": 2, "mode": "affine"}


def test_recipe_json_and_quantization_round_trips(tiny, tmp_path):
    r = default_recipe()
    r.save(tmp_path / "r.json")
    assert Recipe.load(tmp_path / "r.json").to_dict() == r.to_dict()
    back = recipe_from_quantization(quantization_config(tiny, r))
    assert resolve(tiny, back).formats == resolve(tiny, r).formats


@pytest.mark.parametrize("text,needle", [
    ('{"rules": []}', '"default"'), ('{"default": "affine4g48"}', "group size"),
    ('{"default": "affine4", "rules": [{"format": "affine3"}]}', "rule 0"),
    ('{"default": "affine4", "rules": [{"component": "experts", "format": "affine3"}]}', "unknown component"),
    ("[1, 2", "not valid JSON")])
def test_bad_recipes_are_one_line_errors(tmp_path, text, needle):
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(RecipeError, match=re.escape(needle)) as e:
        Recipe.load(tmp_path / "r.json")
    assert "\n" not in str(e.value) and e.value.hint


# --- Macs -----------------------------------------------------------------------------------------
def test_mac_catalog_and_wired_limits():
    assert (get_mac("m3-ultra-512").bandwidth_gbs, get_mac("m3-ultra-512").gpu_cores) == (819, 80)
    assert get_mac("m3-max-96").bandwidth_gbs == 300 and get_mac("m3-max-128").bandwidth_gbs == 400
    assert get_mac("M4-Max-36GB").bandwidth_gbs == 410 and get_mac("m4-max-128").bandwidth_gbs == 546
    assert get_mac("m3-ultra-96-60c").gpu_cores == 60 and get_mac("m3-ultra-96").gpu_cores == 80
    assert default_wired_limit(16 * GiB) == 16 * GiB * 2 // 3 and default_wired_limit(64 * GiB) == 48 * GiB
    assert default_wired_limit(128 * GiB) == pytest.approx(107.52 * GiB, abs=1)
    assert sysctl_command(500 * GiB) == "sudo sysctl iogpu.wired_limit_mb=512000"
    with pytest.raises(MacError, match="did you mean m3-ultra-512"):
        get_mac("m3-ultra-521")
    assert parse_size("361GB") == 361e9 and parse_size("1GiB") == GiB and parse_size("192GB", binary_gb=True) == 192 * GiB


# --- validation against published figures ---------------------------------------------------------
def test_glm5_uniform_4bit_is_the_published_420gb(glm):
    w = price(glm, Recipe.uniform("affine4g64"), mtp=False)  # GLM-5: the 78 decoder layers
    assert w.total == pytest.approx(420e9, rel=0.01)
    assert w.total / GiB == pytest.approx(393, rel=0.02)  # the 4.5 bpw run's "393 GB base" (GiB)


@pytest.mark.parametrize("make", [lambda a: default_recipe(), lambda a: allocate(a, 361e9)], ids=["default", "budget"])
def test_361gb_recipe_fits_m3_ultra_at_full_context(glm, make):
    recipe = make(glm)
    assert 350e9 < price(glm, recipe).total <= 361e9
    p = plan(glm, recipe, get_mac("m3-ultra-512"))
    assert p.context == 202_752 and p.max_context == 202_752
    assert p.fits in ("yes", "raise-wired-limit")
    assert p.sysctl is None if p.fits == "yes" else re.fullmatch(r"sudo sysctl iogpu.wired_limit_mb=\d+", p.sysctl)
    assert p.kv_bytes_per_token == glm.cache_bytes_per_token(2, mtp=True)
    assert p.total_bytes == p.weights_bytes + p.kv_bytes + p.working_set_bytes


def test_speed_calibration_reproduces_the_published_m3_ultra_runs():
    cal = calibration()
    assert 0.2 < cal["decode_efficiency"] < 1 and 0.2 < cal["prefill_efficiency"] < 1
    for pt in cal["points"]:
        assert pt["decode_model"] == pytest.approx(pt["decode"], rel=0.10)
        assert pt["prefill_model"] == pytest.approx(pt["prefill"], rel=0.03)


@pytest.mark.parametrize("held_out", range(len(PUBLISHED_M3_ULTRA)))
def test_speed_model_predicts_a_published_run_it_was_not_fitted_to(held_out):
    """Leave one out: efficiencies fitted on two published runs predict the third run's speeds."""
    fitted = tuple(p for i, p in enumerate(PUBLISHED_M3_ULTRA) if i != held_out)
    pt, = calibration(fitted, (PUBLISHED_M3_ULTRA[held_out],))["held_out"]
    assert pt["decode_model"] == pytest.approx(pt["decode"], rel=0.10)
    assert pt["prefill_model"] == pytest.approx(pt["prefill"], rel=0.03)


# --- verdicts and max context ---------------------------------------------------------------------
def test_verdicts_and_sysctl(glm):
    r = default_recipe()
    base = plan(glm, r, get_mac("m3-ultra-512"), context=4096).total_bytes
    # a custom Mac whose default limit (RAM - 20.48 GiB) is under the need, but RAM - 16 GiB is not
    ram_gb = -(-base // GiB) + 18
    p = plan(glm, r, custom_mac(ram_gb, 800), context=4096)
    assert p.fits == "raise-wired-limit"
    mb = int(p.sysctl.rsplit("=", 1)[1])
    assert p.total_bytes <= mb * 2**20 <= p.max_wired_limit_bytes
    assert plan(glm, r, get_mac("m4-max-128"), context=4096).fits == "no"
    assert plan(glm, r, get_mac("m4-max-128"), context=4096).max_context == 0


def test_max_context_is_solved_exactly(glm, tiny):
    mac = get_mac("m3-ultra-256")
    r = Recipe.uniform("affine2g64")
    n = plan(glm, r, mac).max_context
    assert 2049 < n < 202_752  # in the linear regime
    assert plan(glm, r, mac, context=n).total_bytes <= mac.max_wired_limit < plan(glm, r, mac, context=n + 1).total_bytes
    # below the knee (bisection): a Mac so small that its limit is macOS's default (2/3 of RAM: the
    # 4 GiB OS reserve would leave less), sized to hold ~1000 tiny tokens
    small = custom_mac(1.5 * plan(tiny, r, mac, context=1000).total_bytes / GiB, 100)
    assert small.max_wired_limit == small.default_wired_limit
    m = plan(tiny, r, small).max_context
    assert 1 <= m < 2049
    assert plan(tiny, r, small, context=m).total_bytes <= small.max_wired_limit < plan(tiny, r, small, context=m + 1).total_bytes


# --- solve and pipeline ---------------------------------------------------------------------------
def test_best_recipe_for_fills_the_mac(glm, tmp_path):
    mac = get_mac("m3-ultra-512")
    r = best_recipe_for(glm, mac)
    p = plan(glm, r, mac)
    assert p.fits != "no" and p.total_bytes > 0.98 * mac.max_wired_limit
    assert error_of(glm, r) <= error_of(glm, Recipe.uniform("affine4g64"))
    r.save(tmp_path / "solved.json")
    assert price(glm, Recipe.load(tmp_path / "solved.json")).total == p.weights_bytes
    with pytest.raises(PlanError, match="no recipe"):
        best_recipe_for(glm, get_mac("m4-max-128"))


def test_pipeline_splits_contiguous_layers(glm):
    macs = [get_mac("m3-ultra-256")] * 2
    pp = plan_pipeline(glm, default_recipe(), macs)
    (a0, b0), (a1, b1) = (s.layers for s in pp.stages)
    assert a0 == 0 and a1 == b0 + 1 and b1 == glm.num_hidden_layers - 1
    # Every tensor once, plus the last rank's copy of the embedding for the MTP layer.
    embed = sum(b for name, b in price(glm, default_recipe()).tensor_bytes.items() if name.startswith("model.embed_tokens"))
    assert sum(s.weights_bytes for s in pp.stages) == price(glm, default_recipe()).total + embed
    assert sum(s.kv_bytes for s in pp.stages) == glm.cache_bytes_per_token(2, mtp=True) * 202_752
    assert pp.link_bytes_per_token == glm.hidden_size * 2 and pp.fits != "no"
    assert plan(glm, default_recipe(), macs[0]).fits == "no"  # one of them alone does not hold it


def test_planner_kv_equals_model_cache_nbytes(mtp_ckpt):
    """The planner's KV bytes per token equal the model's measured cache nbytes per token."""
    import mlx.core as mx

    from glm_mlx import load_model
    from glm_mlx.generation.engine import Engine, StepStats
    from glm_mlx.quantize.recipe import Recipe

    model = load_model(mtp_ckpt, dtype=mx.float32)
    args = model.args
    p = plan(args, Recipe.uniform("f32"), get_mac("m3-ultra-512"), context=64, cache_dtype_bytes=4)
    engine = Engine(model, mtp=True)
    pc = engine.new_cache()
    list(engine.generate(list(range(11, 51)), pc, max_tokens=5, stats=StepStats()))
    mx.eval(pc.arrays())
    mtp_layer = p.kv_bytes_per_token - args.cache_bytes_per_token(4, mtp=False)  # the MTP layer's share
    assert mtp_layer > 0
    assert sum(c.nbytes for c in pc.cache) == (p.kv_bytes_per_token - mtp_layer) * len(pc.tokens)
    assert pc.mtp_cache.nbytes == mtp_layer * pc.mtp_cache.offset
