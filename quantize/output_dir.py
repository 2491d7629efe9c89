"""The output folder of a conversion: which files in it are ours, when a rerun may resume, and what
`--force` may delete.

Ownership is recorded, never guessed from names: `.glm-mlx-convert/plan.json` names every file a
conversion will write before it writes any, and `manifest.json` (written last) names them again.
`--force` deletes only files so named (and our temp files of them). Anything else is someone else's:
kept untouched, unless this conversion would overwrite it (the same name) or a loader would read it
beside our shards (any other *.safetensors), which is refused. A folder holding files but no record
of a glm-mlx conversion is refused outright, `--force` or not, and so is an output folder that is,
holds or lies inside the source folder.

Resume fingerprint: the arguments, the planned shards and, for every source file, its size, mtime_ns
and a digest of its safetensors header (dtypes, shapes, offsets); a file in the Hugging Face cache
also records the blob it links to, which is named by its content hash; with --stream, the Hub commit
pins the content. Not a hash of every source byte: checking that on resume means reading the whole
source again (1.5 TB for GLM-5.1 in BF16), and with --stream the source shards of finished output
shards are already deleted. The header digest catches any change of layout (tensors swapped, re-
quantized, reshaped), size and mtime any ordinary rewrite (a download, a copy, an edit); what it
misses is an edit of tensor bytes that keeps the layout and the size and then puts the old mtime back.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from glm_mlx import atomic
from glm_mlx.errors import CheckpointError, GlmMlxError
from glm_mlx.model.checkpoint import INDEX_FILE

from .source import header_digest

if TYPE_CHECKING:
    from .conversion_plan import Plan, Shard
    from .source import Source

WORK = ".glm-mlx-convert"  # plan, imatrix, and (--stream) source shards of a conversion in progress
PLAN = "plan.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "glm-mlx conversion"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt")
# What a version-1 record (no file list) owned beside its shards: the files that converter always wrote.
_V1_FILES = (MANIFEST, "config.json", INDEX_FILE, "recipe.json", "imatrix.safetensors", *TOKENIZER_FILES)
_NOT_FILES = (".DS_Store",)  # the Finder's, in any folder it has shown


class ConvertError(GlmMlxError):
    """The conversion cannot start or did not produce what was planned."""

    hint = "Check the arguments; re-running the same command resumes an interrupted conversion."


# --- where the output may go ------------------------------------------------------------------------------
def check_paths(src, dst) -> None:
    """Refuse an output folder that is the source, lies inside it, or contains it (symlinks resolved):
    writing there could overwrite or delete the source's own shards."""
    s, d = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    hint = "Write the conversion to a new folder outside the source folder."
    if _within(d, s):
        where = "is the source folder" if _same(d, s) else f"is inside the source folder {s}"
        raise ConvertError(f"the output folder {d} {where}", hint)
    if _within(s, d):
        raise ConvertError(f"the source folder {s} is inside the output folder {d}", hint)


def _same(a: Path, b: Path) -> bool:
    try:  # samefile also sees through case-insensitive names and bind mounts
        return a == b or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _within(a: Path, b: Path) -> bool:
    """a is b or below it."""
    return any(_same(p, b) for p in (a, *a.parents))


# --- the resume fingerprint ------------------------------------------------------------------------------
def source_state(source: Source) -> dict:
    """Size, mtime_ns and header digest of every source file (see the module docstring for why not more)."""
    files = {}
    for f in source.files():
        p = source.folder / f
        try:
            st = p.stat()
        except FileNotFoundError:
            raise CheckpointError(f"missing shard {f} in {source.folder}", "The download is incomplete: download it again.") from None
        files[f] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "header": header_digest(p)}
        if p.is_symlink():  # the Hugging Face cache links each file to a blob named by its content hash
            files[f]["blob"] = Path(os.path.realpath(p)).name
    index = hashlib.sha256(json.dumps(source.weight_map, sort_keys=True).encode()).hexdigest()[:16]
    return {"files": files, "index": index}


def fingerprint(source: Source, plan: Plan, method: str, importance_key: str | None, block_elems: int,
                origin=None) -> dict:
    """What decides the output bytes: a rerun resumes only when this is unchanged."""
    return {"version": 2, "source": origin or source_state(source), "recipe": plan.recipe.to_dict(), "method": method,
            "mtp": plan.mtp, "imatrix": importance_key, "block_elems": block_elems,
            "shards": [[s.name, s.size] for s in plan.shards]}


def _source_change(old: dict, new: dict) -> str | None:
    """What differs between two fingerprints that differ only in their source, as a clause; else None."""
    if {k: v for k, v in old.items() if k != "source"} != {k: v for k, v in new.items() if k != "source"}:
        return None
    o, n = old.get("source"), new["source"]
    if not isinstance(o, dict) or "commit" in n or "commit" in o:
        return "the source is at another commit" if isinstance(o, dict) and o.get("commit") != n.get("commit") else None
    of, nf = o.get("files") or {}, n["files"]
    for f in sorted(set(of) | set(nf)):
        if f not in of or f not in nf:
            return f"{f} is {'new in' if f in nf else 'gone from'} the source"
        a, b = of[f], nf[f]
        for key, why in (("bytes", "changed size"), ("header", "has another safetensors header (dtypes, shapes or offsets)"),
                         ("blob", "links to another blob"), ("mtime_ns", "was modified (its mtime changed)")):
            if (a.get(key) if isinstance(a, dict) else a) != b.get(key):
                return f"source file {f} {why}"
    return "the source's index changed"


# --- what is ours ----------------------------------------------------------------------------------------
def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def owned_files(record) -> set[str]:
    """The files a plan.json or manifest.json names as written by its conversion (plain names only)."""
    if not isinstance(record, dict):
        return set()
    files = record.get("files")
    if files is None:  # version 1: no list, its shards and the fixed set of files beside them
        shards = (record.get("fingerprint") or record).get("shards")
        names = [s.get("name") if isinstance(s, dict) else s[0] for s in shards or () if isinstance(s, (dict, list)) and s]
        files = [*names, *_V1_FILES] if names else []
    return {n for n in files if isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")}


def _ours(name: str, owned: set[str]) -> bool:
    """Named by our record, or a temp file of such a name: ShardWriter's `<name>.tmp`, or
    glm_mlx.atomic's `.<name>.<random>.tmp`."""
    if name in owned:
        return True
    if not name.endswith(".tmp"):
        return False
    base = name[:-4]
    return base in owned or (base.startswith(".") and base[1:].rsplit(".", 1)[0] in owned)


def _finished(path: Path, shard: Shard) -> bool:
    """A shard under its final name was fsynced before its rename; still, skip it only if it is the planned
    file: its size and its header bytes (which hold every array's name, dtype, shape and offsets)."""
    try:
        if path.stat().st_size != shard.size:
            return False
        with open(path, "rb") as f:
            return f.read(len(shard.header)) == shard.header
    except OSError:
        return False


def write_plan(dst: Path, fp: dict, files) -> None:
    (dst / WORK).mkdir(parents=True, exist_ok=True)
    atomic.write_json(dst / WORK / PLAN, {"fingerprint": fp, "files": sorted(files)}, indent=1)


def _records(dst: Path):
    """(our manifest or None, our work plan or None, the files they own, dst's names, the foreign ones)."""
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"the output {dst} is a file", "Choose a folder.")
    manifest = _read(dst / MANIFEST)
    if not (isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT):
        manifest = None  # someone else's manifest.json is foreign like any other file
    work = (_read(dst / WORK / PLAN) or {}) if (dst / WORK / PLAN).exists() else None  # {}: unreadable, owns nothing
    owned = owned_files(manifest) | owned_files(work)
    names = sorted(p.name for p in dst.iterdir()) if dst.exists() else []
    foreign = [n for n in names if not n.startswith(".glm-mlx") and n not in _NOT_FILES and not _ours(n, owned)]
    return manifest, work, owned, names, foreign


def _refuse_unrecorded(dst: Path, foreign: list[str], owned: set[str]) -> None:
    if foreign and not owned:
        raise ConvertError(f"{dst} is not empty: it holds {foreign[0]}, which no glm-mlx conversion wrote",
                           "Choose a new or empty folder: --force only replaces what an earlier glm-mlx conversion wrote there.")


def refuse_foreign(dst: Path) -> None:
    """Refuse a file, or a folder holding files and no glm-mlx record, before anything (e.g. a calibration
    cache) is written into it. (A folder with our records is checked in full by prepare_output.)"""
    manifest, work, owned, _, foreign = _records(dst)
    if manifest is None and work is None:
        _refuse_unrecorded(dst, foreign, owned)


def prepare_output(dst: Path, fp: dict, plan: Plan, outputs: list[str], force: bool) -> tuple[list[Shard], list[str]]:
    """Check dst, remove (with force) our earlier conversion there; return (the shards still to write, the
    files to record as ours). Nothing is deleted or written before every check has passed."""
    manifest, work, owned, names, foreign = _records(dst)
    if manifest is not None and not force:
        raise ConvertError(f"{dst} already holds a finished conversion", "Pass --force to overwrite it, or choose another folder.")
    old_fp = (work.get("fingerprint") or (work if work.get("version") == 1 else None)) if isinstance(work, dict) else None
    resume = manifest is None and work is not None and old_fp == fp and not force
    if work is not None and not resume and not force and (old_fp is None or any((dst / n).exists() for n in owned)):
        change = _source_change(old_fp, fp) if old_fp else None
        if change:
            raise ConvertError(f"{dst} holds an unfinished conversion of an earlier state of the source: {change} since it started",
                               "Its finished shards were made from the old source: pass --force to start over "
                               "(it removes only this conversion's files).")
        raise ConvertError(f"{dst} holds an unfinished conversion started with other arguments (or another source)",
                           "Re-run it with the same arguments to resume, or pass --force to start over.")
    _refuse_unrecorded(dst, foreign, owned)
    for n in foreign:
        if n in outputs or n.endswith(".safetensors"):
            what = "this conversion would overwrite it" if n in outputs else "loaders would read it beside the new shards"
            raise ConvertError(f"{dst} holds {n}, which glm-mlx did not write, and {what}",
                               "Move it out of the folder, or choose another folder: glm-mlx never deletes what it did not write.")
    # Every check passed: from here on the folder changes.
    if resume:
        files = sorted(set(outputs) | {n for n in owned if (dst / n).exists()})
    else:
        files = sorted(outputs)
        if owned:  # our earlier conversion, replaced: the record names everything while it is deleted
            write_plan(dst, fp, set(outputs) | owned)
            for n in owned:
                if (dst / n).is_file() or (dst / n).is_symlink():
                    (dst / n).unlink()
    for n in names:  # a killed run's half-written files
        if n.endswith(".tmp") and n not in owned and _ours(n, owned | set(outputs)):
            (dst / n).unlink(missing_ok=True)
    todo = [s for s in plan.shards if not _finished(dst / s.name, s)]
    for s in todo:
        (dst / s.name).unlink(missing_ok=True)  # ours: a foreign file of this name was refused above
    return todo, files
