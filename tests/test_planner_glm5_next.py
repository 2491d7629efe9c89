"""GLM-5.3-Flash (glm5_next) in the planner: the embedded config against the published facts, the
inventory against transformers' reference model (torch, meta device: names, shapes, dtypes), weights
priced byte-exactly against mx.quantize at real layer shapes, the cache contract, and `glm-mlx fit`."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import mlx.core as mx
import pytest
import torch
from typer.testing import CliRunner

from glm_mlx.cli.app import app
from glm_mlx.quantize.inventory import HC, MTP, ROUTED, inventory, param_count, params_by_group
from glm_mlx.quantize.macs import get_mac
from glm_mlx.errors import ConfigError
from glm_mlx.model.config import ModelArgs
from glm_mlx.model.glm5_next_config import Glm5NextArgs
from glm_mlx.quantize.models import args_from_file, embedded_args, smaller_that_fits
from glm_mlx.quantize.next_prices import state_bytes
from glm_mlx.quantize.planner import best_recipe_for, glm51_args, plan, plan_pipeline, price
from glm_mlx.quantize.recipe import Recipe, default_recipe, resolve
from glm_mlx.quantize.serving import serving_plan
from glm_mlx.quantize.working_set import cache_tokens

runner = CliRunner()


@pytest.fixture(scope="module")
def flash() -> Glm5NextArgs:
    return embedded_args("glm-5.3-flash")[0]


@pytest.fixture(scope="module")
def reference(flash):
    """transformers' Glm5NextForConditionalGeneration at the embedded config, on the meta device."""
    from transformers import Glm5NextConfig
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextForConditionalGeneration

    keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts", "kv_lora_rank",
            "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "num_experts_per_tok", "index_topk",
            "index_head_dim", "index_n_heads", "index_kpool", "linear_head_dim", "linear_num_heads",
            "linear_conv_kernel_dim", "hc_mult", "layer_types", "mlp_layer_types", "indexer_types",
            "max_position_embeddings")
    cfg = Glm5NextConfig(text_config={k: getattr(flash, k) for k in keys})
    with torch.device("meta"):
        model = Glm5NextForConditionalGeneration(cfg)
    fp32 = model._keep_in_fp32_modules_strict
    return {"params": {n: (tuple(p.shape), n) for n, p in model.named_parameters()} |
                      {n: (tuple(b.shape), n) for n, b in model.named_buffers() if "e_score" in n},
            "linear": {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}, "fp32": fp32}


def _mlx_names(flash, name: str, shape: tuple) -> dict[str, tuple]:
    """A reference tensor -> the inventory tensors MLX stores it as (name -> shape)."""
    name = name.replace("model.language_model.", "model.").replace(".forget_gate.", ".")  # the checkpoint's names
    E, m, H = flash.n_routed_experts, flash.moe_intermediate_size, flash.num_attention_heads
    if name.endswith("mlp.experts.gate_up_proj"):
        p = name.removesuffix("experts.gate_up_proj") + "switch_mlp."
        return {p + "gate_proj.weight": (E, m, shape[-1]), p + "up_proj.weight": (E, m, shape[-1])}
    if name.endswith("mlp.experts.down_proj"):
        return {name.replace("experts.down_proj", "switch_mlp.down_proj.weight"): shape}
    if name.endswith("conv1d.weight"):  # MLX's Conv1d layout [C, K, 1]: the same elements
        return {name: (shape[0], shape[2], shape[1])}
    if name.endswith("kv_b_proj.weight"):
        p = name.removesuffix("kv_b_proj.weight")
        return {p + "embed_q.weight": (H, flash.kv_lora_rank, flash.qk_nope_head_dim),
                p + "unembed_out.weight": (H, flash.v_head_dim, flash.kv_lora_rank)}
    return {name: shape}


# --- the config --------------------------------------------------------------------------------------
def test_config_reproduces_the_published_facts(flash, reference):
    """45 layers (3 KDA : 1 DSA), 288 experts / 8 active / 1 shared, an MTP block; 321.3B parameters
    with the vision tower and the MTP block (shared/reference/README.md), about 18B active."""
    assert flash.num_hidden_layers == 45 and flash.num_nextn_predict_layers == 1
    assert (flash.n_routed_experts, flash.num_experts_per_tok, flash.n_shared_experts) == (288, 8, 1)
    assert flash.layer_types.count("linear_attention") == 34 and flash.layer_types.count("indexed_attention") == 11
    assert all(flash.is_indexed(l) == (l % 4 == 3) for l in range(45)) and flash.qk_rope_head_dim == 0
    vision = sum(math.prod(s) for n, (s, _) in reference["params"].items() if ".visual." in n)
    total = param_count(inventory(flash, mtp=True)) + vision
    assert total == pytest.approx(321.3e9, rel=1e-3)  # 321.22B: 0.03% under the published 321.3B
    w = price(flash, Recipe.uniform("bf16"), mtp=False)
    active = w.decode_params + flash.vocab_size * flash.hidden_size  # + the embedding rows looked up
    assert 17e9 < active < 18.5e9  # "about 18B active"


def test_config_loads_nested_and_by_name(tmp_path):
    """A multimodal checkpoint nests the text fields under text_config; names and aliases pick embedded configs."""
    nested = {"model_type": "glm5_next", "text_config": {"model_type": "glm5_next_text", "num_hidden_layers": 8},
              "vision_config": {"depth": 24}}
    (tmp_path / "config.json").write_text(json.dumps(nested))
    a = args_from_file(tmp_path)
    assert isinstance(a, Glm5NextArgs) and a.num_hidden_layers == 8 and a.layer_types[3] == "indexed_attention"
    assert isinstance(embedded_args("GLM-5.1")[0], ModelArgs)
    assert isinstance(embedded_args("glm5_next")[0], Glm5NextArgs) and embedded_args("GLM-5.3-Flash")[1] == "GLM-5.3-Flash"
    with pytest.raises(ConfigError):
        Glm5NextArgs.from_dict({"model_type": "glm5_next", "qk_rope_head_dim": 64})


# --- the inventory -----------------------------------------------------------------------------------
def test_inventory_matches_the_reference_model(flash, reference):
    """Every reference tensor of the language model (vision excluded) is in the inventory with its shape
    and dtype; nothing else is, but the MTP block (not in the reference: it skips layer 45)."""
    want = {}
    for name, (shape, _) in reference["params"].items():
        if ".visual." not in name:
            want |= _mlx_names(flash, name, shape)
    inv = {t.name: t for t in inventory(flash, mtp=False)}
    assert set(inv) == set(want)
    fp32 = re.compile("|".join(re.escape(k) for k in reference["fp32"]))
    for name, t in inv.items():
        assert t.shape == want[name], name
        assert t.dtype_bytes == (4 if fp32.search(name) else 2), name
    mtp = [t for t in inventory(flash, mtp=True) if t.mtp]
    layer3 = {t.name.split(".", 3)[3]: t.shape for t in inv.values() if t.layer == 3 and t.component != HC}
    block = {t.name.split(".", 3)[3]: t.shape for t in mtp if t.name.split(".", 3)[3] in layer3}
    assert block == layer3  # the MTP block: layer 3's DSA attention and MoE, plus the NextN extras
    assert param_count(mtp) == params_by_group(inventory(flash, mtp=True))[MTP]


# --- weights, priced exactly as MLX stores them ---------------------------------------------------
def _stored_nbytes(flash, reference, recipe: Recipe, layer: int) -> int:
    """MLX arrays at one layer's reference shapes (bf16 / float32 as the reference keeps them), every
    Linear-type weight through mx.quantize in the recipe's format: at the full real shape lazily (MLX
    gives the stored shapes and dtypes without computing), and evaluated on real random weights for a
    slice of up to SLICE rows of it (rows quantize independently), whose bytes must scale exactly to the full."""
    formats = resolve(flash, recipe, mtp=False).formats
    fp32 = re.compile("|".join(re.escape(k) for k in reference["fp32"]))
    prefix = f"model.language_model.layers.{layer}."
    total = 0
    for ref_name, (ref_shape, _) in reference["params"].items():
        if not ref_name.startswith(prefix):
            continue
        quantizable = ref_name.removesuffix(".weight") in reference["linear"] or ".mlp.experts." in ref_name \
            or ref_name.endswith("kv_b_proj.weight")
        dtype = mx.float32 if fp32.search(ref_name) else mx.bfloat16
        for name, shape in _mlx_names(flash, ref_name, ref_shape).items():
            fmt = formats.get(name.removesuffix(".weight")) if quantizable else None

            def stored(x):
                return mx.quantize(x, **fmt.to_mlx()) if fmt is not None and fmt.quantized else (x,)

            full = sum(a.nbytes for a in stored(mx.zeros(shape, dtype)))  # lazy: never evaluated
            rows = math.gcd(shape[-2], SLICE) if len(shape) > 1 else shape[0]  # divides the rows
            real = stored(mx.random.normal((rows, shape[-1]) if len(shape) > 1 else shape).astype(dtype))
            mx.eval(*real)
            scale = math.prod(shape[:-1]) // rows if len(shape) > 1 else 1
            assert sum(a.nbytes for a in real) * scale == full, name
            total += full
    return total


SLICE = 64


@pytest.mark.parametrize("recipe", [default_recipe(), Recipe.uniform("affine4g64"), Recipe.uniform("mxfp4")],
                         ids=lambda r: r.name.split(" ")[0] if r.rules else r.default.name)
@pytest.mark.parametrize("layer", [0, 3], ids=["KDA+dense", "DSA+MoE"])
def test_price_is_byte_exact_at_real_layer_shapes(flash, reference, recipe, layer):
    priced = price(flash, recipe, mtp=False).tensor_bytes
    want = sum(b for n, b in priced.items() if n.startswith(f"model.layers.{layer}."))
    assert _stored_nbytes(flash, reference, recipe, layer) == want


def test_recipes_select_every_part_and_the_allocator_fills_a_budget(flash):
    w = price(flash, default_recipe())
    assert not w.unused_rules and not w.kept  # every default rule selects a GLM-5.3-Flash weight
    assert 150e9 < w.total < 158e9 and w.by_component[ROUTED] > 0.9 * w.total
    solved = best_recipe_for(flash, get_mac("m4-max-128"), 32768)
    assert 110e9 < price(flash, solved).total <= 120e9
    assert price(flash, dataclasses.replace(default_recipe(), method="iq")).total == w.total  # iq rounds, same bytes


# --- the cache: DSA per token, KDA per sequence --------------------------------------------------------
def test_kv_is_dsa_only_and_the_kda_state_is_constant(flash):
    # 11 DSA layers + the MTP block: latent 512 x 2 B, indexer key + pool gate 2 x 128 x 2 B, pooled keys 128 x 2 B / 16
    assert flash.cache_bytes_per_token(2, mtp=True) == 12 * (512 * 2 + 512 + 16)
    # 34 KDA layers: conv window 3 x 3 x 8192 bf16 + delta-rule state 64 x 128 x 128 float32
    assert state_bytes(flash, 2, mtp=True) == flash.kda_state_bytes(2) == 34 * (3 * 3 * 8192 * 2 + 64 * 128 * 128 * 4)
    mac = get_mac("m3-ultra-256")
    a, b = plan(flash, default_recipe(), mac, 8192), plan(flash, default_recipe(), mac, 65536)
    assert a.state_bytes == b.state_bytes == flash.kda_state_bytes(2)
    assert b.kv_bytes - a.kv_bytes == a.kv_bytes_per_token * (cache_tokens(65536) - cache_tokens(8192))
    assert a.total_bytes == a.weights_bytes + a.kv_bytes + a.working_set_bytes
    s = serving_plan(b)
    assert s.batch_kv_bytes == s.max_batch * (b.kv_bytes_per_token * cache_tokens(65536) + b.state_bytes)


def test_kv_matches_real_cache_arrays(flash):
    """The contract priced on real MLX arrays of the cached shapes for 4,096 tokens of one sequence."""
    T, dsa = 4096, [l for l in flash.layers(True) if flash.is_indexed(l)]
    per_layer = [mx.zeros((1, 1, T, flash.kv_lora_rank), mx.bfloat16),  # latent rows (NoPE: no rope key)
                 mx.zeros((1, T, 2 * flash.index_head_dim), mx.bfloat16),  # indexer keys and pool gates
                 mx.zeros((1, T // flash.index_kpool, flash.index_head_dim), mx.bfloat16)]  # pooled keys
    state = [mx.zeros((1, flash.linear_conv_kernel_dim - 1, 3 * flash.linear_dim), mx.bfloat16),
             mx.zeros((1, flash.linear_num_heads, flash.linear_head_dim, flash.linear_head_dim), mx.float32)]
    kda = sum(not flash.is_indexed(l) for l in flash.layers(True))
    assert len(dsa) * sum(x.nbytes for x in per_layer) == flash.cache_bytes_per_token(2, True) * T
    assert kda * sum(x.nbytes for x in state) == flash.kda_state_bytes(2)
    assert all(flash.layer_state_bytes(l, 2) == sum(x.nbytes for x in state) for l in range(45) if not flash.is_indexed(l))


def test_working_set_is_small_and_grows_with_the_context(flash):
    short, full = plan(flash, default_recipe(), get_mac("m3-ultra-256"), 4096), plan(flash, default_recipe(), get_mac("m3-ultra-256"))
    assert 0.5e9 < short.working_set_bytes < full.working_set_bytes < 4e9
    assert full.context == 1_048_576 and full.kv_bytes < 21e9  # 1M tokens: ~20 GB of cache (DSA only)


# --- plans, the pipeline, and GLM-5.1 unchanged ------------------------------------------------------------
def test_macs_glm51_cannot_hold_get_glm53_flash(flash):
    glm = glm51_args()
    for name, default_fits in (("m3-ultra-256", True), ("m2-ultra-192", True), ("m4-max-128", False)):
        p = plan(flash, default_recipe(), get_mac(name))  # full 1M context
        assert (p.fits != "no") == default_fits, name
    alt = smaller_that_fits(glm, get_mac("m4-max-128"), 32768)
    assert alt.name == "glm-5.3-flash" and alt.solved and alt.plan.fits != "no"
    assert alt.command == "glm-mlx fit --model glm-5.3-flash --mac m4-max-128 --context 32768 --solve"
    assert smaller_that_fits(flash, get_mac("m4-max-64"), 32768) is None  # nothing smaller than Flash


def test_pipeline_splits_flash(flash):
    pp = plan_pipeline(flash, default_recipe(), [get_mac("m4-max-128")] * 2, 131072)
    assert pp.fits != "no" and pp.stages[0].layers[0] == 0 and pp.stages[-1].layers[1] == 44
    p = plan(flash, default_recipe(), get_mac("m4-max-128"), 131072)
    assert sum(s.weights_bytes for s in pp.stages) - p.weights_bytes == price(flash, default_recipe()).by_component[
        "embeddings/head"] // 2  # the last rank's copy of the embedding (the MTP block embeds drafts)
    assert sum(s.kv_bytes for s in pp.stages) == p.kv_bytes


# --- glm-mlx fit ---------------------------------------------------------------------------------------
def _fit(*args) -> dict | list:
    r = runner.invoke(app, ["fit", *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_fit_model_flag_plans_flash():
    d = _fit("--model", "glm-5.3-flash", "--mac", "m2-ultra-192")
    assert d["model"] == "GLM-5.3-Flash" and d["fits"] in ("yes", "raise-wired-limit") and d["context"] == 1_048_576
    assert d["total_bytes"] == d["weights_bytes"] + d["kv_bytes"] + d["working_set_bytes"] and d["state_bytes"] > 1e8
    t = _fit("glm-5.3-flash", "--mac", "m4-max-128", "--target-size", "110GB", "--context", "32768")
    assert t["weights_bytes"] <= 110e9 and t["fits"] != "no"
    r = runner.invoke(app, ["fit", "--model", "glm-5.3-flash", "--mac", "m2-ultra-192"])
    assert r.exit_code == 0 and "KDA state" in r.stdout and "GLM-5.3-Flash" in r.stdout


def test_fit_tells_a_glm51_user_which_glm_fits():
    d = _fit("--mac", "m4-max-128", "--context", "32768")
    assert d["fits"] == "no" and d["smaller_model_fits"]["model"] == "glm-5.3-flash"
    r = runner.invoke(app, ["fit", "--mac", "m4-max-128", "--context", "32768"])
    assert "GLM-5.1 does not fit this Mac; GLM-5.3-Flash does" in r.stdout
    r = runner.invoke(app, ["fit", "--mac", "m4-max-128", "--context", "32768", "--solve"])
    assert r.exit_code != 0 and "glm-mlx fit --model glm-5.3-flash" in r.output


def test_fit_compare_both_models():
    rows = _fit("--compare", "m3-ultra-256,m2-ultra-192,m4-max-128", "--model", "all")
    got = {(r["model"], r["mac"]["name"]): r["fits"] for r in rows}
    assert got[("glm-5.1", "m3-ultra-256")] != "no" and got[("glm-5.1", "m4-max-128")] == "no"
    assert all(got[("glm-5.3-flash", m)] != "no" for m in ("m3-ultra-256", "m2-ultra-192", "m4-max-128"))
    r = runner.invoke(app, ["fit", "--compare", "m3-ultra-256,m4-max-128", "--model", "glm-5.1,glm-5.3-flash"])
    assert r.exit_code == 0 and "GLM-5.1 vs GLM-5.3-Flash" in r.stdout


# --- the MLX runtime (glm_mlx/model/glm5_next*.py): the same tensors and cache ----------------------------
TINY = dict(model_type="glm5_next", vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
            num_experts_per_tok=2, kv_lora_rank=64, q_lora_rank=32, qk_nope_head_dim=32, v_head_dim=32, index_topk=32,
            index_head_dim=32, index_n_heads=2, index_kpool=4, linear_num_heads=2, linear_head_dim=32, hc_mult=2,
            num_nextn_predict_layers=1, dtype="bfloat16")


def test_inventory_and_cache_match_the_mlx_model(flash):
    """Names and shapes of the MLX model's parameters (MTP block included) are the inventory's; dtypes too
    once cast as its loader casts (index_kpool_compress: the runtime keeps what the checkpoint stores,
    priced at the model dtype). Conv weights: MLX's Conv1d layout [C, K, 1], the same elements as the
    reference's [C, 1, K], as the inventory lists it. (The planner reads the config with the runtime's own
    Glm5NextArgs, so its cache contract is the runtime's analytic one by construction.)"""
    runtime = pytest.importorskip("glm_mlx.model.glm5_next")
    from mlx.utils import tree_flatten

    model = runtime.Model(Glm5NextArgs.from_dict(TINY), mtp=True)
    cast = model.cast_predicate
    params = {k: v.astype(mx.bfloat16) if cast(k) or "index_kpool_compress" in k else v
              for k, v in tree_flatten(model.parameters())}
    inv = {t.name: t for t in inventory(Glm5NextArgs.from_dict(TINY), mtp=True)}
    assert set(params) == set(inv)
    for name, t in inv.items():
        p = params[name]
        assert (tuple(p.shape), p.dtype.size) == (t.shape, t.dtype_bytes), name
