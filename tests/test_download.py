"""`glm-mlx download` and glm_mlx.hub.download against the loopback fake Hub (tests/hub_server.py, fixture `hub`)."""

from __future__ import annotations

import _thread
import hashlib
import json
import os
import posixpath
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cli_util import assert_clean_error, command, invoke
from hypothesis import example, given
from hypothesis import strategies as st
from typer.testing import CliRunner

from glm_mlx.hub import download as hublib
from glm_mlx.cli.app import app

REPO = "org/tiny-glm"
WEIGHT = "model-00001-of-00002.safetensors"


def _files() -> dict[str, bytes]:
    rng = random.Random(0)  # fixed bytes, so a wrong offset after a resume shows as a mismatch
    return {
        "config.json": json.dumps({"model_type": "glm_moe_dsa", "hidden_size": 64}).encode(),
        WEIGHT: rng.randbytes(700_000),
        "model-00002-of-00002.safetensors": rng.randbytes(300_000),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"vocab": {"a": 0}}}).encode(),
        "README.md": b"# tiny\n",
    }


def run(*args: str):
    return invoke("download", *args, ok=False)


def assert_same_files(folder: Path, files: dict[str, bytes]):
    found = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts]
    assert sorted(found) == sorted(files)
    for name, data in files.items():
        assert (folder / name).read_bytes() == data, name


def test_download_into_cache_prints_the_snapshot(hub, tmp_path):
    files = _files()
    repo = hub.add_repo(REPO, files)
    result = run(REPO)
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip())
    assert path == tmp_path / "hf-cache" / "models--org--tiny-glm" / "snapshots" / repo.commit
    assert_same_files(path, files)
    # It really went through the loopback servers: weights came once each, from the "CDN" the Hub redirects to.
    assert [r.path for r in hub.gets(WEIGHT)] == [f"/lfs/{hashlib.sha256(files[WEIGHT]).hexdigest()}/{WEIGHT}"]
    assert hub.sent[WEIGHT] == len(files[WEIGHT])
    # resolve_model_path finds it offline (no request), by repo id; a folder is returned as is.
    before = len(hub.requests)
    assert hublib.resolve_model_path(REPO) == path
    assert hublib.resolve_model_path(str(path)) == path
    assert len(hub.requests) == before
    # A second run fetches nothing again.
    assert run(REPO).exit_code == 0
    assert len(hub.gets(WEIGHT)) == 1


def test_include_exclude(hub):
    files = _files()
    hub.add_repo(REPO, files)
    result = run(REPO, "--include", "*.json", "--include", "*.safetensors", "--exclude", "tokenizer*", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    keep = ["config.json", WEIGHT, "model-00002-of-00002.safetensors"]
    assert out["files"] == 3 and out["bytes"] == sum(len(files[k]) for k in keep)
    assert_same_files(Path(out["path"]), {k: files[k] for k in keep})
    json_files = [(k, len(files[k])) for k in ("config.json", "tokenizer.json")]
    assert hublib.repo_files(REPO, include=["*.json"]) == json_files
    # The library call, without progress output, gives the same snapshot folder.
    assert hublib.download(REPO, include=["config.json"], progress=False) == Path(out["path"])


def test_dir_and_json(hub, tmp_path):
    files = _files()
    hub.add_repo(REPO, files)
    target = tmp_path / "models" / "tiny"
    result = run(REPO, "--dir", str(target), "--json")
    assert result.exit_code == 0, result.output
    total = sum(map(len, files.values()))
    assert json.loads(result.stdout) == {"path": str(target), "files": len(files), "bytes": total}
    assert_same_files(target, files)
    assert not (tmp_path / "hf-cache" / "models--org--tiny-glm" / "blobs").exists()  # --dir keeps the cache out of it
    assert run(REPO, "--dir", str(target)).exit_code == 0
    assert len(hub.gets(WEIGHT)) == 1


@pytest.mark.parametrize("to_dir", [False, True], ids=["cache", "dir"])
def test_interrupted_download_resumes_from_the_partial_file(hub, tmp_path, to_dir):
    files = _files()
    hub.add_repo(REPO, files)
    target = tmp_path / "local"
    args = [REPO, "--dir", str(target)] if to_dir else [REPO]

    # Run 1: the connection drops after 300 kB of the big shard, and the retry gets a 503: the run fails.
    hub.cut(WEIGHT, 300_000)
    result = run(*args)
    assert_clean_error(result, "Hint: Re-run")
    partials = {p.name: p.stat().st_size for p in tmp_path.rglob("*.incomplete")}
    name = hashlib.sha256(files[WEIGHT]).hexdigest() + ".incomplete"  # partials are named by the file's etag
    assert name in partials, partials
    kept = partials[name]
    assert 0 < kept <= 300_000  # what was received (whole 64 kB reads) stays on disk
    if to_dir:
        assert (target / ".cache" / "glm-mlx" / name).exists()

    # Run 2: the hub is back; the shard continues at byte `kept` with a Range request and ends byte-exact.
    hub.cut_clear()
    sent_before = hub.sent.get(WEIGHT, 0)
    result = run(*args)
    assert result.exit_code == 0, result.output
    resumed = hub.gets(WEIGHT)[-1]
    assert resumed.range == f"bytes={kept}-"
    assert hub.sent[WEIGHT] - sent_before == len(files[WEIGHT]) - kept  # only the missing tail was sent
    assert_same_files(Path(result.stdout.strip()), files)
    assert not list(tmp_path.rglob("*.incomplete"))


def test_ctrl_c_keeps_the_partial_file_and_the_next_run_finishes(hub, tmp_path):
    files = _files()
    hub.add_repo(REPO, files)
    hub.cut(WEIGHT, 300_000, stall=True)  # the transfer hangs after 300 kB: the user presses Ctrl-C
    blobs = tmp_path / "hf-cache" / "models--org--tiny-glm" / "blobs"
    partial = blobs / (hashlib.sha256(files[WEIGHT]).hexdigest() + ".incomplete")

    def press_ctrl_c():
        hub.stalled.wait(10)
        deadline = time.monotonic() + 10
        while (partial.stat().st_size if partial.exists() else 0) < 4 * 65536 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the received whole 64 kB reads are on disk
        _thread.interrupt_main()  # SIGINT, as Ctrl-C delivers it to the main thread
        time.sleep(0.5)  # the main thread cancels the transfers before the stalled one gets more bytes
        hub.cut_clear()

    helper = threading.Thread(target=press_ctrl_c)
    helper.start()
    result = run(REPO)
    helper.join()
    assert result.exit_code == 130 and "Interrupted" in result.stderr and "Traceback" not in result.output
    kept = partial.stat().st_size
    assert 0 < kept < len(files[WEIGHT])

    result = run(REPO)
    assert result.exit_code == 0, result.output
    assert hub.gets(WEIGHT)[-1].range == f"bytes={kept}-"
    assert_same_files(Path(result.stdout.strip()), files)


def test_refuses_when_disk_is_short(hub, monkeypatch):
    files = _files()
    hub.add_repo(REPO, files)
    monkeypatch.setattr(hublib, "free_bytes", lambda path: 1000)
    result = run(REPO)
    total = sum(map(len, files.values()))
    assert_clean_error(result, "not enough disk space", hublib.fmt_bytes(total), hublib.fmt_bytes(1000), "--dir")
    assert not hub.gets(WEIGHT) and not any("/resolve/" in r.path for r in hub.requests)  # nothing fetched


def test_check_disk_counts_bytes_already_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(hublib, "free_bytes", lambda path: 50)
    assert hublib.check_disk([("a", 60), ("b", 40)], tmp_path, done=60) == 40
    (tmp_path / "a").write_bytes(b"x" * 60)  # done=None: files already at target_dir/path count
    assert hublib.check_disk([("a", 60), ("b", 40)], tmp_path) == 40
    with pytest.raises(hublib.DiskSpaceError, match=r"need 100 B more, only 50 B free \(100 B in total, 0 B"):
        hublib.check_disk([("a", 60), ("b", 40)], tmp_path / "new", done=0)


def test_hub_errors_are_one_clean_line(hub):
    hub.add_repo(REPO, _files())
    hub.add_repo("org/gated", {"config.json": b"{}"}, gated=True)
    assert_clean_error(run("org/missing"), "repository not found on the Hub: org/missing")
    assert_clean_error(run(REPO, "--revision", "v9"), "revision 'v9' not found in org/tiny-glm")
    assert_clean_error(run("org/gated"), "gated", "hf auth login")
    assert_clean_error(run(REPO, "--include", "*.gguf"), "no files in org/tiny-glm@main match --include *.gguf")
    hub.stop()
    assert_clean_error(run(REPO), "cannot reach the Hub at http://127.0.0.1:")


def test_resolve_model_path_errors(hub, tmp_path):
    with pytest.raises(hublib.ModelNotFoundError) as err:
        hublib.resolve_model_path("org/absent")
    assert "not in the Hugging Face cache" in str(err.value)
    assert err.value.hint == "Download it first: glm-mlx download org/absent"
    with pytest.raises(hublib.ModelNotFoundError, match="no checkpoint folder"):
        hublib.resolve_model_path(str(tmp_path / "nowhere"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(hublib.ModelNotFoundError, match="is a file"):
        hublib.resolve_model_path(tmp_path / "f.txt")
    assert not hub.requests  # offline: the cache only


def test_help_has_an_example():
    result = CliRunner().invoke(app, ["download", "--help"])
    assert result.exit_code == 0
    assert "Example" in result.stdout and "glm-mlx download" in result.stdout and "--include" in result.stdout


# --- Hostile repos (issue #15): remote names and etags must not place files outside the target ---


def cli_download(*args: str) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess; HF_ENDPOINT/HF_HOME/HF_HUB_CACHE come from the `hub` fixture's environment."""
    return command("download", *args, timeout=120)


def assert_refused(proc: subprocess.CompletedProcess, *needles: str):
    """Exit 1, one `Error:` line naming the culprit, then its hint, no traceback, nothing on stdout."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()  # progress lines may come first (the etag shows up after the listing)
    errors = [i for i, line in enumerate(lines) if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[errors[0] + 1 :] == [lines[-1]] and lines[-1].startswith("Hint: "), proc.stderr
    assert "unsafe" in lines[errors[0]] and "unsafe file name" in lines[-1], proc.stderr
    for needle in needles:
        assert needle in lines[errors[0]], proc.stderr


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _hostile_name(kind: str, tmp_path: Path) -> str:
    # An absolute name inside tmp_path: the escape is then checkable, and a bad client cannot touch the real /abs.
    return {"dotdot": "../x.safetensors", "absolute": f"{tmp_path}/abs/x.safetensors",
            "backslash": "a\\b.safetensors"}[kind]


@pytest.mark.parametrize("to_dir", [False, True], ids=["cache", "dir"])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "backslash"])
def test_hostile_file_name_fails_the_download_before_anything_is_written(hub, tmp_path, to_dir, kind):
    name = _hostile_name(kind, tmp_path)
    hub.add_repo(REPO, {**_files(), name: b"\x00" * 1000})
    target = tmp_path / "out" / "model"
    before = _tree(tmp_path)
    proc = cli_download(REPO, *(["--dir", str(target)] if to_dir else []))
    assert_refused(proc, repr(name), REPO)
    assert _tree(tmp_path) == before  # nothing at all: no cache, no --dir, no partial file, no escaped file
    assert not (tmp_path / "out" / "x.safetensors").exists() and not (tmp_path / "abs").exists()
    assert not any("/resolve/" in r.path or r.path.startswith("/lfs/") for r in hub.requests)  # listing only


def test_hostile_name_is_refused_even_when_include_skips_it(hub, tmp_path):
    hub.add_repo(REPO, {**_files(), "../x.safetensors": b"x"})
    with pytest.raises(hublib.UnsafeRepoError, match=r"unsafe file path '\.\./x\.safetensors'"):
        hublib.download_repo(REPO, include=["config.json"], local_dir=tmp_path / "d", progress=False)
    with pytest.raises(hublib.UnsafeRepoError):  # listing it is refused too: the repo is hostile
        hublib.repo_files(REPO)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("to_dir", [False, True], ids=["cache", "dir"])
@pytest.mark.parametrize("etag", ["../../..", "../../../escaped"])
def test_hostile_linked_etag_fails_the_download_before_anything_is_written(hub, tmp_path, to_dir, etag):
    files = _files()
    repo = hub.add_repo(REPO, files)
    repo.files[WEIGHT].linked_etag = etag  # the HEAD's X-Linked-Etag: the blob's (and partial file's) name
    target = tmp_path / "out" / "model"
    before = _tree(tmp_path)
    proc = cli_download(REPO, *(["--dir", str(target)] if to_dir else []))
    assert_refused(proc, repr(etag), repr(WEIGHT))
    assert _tree(tmp_path) == before  # the other shard's good etag did not start a transfer either
    assert not hub.gets(WEIGHT) and not hub.gets("model-00002-of-00002.safetensors")


def test_good_etag_forms_are_accepted():
    sha1, sha256 = "a" * 40, "0123456789abcdef" * 4
    assert hublib.check_etag("o/r", "f", sha256) == sha256
    assert hublib.check_etag("o/r", "f", f'"{sha1}"') == sha1  # quotes stripped, as huggingface_hub does
    assert hublib.check_etag("o/r", "f", f'W/"{sha1}"') == sha1
    for bad in ["", None, "../../..", "a" * 39, "a" * 41, "g" * 40, sha256 + "/x", f"{sha1}\x00", "a" * 64 + "\n"]:
        with pytest.raises(hublib.UnsafeRepoError):
            hublib.check_etag("o/r", "f", bad)


# Names built from the pieces that matter (separators, dots, drives, NUL) plus arbitrary text.
_PIECES = st.sampled_from(["a", "b.safetensors", ".", "..", "...", "", "/", "\\", "C:", "c:d", "\x00", "\n", " ", "~"])
_NAMES = st.one_of(st.lists(_PIECES, max_size=8).map("".join),
                   st.lists(_PIECES, max_size=6).map("/".join),
                   st.text(max_size=30))


@given(_NAMES)
@example("../x.safetensors")
@example("/abs/x.safetensors")
@example("a\\b.safetensors")
@example("a/../../b")
@example("C:/x")
def test_path_validator_accepts_only_names_that_stay_under_the_target(name):
    root = "/srv/models/target"
    parts = name.split("/")
    try:
        joined = hublib._join("o/r", Path(root), name)
    except hublib.UnsafeRepoError as err:
        assert repr(name) in str(err) and "\n" not in str(err)  # one line, naming the path (escaped)
        return
    # Accepted: it lies strictly under the target, unchanged by normalisation, and is a plain POSIX name.
    assert str(joined) == posixpath.normpath(f"{root}/{name}") and str(joined).startswith(root + "/")
    assert os.path.commonpath([root, str(joined)]) == root
    assert not name.startswith("/") and "\\" not in name and "\x00" not in name
    assert all(p not in ("", ".", "..") for p in parts)


@given(st.text(alphabet="./\\abC:", max_size=12))
def test_path_validator_rejects_dotdot_absolute_and_backslash(name):
    bad = ".." in name.replace("\\", "/").split("/") or name.startswith("/") or "\\" in name
    if bad:
        with pytest.raises(hublib.UnsafeRepoError):
            hublib.check_repo_path("o/r", name)
