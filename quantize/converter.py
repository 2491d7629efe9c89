"""Streaming converter: an HF checkpoint folder (BF16/FP32, or FP8 with `weight_scale_inv`) -> an MLX
folder that glm_mlx and mlx-lm load, without ever holding more than a block of one tensor. An MLX-quantized
folder is a source too, for an unquantized recipe only (`convert --dequantize`; source.MlxSource).

Everything is planned from config.json + recipe before a byte is written: the output tensors are the
inventory (the model's own names: stacked experts, kv_b_proj split into embed_q / unembed_out), each
priced by the one format table, packed in order into shards of at most `shard_size` bytes whose
safetensors headers are therefore known up front. Each shard is written piece by piece at its planned
offsets (an expert, or a block of rows: quantization groups never cross rows) into `<shard>.tmp`,
synced and renamed; a rerun with the same arguments (and an unchanged source) skips the shards already
renamed and, the work being deterministic, writes the same bytes. `manifest.json` is written last: its
presence marks a finished conversion, which is never overwritten without `force`. What may be deleted
or resumed in the output folder, and the fingerprint that decides it, are in output_dir.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from glm_mlx import atomic
from glm_mlx.disk import check_writable, fmt_bytes, free_bytes
from glm_mlx.model.config import ModelArgs, config_dtype
from glm_mlx.model.checkpoint import INDEX_FILE, config_args

from . import next_convert
from .imatrix import Importance
from .inventory import Tensor, inventory
from .conversion_plan import Item, Plan, Shard
from .next_prices import is_next
from .output_dir import (MANIFEST, MANIFEST_FORMAT, TOKENIZER_FILES, WORK, ConvertError, check_paths,
                         fingerprint, prepare_output, write_plan)
from .planner import price
from .quantizer import quantize
from .recipe import Recipe, quantization_config, resolve
from .progress import Bars
from .source import MX_NAME, Source, ShardWriter, layout, open_source, read_header

SHARD_SIZE = 5 * 10**9
BLOCK_ELEMS = 1 << 22  # elements per quantized block of rows (~16 MB of float32)
_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
DTYPES = tuple(_DTYPES)  # what --dtype takes: the dtype of every weight stored unquantized
_IGNORED = ("_scale_inv", ".input_scale", "rotary_emb.inv_freq")


class DiskSpaceError(ConvertError):
    hint = "Free disk space or write to another disk; finished shards of an interrupted run are kept."


def source_names(args: ModelArgs, t: Tensor) -> list[str]:
    """The HF checkpoint tensors an output tensor is made from."""
    if ".mlp.switch_mlp." in t.name:
        return [t.name.replace(".switch_mlp.", f".experts.{e}.") for e in range(args.n_routed_experts)]
    if t.name.endswith((".embed_q.weight", ".unembed_out.weight")):
        return [t.name.rsplit(".", 2)[0] + ".kv_b_proj.weight"]
    return [t.name]


def _entry_bound(array) -> int:
    """Most header bytes one array's entry takes (offsets counted at 13 digits): files stay <= shard_size."""
    name, dtype, shape, _ = array
    return len(json.dumps({name: {"dtype": dtype, "shape": list(shape), "data_offsets": [10**12, 10**12]}}))


def with_dtype(config: dict, dtype: str | None) -> dict:
    """`config` with its model dtype set to `dtype` (None: unchanged); a nested text_config's too."""
    if dtype is None:
        return config
    if dtype not in _DTYPES:
        raise ConvertError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    text = config.get("text_config")
    if isinstance(text, dict) and ("dtype" in text or "torch_dtype" in text):
        config = {**config, "text_config": with_dtype(text, dtype)}
    return {**config, "dtype": dtype, **({"torch_dtype": dtype} if "torch_dtype" in config else {})}


def source_args(config: dict, dtype: str | None = None):
    """The args for a source's config.json (the model's reading): Glm5NextArgs for GLM-5.3-Flash (glm5_next),
    else ModelArgs."""
    return config_args(with_dtype(config, dtype))


def source_naming(args, source: Source):
    """How a glm5_next source names its tensors (next_convert.NextNames); None for GLM-5.1 or an MLX layout."""
    return next_convert.NextNames(source.weight_map) if is_next(args) and not source.mlx_layout else None


def make_plan(args: ModelArgs, recipe: Recipe, mtp: bool, shard_size: int = SHARD_SIZE, mlx_layout: bool = False,
              names=None) -> Plan:
    """`mlx_layout`: the source already has the output's tensor names and shapes (an MLX checkpoint).
    `names`: a glm5_next source's naming (source_naming; default: the reference checkpoint's layout)."""
    dtype = _DTYPES[config_dtype(args.extra)]
    if names is None and is_next(args) and not mlx_layout:
        names = next_convert.NextNames()
    tensors = inventory(args, mtp)
    res = resolve(args, recipe, mtp, tensors)
    items = []
    for t in tensors:
        fmt = res.formats.get(t.module) if t.quantizable and t.name.endswith(".weight") else None
        if fmt is not None and fmt.quantized:
            arrays = [(f"{t.module}.{suffix}", "U32" if suffix == "weight" else MX_NAME[dtype] if fmt.mode == "affine" else "U8",
                       shape, math.prod(shape) * esize) for suffix, (shape, esize) in fmt.arrays(t.shape, t.dtype_bytes).items()]
        else:
            fmt = None
            name = "F32" if t.dtype_bytes == 4 else MX_NAME[dtype]
            arrays = [(t.name, name, t.shape, t.numel * t.dtype_bytes)]
        sources = [t.name] if mlx_layout else source_names(args, t)
        items.append(Item(t, fmt, arrays, names.sources(t, sources) if names is not None else sources))
    groups, cur, size = [], [], 64  # 64: the header's length prefix, metadata and padding
    for it in items:  # greedy, in inventory order: a tensor never spans two shards
        need = it.nbytes + sum(_entry_bound(a) for a in it.arrays)
        if cur and size + need > shard_size:
            groups.append(cur)
            cur, size = [], 64
        cur.append(it)
        size += need
    groups.append(cur)
    shards = []
    for i, g in enumerate(groups):
        s = Shard(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", g)
        s.header, s.offsets = layout([a for it in g for a in it.arrays])
        shards.append(s)
    plan = Plan(args, recipe, mtp, dtype, shards)
    predicted = price(args, recipe, mtp).total
    if plan.tensor_bytes != predicted:  # one format table prices both: a mismatch is a bug
        raise ConvertError(f"planned {plan.tensor_bytes:,} bytes of tensors but the planner predicts {predicted:,}")
    return plan


def check_source(source: Source, plan: Plan, names=None) -> list[str]:
    """Every tensor the plan needs is in the checkpoint, and nothing is left over unexplained; the notes
    to show (a glm5_next checkpoint's vision tensors, skipped). `names`: source_naming's."""
    n = plan.args.num_hidden_layers
    needed = {s for sh in plan.shards for it in sh.items for s in it.sources}
    missing = sorted(needed - set(source.weight_map))
    if missing:
        raise ConvertError(f"missing tensor {missing[0]} in {source.folder}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""),
                           "The checkpoint does not match its config.json, or the download is incomplete.")
    for key in source.weight_map:
        k = key if names is None else names.canonical(key)
        if k is None or key in needed:  # None: a vision tensor (counted in the note)
            continue
        parts = k.split(".")
        layer = int(parts[2]) if k.startswith("model.layers.") else None
        if k.endswith(_IGNORED) or (layer is not None and (layer > n or (layer == n and not plan.mtp))):
            continue
        if layer == n and (".embed_tokens." in k or ".shared_head.head." in k):
            continue  # the MTP layer's copies of the shared embedding and head
        raise ConvertError(f"unexpected tensor {key} in {source.folder}", "The checkpoint does not match its config.json.")
    return next_convert.vision_note(names) if names is not None else []


def check_importance(plan: Plan, importance: Importance | None) -> None:
    """An imatrix made for another model would broadcast wrongly: refuse it by name."""
    for it in (it for s in plan.shards for it in s.items if importance is not None and it.fmt is not None):
        imp = importance.get(it.t.module)
        lead = it.t.shape[:-2] if len(it.t.shape) == 3 else ()
        if imp is not None and tuple(imp.shape) not in ((it.t.shape[-1],), (*lead, it.t.shape[-1])):
            raise ConvertError(f"the importance matrix has shape {list(imp.shape)} for {it.t.module}, "
                               f"which has input width {it.t.shape[-1]}", "Calibrate on this model (--calibration TEXT).")


def mtp_in_source(args: ModelArgs, weight_map) -> bool:
    if is_next(args):  # nested names (model.language_model.layers.N)
        return next_convert.mtp_in_source(args, weight_map)
    prefix = f"model.layers.{args.num_hidden_layers}."
    return bool(args.num_nextn_predict_layers) and any(k.startswith(prefix) for k in weight_map)


# --- producing the bytes ----------------------------------------------------------------------------------
def pieces(item: Item, source: Source, args: ModelArgs, importance: Importance | None, block_elems: int):
    """(first row, float32 rows, importance of their input channels) covering the tensor in row order;
    rows are counted over all leading dims (expert e's row r is row e * out + r)."""
    t = item.t
    imp = importance.get(t.module) if importance is not None else None
    if source.mlx_layout:  # an MLX checkpoint (read dequantized): the same names and shapes, rows over leading dims
        if len(t.shape) < 2:
            yield 0, source.read(t.name), None
            return
        rows, width = math.prod(t.shape[:-1]), t.shape[-1]
        step = max(1, block_elems // width)
        for a in range(0, rows, step):
            yield a, source.read(t.name, (a, min(rows, a + step))), None
        return
    if is_next(args) and t.name.endswith(".self_attn.conv1d.weight"):  # q/k/v_conv1d joined (small)
        yield 0, next_convert.conv_weight(source, item.sources), None
        return
    if t.name.endswith((".embed_q.weight", ".unembed_out.weight")):
        N, H, C = args.qk_nope_head_dim, args.num_attention_heads, args.kv_lora_rank
        w = source.read(item.sources[0]).reshape(H, N + args.v_head_dim, C)
        w = w[:, :N, :].swapaxes(-1, -2) if ".embed_q." in t.name else w[:, N:, :]  # [H, C, N] / [H, V, C]
        for h in range(H):
            yield h * t.shape[1], mx.contiguous(w[h]), None if imp is None else imp[h]
        return
    if len(t.shape) < 2:
        yield 0, source.read(item.sources[0]), None
        return
    rows, width = t.shape[-2], t.shape[-1]
    step = max(128, block_elems // width // 128 * 128)  # a multiple of 128: FP8 scale blocks stay whole
    for e, name in enumerate(item.sources):
        for a in range(0, rows, step):
            b = min(rows, a + step)
            yield e * rows + a, source.read(name, (a, b)), None if imp is None else (imp[e] if imp.ndim == 2 else imp)


def write_item(writer: ShardWriter, shard: Shard, item: Item, source: Source, plan: Plan, importance, method: str,
               block_elems: int, advance=None) -> None:
    total_rows = {name: max(1, math.prod(shape[:-1])) for name, _, shape, _ in item.arrays}
    by_suffix = {name.rsplit(".", 1)[1]: (name, nbytes // total_rows[name]) for name, _, _, nbytes in item.arrays}
    for row, block, imp in pieces(item, source, plan.args, importance, block_elems):
        if item.fmt is None:
            out = {"weight": block.astype(mx.float32 if item.arrays[0][1] == "F32" else plan.dtype)}
        else:
            out = quantize(block, item.fmt, imp, method=method, dtype=plan.dtype)
        mx.eval(out)
        for suffix, arr in out.items():
            name, row_bytes = by_suffix[suffix if item.fmt is not None else item.t.name.rsplit(".", 1)[1]]
            n = writer.write(shard.offsets[name][0] + row * row_bytes, arr)
            if advance:
                advance(n)
        del out, block
    mx.clear_cache()


# --- the output folder (ownership, resume and --force rules: output_dir.py) -----------------------------------
def output_files(plan: Plan, source: Source, importance: Importance | None) -> list[str]:
    """Every file this conversion writes into the output folder: what plan.json records as ours."""
    return [*(s.name for s in plan.shards), "config.json", INDEX_FILE, "recipe.json", MANIFEST,
            *(n for n in TOKENIZER_FILES if (source.folder / n).exists()), *(["imatrix.safetensors"] if importance is not None else [])]


def check_disk(dst: Path, todo: list[Shard], plan: Plan, extra: int = 0) -> None:
    need = sum(s.size for s in todo) + extra
    free = free_bytes(dst)
    if need > free:
        check_writable(dst)  # read-only, /proc-like or a file: say so, not "0 B free"
        done = plan.file_bytes - sum(s.size for s in todo)
        more = f" (+ {fmt_bytes(extra)} of source shards)" if extra else ""
        raise DiskSpaceError(f"not enough disk space in {dst}: the conversion needs {fmt_bytes(need)} more{more}, "
                             f"only {fmt_bytes(free)} free (output {fmt_bytes(plan.file_bytes)}, {fmt_bytes(done)} already written)")


# --- finishing --------------------------------------------------------------------------------------------
def write_metadata(src: Path, dst: Path, plan: Plan, fp: dict, importance: Importance | None) -> None:
    config = json.loads((src / "config.json").read_text())
    dtype = next(k for k, v in _DTYPES.items() if v == plan.dtype)
    if config_dtype(config) != dtype:  # --dtype: the config names what the weights now are
        config = with_dtype(config, dtype)
    config.pop("quantization_config", None)  # the source's (e.g. FP8) scheme no longer applies
    config.pop("quantization", None)
    if isinstance(config.get("text_config"), dict):  # glm5_next: the language model's own copy
        config["text_config"] = {k: v for k, v in config["text_config"].items()
                                 if k not in ("quantization_config", "quantization")}
    q = quantization_config(plan.args, plan.recipe, plan.mtp)
    if q is not None:
        config["quantization"] = config["quantization_config"] = q  # mlx-lm writes both
    atomic.write_json(dst / "config.json", dict(sorted(config.items())))
    for name in TOKENIZER_FILES:  # the same list as output_files: plan.json already names each as ours
        if (src / name).exists():
            atomic.write_bytes(dst / name, (src / name).read_bytes())
    weight_map = {a[0]: s.name for s in plan.shards for it in s.items for a in it.arrays}
    index = {"metadata": {"total_size": plan.tensor_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    atomic.write_json(dst / INDEX_FILE, index)
    plan.recipe.save(dst / "recipe.json")
    if importance is not None:
        importance.save(dst / "imatrix.safetensors")


def write_manifest(dst: Path, plan: Plan, fp: dict, importance: Importance | None, files: list[str]) -> None:
    """Written last: its presence marks a finished, verified conversion; `files` (what it wrote) is what a
    later --force may delete."""
    manifest = {"format": MANIFEST_FORMAT, "version": 2, "files": sorted(files), "recipe": plan.recipe.to_dict(), "method": fp["method"],
                "mtp": plan.mtp, "source": fp["source"], "tensor_bytes": plan.tensor_bytes, "file_bytes": plan.file_bytes,
                "shards": [{"name": s.name, "bytes": s.size, "tensors": sum(len(i.arrays) for i in s.items)} for s in plan.shards],
                "imatrix": None if importance is None else {"tokens": importance.tokens, "key": fp["imatrix"],
                                                            "defaults": importance.defaults}}
    atomic.write_json(dst / MANIFEST, manifest)


def verify(dst: Path, plan: Plan) -> int:
    """Every planned array present with its dtype and shape; total bytes == the planner's; it loads."""
    from glm_mlx.model.loading import load_model

    total = 0
    for s in plan.shards:
        found = read_header(dst / s.name)
        want = {a[0]: a for it in s.items for a in it.arrays}
        if set(found) != set(want):
            odd = sorted(set(found) ^ set(want))[0]
            raise ConvertError(f"{s.name}: tensor {odd} is {'missing' if odd in want else 'unexpected'}")
        for name, e in found.items():
            if (e.dtype, e.shape) != (want[name][1], tuple(want[name][2])):
                raise ConvertError(f"{s.name}: {name} is {e.dtype}{list(e.shape)}, planned {want[name][1]}{list(want[name][2])}")
            total += e.end - e.start
    predicted = price(plan.args, plan.recipe, plan.mtp).total
    if total != predicted:
        raise ConvertError(f"wrote {total:,} bytes of tensors, the planner predicted {predicted:,}")
    load_model(dst, lazy=True, mtp=plan.mtp)
    return total


@dataclass
class Result:
    path: Path
    plan: Plan
    written: list[str]  # shards written by this run (the rest were already there)
    tensor_bytes: int
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. a glm5_next source's vision tensors, skipped


def importance_key(text: bytes, params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode() + text).hexdigest()[:16]


def convert(src, dst, recipe: Recipe, *, importance: Importance | None = None, importance_id: str | None = None,
            method: str | None = None, shard_size: int = SHARD_SIZE, force: bool = False, progress: bool = False,
            fetcher=None, block_elems: int = BLOCK_ELEMS, dtype: str | None = None) -> Result:
    """Convert the HF checkpoint folder `src` into the MLX folder `dst` under `recipe`.

    `importance` (quantize.imatrix) feeds the "iq" method; `importance_id` identifies it for resuming.
    `method` defaults to the recipe's. `fetcher` (quantize.stream) provides source shards on demand
    and deletes them once no later shard needs them. Re-running after an interruption resumes.
    `dtype` (bfloat16, float16, float32) is what unquantized weights (and affine scales and biases) are
    stored as; default: the source config's dtype. An MLX-quantized source is only written unquantized
    (a recipe of bf16/f16/f32 formats: dequantizing); re-quantizing it would compound rounding errors.
    """
    dst = Path(dst).expanduser()
    if fetcher is None:  # (--stream's source lives in dst/.glm-mlx-source by design)
        check_paths(src, dst)
    recipe = dataclasses.replace(recipe, method=method or recipe.method)  # recipe.json records the rounding
    method = recipe.method
    source = open_source(Path(src)) if fetcher is None else fetcher.source
    args = source_args(source.config, dtype)
    names = source_naming(args, source)
    plan = make_plan(args, recipe, mtp_in_source(args, source.weight_map), shard_size, mlx_layout=source.mlx_layout,
                     names=names)
    if source.mlx_layout and any(it.fmt is not None for s in plan.shards for it in s.items):
        raise ConvertError(f"{source.folder} is already an MLX-quantized checkpoint",
                           "Pass --dequantize to write it unquantized, or convert from the original HF checkpoint (BF16 or FP8).")
    notes = check_source(source, plan, names)
    check_importance(plan, importance)
    fp = fingerprint(source, plan, method, importance_id, block_elems, fetcher.origin if fetcher else None)
    if plan.dtype != _DTYPES[config_dtype(source.config)]:  # the same shards in another dtype: other bytes
        fp["dtype"] = config_dtype(args.extra)
    todo, files = prepare_output(dst, fp, plan, output_files(plan, source, importance), force)
    check_disk(dst, todo, plan, fetcher.peak_bytes(todo) if fetcher else 0)
    write_plan(dst, fp, files)  # before any output file exists: it names them all as ours
    written = []
    with Bars(progress, plan.file_bytes, plan.file_bytes - sum(s.size for s in todo), dst.name) as bars:
        for i, shard in enumerate(todo):
            if fetcher is not None:
                fetcher.ensure(shard_sources(shard, source), log=bars.log)
            writer = ShardWriter(dst / shard.name, shard.header, shard.size)
            task = bars.start(shard.name, shard.size, len(shard.header))
            try:
                for item in shard.items:
                    write_item(writer, shard, item, source, plan, importance, method, block_elems,
                               lambda n: bars.advance(task, n))
                writer.finish()
            except BaseException:
                writer.abort()
                raise
            bars.finish(task)
            written.append(shard.name)
            if fetcher is not None:
                later = set().union(*(shard_sources(s, source) for s in todo[i + 1:]))
                fetcher.release(shard_sources(shard, source) - later)
    write_metadata(source.folder, dst, plan, fp, importance)
    total = verify(dst, plan)
    write_manifest(dst, plan, fp, importance, files)
    if fetcher is not None:
        fetcher.cleanup()
    shutil.rmtree(dst / WORK, ignore_errors=True)
    return Result(dst, plan, written, total, notes)


def shard_sources(shard: Shard, source: Source) -> set[str]:
    """The source files an output shard reads (FP8 scales, MLX scales and biases included)."""
    return set().union(*(source.files_for(n) for it in shard.items for n in it.sources))
