"""Uploading a finished conversion to the Hub (`glm-mlx convert --upload-repo`), over huggingface_hub."""

from __future__ import annotations

import contextlib
import glob
from pathlib import Path
from typing import Sequence

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HFValidationError, HfHubHTTPError
from huggingface_hub.utils import validate_repo_id

from .download import HubError, hub_errors


def check_upload_repo(repo_id: str) -> None:
    """Refuse a malformed repo id before any work."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(f"not a valid repo id: {repo_id!r}", hint="Use the form owner/name: me/GLM-5.1-4bit.") from None


@contextlib.contextmanager
def _upload_errors(repo_id: str, hint: str):
    """hub_errors, with `hint` (what to do about a failed upload) unless the token is the problem."""
    try:
        with hub_errors(repo_id):
            yield
    except HubError as e:
        cause = e.__cause__
        auth = isinstance(cause, HfHubHTTPError) and cause.response is not None and cause.response.status_code in (401, 403)
        raise HubError(str(e), hint=e.hint if auth else hint) from cause


def create_repo(repo_id: str, token: str | None = None) -> str:
    """Create a model repo on the Hub unless it exists; its URL."""
    with _upload_errors(repo_id, "Check the network (or HF_ENDPOINT) and re-run; nothing was converted yet."):
        return str(HfApi(token=token).create_repo(repo_id, repo_type="model", exist_ok=True))


def upload_files(folder: str | Path, repo_id: str, files: Sequence[str], token: str | None = None) -> str:
    """Upload `files` (paths relative to `folder`) to the model repo `repo_id` in one commit; the repo's URL."""
    folder = Path(folder)
    with _upload_errors(repo_id, f"The conversion in {folder} is finished: upload it with `hf upload {repo_id} {folder}`."):
        HfApi(token=token).upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                         allow_patterns=[glob.escape(f) for f in files],
                                         commit_message=f"Upload {folder.name} (glm-mlx convert)")
    return f"{constants.ENDPOINT}/{repo_id}"
