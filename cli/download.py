"""`glm-mlx download`: fetch a model repo from the Hugging Face Hub, resumably, after a disk-space check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated


def download(
    repo: Annotated[str, typer.Argument(help="Repo id on the Hub (owner/name), e.g. zai-org/GLM-5.1.")],
    filenames: Annotated[
        Optional[List[str]],
        typer.Argument(help="Only these files (e.g. config.json; a folder name takes what is under it), as `hf download` "
                       "takes them. One file: its path is printed.", show_default=False),
    ] = None,
    revision: Annotated[
        Optional[str], typer.Option("--revision", "-r", help="Branch, tag or commit (default: main).")
    ] = None,
    include: Annotated[
        Optional[List[str]], typer.Option("--include", "-i", help="Only files matching this glob (repeatable).")
    ] = None,
    exclude: Annotated[
        Optional[List[str]], typer.Option("--exclude", "-x", help="Skip files matching this glob (repeatable).")
    ] = None,
    dir: Annotated[
        Optional[Path],
        typer.Option("--local-dir", "--dir", file_okay=False,
                     help="Download into this folder, not the Hugging Face cache.", show_default=False),
    ] = None,
    cache_dir: Annotated[
        Optional[Path],
        typer.Option("--cache-dir", file_okay=False, help="Use this Hugging Face cache folder instead of HF_HUB_CACHE.",
                     show_default=False),
    ] = None,
    token: Annotated[
        Optional[str],
        typer.Option("--token", help="A Hub access token, instead of HF_TOKEN or the one `hf auth login` saved.",
                     show_default=False),
    ] = None,
    max_workers: Annotated[int, typer.Option("--max-workers", help="Files downloaded at once.")] = 8,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be fetched, its size and whether it fits on disk; "
                           "download nothing.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {"path", "files", "bytes"} as JSON instead of the path.')
    ] = False,
):
    """Download a model repo from the Hugging Face Hub.

    Files go to the Hugging Face cache (HF_HUB_CACHE, or --cache-dir) unless --local-dir is given. Free disk space is checked first.

    File names after the repo id take only those files (with --include/--exclude, both must match).

    Interrupted? Run the same command again: it resumes where it stopped.

    Prints the local folder on stdout; progress (bytes/s, ETA) goes to stderr.

    Example: glm-mlx download zai-org/GLM-5.1 --exclude "*.md" --local-dir ~/models/glm-5.1

    Example: glm-mlx download zai-org/GLM-5.1 config.json tokenizer.json --dry-run
    """
    from glm_mlx.hub import download as hub
    from glm_mlx.errors import GlmMlxError

    if dir is not None and cache_dir is not None:
        raise GlmMlxError("--local-dir and --cache-dir both say where the files go",
                          "Pass one: --local-dir for a plain folder, --cache-dir for a Hugging Face cache.")
    where = {"include": include, "exclude": exclude, "local_dir": dir, "cache_dir": cache_dir, "token": token,
             "files": filenames}
    if dry_run:
        _print_plan(hub.plan_download(repo, revision, **where), as_json)
        return
    result = hub.download_repo(repo, revision=revision, max_workers=max_workers, **where)
    if as_json:
        typer.echo(json.dumps({"path": str(result.path), "files": result.files, "bytes": result.bytes}))
    elif filenames and len(filenames) == 1 and (result.path / filenames[0]).is_file():
        typer.echo(str(result.path / filenames[0]))  # one file: its path, as `hf download REPO FILE` prints
    else:
        typer.echo(str(result.path))


def _print_plan(plan, as_json: bool) -> None:
    """--dry-run: the files, their sizes and what is already on disk, and whether the rest fits."""
    from glm_mlx.disk import fmt_bytes

    if as_json:
        typer.echo(json.dumps({"dry_run": True, "repo": plan.repo_id, "commit": plan.commit, "path": str(plan.path),
                               "files": [{"path": p, "bytes": n, "have": h} for p, n, h in plan.files],
                               "bytes": plan.bytes, "have": plan.have, "needed": plan.needed, "free": plan.free,
                               "fits": plan.fits}))
        return

    def state(size: int, have: int) -> str:
        return "to fetch" if have == 0 else "already here" if have >= size else f"partial, {fmt_bytes(have)} here"

    rows = [(p, fmt_bytes(n), state(n, h)) for p, n, h in plan.files]
    w1, w2 = max(len("FILE"), *(len(r[0]) for r in rows)), max(len("SIZE"), *(len(r[1]) for r in rows))
    typer.echo(f"Dry run: {plan.repo_id}@{plan.commit[:8]} -> {plan.path} (nothing downloaded)")
    for p, size, st in [("FILE", "SIZE", "STATUS"), *rows]:
        typer.echo(f"  {p:<{w1}}  {size:>{w2}}  {st}")
    verdict = "fits" if plan.fits else f"does NOT fit: {fmt_bytes(plan.needed - plan.free)} short"
    typer.echo(f"{len(plan.files)} files, {fmt_bytes(plan.bytes)}: {fmt_bytes(plan.have)} already here, "
               f"{fmt_bytes(plan.needed)} to fetch, {fmt_bytes(plan.free)} free there: {verdict}.")
