"""`glm-mlx convert` and `glm-mlx eval` through Typer's CliRunner, incl. --stream against the loopback hub."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from cli_util import assert_clean_error
from cli_util import invoke as run
from convert_fixtures import make_source, tree_bytes

from glm_mlx import load_model
from glm_mlx.model.config import ModelArgs
from glm_mlx.quantize import converter
from glm_mlx.quantize.planner import price
from glm_mlx.quantize.recipe import Recipe

TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
        "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date.\n") * 3


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("cli") / "src")


def test_uniform_recipe_and_json(src, tmp_path):
    out = tmp_path / "out"
    res = run("convert", src, out, "--bits", "4", "--group-size", "32", "--shard-size", "300kB", "--json")
    info = json.loads(res.stdout)
    args = ModelArgs.from_file(src)
    assert info["tensor_bytes"] == price(args, Recipe.uniform("affine4g32"), mtp=True).total
    assert info["shards"] == len(info["written"]) > 1 and "Converted" in res.stderr
    assert load_model(out, dtype=mx.float32).has_mtp
    assert_clean_error(run("convert", src, out, "--bits", "4", "--group-size", "32", ok=False), "finished conversion", "--force")
    run("convert", src, out, "--mode", "nvfp4", "--force")
    assert json.loads((out / "config.json").read_text())["quantization"]["mode"] == "nvfp4"


def test_recipe_file_target_size_and_fit(src, tmp_path):
    args = ModelArgs.from_file(src)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"default": "affine4g32", "rules": [{"component": "routed experts", "format": "mxfp4"}]}))
    run("convert", src, tmp_path / "a", "--recipe", recipe)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["quantization"]["model.layers.1.mlp.switch_mlp.up_proj"]["mode"] == "mxfp4"
    budget = (price(args, Recipe.uniform("affine3g32")).total + price(args, Recipe.uniform("affine4g32")).total) // 2
    run("convert", src, tmp_path / "b", "--target-size", f"{budget / 1e6}MB")
    assert converter.make_plan(args, Recipe.load(tmp_path / "b" / "recipe.json"), True).tensor_bytes <= budget
    run("convert", src, tmp_path / "c", "--fit", "m3-ultra-512", "--context", "4096")
    assert "m3-ultra-512" in Recipe.load(tmp_path / "c" / "recipe.json").name
    assert_clean_error(run("convert", src, tmp_path / "d", "--bits", "4", "--target-size", "1GB", ok=False), "Pass only one")
    assert_clean_error(run("convert", src, tmp_path / "d", "--context", "4096", ok=False), "--context only applies to --fit")
    assert_clean_error(run("convert", src, tmp_path / "d", "--fit", "m9-mega", ok=False), "m9-mega")


def test_bad_recipe_files(src, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_clean_error(run("convert", src, tmp_path / "o", "--recipe", bad, ok=False), "not valid JSON")
    bad.write_text(json.dumps({"default": "affine7g64"}))
    assert_clean_error(run("convert", src, tmp_path / "o", "--recipe", bad, ok=False), "affine bits must be one of")
    assert_clean_error(run("convert", src, tmp_path / "o", "--recipe", tmp_path / "none.json", ok=False), "does not exist")
    assert not (tmp_path / "o").exists()


def test_corrupt_source_shard_and_missing_folder(src, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert_clean_error(run("convert", broken, tmp_path / "o", "--bits", "4", ok=False), f"corrupt shard {shard.name}")
    assert_clean_error(run("convert", tmp_path / "nowhere", tmp_path / "o2", ok=False), "nowhere")


def test_not_enough_disk(src, tmp_path, monkeypatch):
    monkeypatch.setattr(converter, "free_bytes", lambda path: 10**5)
    r = run("convert", src, tmp_path / "o", "--bits", "8", ok=False)
    assert_clean_error(r, "not enough disk space", "only 100.00 kB free", "MB more")


def test_calibration_and_eval(src, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "iq"
    run("convert", src, out, "--bits", "4", "--group-size", "32", "--calibration", text)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "iq" and manifest["imatrix"]["tokens"] == len(TEXT)
    assert Recipe.load(out / "recipe.json").method == "iq" and (out / "imatrix.safetensors").exists()
    # The saved imatrix drives a mixed recipe for another size without calibrating again.
    r = run("convert", src, tmp_path / "mixed", "--target-size", "1.2MB", "--calibration", out / "imatrix.safetensors")
    assert "Calibrating" not in r.stderr
    res = json.loads(run("eval", out, "--reference", src, "--text", text, "--window", "64", "--json").stdout)
    assert res["tokens"] > 400 and 0 < res["kl"] and 0 <= res["top1"] <= 1 and res["ppl"] > 1
    same = json.loads(run("eval", src, "--reference", src, "--text", text, "--json").stdout)
    assert same["kl"] < 1e-6 and same["top1"] == 1.0 and same["ppl"] == pytest.approx(same["ppl_reference"])
    assert "mean KL" in run("eval", out, "--reference", src, "--text", text).stdout
    assert_clean_error(run("eval", out, "--reference", src, "--text", tmp_path / "none.txt", ok=False), "cannot read text file")
    assert_clean_error(run("convert", src, tmp_path / "x", "--calibration", tmp_path / "none.txt", ok=False), "none.txt")


def test_stream_from_the_hub_resumes_after_an_interruption(src, tmp_path, hub):
    repo = "org/glm-tiny"
    hub.add_repo(repo, src)
    local = tmp_path / "local"
    run("convert", src, local, "--bits", "4", "--group-size", "32", "--shard-size", "200kB")
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    hub.cut(shards[1], after=300_000)  # the second source shard breaks off mid-transfer
    out = tmp_path / "streamed"
    args = ("convert", repo, out, "--stream", "--bits", "4", "--group-size", "32", "--shard-size", "200kB")
    assert_clean_error(run(*args, ok=False), "503", "Re-run")
    assert list(out.glob("model-*.safetensors")) and not (out / "manifest.json").exists()
    hub.cut_clear()
    run(*args)
    assert len(hub.gets(shards[0])) == 1  # still on disk from the first run: not fetched again
    assert hub.gets(shards[1])[-1].range.startswith("bytes=")  # the cut transfer continued where it stopped
    assert not (out / ".glm-mlx-source").exists()  # source shards deleted
    want = {k: v for k, v in tree_bytes(local).items() if k != "manifest.json"}
    got = {k: v for k, v in tree_bytes(out).items() if k != "manifest.json"}
    assert got == want  # the same bytes as converting the local folder
    assert_clean_error(run("convert", src, tmp_path / "o", "--stream", ok=False), "repo id")


def test_convert_into_its_own_source_is_refused_and_nothing_is_touched(src, tmp_path):
    """As users run it: `glm-mlx convert SRC SRC --force` used to delete every source shard."""
    mine = shutil.copytree(src, tmp_path / "src")
    before = tree_bytes(mine)
    env = {k: v for k, v in os.environ.items() if k != "GLM_MLX_DEBUG"}
    p = subprocess.run([sys.executable, "-m", "glm_mlx.cli.app", "convert", str(mine), str(mine), "--force"],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and [ln.split(":")[0] for ln in lines] == ["Error", "Hint"], p.stderr
    assert f"the output folder {mine.resolve()} is the source folder" in lines[0] and "outside the source" in lines[1]
    assert tree_bytes(mine) == before
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)  # refused before calibrating, which caches its result in the output folder
    assert_clean_error(run("convert", mine, mine, "--force", "--calibration", text, ok=False), "is the source folder")
    assert_clean_error(run("convert", mine, mine / "mlx", "--force", ok=False), "is inside the source folder")
    assert_clean_error(run("convert", mine, tmp_path, "--force", ok=False), "is inside the output folder")
    assert tree_bytes(mine) == before


def test_force_does_not_overwrite_someone_elses_folder(src, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model-00001-of-00002.safetensors").write_bytes(b"their weights")
    (theirs / "config.json").write_text('{"theirs": true}')
    before = tree_bytes(theirs)
    assert_clean_error(run("convert", src, theirs, "--bits", "4", "--force", ok=False),
                       "holds config.json, which no glm-mlx conversion wrote", "--force only replaces")
    assert tree_bytes(theirs) == before
    # With --calibration too: refused before the calibration pass could leave its cache in their folder.
    text = tmp_path / "calib.txt"
    text.write_text("Some calibration text for the importance pass. " * 20)
    assert_clean_error(run("convert", src, theirs, "--bits", "4", "--calibration", text, "--force", ok=False),
                       "holds config.json, which no glm-mlx conversion wrote")
    assert sorted(p.name for p in theirs.iterdir()) == ["config.json", "model-00001-of-00002.safetensors"]
