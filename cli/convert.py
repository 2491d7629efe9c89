"""`glm-mlx convert`: an HF checkpoint (folder or repo id) -> an MLX checkpoint, streaming and resumable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from typing_extensions import Annotated

from glm_mlx.errors import GlmMlxError

stderr = Console(stderr=True, highlight=False)
CALIBRATION_WINDOW = 512  # tokens per calibration sequence


def _alias(values: dict):
    """The one value given under any of an option's spellings ({"--bits": 4, "--q-bits": None} -> 4)."""
    given = {name: v for name, v in values.items() if v is not None}
    if len(set(given.values())) > 1:
        names = " and ".join(f"{n} {v}" for n, v in given.items())
        raise GlmMlxError(f"{names} disagree (the same option, spelled two ways)", "Pass it once.")
    return next(iter(given.values()), None)


def _choose_recipe(args, mtp, importance, recipe_file, bits, mode, group_size, target_size, fit, context,
                   uniform="--bits/--mode/--group-size", quantize=False):
    """`uniform`: how the user spelled the uniform-recipe options (for the error naming them); `quantize`: -q."""
    from glm_mlx.quantize.allocate import allocate
    from glm_mlx.quantize.formats import make_format
    from glm_mlx.quantize.macs import get_mac, parse_size
    from glm_mlx.quantize.planner import best_recipe_for, weights_budget
    from glm_mlx.quantize.recipe import Recipe, default_recipe

    given = [n for n, v in (("--recipe", recipe_file), (uniform, quantize or bits or mode or group_size),
                            ("--target-size", target_size), ("--fit", fit)) if v]
    if len(given) > 1:
        raise GlmMlxError(f"{' and '.join(given)} each choose the recipe", "Pass only one of them.")
    if context is not None and not fit:
        raise GlmMlxError("--context only applies to --fit", "Pass --fit MAC with it, e.g. --fit m3-ultra-512 --context 65536.")
    if recipe_file:
        return Recipe.load(recipe_file)
    if quantize or bits or mode or group_size:  # -q alone: affine 4-bit, group 64 (mlx-lm's default)
        return Recipe.uniform(make_format(mode or "affine", bits, group_size))
    if target_size:
        return allocate(args, parse_size(target_size), mtp, name=f"budget {target_size}", importance=importance)
    if fit:
        mac = get_mac(fit)
        ctx = args.max_position_embeddings if context is None else context
        if importance is None:
            return best_recipe_for(args, mac, ctx, mtp)
        return allocate(args, weights_budget(args, mac, ctx, mtp), mtp, name=f"mixed for {mac.name} at {ctx:,} tokens",
                        importance=importance)
    return default_recipe()


def _importance(calibration: Path, source_folder: Path, dst: Path, stream: bool, max_tokens: int, force: bool):
    """(Importance, id): a saved imatrix (.safetensors), or a calibration pass over a text file
    (cached in the output's work folder, so a resumed conversion does not calibrate again)."""
    from glm_mlx.model.glm5_next_config import is_glm5_next
    from glm_mlx.quantize.converter import WORK, importance_key
    from glm_mlx.quantize.imatrix import Importance, calibrate
    from glm_mlx.quantize.next_imatrix import calibrate_next
    from glm_mlx.quantize.source import Source

    try:
        data = calibration.read_bytes()
    except OSError as e:
        raise GlmMlxError(f"cannot read calibration file {calibration}: {e.strerror or e}", "Check the path.") from None
    if calibration.suffix == ".safetensors":
        try:
            return Importance.load(calibration), hashlib.sha256(data).hexdigest()[:16]
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise GlmMlxError(f"{calibration} is not an imatrix written by glm-mlx ({e})",
                              "Pass a text file, or the imatrix.safetensors of an earlier conversion.") from None
    if stream:
        raise GlmMlxError("--calibration with a text file needs the whole source on disk, which --stream avoids",
                          "Download the source first (glm-mlx download), or pass the imatrix.safetensors of an earlier conversion.")
    key = importance_key(data, {"window": CALIBRATION_WINDOW, "max_tokens": max_tokens})
    cached = dst / WORK / f"imatrix-{key}.safetensors"
    if cached.exists() and not force:
        return Importance.load(cached), key
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    try:
        _quiet_transformers()  # it warns that the text is longer than the model's context: it is cut into windows
        ids = load_tokenizer(source_folder).encode(data.decode("utf-8"))[:max_tokens]
    except UnicodeDecodeError:
        raise GlmMlxError(f"calibration file {calibration} is not UTF-8 text") from None
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing tokenizer
        raise GlmMlxError(f"cannot load the source's tokenizer: {str(e).splitlines()[0]}",
                          "Calibration needs tokenizer files in the source folder.") from None
    chunks = [ids[i:i + CALIBRATION_WINDOW] for i in range(0, len(ids), CALIBRATION_WINDOW)]
    if not chunks:
        raise GlmMlxError(f"calibration file {calibration} is empty")
    stderr.print(f"Calibrating on {len(ids):,} tokens of {calibration.name} (one layer in memory at a time)")
    source = Source(source_folder)  # GLM-5.3-Flash: through its own blocks (hyper-connections, KDA)
    imp = (calibrate_next if is_glm5_next(source.config) else calibrate)(source, chunks)
    cached.parent.mkdir(parents=True, exist_ok=True)
    imp.save(cached)
    return imp, key


_DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "f16": "float16",
                "float32": "float32", "fp32": "float32", "f32": "float32"}


def _dtype(name: str | None) -> str | None:
    """--dtype's value as a config dtype name (bf16 -> bfloat16); None when not given."""
    if name is None:
        return None
    if name.strip().lower() not in _DTYPE_NAMES:
        raise GlmMlxError(f"--dtype must be bfloat16, float16 or float32 (got {name!r})",
                          "Quantized weights take --bits/--mode; --dtype is for the weights stored unquantized.")
    return _DTYPE_NAMES[name.strip().lower()]


def _unquantized_as(recipe, fmt):
    """`recipe` with every unquantized format (bf16, f16, f32) replaced by `fmt`."""
    import dataclasses

    def swap(f):
        return f if f.quantized else fmt

    return dataclasses.replace(recipe, default=swap(recipe.default),
                               rules=[dataclasses.replace(r, format=swap(r.format)) for r in recipe.rules])


def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()


def convert(
    src: Annotated[str, typer.Argument(help="HF checkpoint: a local folder, or a repo id (owner/name).")],
    dst: Annotated[Path, typer.Argument(help="Output folder for the MLX checkpoint.")],
    recipe_file: Annotated[Optional[Path], typer.Option("--recipe", help="Recipe JSON (e.g. from glm-mlx fit --solve --out).")] = None,
    bits: Annotated[Optional[int], typer.Option("--bits", help="Uniform recipe: bits (affine 2,3,4,5,6,8).")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="Uniform recipe: affine, mxfp4, nvfp4 or mxfp8.")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="Uniform recipe: affine group size (32, 64, 128).")] = None,
    target_size: Annotated[Optional[str], typer.Option("--target-size", help="Mixed precision at most this size, e.g. 361GB.")] = None,
    fit: Annotated[Optional[str], typer.Option("--fit", help="Best recipe for this Mac, e.g. m3-ultra-512.")] = None,
    context: Annotated[Optional[int], typer.Option("--context", help="With --fit: context to leave room for [default: max].")] = None,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="Text file for the importance matrix (or a saved imatrix.safetensors): importance-weighted quantization and measured sensitivities.")] = None,
    calibration_tokens: Annotated[int, typer.Option("--calibration-tokens", help="Most calibration tokens used.")] = 65536,
    method: Annotated[Optional[str], typer.Option("--method", help="Rounding: rtn (mx.quantize) or iq (importance-weighted) [default: iq with --calibration, else the recipe's].")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="SRC is a repo id: fetch one source shard at a time and delete it when done.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="With a repo id: branch, tag or commit.")] = None,
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest output shard.")] = "5GB",
    force: Annotated[bool, typer.Option("--force", help="Overwrite a finished (or differently started) conversion in DST.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary instead of the folder.")] = False,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="What unquantized weights (and affine scales and biases) are stored as: bfloat16, float16 or float32 [default: the source's dtype].", show_default=False)] = None,
    dequantize: Annotated[bool, typer.Option("--dequantize", "-d", help="Write an MLX-quantized or FP8 checkpoint back unquantized (bfloat16, or --dtype), streaming shard by shard.")] = False,
    upload_repo: Annotated[Optional[str], typer.Option("--upload-repo", help="Then upload the result to this Hub repo (owner/name; created if missing; HF_TOKEN or `hf auth login`).", show_default=False)] = None,
    quantize: Annotated[bool, typer.Option("--quantize", "-q", help="mlx-lm's spelling: a uniform recipe, affine 4-bit, group 64 unless --q-bits/--q-group-size/--q-mode say otherwise.")] = False,
    q_bits: Annotated[Optional[int], typer.Option("--q-bits", help="mlx-lm's spelling of --bits.", show_default=False)] = None,
    q_group_size: Annotated[Optional[int], typer.Option("--q-group-size", help="mlx-lm's spelling of --group-size.", show_default=False)] = None,
    q_mode: Annotated[Optional[str], typer.Option("--q-mode", help="mlx-lm's spelling of --mode.", show_default=False)] = None,
):
    """Convert an HF checkpoint (BF16 or FP8) into a quantized MLX checkpoint.

    Memory stays bounded (a block of one tensor at a time). Output shards are written under temporary names and renamed; an interrupted run resumes when re-run with the same arguments. Free disk is checked against the predicted size first, and the result is verified against the planner's prediction.

    Example: glm-mlx convert ~/models/GLM-5.1 ~/models/GLM-5.1-mlx --target-size 361GB

    Example: glm-mlx convert zai-org/GLM-5.1-FP8 ~/models/GLM-5.1-mlx --stream --fit m3-ultra-512 --context 131072

    Example: glm-mlx convert ./glm-mini ./glm-mini-iq4 --bits 4 --calibration calib.txt

    Example: glm-mlx convert zai-org/GLM-5.1-FP8 ~/models/GLM-5.1-bf16 --stream --dequantize

    Example: glm-mlx convert ./GLM-5.1 ./GLM-5.1-4bit -q --upload-repo me/GLM-5.1-4bit
    """
    from glm_mlx.model.config import config_dtype
    from glm_mlx.model.checkpoint import Checkpoint
    from glm_mlx.quantize import converter
    from glm_mlx.quantize.output_dir import refuse_foreign
    from glm_mlx.quantize.formats import unquantized
    from glm_mlx.quantize.macs import parse_size
    from glm_mlx.disk import fmt_bytes
    from glm_mlx.quantize.recipe import METHODS, Recipe
    from glm_mlx.quantize.source import open_source, quantization_kind

    if method is not None and method not in METHODS:
        raise GlmMlxError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    bits = _alias({"--bits": bits, "--q-bits": q_bits})
    group_size = _alias({"--group-size": group_size, "--q-group-size": q_group_size})
    mode = _alias({"--mode": mode, "--q-mode": q_mode})
    uniform = "/".join(n for n, v in (("-q", quantize), ("--bits", bits), ("--mode", mode), ("--group-size", group_size)) if v)
    dtype = _dtype(dtype)
    if dequantize:
        recipe_given = [n for n, v in (("--recipe", recipe_file), (uniform, uniform), ("--target-size", target_size),
                                       ("--fit", fit), ("--calibration", calibration), ("--method", method)) if v]
        if recipe_given:
            raise GlmMlxError(f"--dequantize writes unquantized weights: {recipe_given[0]} does not apply",
                              f"Drop {recipe_given[0]}, or drop --dequantize to quantize.")
    if upload_repo is not None:
        from glm_mlx.hub import upload as hub_upload

        hub_upload.check_upload_repo(upload_repo)
    dst = dst.expanduser()
    if (dst / converter.MANIFEST).exists() and not force:
        hint = "Pass --force to overwrite it, or choose another folder."
        if upload_repo is not None:
            hint += f" To upload it as it is: hf upload {upload_repo} {dst}"
        raise converter.ConvertError(f"{dst} already holds a finished conversion", hint)
    fetcher = None
    if stream:
        from glm_mlx.quantize.stream import HubFetcher

        if Path(src).expanduser().exists():
            raise GlmMlxError(f"--stream takes a repo id, and {src} is a local path", "Drop --stream to convert a local folder.")
        fetcher = HubFetcher(src, dst, revision)
        source = fetcher.source
    else:
        source = open_source(Checkpoint.open(src))
        converter.check_paths(source.folder, dst)  # before calibration caches anything in dst
        if calibration is not None:
            refuse_foreign(dst)  # calibration writes its cache into dst: someone else's folder is refused first
    kind = quantization_kind(source.config)
    if dequantize and kind not in ("mlx", "fp8"):
        raise GlmMlxError(f"{src} is not quantized: there is nothing to dequantize" if kind is None else
                          f"{src} is quantized with {kind}, which --dequantize cannot read (it reads MLX-quantized and FP8 checkpoints)",
                          "Drop --dequantize (--dtype sets the dtype of the unquantized weights)." if kind is None else
                          "Convert from the checkpoint's original BF16 weights.")
    if kind == "mlx" and not dequantize:
        raise converter.ConvertError(f"{src} is already an MLX-quantized checkpoint",
                                     "Pass --dequantize to write it unquantized, or convert from the original HF checkpoint (BF16 or FP8).")
    args = converter.source_args(source.config, dtype)  # Glm5NextArgs for GLM-5.3-Flash (glm5_next)
    mtp = converter.mtp_in_source(args, source.weight_map)
    importance, imp_id = (None, None)
    if calibration is not None:
        importance, imp_id = _importance(calibration, source.folder, dst, stream, calibration_tokens, force)
    if dequantize:
        out_dtype = config_dtype(args.extra)
        recipe = Recipe.uniform(unquantized(out_dtype), name=f"dequantized to {out_dtype}")
    else:
        recipe = _choose_recipe(args, mtp, importance, recipe_file, bits, mode, group_size, target_size, fit, context,
                                uniform or "--bits/--mode/--group-size", quantize)
        if dtype is not None:  # --dtype says what "unquantized" means: a recipe's bf16/f16/f32 rules follow it
            recipe = _unquantized_as(recipe, unquantized(dtype))
    recipe.method = method or ("iq" if importance is not None else recipe.method)
    if upload_repo is not None:  # before hours of converting: a missing token or write access fails now
        hub_upload.create_repo(upload_repo)
    result = converter.convert(source.folder, dst, recipe, importance=importance, importance_id=imp_id,
                               shard_size=int(parse_size(shard_size)), force=force, progress=True, fetcher=fetcher,
                               dtype=dtype)
    plan = result.plan
    for note in result.notes:
        stderr.print(f"Note: {note}", soft_wrap=True)
    stderr.print(f"Converted {src} -> {dst}: {len(plan.shards)} shards, {fmt_bytes(result.tensor_bytes)} of weights "
                 f"(= the planner's prediction), recipe {recipe.name or recipe.default.name}, rounding {recipe.method}; "
                 f"{len(result.written)} shards written now, {len(plan.shards) - len(result.written)} already there.", soft_wrap=True)
    url = None
    if upload_repo is not None:
        files = json.loads((dst / converter.MANIFEST).read_text())["files"]
        url = hub_upload.upload_files(dst, upload_repo, files)
        stderr.print(f"Uploaded {len(files)} files to {url}", soft_wrap=True)
    if as_json:
        typer.echo(json.dumps({"path": str(dst), "shards": len(plan.shards), "written": result.written,
                               "tensor_bytes": result.tensor_bytes, "recipe": recipe.to_dict(),
                               **({"uploaded": url} if url else {})}))
    else:
        typer.echo(str(dst))
