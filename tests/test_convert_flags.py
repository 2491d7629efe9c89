"""mlx-lm's spellings for `glm-mlx convert` (issue #16): -q/--q-bits/--q-group-size/--q-mode, --dtype,
--dequantize (MLX-quantized and FP8 sources) and --upload-repo. Hub traffic goes to the loopback fake
(tests/hub_server.py, fixture `hub`); `hf download`'s spellings: test_download_flags.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from cli_util import assert_clean_error
from cli_util import command as cli
from cli_util import invoke as run
from convert_fixtures import make_source, tree_bytes

from glm_mlx import load_model
from glm_mlx.quantize.converter import convert
from glm_mlx.quantize.recipe import Recipe
from glm_mlx.quantize.source import read_header

TOKS = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
# A mixed recipe, so that dequantizing meets every mode MLX stores and per-module overrides in config.json.
MIXED = {"default": "affine4g64", "rules": [{"component": "routed experts", "format": "mxfp4"},
                                            {"component": "attention", "format": "nvfp4"},
                                            {"component": "shared experts", "format": "affine8g32"},
                                            {"component": "dense MLP", "format": "mxfp8"}]}
# Largest rounding error of each format, as a fraction of a group's span (affine: max - min) or largest |w| (fp):
# half a quantization step plus the bf16 rounding of scales, biases and the result (measured: 0.066, 0.0097,
# 0.20, 0.17, 0.059 on random normal weights).
ERROR = {"affine4g64": 1 / 12, "affine8g32": 1 / 64, "mxfp4": 1 / 4, "nvfp4": 1 / 4, "mxfp8": 1 / 12}


def tensors(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def dtypes(folder: Path) -> dict[str, str]:
    return {k: e.dtype for f in folder.glob("model-*.safetensors") for k, e in read_header(f).items()}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("flags") / "src")


@pytest.fixture(scope="module")
def plain(src, tmp_path_factory):
    """The source's own weights in MLX layout, unquantized: what dequantizing should give back."""
    out = tmp_path_factory.mktemp("plain") / "out"
    convert(src, out, Recipe.uniform("bf16"))
    return out


@pytest.fixture(scope="module")
def quantized(src, tmp_path_factory):
    """An MLX-quantized checkpoint written by our own converter (mixed modes, per-module overrides)."""
    root = tmp_path_factory.mktemp("quantized")
    (root / "recipe.json").write_text(json.dumps(MIXED))
    run("convert", src, root / "q", "--recipe", root / "recipe.json", "--shard-size", "300kB")
    return root / "q"


# --- mlx-lm's quantization spellings --------------------------------------------------------------------------
def test_q_alone_is_mlx_lm_default_4bit_g64(src, tmp_path):
    run("convert", src, tmp_path / "q", "-q")
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert {k: q[k] for k in ("bits", "group_size", "mode")} == {"bits": 4, "group_size": 64, "mode": "affine"}
    assert Recipe.load(tmp_path / "q" / "recipe.json").default.name == "affine4g64"


def test_q_options_are_the_recipe_options(src, tmp_path):
    run("convert", src, tmp_path / "theirs", "-q", "--q-bits", "8", "--q-group-size", "32")
    run("convert", src, tmp_path / "ours", "--bits", "8", "--group-size", "32")
    mine = {k: v for k, v in tree_bytes(tmp_path / "ours").items() if k != "manifest.json"}
    assert {k: v for k, v in tree_bytes(tmp_path / "theirs").items() if k != "manifest.json"} == mine
    run("convert", src, tmp_path / "fp4", "--quantize", "--q-mode", "mxfp4")
    assert json.loads((tmp_path / "fp4" / "config.json").read_text())["quantization"]["mode"] == "mxfp4"
    run("convert", src, tmp_path / "same", "--bits", "4", "--q-bits", "4")  # the same value twice is fine


@pytest.mark.parametrize("args,needles", [
    (["--bits", "4", "--q-bits", "8"], ["--bits 4 and --q-bits 8 disagree"]),
    (["--mode", "affine", "--q-mode", "mxfp4"], ["disagree"]),
    (["-q", "--target-size", "1GB"], ["-q and --target-size each choose the recipe", "Pass only one"]),
    (["--q-bits", "4", "--fit", "m3-ultra-512"], ["--bits and --fit"]),
    (["--q-bits", "9"], ["--q-bits must be >= 2 and <= 8 (got 9)"]),
    (["--q-group-size", "8"], ["--q-group-size must be >= 16"]),
    (["-q", "--q-bits", "7"], ["affine bits must be one of"]),
    (["--q-mode", "int3"], ["unknown mode 'int3'"]),
    (["--dtype", "int8"], ["--dtype must be bfloat16, float16 or float32 (got 'int8')"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v[0].startswith("-") else "")
def test_bad_flag_combinations_are_one_line_errors(src, tmp_path, args, needles):
    assert_clean_error(run("convert", src, tmp_path / "o", *args, ok=False), *needles)
    assert not (tmp_path / "o").exists()


# --- --dtype ------------------------------------------------------------------------------------------------------
def test_dtype_sets_what_unquantized_weights_and_scales_are_stored_as(src, tmp_path):
    run("convert", src, tmp_path / "f16", "-q", "--dtype", "float16")
    config = json.loads((tmp_path / "f16" / "config.json").read_text())
    assert config["dtype"] == "float16" and config["quantization"]["bits"] == 4
    found = dtypes(tmp_path / "f16")
    assert found["model.embed_tokens.scales"] == found["model.norm.weight"] == "F16"
    assert found["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"  # always float32
    assert "BF16" not in found.values()
    assert load_model(tmp_path / "f16", dtype=mx.float32).has_mtp
    # Unquantized and float32: twice the bytes of bfloat16 (the planner agrees, or convert would have refused).
    # --dtype says what "unquantized" means, so a recipe's bf16 rules follow it.
    bf16 = _recipe(tmp_path, {"default": "bf16"})
    run("convert", src, tmp_path / "f32", "--recipe", bf16, "--dtype", "fp32")
    run("convert", src, tmp_path / "bf16", "--recipe", bf16)
    assert set(dtypes(tmp_path / "f32").values()) == {"F32"}
    assert Recipe.load(tmp_path / "f32" / "recipe.json").default.name == "f32"
    f32, bf16 = ([p.stat().st_size for p in (tmp_path / d).glob("model-*.safetensors")] for d in ("f32", "bf16"))
    assert sum(f32) == pytest.approx(2 * sum(bf16), rel=0.01)
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"


def test_dtype_is_part_of_the_resume_fingerprint(src, tmp_path):
    """An interrupted bfloat16 run is not finished in float16 (the shards' sizes are the same, the bytes not)."""
    from glm_mlx.quantize import converter

    out = tmp_path / "out"
    real = converter.write_item
    calls = []

    def stop_after_a_shard(writer, shard, *a, **k):
        if shard.name.startswith("model-00002"):
            raise KeyboardInterrupt
        calls.append(shard.name)
        real(writer, shard, *a, **k)

    converter.write_item = stop_after_a_shard
    try:
        with pytest.raises(KeyboardInterrupt):
            convert(src, out, Recipe.uniform("affine4g64"), shard_size=200_000)
    finally:
        converter.write_item = real
    with pytest.raises(converter.ConvertError, match="other arguments|differently"):
        convert(src, out, Recipe.uniform("affine4g64"), shard_size=200_000, dtype="float16")
    convert(src, out, Recipe.uniform("affine4g64"), shard_size=200_000, dtype="bfloat16")  # = the source's: resumes


def _recipe(tmp_path: Path, d: dict) -> Path:
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.json"
    path.write_text(json.dumps(d))
    return path


# --- --dequantize: an MLX-quantized checkpoint ------------------------------------------------------------------
def test_dequantize_an_mlx_checkpoint(quantized, plain, tmp_path):
    out = tmp_path / "dq"
    r = run("convert", quantized, out, "--dequantize", "--shard-size", "400kB", "--json")
    assert json.loads(r.stdout)["shards"] > 1
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert Recipe.load(out / "recipe.json").name == "dequantized to bfloat16"
    got, q, orig = tensors(out), tensors(quantized), tensors(plain)
    assert set(got) == set(orig)  # the model's own names and shapes, no scales or biases
    assert {k: e for k, e in dtypes(out).items() if e != "BF16"} == {k: "F32" for k in got if k.endswith("e_score_correction_bias")}
    qconf = json.loads((quantized / "config.json").read_text())["quantization"]
    seen = set()
    for name, w in got.items():
        module = name.rsplit(".", 1)[0]
        assert w.shape == orig[name].shape, name
        if f"{module}.scales" not in q:
            assert mx.array_equal(w, orig[name]), name  # stored unquantized: the same bytes
            continue
        entry = qconf.get(module) or qconf
        mode, bits, group = entry["mode"], entry["bits"], entry["group_size"]
        # Exactly what mx.dequantize makes of the stored arrays (affine: in float32), rounded to bfloat16 ...
        scales, biases = q[f"{module}.scales"], q.get(f"{module}.biases")
        if mode == "affine":
            scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
        ref = mx.dequantize(q[f"{module}.weight"], scales, biases, group_size=group, bits=bits, mode=mode)
        assert mx.array_equal(w, ref.astype(mx.bfloat16)), name
        # ... which is the original within the format's rounding error.
        fmt = mode if mode != "affine" else f"affine{bits}g{group}"
        seen.add(fmt)
        o = orig[name].astype(mx.float32)
        groups = o.reshape(-1, group)
        span = (groups.max(axis=1) - groups.min(axis=1)) if mode == "affine" else mx.abs(groups).max(axis=1)
        err = mx.abs(w.astype(mx.float32) - o).reshape(-1, group).max(axis=1)
        assert bool((err <= span * ERROR[fmt] + 1e-6).all()), (name, fmt)
    assert seen == set(ERROR)
    # Dequantized to float32, the model computes what the quantized one does in float32 (the same weights;
    # only the matmuls' summation order differs).
    run("convert", quantized, tmp_path / "f32", "--dequantize", "--dtype", "float32")
    toks = mx.array([TOKS])
    a = load_model(quantized, dtype=mx.float32)(toks)
    b = load_model(tmp_path / "f32", dtype=mx.float32)(toks)
    np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-4)


def test_dequantize_needs_a_quantized_source_and_no_recipe(src, quantized, tmp_path):
    assert_clean_error(run("convert", src, tmp_path / "o", "--dequantize", ok=False),
                       "is not quantized: there is nothing to dequantize", "--dtype")
    assert_clean_error(run("convert", quantized, tmp_path / "o", ok=False),
                       "already an MLX-quantized checkpoint", "--dequantize")
    assert_clean_error(run("convert", quantized, tmp_path / "o", "-d", "--q-bits", "4", ok=False),
                       "--dequantize writes unquantized weights: --bits does not apply")
    assert_clean_error(run("convert", quantized, tmp_path / "o", "--dequantize", "--fit", "m3-ultra-512", ok=False),
                       "--fit does not apply")
    assert not (tmp_path / "o").exists()


def test_dequantize_to_float16(quantized, tmp_path):
    run("convert", quantized, tmp_path / "f16", "-d", "--dtype", "float16")
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["dtype"] == "float16"
    assert set(dtypes(tmp_path / "f16").values()) == {"F16", "F32"}


def test_dequantize_streams_an_mlx_repo_from_the_hub(quantized, tmp_path, hub):
    hub.add_repo("org/tiny-mixed", quantized)
    run("convert", quantized, tmp_path / "local", "-d", "--shard-size", "200kB")
    out = tmp_path / "streamed"
    run("convert", "org/tiny-mixed", out, "--stream", "--dequantize", "--shard-size", "200kB")
    skip = {"manifest.json"}
    assert {k: v for k, v in tree_bytes(out).items() if k not in skip} == \
        {k: v for k, v in tree_bytes(tmp_path / "local").items() if k not in skip}
    for shard in sorted(p.name for p in quantized.glob("model-*.safetensors")):
        assert len(hub.gets(shard)) == 1  # each source shard fetched once (scales and biases with their weights)
    assert not (out / ".glm-mlx-source").exists()


# --- --dequantize: an FP8 checkpoint (float8_e4m3 + weight_scale_inv per 128x128 block) ---------------------------
FP8_DIMS = {"hidden_size": 256, "intermediate_size": 256}  # dense MLP weights span 2 x 2 scale blocks


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return make_source(root / "fp8", fp8=True, seed=3, **FP8_DIMS), make_source(root / "bf16", seed=3, **FP8_DIMS)


def _raw_tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes) straight from a safetensors file, without any library."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    return {k: (v["dtype"], v["shape"], data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def _e4m3(raw: bytes) -> np.ndarray:
    """float8_e4m3fn bytes -> float64, decoded by hand: 1 sign, 4 exponent (bias 7), 3 mantissa bits."""
    b = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
    sign, exp, man = np.where(b >> 7, -1.0, 1.0), (b >> 3) & 15, b & 7
    value = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7))
    assert not ((exp == 15) & (man == 7)).any()  # no NaN in weights
    return sign * value


def test_dequantize_an_fp8_checkpoint(fp8, tmp_path):
    src, bf16 = fp8
    out, ref = tmp_path / "dq", tmp_path / "ref"
    run("convert", src, out, "--dequantize", "--shard-size", "500kB")
    convert(bf16, ref, Recipe.uniform("bf16"))  # the same weights before FP8 quantization
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    got, orig = tensors(out), tensors(ref)
    assert set(got) == set(orig) and set(dtypes(out).values()) == {"BF16", "F32"}
    # Every FP8 weight, decoded by hand (e4m3 value times its block's scale), is what the output holds.
    raw = {}
    for f in src.glob("model-*.safetensors"):
        raw.update(_raw_tensors(f))
    checked = 0
    for name, (dtype, shape, data) in raw.items():
        if dtype != "F8_E4M3":
            continue
        sdtype, sshape, sdata = raw[name + "_scale_inv"]
        assert sdtype == "F32"
        scale = np.frombuffer(sdata, dtype=np.float32).reshape(sshape).astype(np.float64)
        m, n = shape
        want = _e4m3(data).reshape(m, n) * np.kron(scale, np.ones((128, 128)))[:m, :n]
        if ".experts." in name:  # stacked in the output: expert e is switch_mlp[e]
            prefix, rest = name.split(".experts.")
            e, proj = rest.split(".", 1)
            have = got[f"{prefix}.switch_mlp.{proj}"][int(e)]
        elif ".kv_b_proj." in name:
            continue  # split into embed_q / unembed_out: compared below through the originals
        else:
            have = got[name]
        have = np.array(have.astype(mx.float32), dtype=np.float64)
        np.testing.assert_allclose(have, want, rtol=2**-8, atol=1e-30, err_msg=name)  # bf16 rounding of the product
        checked += 1 + (scale.size > 1)
    assert checked > 40
    # And within FP8's rounding (3 mantissa bits: 2^-4 of each value, at most) of the original weights.
    for name, w in got.items():
        o = orig[name].astype(mx.float32)
        err = float(mx.abs(w.astype(mx.float32) - o).max())
        assert err <= 0.07 * float(mx.abs(o).max()) + 1e-6, name
    assert sum(not mx.array_equal(got[k], orig[k]) for k in got) > 40  # really quantized, then dequantized


def test_dequantize_streams_an_fp8_repo(fp8, tmp_path, hub):
    src, _ = fp8
    hub.add_repo("org/tiny-fp8", src)
    run("convert", src, tmp_path / "local", "--dequantize", "--shard-size", "500kB")
    run("convert", "org/tiny-fp8", tmp_path / "streamed", "--stream", "--dequantize", "--shard-size", "500kB")
    skip = {"manifest.json"}
    assert {k: v for k, v in tree_bytes(tmp_path / "streamed").items() if k not in skip} == \
        {k: v for k, v in tree_bytes(tmp_path / "local").items() if k not in skip}


# --- --upload-repo ------------------------------------------------------------------------------------------------
def test_upload_repo_with_the_real_cli(src, tmp_path, hub):
    out = tmp_path / "out"
    p = cli("convert", src, out, "-q", "--shard-size", "400kB", "--upload-repo", "me/tiny-4bit")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(out) and "Uploaded" in p.stderr and "me/tiny-4bit" in p.stderr
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert len(hub.commits) == 1
    repo, summary, added = hub.commits[0]
    assert repo == "me/tiny-4bit" and "glm-mlx convert" in summary
    assert sorted(added) == sorted(files)
    assert added == {f: (out / f).read_bytes() for f in files}  # every file, byte for byte
    assert any(r.path == "/api/repos/create" for r in hub.requests)
    # And it downloads back as it was.
    back = tmp_path / "back"
    d = cli("download", "me/tiny-4bit", "--local-dir", back)
    assert d.returncode == 0, d.stderr
    assert {k: v for k, v in tree_bytes(back).items() if not k.startswith(".cache/")} == {f: (out / f).read_bytes() for f in files}
    # Again with --force: the repo exists (create_repo's 409 is fine), the same bytes need no new commit.
    p = cli("convert", src, out, "-q", "--shard-size", "400kB", "--upload-repo", "me/tiny-4bit", "--force")
    assert p.returncode == 0, p.stderr
    assert len(hub.commits) == 1


def test_upload_problems_are_named_before_converting(src, tmp_path, hub):
    assert_clean_error(run("convert", src, tmp_path / "o", "-q", "--upload-repo", "not a/valid/repo", ok=False),
                       "not a valid repo id: 'not a/valid/repo'")
    assert not (tmp_path / "o").exists()
    run("convert", src, tmp_path / "done", "-q")
    assert_clean_error(run("convert", src, tmp_path / "done", "-q", "--upload-repo", "me/x", ok=False),
                       "already holds a finished conversion", f"hf upload me/x {tmp_path / 'done'}")
    hub.stop()  # the Hub is unreachable: refused before any conversion work
    assert_clean_error(run("convert", src, tmp_path / "o", "-q", "--upload-repo", "me/x", ok=False),
                       "cannot reach the Hub", "nothing was converted yet")
    assert not (tmp_path / "o").exists()


def test_a_failed_upload_says_how_to_upload_the_finished_conversion(src, tmp_path, hub, monkeypatch):
    from huggingface_hub import HfApi

    def boom(self, **kwargs):
        import httpx2

        raise httpx2.ConnectError("connection reset")

    monkeypatch.setattr(HfApi, "upload_folder", boom)
    out = tmp_path / "out"
    r = run("convert", src, out, "-q", "--upload-repo", "me/y", ok=False)
    assert_clean_error(r, "cannot reach the Hub", f"hf upload me/y {out}")
    assert (out / "manifest.json").exists()  # the conversion itself is finished and kept
