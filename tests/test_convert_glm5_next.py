"""`glm-mlx convert` on GLM-5.3-Flash (glm5_next): tiny BF16 / FP8 checkpoints written by the reference
(tests/glm5_next_convert_fixtures.py) -> MLX folders that load, match the planner's inventory and prices to
the byte, equal the model's own sanitize (unquantized) and in-memory mx.quantize (quantized), stay close in
logits; the iq recipe (calibration through the glm5_next blocks), --target-size, --fit, --stream from the
loopback hub, vision tensors skipped with a note, and peak memory that does not grow with the model."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from cli_util import invoke as run
from convert_fixtures import tree_bytes
from glm5_next_convert_fixtures import make_next_source
from mlx.utils import tree_flatten

from glm_mlx import load_model
from glm_mlx.errors import ConfigError
from glm_mlx.model.glm5_next import Model
from glm_mlx.model.glm5_next_config import Glm5NextArgs
from glm_mlx.quantize.converter import convert, make_plan, source_args
from glm_mlx.quantize.imatrix import collect
from glm_mlx.quantize.inventory import inventory
from glm_mlx.quantize.next_convert import NextNames, hf_name
from glm_mlx.quantize.next_imatrix import calibrate_next
from glm_mlx.quantize.planner import price
from glm_mlx.quantize.recipe import Recipe, default_recipe
from glm_mlx.quantize.source import Source, read_header

TOKS = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]  # 8 pools of 2 > K = 4: the indexer selects
TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
        "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date.\n") * 2


def quiet_load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a source's vision tower note
        return load_model(path, **kw)


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return make_next_source(tmp_path_factory.mktemp("next-bf16") / "src")


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    return make_next_source(tmp_path_factory.mktemp("next-fp8") / "src", fp8=True, seed=3)


@pytest.fixture(scope="module")
def tame(tmp_path_factory):
    return make_next_source(tmp_path_factory.mktemp("next-tame") / "src", tame=True, seed=1)


def stored(folder: Path) -> dict:
    return {k: e for f in folder.glob("model-*.safetensors") for k, e in read_header(f).items()}


def arrays(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        out.update(mx.load(str(f)))
    return out


# --- one inventory, the model's names ------------------------------------------------------------------
def test_unquantized_output_is_the_models_sanitize_of_the_source(bf16, tmp_path):
    """The converter's streamed mapping (names, q/k/v conv join, expert stacking, kv_b_proj split) against
    the model's own sanitize on the whole checkpoint: the same tensors, shapes and values; the written
    tensors are exactly the planner's inventory, dtypes included (F32 where the reference keeps float32)."""
    out = tmp_path / "out"
    result = convert(bf16, out, Recipe.uniform("bf16"), shard_size=150_000)
    args = source_args(json.loads((bf16 / "config.json").read_text()))
    inv = {t.name: t for t in inventory(args, mtp=True)}
    got = stored(out)
    assert set(got) == set(inv) and len(result.plan.shards) > 2
    for name, t in inv.items():
        assert (got[name].dtype, got[name].shape) == ("F32" if t.dtype_bytes == 4 else "BF16", t.shape), name
    src = {}
    for f in sorted(bf16.glob("model-*.safetensors")):
        src.update(mx.load(str(f)))
    with pytest.warns(UserWarning, match="vision"):
        want = Model(Glm5NextArgs.from_dict(json.loads((bf16 / "config.json").read_text())), mtp=True).sanitize(src)
    have = arrays(out)
    assert set(want) == set(have)
    for k, v in want.items():
        assert v.shape == have[k].shape and mx.array_equal(v.astype(mx.float32), have[k].astype(mx.float32)), k
    assert any("vision tower" in n for n in result.notes)


def test_names_without_a_source_are_the_references(bf16):
    """A plan priced from a config alone names the reference checkpoint's tensors, as save_pretrained wrote them."""
    config = json.loads((bf16 / "config.json").read_text())
    args = source_args(config)
    names = set(json.loads((bf16 / "model.safetensors.index.json").read_text())["weight_map"])
    plan = make_plan(args, default_recipe(), mtp=True)
    wanted = {s for sh in plan.shards for it in sh.items for s in it.sources}
    assert wanted == {k for k in names if "visual" not in k and not k.endswith("_scale_inv")}
    assert hf_name("model.layers.0.ffn_hc.scale") == "model.language_model.layers.0.hc_ffn_scale"
    assert NextNames(names).source("model.layers.0.attn_hc.fn") == "model.language_model.layers.0.hc_attn_fn"


def test_the_planner_reads_the_config_as_the_model_does():
    """One reader: a schedule the model derives (index_topk_pattern) is the one the converter plans."""
    text = {"num_hidden_layers": 4, "layer_types": ["linear_attention"] * 2 + ["indexed_attention"] * 2,
            "index_topk_pattern": "FFFS", "mlp_layer_types": ["dense"] + ["sparse"] * 3}
    args = source_args({"model_type": "glm5_next", "text_config": text})
    assert isinstance(args, Glm5NextArgs) and args.indexer_types == ["full"] * 3 + ["shared"]
    assert [args.has_indexer(l) for l in range(5)] == [False, False, True, False, True]  # layer 4: MTP
    with pytest.raises(ConfigError, match="indexer_types"):  # a shared layer after a KDA layer: refused
        source_args({"model_type": "glm5_next", "text_config": {**text, "index_topk_pattern": "FFSF"}})


# --- quantized: the planner's bytes, mx.quantize's values ---------------------------------------------------
@pytest.mark.parametrize("which", ["bf16", "fp8"])
def test_converts_loads_and_matches_the_planner(which, request, tmp_path):
    src = request.getfixturevalue(which)
    recipe = default_recipe()
    out = tmp_path / "out"
    result = convert(src, out, recipe, shard_size=200_000)
    args = source_args(json.loads((src / "config.json").read_text()))
    assert result.plan.mtp
    w = price(args, recipe, mtp=True)
    got = stored(out)
    assert result.tensor_bytes == w.total == sum(e.end - e.start for e in got.values())
    for it in (it for s in result.plan.shards for it in s.items):  # per tensor: the planner's bytes, the plan's arrays
        assert sum(got[a[0]].end - got[a[0]].start for a in it.arrays) == w.tensor_bytes[it.t.name], it.t.name
        assert all((got[a[0]].dtype, got[a[0]].shape) == (a[1], tuple(a[2])) for a in it.arrays), it.t.name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["model.layers.1.mlp.gate"] is False and "quantization_config" in config
    assert config["quantization"] == config["quantization_config"] and "quant_method" not in config["quantization"]
    model = load_model(out, dtype=mx.float32)
    assert model.has_mtp and type(model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    assert type(model.layers[1].mlp.switch_mlp.gate_proj).__name__ == "QuantizedSwitchLinear"
    assert type(model.layers[3].self_attn.unembed_out).__name__ == "QuantizedMultiLinear"
    assert "model.layers.3.self_attn.embed_q" in w.kept  # last dim 16 (qk_nope): no 64-group fits, kept as the planner says
    assert type(model.layers[3].self_attn.embed_q).__name__ == "MultiLinear"
    assert type(model.mtp_layer.eh_proj).__name__ == "QuantizedLinear"
    params = dict(tree_flatten(model.parameters()))
    assert params["model.layers.0.self_attn.conv1d.weight"].dtype == mx.float32
    logits = model(mx.array([TOKS]))
    assert logits.shape == (1, len(TOKS), args.vocab_size) and bool(mx.isfinite(logits).all())


@pytest.mark.parametrize("which", ["bf16", "fp8"])
def test_rtn_output_is_exactly_mx_quantize_of_the_source(which, request, tmp_path):
    """Converted with plain rounding == the source loaded (the model's sanitize, FP8 dequantized whole)
    and quantized in memory, mlx-lm's way."""
    src = request.getfixturevalue(which)
    out = tmp_path / "out"
    convert(src, out, Recipe.uniform("affine8g64"), shard_size=300_000)
    ours = load_model(out, dtype=mx.bfloat16)
    ref = quiet_load(src, dtype=mx.bfloat16)  # quantized in memory from the same bf16 weights (scales bf16 alike)
    q = json.loads((out / "config.json").read_text())["quantization"]
    have = dict(tree_flatten(ours.parameters()))
    glob = {k: q[k] for k in ("group_size", "bits", "mode")}
    nn.quantize(ref, class_predicate=lambda p, m: q.get(p, glob) if hasattr(m, "to_quantized") and f"{p}.scales" in have else False)
    toks = mx.array([TOKS])
    assert mx.array_equal(ref(toks), ours(toks))


def logit_error(src: Path, out: Path) -> float:
    """max |logits - source logits| / max |source logits|, float32, over a sequence where the indexer selects."""
    toks = mx.array([TOKS + TOKS[::-1]])
    want = quiet_load(src, dtype=mx.float32)(toks)
    got = load_model(out, dtype=mx.float32)(toks)
    return float(mx.abs(got - want).max() / mx.abs(want).max())


def test_logits_stay_close_to_the_source(tame, tmp_path):
    """On a tame tiny model (every expert active: no routing choice to flip) the error follows the bits:
    measured 8-bit 0.3%, default recipe (experts 3/4-bit, the rest 6-bit) ~6% of the largest logit."""
    errors = {}
    for name, recipe in (("affine8g64", Recipe.uniform("affine8g64")), ("default", default_recipe()),
                         ("affine4g64", Recipe.uniform("affine4g64"))):
        convert(tame, tmp_path / name, recipe, shard_size=400_000)
        errors[name] = logit_error(tame, tmp_path / name)
    print("relative logit error", errors)
    assert errors["affine8g64"] < 0.02 and errors["affine8g64"] < errors["default"] and errors["affine8g64"] < errors["affine4g64"]
    assert errors["default"] < 0.25


# --- the iq recipe ---------------------------------------------------------------------------------------
def test_layer_by_layer_calibration_equals_the_in_memory_pass(bf16):
    rng = np.random.RandomState(0)
    chunks = [[int(t) for t in rng.randint(3, 96, size=n)] for n in (19, 6)]
    streamed = calibrate_next(Source(bf16), chunks)
    model = quiet_load(bf16, dtype=mx.float32)
    held = collect(model, chunks)
    assert type(model.layers[0].self_attn.q_proj).__name__ == "Linear"  # recorders removed
    assert set(streamed.imp) == set(held.imp)
    for k, v in held.imp.items():
        assert mx.allclose(streamed.imp[k], v, rtol=1e-4, atol=1e-6), k
    args = source_args(json.loads((bf16 / "config.json").read_text()))
    quantizable = {t.module for t in inventory(args, mtp=True) if t.quantizable}
    assert quantizable == set(streamed.imp)  # every quantizable module of the inventory has its importance
    assert streamed.imp["model.layers.3.self_attn.embed_q"].shape == (args.num_attention_heads, args.qk_nope_head_dim)
    assert streamed.imp["model.layers.1.mlp.switch_mlp.down_proj"].shape == (args.n_routed_experts, args.moe_intermediate_size)
    assert streamed.imp["model.layers.0.self_attn.f_b_proj"].shape == (args.linear_head_dim,)


def test_cli_iq_target_size_and_fit(bf16, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    iq = tmp_path / "iq"
    r = run("convert", bf16, iq, "--bits", "4", "--group-size", "32", "--calibration", text, "--shard-size", "300kB")
    assert "Calibrating" in r.stderr and "Note: skipped" in r.stderr and "vision tower" in r.stderr
    manifest = json.loads((iq / "manifest.json").read_text())
    assert manifest["method"] == "iq" and manifest["imatrix"]["tokens"] == len(TEXT)
    assert Recipe.load(iq / "recipe.json").method == "iq" and (iq / "imatrix.safetensors").exists()
    assert bool(mx.isfinite(load_model(iq, dtype=mx.float32)(mx.array([TOKS]))).all())
    args = source_args(json.loads((bf16 / "config.json").read_text()))
    budget = (price(args, Recipe.uniform("affine3g64")).total + price(args, Recipe.uniform("affine4g64")).total) // 2
    r = run("convert", bf16, tmp_path / "b", "--target-size", f"{budget / 1e6}MB", "--calibration", iq / "imatrix.safetensors")
    assert "Calibrating" not in r.stderr
    mixed = Recipe.load(tmp_path / "b" / "recipe.json")
    assert price(args, Recipe.uniform("affine3g64")).total < make_plan(args, mixed, True).tensor_bytes <= budget
    run("convert", bf16, tmp_path / "c", "--fit", "m3-ultra-512", "--context", "4096")
    assert "m3-ultra-512" in Recipe.load(tmp_path / "c" / "recipe.json").name
    for d in ("b", "c"):
        assert load_model(tmp_path / d, dtype=mx.float32).has_mtp


# --- streamed from the hub, bounded memory -------------------------------------------------------------------
def test_stream_from_the_hub_is_the_local_conversion(fp8, tmp_path, hub):
    repo = "org/glm5-next-tiny-fp8"
    hub.add_repo(repo, fp8)
    local, out = tmp_path / "local", tmp_path / "streamed"
    run("convert", fp8, local, "--bits", "4", "--group-size", "32", "--shard-size", "200kB")
    r = run("convert", repo, out, "--stream", "--bits", "4", "--group-size", "32", "--shard-size", "200kB")
    assert "Note: skipped" in r.stderr
    vision_shard = max(p.name for p in fp8.glob("model-*.safetensors"))  # holds the vision tower alone
    assert hub.gets(vision_shard) == []  # never fetched
    assert all(len(hub.gets(p.name)) == 1 for p in fp8.glob("model-*.safetensors") if p.name != vision_shard)
    assert not (out / ".glm-mlx-source").exists()
    want = {k: v for k, v in tree_bytes(local).items() if k != "manifest.json"}
    assert {k: v for k, v in tree_bytes(out).items() if k != "manifest.json"} == want


_MEASURE = """
import json, resource, sys, warnings
warnings.simplefilter("ignore")
from glm_mlx.quantize.converter import convert
from glm_mlx.quantize.recipe import default_recipe
r = convert(sys.argv[1], sys.argv[2], default_recipe())
try:  # this process's own high-water mark: Linux's ru_maxrss carries the forking parent's over exec
    peak = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
except OSError:  # macOS: ru_maxrss is in bytes and starts afresh
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_rss": peak, "tensor_bytes": r.tensor_bytes}))
"""


def test_peak_memory_does_not_grow_with_the_model(tmp_path):
    """4 vs 16 decoder layers of the same shapes, each conversion in its own process: peak RSS (VmHWM) compared."""
    res = []
    for n in (4, 16):
        src = make_next_source(tmp_path / f"src{n}", num_hidden_layers=n, hidden_size=256, moe_intermediate_size=128,
                               n_routed_experts=16, mlp_layer_types=["dense"] + ["sparse"] * (n - 1))
        p = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(tmp_path / f"out{n}")], capture_output=True,
                           text=True, timeout=600, check=True)
        source_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        res.append({"source_bytes": source_bytes, **json.loads(p.stdout.strip().splitlines()[-1])})
    print("peak RSS", res)
    small, large = res
    assert large["source_bytes"] > 3 * small["source_bytes"] and large["tensor_bytes"] > 3 * small["tensor_bytes"]
    assert large["peak_rss"] / small["peak_rss"] < 1.25


def test_dequantize_an_mlx_conversion_and_an_fp8_source(tame, fp8, tmp_path):
    """--dequantize reads an MLX glm5_next conversion (its own names and layouts, conv [C, K, 1] included) and
    an FP8 source back into unquantized bf16 folders that load."""
    q, deq = tmp_path / "q", tmp_path / "deq"
    convert(tame, q, Recipe.uniform("affine8g64"), shard_size=300_000)
    run("convert", q, deq, "--dequantize")
    have, quantized = arrays(deq), arrays(q)
    w = quantized["model.layers.1.mlp.switch_mlp.up_proj.weight"]
    s, b = (quantized[f"model.layers.1.mlp.switch_mlp.up_proj.{k}"] for k in ("scales", "biases"))
    want = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=64, bits=8).astype(mx.bfloat16)
    assert mx.array_equal(have["model.layers.1.mlp.switch_mlp.up_proj.weight"], want)
    assert mx.array_equal(have["model.layers.0.self_attn.conv1d.weight"], quantized["model.layers.0.self_attn.conv1d.weight"])
    toks = mx.array([TOKS])
    a, b = load_model(q, dtype=mx.float32)(toks), load_model(deq, dtype=mx.float32)(toks)
    assert float(mx.abs(a - b).max() / mx.abs(a).max()) < 0.01  # bf16 rounding of the dequantized weights
    out = tmp_path / "fp8-deq"
    run("convert", fp8, out, "--dequantize")
    assert {e.dtype for e in stored(out).values()} == {"BF16", "F32"}
    assert load_model(out).has_mtp
