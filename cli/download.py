"""`glm-mlx download`: fetch a model repo from the Hugging Face Hub, resumably, after a disk-space check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated


def download(
    repo: Annotated[str, typer.Argument(help="Repo id on the Hub (owner/name), e.g. zai-org/GLM-5.1.")],
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
        typer.Option("--dir", "-d", file_okay=False, help="Download into this folder, not the Hugging Face cache."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {"path", "files", "bytes"} as JSON instead of the path.')
    ] = False,
):
    """Download a model repo from the Hugging Face Hub.

    Files go to the Hugging Face cache (HF_HUB_CACHE) unless --dir is given. Free disk space is checked first.

    Interrupted? Run the same command again: it resumes where it stopped.

    Prints the local folder on stdout; progress (bytes/s, ETA) goes to stderr.

    Example: glm-mlx download zai-org/GLM-5.1 --exclude "*.md" --dir ~/models/glm-5.1
    """
    from glm_mlx import hub  # here, not at the top: keeps `glm-mlx --help` from importing huggingface_hub

    result = hub.download_repo(repo, revision=revision, include=include, exclude=exclude, local_dir=dir)
    if as_json:
        typer.echo(json.dumps({"path": str(result.path), "files": result.files, "bytes": result.bytes}))
    else:
        typer.echo(str(result.path))
