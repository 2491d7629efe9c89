"""Shared pytest fixtures."""

from __future__ import annotations

import os

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


# --- the real server, for the test_server*.py modules ------------------------------------------------
@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real `glm-mlx serve` for every test_server*.py module (the bundled glm-mini, unless
    GLM_MLX_TEST_SERVE_MODEL names another checkpoint)."""
    from serve_helpers import CONTEXT, MODEL_DIR
    from server_util import Server

    # its own prefix-cache folder: nothing written to (or read back from) the user's cache
    model = [str(MODEL_DIR)] if "GLM_MLX_TEST_SERVE_MODEL" in os.environ else []  # as users do: no model argument
    s = Server(*model, "--prefill-step", "16", "--context", str(CONTEXT),
               "--cache-dir", str(tmp_path_factory.mktemp("prefix")), "--cache-disk", "256MB")
    try:
        s.start()
    except RuntimeError as e:
        s.cleanup()
        pytest.fail(str(e))
    yield s
    alive, log = s.proc.poll() is None, s.stderr()
    s.stop()
    s.cleanup()
    if not alive:
        pytest.fail(f"glm-mlx serve exited early with {s.proc.returncode}:\n{log[-6000:]}")
    if "Traceback" in log:  # also one logged after the last test's own check
        pytest.fail(f"the server logged a traceback:\n{log[-6000:]}")


@pytest.fixture(autouse=True)
def _server_log_on_failure(request):
    """A failing test that used the server gets the server's log lines from its run in its report."""
    if "server" not in request.fixturenames:
        yield
        return
    srv = request.getfixturevalue("server")
    start, failed = len(srv.log_lines()), request.session.testsfailed
    yield
    lines = srv.log_lines()
    if request.session.testsfailed > failed:
        print("--- glm-mlx serve stderr during this test ---\n" + "\n".join(lines[start:][-200:]))
        if srv.proc.poll() is not None:
            print(f"--- the server exited with {srv.proc.returncode}; its whole log ---\n" + "\n".join(lines))
        return
    # Nothing went wrong on the server's side either: the test that made it log a traceback fails.
    assert srv.proc.poll() is None, f"the server exited with {srv.proc.returncode}:\n" + "\n".join(lines[-200:])
    assert not any("Traceback" in ln for ln in lines[start:]), "\n".join(lines[start:][-200:])


@pytest.fixture(scope="session")
def tokenizer():
    from mlx_lm.tokenizer_utils import load
    from serve_helpers import MODEL_DIR

    return load(MODEL_DIR)


@pytest.fixture(scope="session")
def oa(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def ac(server):
    import anthropic

    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=120)
