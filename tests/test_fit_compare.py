"""`glm-mlx fit --compare` (one table over Macs), `--contexts`, `--json` rows and `--plot` (a PNG)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from importlib.resources import files

import pytest
from typer.testing import CliRunner

from glm_mlx.cli.app import app
from glm_mlx.model.config import ModelArgs
from glm_mlx.quantize import compare as cmp
from glm_mlx.quantize.macs import get_mac
from glm_mlx.quantize.planner import best_recipe_for, glm51_args, plan

runner = CliRunner()
THREE = "m3-ultra-512,m3-ultra-256,m4-max-128"
MAX = 202_752  # GLM-5.1's max_position_embeddings


def cli(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm_mlx.cli.app", "fit", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def glm():
    return glm51_args()


# --- the library ----------------------------------------------------------------------------------
def test_parse_contexts():
    assert cmp.parse_contexts("8K,32k, 128K,200K,max,1M,4096", MAX) == [
        ("8K", 8192), ("32K", 32768), ("128K", 131072), ("200K", MAX), ("max", MAX), ("1M", MAX), ("4,096", 4096)]
    assert cmp.parse_contexts(None, MAX) == [] and cmp.parse_contexts("", MAX) == []
    for bad in ("abc", "0", "8G", "-5"):
        with pytest.raises(cmp.CompareError):
            cmp.parse_context(bad, MAX)


def test_rows_are_the_planners_best_recipes(glm):
    macs = [get_mac(n) for n in THREE.split(",")]
    rows = cmp.compare(glm, macs, 32768, cmp.parse_contexts("8K,200K", MAX))
    big, mid, small = rows
    for row in (big, mid):  # what `fit --mac M --solve --context C` prints, field for field
        want = plan(glm, best_recipe_for(glm, row.mac, 32768), row.mac, 32768)
        got = row.best.plan
        assert (got.weights_bytes, got.max_context, got.fits) == (want.weights_bytes, want.max_context, want.fits)
        assert got.decode_tok_s == pytest.approx(want.decode_tok_s) and got.prefill_tok_s == pytest.approx(want.prefill_tok_s)
        assert row.best.bits_per_weight == pytest.approx(8 * want.weights_bytes / want.params)
        assert got.max_context >= 32768 and (row.best.kind == "mixed" or row.best.kind.startswith("uniform"))
    assert [s.label for s in big.contexts] == ["8K", "200K"] and big.contexts[1].context == MAX
    assert all(s.fits != "no" for s in big.contexts) and mid.contexts[1].fits == "no"  # 256 GB: no room at 200K
    # less context, more room for weights: more bits at 8K than at 32K than at the maximum
    assert big.contexts[0].bits_per_weight > big.best.bits_per_weight > big.contexts[1].bits_per_weight
    assert big.best.bits_per_weight > mid.best.bits_per_weight > 2.5
    assert not small.fits_somewhere and small.best.plan is None and small.weights_budget_bytes < cmp.smallest_weights(glm)
    d = big.to_dict()
    assert d["mac"]["name"] == "m3-ultra-512" and "Mac Studio" in d["mac"]["products"]
    assert d["recipe"]["rules"] and d["contexts"][0]["label"] == "8K" and json.dumps([r.to_dict() for r in rows])


def test_solves_are_shared_by_macs_of_the_same_budget(glm, monkeypatch):
    """The whole default catalog at five contexts needs ten solves on GLM-5.1: the 256 and 512 GB
    budgets at each context; Macs where nothing can fit are never solved."""
    calls = []

    def counting(*a, **k):
        calls.append(a[1].name)
        return best_recipe_for(*a, **k)

    monkeypatch.setattr(cmp, "best_recipe_for", counting)
    start = time.perf_counter()
    rows = cmp.compare(glm, None, None, cmp.parse_contexts("8K,32K,128K,200K", MAX))
    seconds = time.perf_counter() - start
    assert len(calls) <= 2 * 4  # 32K is the comparison's own context: reused, not solved again
    assert seconds < 30, seconds  # ~2 s on a free core
    names = [r.mac.name for r in rows]
    assert names[:2] == ["m3-ultra-512", "m3-ultra-256"] and not any(n.endswith("c") for n in names)
    assert all(r.mac.memory_gb >= 64 for r in rows) and "m4-max-128" in names and "m4-pro-64" in names
    assert [r.mac.memory_gb for r in rows] == sorted((r.mac.memory_gb for r in rows), reverse=True)
    pair = cmp.compare(glm, [get_mac("m3-ultra-256"), get_mac("m3-ultra-256-60c")], 32768)
    assert pair[0].best.plan.weights_bytes == pair[1].best.plan.weights_bytes
    assert pair[0].best.plan.prefill_tok_s > pair[1].best.plan.prefill_tok_s  # 80 vs 60 GPU cores


def test_a_small_model_brings_in_small_macs():
    mini = ModelArgs.from_file(files("glm_mlx") / "data" / "glm-mini" / "config.json")
    names = [m.name for m in cmp.default_macs(mini, 4096)]
    assert "m1-8" in names and "m3-ultra-512" in names  # everything fits a tiny model


# --- the command ----------------------------------------------------------------------------------
def test_compare_prints_one_table():
    start = time.perf_counter()
    r = cli("--compare")
    seconds = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("GLM-5.1: the best recipe per Mac at 32,768 tokens")
    for text in ("Mac", "recipe", "weights", "bits/w", "max context", "decode tok/s", "prefill tok/s",
                 "m3-ultra-512", "m3-ultra-256", "mixed", "Nothing fits on", "m4-max-128"):
        assert text in out, text
    row = next(line for line in out.splitlines() if line.startswith("m3-ultra-512"))
    assert "GB" in row and "raise" in row
    assert seconds < 60, seconds  # a few seconds on a free machine (import ~2 s, solving ~1 s)


def test_compare_json_is_the_rows():
    r = cli("--compare", THREE, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["mac"]["name"] for row in rows] == THREE.split(",")
    big = rows[0]
    for key in ("recipe_name", "weights_bytes", "bits_per_weight", "max_context", "decode_tok_s", "prefill_tok_s",
                "fits", "sysctl", "recipe", "contexts"):
        assert key in big, key
    assert big["fits"] == "raise-wired-limit" and big["max_context"] >= 32768 and big["contexts"] == []
    assert rows[2]["fits"] == "no" and rows[2]["weights_bytes"] is None
    alone = json.loads(cli("--compare", "--json").stdout)  # --compare followed by another option: the catalog
    assert len(alone) > 10 and alone[0]["mac"]["name"] == "m3-ultra-512"


def test_compare_contexts_add_columns():
    r = cli("--compare", THREE, "--contexts", "8K,32K,128K,200K")
    assert r.returncode == 0, r.stderr
    header = next(line for line in r.stdout.splitlines() if line.startswith("Mac"))
    assert all(h in header for h in ("8K", "32K", "128K", "200K"))
    row = next(line for line in r.stdout.splitlines() if line.startswith("m3-ultra-256"))
    assert row.count("bpw") == 3 and row.rstrip().endswith("-")  # no room at 200K
    assert "200K is planned at the model's maximum, 202,752 tokens" in r.stdout.replace("\n", " ")
    rows = json.loads(cli("--compare", THREE, "--contexts", "8K,200K", "--json").stdout)
    assert [c["context"] for c in rows[0]["contexts"]] == [8192, MAX]
    assert rows[1]["contexts"][1]["fits"] == "no" and rows[1]["contexts"][0]["decode_tok_s"] > 0


@pytest.mark.parametrize("argv,needle", [
    (["--compare", "--bits", "4"], "--bits/--mode/--group-size do not apply"),
    (["--compare", "--mac", "m3-ultra-512"], "--mac do not apply"),
    (["--contexts", "8K"], "--contexts adds columns to the --compare table"),
    (["--compare", "--contexts", "8K,lots"], "cannot read context 'lots'"),
    (["--compare", "m3-ultra-512,Mac Studio M3 Ultra 128GB"], "comes with 96, 256 or 512 GB"),
])
def test_compare_errors(argv, needle):
    r = runner.invoke(app, ["fit", *argv])
    assert r.exit_code == 1 and needle in r.output and "Hint:" in r.output


# --- the plot -------------------------------------------------------------------------------------
def _check_png(path, min_width=400):
    import numpy as np
    from matplotlib import image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, len(data)
    pixels = image.imread(path)
    h, w = pixels.shape[:2]
    assert w >= min_width and h >= 300
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20  # not a blank canvas
    return w, h


def test_plot_compare_and_single_mac(tmp_path):
    pytest.importorskip("matplotlib")
    r = cli("--compare", THREE, "--contexts", "8K", "--plot", str(tmp_path / "cmp.png"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith(f"Plot written to {tmp_path / 'cmp.png'}")
    w3, _ = _check_png(tmp_path / "cmp.png", 1200)  # three panels side by side
    r = cli("--mac", "m4-max-128", "--plot", str(tmp_path / "sub" / "one.png"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["fits"] == "no" and "Plot written to" in r.stderr  # stdout: only the JSON
    w1, _ = _check_png(tmp_path / "sub" / "one.png")
    assert w1 < w3


def test_plot_without_matplotlib_is_one_error_and_a_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the extra sees
    r = runner.invoke(app, ["fit", "--plot", str(tmp_path / "x.png")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "--plot needs matplotlib" in r.output and "pip install 'glm-mlx[plot]'" in r.output
    assert not (tmp_path / "x.png").exists()
