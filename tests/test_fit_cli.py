"""`glm-mlx fit` through Typer's CliRunner: the report, --json, recipes, and the error paths."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest
from typer.testing import CliRunner

from glm_mlx.cli.app import app
from glm_mlx.quantize.planner import glm51_args
from glm_mlx.quantize.recipe import Recipe, quantization_config

CONFIG = files("glm_mlx") / "data" / "glm-5.1-config.json"
runner = CliRunner()
KEYS = {"weights_bytes", "kv_bytes_per_token", "kv_bytes", "working_set_bytes", "total_bytes", "wired_limit_bytes",
        "fits", "max_context", "decode_tok_s", "prefill_tok_s", "recipe"}


def fit(*args):
    return runner.invoke(app, ["fit", *args])


def fit_json(*args) -> dict:
    r = fit(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)  # exactly one JSON object on stdout


def test_no_arguments_reports_glm51_on_m3_ultra_512():
    r = fit()
    assert r.exit_code == 0, r.output
    for text in ("GLM-5.1", "m3-ultra-512", "202,752", "Weights", "KV cache", "Working set", "Total to wire",
                 "Max context", "decode", "prefill", "Assumptions"):
        assert text in r.stdout, text
    assert "Fits" in r.stdout or "sudo sysctl iogpu.wired_limit_mb=" in r.stdout


def test_json_has_the_documented_keys():
    d = fit_json()
    assert KEYS <= d.keys()
    assert d["weights_bytes"] <= 361e9 and d["fits"] in ("yes", "raise-wired-limit")
    assert d["max_context"] == d["context"] == 202_752
    assert d["total_bytes"] == d["weights_bytes"] + d["kv_bytes"] + d["working_set_bytes"]


def test_glm5_uniform_4bit_without_mtp():
    d = fit_json("--bits", "4", "--group-size", "64", "--no-mtp")
    assert d["weights_bytes"] == pytest.approx(420e9, rel=0.01) and d["mtp"] is False


def test_target_size_and_solve_write_usable_recipes(tmp_path):
    d = fit_json("--target-size", "361GB", "--out", str(tmp_path / "t.json"))
    assert d["weights_bytes"] <= 361e9 and d["fits"] in ("yes", "raise-wired-limit")
    again = fit_json("--recipe", str(tmp_path / "t.json"))
    assert again["weights_bytes"] == d["weights_bytes"]
    s = fit_json("--solve", "--mac", "m3-ultra-256", "--context", "32768", "--out", str(tmp_path / "s.json"))
    assert s["fits"] != "no" and Recipe.load(tmp_path / "s.json").rules


def test_modes_custom_mac_and_pipeline():
    assert fit_json("--mode", "mxfp4")["recipe"]["default"] == "mxfp4"
    d = fit_json("--memory", "192GB", "--bandwidth", "800", "--bits", "2", "--context", "8192",
                 "--pipeline", "m2-ultra-192,m2-ultra-192")
    assert d["mac"]["memory_gb"] == 192 and len(d["pipeline"]["stages"]) == 2
    r = fit("--mac", "list")
    assert r.exit_code == 0 and "m3-ultra-512" in r.stdout and "m4-max-36" in r.stdout


def test_converted_checkpoint_is_priced_from_its_quantization(tmp_path):
    base = json.loads(CONFIG.read_text())
    base["quantization"] = quantization_config(glm51_args(), Recipe.uniform("affine3g64"))
    (tmp_path / "config.json").write_text(json.dumps(base))
    assert fit_json("--model", str(tmp_path))["weights_bytes"] == fit_json("--bits", "3")["weights_bytes"]


@pytest.mark.parametrize("argv,needle", [
    (["--mac", "m3-ultra-521"], "did you mean m3-ultra-512"),
    (["--memory", "192GB"], "needs both --memory and --bandwidth"),
    (["--model", "/nonexistent/glm-folder"], "no model folder or config file"),
    (["--bits", "4", "--solve"], "each choose the recipe"),
    (["--bits", "7"], "affine bits must be one of"),
    (["--target-size", "lots"], "--target-size must be a size like"),
])
def test_errors_are_one_message_and_a_hint(argv, needle):
    r = fit(*argv)
    assert r.exit_code == 1
    assert needle in r.output and "Hint:" in r.output and "Traceback" not in r.output


def test_bad_recipe_file(tmp_path):
    (tmp_path / "bad.json").write_text('{"default": "affine4", "rules": [{"match": "*", "format": "int4"}]}')
    r = fit("--recipe", str(tmp_path / "bad.json"))
    assert r.exit_code == 1 and "unknown quantization format 'int4'" in r.output
    r = fit("--recipe", str(tmp_path / "missing.json"))
    assert r.exit_code == 1 and "does not exist" in r.output


def test_repo_id_fetches_only_config_json(hub):
    hub.add_repo("zai-org/GLM-5.1", {"config.json": CONFIG.read_bytes(), "model-00001-of-00282.safetensors": b"\0" * 64})
    d = fit_json("--model", "zai-org/GLM-5.1")
    assert d["model"] == "zai-org/GLM-5.1" and d["params"] == 753_864_139_008
    assert hub.gets("config.json") and not hub.gets("model-00001-of-00282.safetensors")
    r = fit("--model", "zai-org/no-such-repo")
    assert r.exit_code == 1 and "could not fetch config.json" in r.output
