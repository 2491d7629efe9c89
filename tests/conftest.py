"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A loopback fake Hub (tests/hub_server.py) that huggingface_hub talks to, with a fresh cache in tmp_path.

    huggingface_hub reads its environment into `huggingface_hub.constants` at import time, so the constants are
    patched as well as the variables (for subprocesses). Nothing leaves 127.0.0.1, and no token is sent.
    """
    from huggingface_hub import constants, hf_api

    from hub_server import HubServer

    server = HubServer().start()
    home, cache = tmp_path / "hf-home", tmp_path / "hf-cache"
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "HF_HUB_OFFLINE": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    patches = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": True,
        "HF_HUB_OFFLINE": False,
        # Small read chunks, so a transfer cut after a few hundred kB leaves a partial file (default: 10 MB).
        "DOWNLOAD_CHUNK_SIZE": 64 * 1024,
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", server.url)  # the module-level HfApi() behind hf_api.model_info etc.
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mtp_ckpt(tmp_path_factory):
    """A tiny GLM-MoE-DSA checkpoint (reference-written) with an MTP layer and a GLM-style tokenizer."""
    from reference import add_mtp_layer, make_reference, write_tokenizer

    path = tmp_path_factory.mktemp("mtp_ckpt")
    add_mtp_layer(path, make_reference(path, seed=5), seed=6)
    write_tokenizer(path)
    return path
