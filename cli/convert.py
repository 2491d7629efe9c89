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


def _choose_recipe(args, mtp, importance, recipe_file, bits, mode, group_size, target_size, fit, context):
    from glm_mlx.quantize.allocate import allocate
    from glm_mlx.quantize.formats import make_format
    from glm_mlx.quantize.macs import get_mac, parse_size
    from glm_mlx.quantize.planner import best_recipe_for, weights_budget
    from glm_mlx.quantize.recipe import Recipe, default_recipe

    given = [n for n, v in (("--recipe", recipe_file), ("--bits/--mode/--group-size", bits or mode or group_size),
                            ("--target-size", target_size), ("--fit", fit)) if v]
    if len(given) > 1:
        raise GlmMlxError(f"{' and '.join(given)} each choose the recipe", "Pass only one of them.")
    if context is not None and not fit:
        raise GlmMlxError("--context only applies to --fit", "Pass --fit MAC with it, e.g. --fit m3-ultra-512 --context 65536.")
    if recipe_file:
        return Recipe.load(recipe_file)
    if bits or mode or group_size:
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
    from glm_mlx.quantize.converter import WORK, importance_key
    from glm_mlx.quantize.imatrix import Importance, calibrate
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
    imp = calibrate(Source(source_folder), chunks)
    cached.parent.mkdir(parents=True, exist_ok=True)
    imp.save(cached)
    return imp, key


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
):
    """Convert an HF checkpoint (BF16 or FP8) into a quantized MLX checkpoint.

    Memory stays bounded (a block of one tensor at a time). Output shards are written under temporary names and renamed; an interrupted run resumes when re-run with the same arguments. Free disk is checked against the predicted size first, and the result is verified against the planner's prediction.

    Example: glm-mlx convert ~/models/GLM-5.1 ~/models/GLM-5.1-mlx --target-size 361GB

    Example: glm-mlx convert zai-org/GLM-5.1-FP8 ~/models/GLM-5.1-mlx --stream --fit m3-ultra-512 --context 131072

    Example: glm-mlx convert ./glm-mini ./glm-mini-iq4 --bits 4 --calibration calib.txt
    """
    from glm_mlx.config import ModelArgs
    from glm_mlx.loading import resolve_path
    from glm_mlx.quantize import converter
    from glm_mlx.quantize.macs import parse_size
    from glm_mlx.quantize.progress import fmt_bytes
    from glm_mlx.quantize.recipe import METHODS
    from glm_mlx.quantize.source import Source

    if method is not None and method not in METHODS:
        raise GlmMlxError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    dst = dst.expanduser()
    if (dst / converter.MANIFEST).exists() and not force:
        raise converter.ConvertError(f"{dst} already holds a finished conversion", "Pass --force to overwrite it, or choose another folder.")
    fetcher = None
    if stream:
        from glm_mlx.quantize.stream import HubFetcher

        if Path(src).expanduser().exists():
            raise GlmMlxError(f"--stream takes a repo id, and {src} is a local path", "Drop --stream to convert a local folder.")
        fetcher = HubFetcher(src, dst, revision)
        source = fetcher.source
    else:
        source = Source(resolve_path(src))
        converter.check_paths(source.folder, dst)  # before calibration caches anything in dst
    args = ModelArgs.from_dict(source.config)
    mtp = converter.mtp_in_source(args, source.weight_map)
    importance, imp_id = (None, None)
    if calibration is not None:
        importance, imp_id = _importance(calibration, source.folder, dst, stream, calibration_tokens, force)
    recipe = _choose_recipe(args, mtp, importance, recipe_file, bits, mode, group_size, target_size, fit, context)
    recipe.method = method or ("iq" if importance is not None else recipe.method)
    result = converter.convert(source.folder, dst, recipe, importance=importance, importance_id=imp_id,
                               shard_size=int(parse_size(shard_size)), force=force, progress=True, fetcher=fetcher)
    plan = result.plan
    stderr.print(f"Converted {src} -> {dst}: {len(plan.shards)} shards, {fmt_bytes(result.tensor_bytes)} of weights "
                 f"(= the planner's prediction), recipe {recipe.name or recipe.default.name}, rounding {recipe.method}; "
                 f"{len(result.written)} shards written now, {len(plan.shards) - len(result.written)} already there.", soft_wrap=True)
    if as_json:
        typer.echo(json.dumps({"path": str(dst), "shards": len(plan.shards), "written": result.written,
                               "tensor_bytes": result.tensor_bytes, "recipe": recipe.to_dict()}))
    else:
        typer.echo(str(dst))
