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
from convert_fixtures import make_source, negate_tensor, swap_tensors, tree_bytes
from mlx.utils import tree_flatten

from glm_mlx import load, load_model
from glm_mlx.model.config import ModelArgs
from glm_mlx.generation.engine import Engine
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


def test_an_unquantized_rule_keeps_the_model_dtype(bf16, tmp_path):
    """A "f32" rule on a bf16 checkpoint means "not quantized": stored as bf16 (upcasting adds no precision),
    and the planner prices it so (it once priced 4 bytes a weight and the converter refused its own plan)."""
    from convert_fixtures import _header

    recipe = Recipe.from_dict({"default": "affine4g32", "rules": [{"component": "attention", "format": "f32"}]})
    out = tmp_path / "out"
    convert(bf16, out, recipe, shard_size=300_000)
    entries = {k: v for f in out.glob("*.safetensors") for k, v in _header(f)[1].items() if k != "__metadata__"}
    assert entries["model.layers.0.self_attn.q_a_proj.weight"]["dtype"] == "BF16"
    stored = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in entries.values())
    config = json.loads((out / "config.json").read_text())
    assert stored == price(ModelArgs.from_dict(config), recipe).total
    assert config["quantization"]["model.layers.0.self_attn.q_a_proj"] is False


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


# --- nothing lost: --force deletes only what a conversion wrote; a changed source is never mixed in ---------------
def copy_source(bf16: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(bf16, to))  # copy2: mtimes kept


def test_output_may_not_be_the_source_or_overlap_it(bf16, tmp_path):
    src = copy_source(bf16, tmp_path / "src")
    before = tree_bytes(src)
    (tmp_path / "link").symlink_to(src)
    for dst, msg in ((src, "is the source folder"), (tmp_path / "link", "is the source folder"),
                     (src / "mlx", "is inside the source folder"), (tmp_path, "is inside the output folder")):
        with pytest.raises(ConvertError, match=msg):
            convert(src, dst, Recipe.uniform("affine4g64"), force=True)
        assert tree_bytes(src) == before and not (src / "mlx").exists()


def test_force_never_touches_a_folder_glm_mlx_did_not_write(bf16, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    shard = min(bf16.glob("model-*.safetensors"))
    (theirs / "model-00001-of-00002.safetensors").write_bytes(shard.read_bytes())
    (theirs / "config.json").write_text('{"theirs": true}')
    before = tree_bytes(theirs)
    for force in (True, False):
        with pytest.raises(ConvertError, match="not empty: it holds config.json, which no glm-mlx conversion wrote"):
            convert(bf16, theirs, Recipe.uniform("affine4g64"), shard_size=200_000, force=force)
        assert tree_bytes(theirs) == before


def test_force_over_our_conversion_removes_only_our_files(bf16, tmp_path):
    out, clean = tmp_path / "out", tmp_path / "clean"
    old = convert(bf16, out, Recipe.uniform("affine4g64"), shard_size=150_000)
    old_files = {p.name for p in out.iterdir()}
    mine = {"notes.txt": b"mine", "scratch.tmp": b"mine too"}  # not ours: kept as they are, --force or not
    for name, data in mine.items():
        (out / name).write_bytes(data)
    (out / "extra.safetensors").write_bytes(b"theirs")  # a loader would read it beside our shards: refused
    with pytest.raises(ConvertError, match="holds extra.safetensors, which glm-mlx did not write"):
        convert(bf16, out, Recipe.uniform("affine8g64"), shard_size=400_000, force=True)
    assert old_files < {p.name for p in out.iterdir()}
    (out / "extra.safetensors").unlink()
    new = convert(bf16, out, Recipe.uniform("affine8g64"), shard_size=400_000, force=True)
    convert(bf16, clean, Recipe.uniform("affine8g64"), shard_size=400_000)
    assert len(new.plan.shards) < len(old.plan.shards)  # the old shards' names are gone ...
    got = tree_bytes(out)
    assert {k: got.pop(k) for k in mine} == mine  # ... the foreign files are untouched ...
    assert got == tree_bytes(clean)  # ... and the rest is exactly a clean conversion
    assert json.loads(got["manifest.json"])["files"] == sorted(got)  # which names all it wrote


class Interrupted(Exception):
    pass


def interrupted(src: Path, out: Path, recipe: Recipe, shard_size: int, after: int = 2) -> list[str]:
    """Convert, stopping as the shard after `after` finished ones is about to be renamed; the finished shards."""
    finished = []

    class Writer(converter.ShardWriter):
        def finish(self):
            if len(finished) == after:
                raise Interrupted
            super().finish()
            finished.append(self.final.name)

    real, converter.ShardWriter = converter.ShardWriter, Writer
    try:
        with pytest.raises(Interrupted):
            convert(src, out, recipe, shard_size=shard_size)
    finally:
        converter.ShardWriter = real
    assert (out / converter.WORK / "plan.json").exists() and not (out / "manifest.json").exists()
    return finished


@pytest.mark.parametrize("change", ["header", "bytes"])
def test_resume_notices_a_source_changed_at_the_same_size(change, bf16, tmp_path):
    """Killed after two shards, the source then changed: resuming would mix old and new weights.
    `header`: two tensors swapped in the header, size and mtime kept; `bytes`: a tensor's data changed
    (header and size kept), which leaves only the mtime to tell."""
    src, out, clean = copy_source(bf16, tmp_path / "src"), tmp_path / "out", tmp_path / "clean"
    recipe = Recipe.uniform("affine4g32")
    finished = interrupted(src, out, recipe, 120_000)
    old = {n: (out / n).read_bytes() for n in finished}
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    if change == "header":  # both read by the first output shard
        changed = index["model.layers.0.mlp.gate_proj.weight"]
        swap_tensors(src / changed, "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight")
        why = "has another safetensors header"
    else:
        changed = index["model.layers.0.self_attn.o_proj.weight"]
        negate_tensor(src / changed, "model.layers.0.self_attn.o_proj.weight")
        why = r"was modified \(its mtime changed\)"
    with pytest.raises(ConvertError, match=f"source file {changed} {why}") as e:
        convert(src, out, recipe, shard_size=120_000)
    assert "--force" in e.value.hint
    assert {n: (out / n).read_bytes() for n in finished} == old  # refused: nothing touched
    convert(src, clean, recipe, shard_size=120_000)
    assert any((clean / n).read_bytes() != data for n, data in old.items())  # the change matters to the output
    result = convert(src, out, recipe, shard_size=120_000, force=True)
    assert set(finished) <= set(result.written)
    assert tree_bytes(out) == tree_bytes(clean)


def test_resume_checks_a_finished_shard_before_skipping_it(bf16, tmp_path):
    out, whole = tmp_path / "out", tmp_path / "whole"
    recipe = Recipe.uniform("affine4g32")
    convert(bf16, whole, recipe, shard_size=120_000)
    finished = interrupted(bf16, out, recipe, 120_000)
    with open(out / finished[0], "r+b") as f:  # same size, its header damaged
        f.write(bytes(64))
    result = convert(bf16, out, recipe, shard_size=120_000)
    assert finished[0] in result.written and finished[1] not in result.written
    assert tree_bytes(out) == tree_bytes(whole)
