"""The streaming converter: tiny GLM-5.1-shaped BF16 / FP8 checkpoints -> MLX checkpoints that load,
generate, match the planner to the byte, and survive kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from convert_fixtures import make_source, tree_bytes
from mlx.utils import tree_flatten

from glm_mlx import load, load_model
from glm_mlx.config import ModelArgs
from glm_mlx.engine import Engine
from glm_mlx.quantize import converter
from glm_mlx.quantize.converter import ConvertError, DiskSpaceError, convert
from glm_mlx.quantize.planner import price
from glm_mlx.quantize.recipe import Recipe, default_recipe
from glm_mlx.quantize.source import read_header

TOKS = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]  # > index_topk (8): the indexer is used


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("bf16") / "src")


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("fp8") / "src", fp8=True, seed=3)


def tensor_bytes(folder: Path) -> int:
    return sum(e.end - e.start for f in folder.glob("model-*.safetensors") for e in read_header(f).values())


@pytest.mark.parametrize("which", ["bf16", "fp8"])
def test_converts_loads_and_generates(which, request, tmp_path):
    src = request.getfixturevalue(which)
    recipe = default_recipe()
    out = tmp_path / "out"
    result = convert(src, out, recipe, shard_size=250_000)
    args = ModelArgs.from_file(src)
    assert result.plan.mtp  # the MTP layer is kept (quantized per recipe)
    predicted = price(args, recipe, mtp=True).total
    assert result.tensor_bytes == predicted == tensor_bytes(out)  # to the byte
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == predicted
    assert len(list(out.glob("model-*.safetensors"))) == len(result.plan.shards) > 2
    assert all((out / s.name).stat().st_size <= 250_000 for s in result.plan.shards if len(s.items) > 1)
    config = json.loads((out / "config.json").read_text())
    assert "quant_method" not in config["quantization"] and config["quantization"] == config["quantization_config"]
    assert config["quantization"]["model.layers.1.mlp.gate"] is False
    assert Recipe.load(out / "recipe.json").to_dict() == recipe.to_dict()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensor_bytes"] == predicted and not (out / converter.WORK).exists()
    # Quantized where the recipe says, kept where it must be.
    model, tok = load(out, dtype=mx.float32)
    layer = model.model.layers[1]
    assert type(layer.mlp.switch_mlp.gate_proj).__name__ == "QuantizedSwitchLinear"
    assert type(layer.self_attn.q_a_proj).__name__ == "QuantizedLinear"
    assert type(layer.mlp.gate).__name__ == "MoEGate" and model.has_mtp
    assert type(model.mtp_layer.eh_proj).__name__ == "QuantizedLinear"
    bias = dict(tree_flatten(model.parameters()))["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == mx.float32
    # It generates, with MTP drafting (quality is measured on trained weights, docs/quantization.md).
    ids = list(Engine(model, mtp=True, num_draft=2).generate(TOKS, max_tokens=12))
    assert len(ids) == 12 and all(0 <= i < args.vocab_size for i in ids)
    assert bool(mx.isfinite(model(mx.array([TOKS]))).all())


def test_rtn_output_is_exactly_mx_quantize_of_the_source(bf16, tmp_path):
    """Converted with plain rounding == the source loaded and quantized in memory (mlx-lm's way)."""
    toks = mx.array([TOKS])
    for fmt in ("affine4g64", "mxfp4", "nvfp4"):
        out = tmp_path / fmt
        convert(bf16, out, Recipe.uniform(fmt), shard_size=400_000)
        ours = load_model(out, dtype=mx.bfloat16)
        ref = load_model(bf16, dtype=mx.bfloat16)  # quantized in memory from the same bf16 weights
        q = json.loads((out / "config.json").read_text())["quantization"]
        have = dict(tree_flatten(ours.parameters()))
        glob = {k: q[k] for k in ("group_size", "bits", "mode")}
        nn.quantize(ref, class_predicate=lambda p, m: (q.get(p, glob) if hasattr(m, "to_quantized") and f"{p}.scales" in have else False))
        assert mx.array_equal(ref(toks), ours(toks)), fmt


def test_mlx_lm_loads_the_output(bf16, tmp_path):
    from mlx_lm.utils import load_model as mlx_lm_load

    out = tmp_path / "out"
    recipe = Recipe.from_dict({"default": "affine4g32", "rules": [{"component": "attention", "format": "affine6g32"},
                                                                 {"match": "*.switch_mlp.down_proj", "format": "mxfp4"}]})
    convert(bf16, out, recipe, shard_size=300_000)
    assert json.loads((out / "config.json").read_text())["quantization"]["model.layers.2.mlp.switch_mlp.down_proj"]["mode"] == "mxfp4"
    theirs, _ = mlx_lm_load(out)  # drops the MTP layer, reads the per-module overrides
    theirs.set_dtype(mx.float32)  # compare in float32: bf16 rounding differs between implementations
    ours = load_model(out, mtp=False, dtype=mx.float32)
    toks = mx.array([TOKS[:7]])  # within index_topk: both attend densely
    np.testing.assert_allclose(np.array(ours(toks)), np.array(theirs(toks)), atol=1e-3)


_KILLABLE = """
import sys, time
from glm_mlx.quantize import converter
from glm_mlx.quantize.recipe import Recipe
real = converter.write_item
def slow(*a, **k):  # the test kills the process while it sits here, mid-shard
    real(*a, **k)
    time.sleep(0.02)
converter.write_item = slow
converter.convert(sys.argv[1], sys.argv[2], Recipe.uniform("affine4g32"), method="iq", shard_size=120_000)
"""


def test_kill_9_then_resume_is_byte_identical(bf16, tmp_path):
    whole = tmp_path / "whole"
    convert(bf16, whole, Recipe.uniform("affine4g32"), method="iq", shard_size=120_000)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(bf16), str(out)], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        finished = list(out.glob("model-*.safetensors"))
        if len(finished) >= 2 and list(out.glob("*.tmp")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("model-*.safetensors")}
    assert len(done) >= 2 and list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    result = convert(bf16, out, Recipe.uniform("affine4g32"), method="iq", shard_size=120_000)
    assert set(result.written).isdisjoint(done)  # finished shards were skipped ...
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in done.items())  # ... not rewritten
    assert tree_bytes(out) == tree_bytes(whole)


def test_refuses_when_the_disk_is_too_small(bf16, tmp_path, monkeypatch):
    monkeypatch.setattr(converter, "free_bytes", lambda path: 500)
    with pytest.raises(DiskSpaceError, match=r"needs [\d.]+ [kM]B more, only 500 B free \(output [\d.]+ MB, 0 B already written\)"):
        convert(bf16, tmp_path / "out", default_recipe())
    assert not list((tmp_path / "out").glob("model-*"))


def test_finished_conversions_need_force(bf16, tmp_path):
    out = tmp_path / "out"
    convert(bf16, out, Recipe.uniform("affine4g64"))
    before = tree_bytes(out)
    with pytest.raises(ConvertError, match="already an MLX-quantized checkpoint"):
        convert(out, tmp_path / "again", Recipe.uniform("affine4g64"))
    with pytest.raises(ConvertError, match="already holds a finished conversion"):
        convert(bf16, out, Recipe.uniform("affine8g64"))
    assert tree_bytes(out) == before
    result = convert(bf16, out, Recipe.uniform("affine8g64"), force=True)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert tensor_bytes(out) == result.tensor_bytes > sum(len(v) for k, v in before.items() if k.startswith("model-")) - 10**5


def test_unfinished_conversion_with_other_arguments_and_foreign_folders(bf16, tmp_path):
    out = tmp_path / "out"
    convert(bf16, out, Recipe.uniform("affine4g64"), shard_size=200_000)
    (out / "manifest.json").unlink()  # as if killed before the end
    (out / converter.WORK).mkdir()
    (out / converter.WORK / "plan.json").write_text(json.dumps({"other": 1}))
    with pytest.raises(ConvertError, match="started with other arguments"):
        convert(bf16, out, Recipe.uniform("affine4g64"), shard_size=200_000)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not empty"):
        convert(bf16, foreign, Recipe.uniform("affine4g64"))


def test_source_problems_are_named(bf16, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(bf16, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    index["weight_map"]["model.layers.1.mlp.extra.weight"] = index["weight_map"].pop(name)
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConvertError, match=f"missing tensor {name}"):
        convert(src, tmp_path / "out", default_recipe())
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-1000])  # truncated download
    index["weight_map"][name] = index["weight_map"].pop("model.layers.1.mlp.extra.weight")
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(Exception, match=f"corrupt shard {shard.name}"):
        convert(src, tmp_path / "out2", default_recipe())


def test_peak_memory_does_not_grow_with_the_model(tmp_path):
    """The benchmark behind docs/quantization.md's 2 GB vs 8 GB figures, on two tiny checkpoints
    (2 vs 14 decoder layers of the same shapes): each conversion in its own process, ru_maxrss compared."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import convert_rss

    small, large = convert_rss.measure([0.006, 0.04], tmp_path, base=convert_rss.TINY)
    assert large["source_gb"] > 3 * small["source_gb"] and large["tensor_bytes"] > 3 * small["tensor_bytes"]
    assert max(small["peak_rss"], large["peak_rss"]) / min(small["peak_rss"], large["peak_rss"]) < 1.25


def test_an_importance_matrix_of_another_model_is_refused(bf16, tmp_path):
    from glm_mlx.quantize.imatrix import Importance

    wrong = Importance(imp={"model.layers.1.mlp.switch_mlp.up_proj": mx.ones((8, 7))})
    with pytest.raises(ConvertError, match=r"shape \[8, 7\] for model.layers.1.mlp.switch_mlp.up_proj"):
        convert(bf16, tmp_path / "out", Recipe.uniform("affine4g32"), importance=wrong, method="iq")
