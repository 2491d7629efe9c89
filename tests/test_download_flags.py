"""`hf download`'s spellings for `glm-mlx download` (issue #16): --local-dir/--cache-dir/--token/--revision/
--max-workers/--dry-run and positional file names, through the real command against the loopback fake Hub
(tests/hub_server.py, fixture `hub`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from cli_util import assert_clean_error
from cli_util import command as cli
from cli_util import invoke as run

from glm_mlx.hub import download as hublib


REPO = "org/tiny-glm"


def _files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {"config.json": b'{"model_type": "glm_moe_dsa"}', "tokenizer.json": b'{"version": "1.0"}',
            "model-00001-of-00002.safetensors": rng.bytes(400_000), "model-00002-of-00002.safetensors": rng.bytes(200_000),
            "extra/a.txt": b"a", "extra/b.txt": b"bb", "README.md": b"# tiny\n"}


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_positional_file_names_and_local_dir(hub, tmp_path):
    files = _files()
    hub.add_repo(REPO, files)
    target = tmp_path / "two"
    p = cli("download", REPO, "config.json", "model-00002-of-00002.safetensors", "--local-dir", target)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(target)
    assert [x for x in _tree(target) if not x.startswith(".cache")] == ["config.json", "model-00002-of-00002.safetensors"]
    assert (target / "model-00002-of-00002.safetensors").read_bytes() == files["model-00002-of-00002.safetensors"]
    assert not hub.gets("model-00001-of-00002.safetensors")
    # One file: its path is printed, as `hf download REPO FILE` does; a folder name takes what is under it.
    p = cli("download", REPO, "tokenizer.json", "--dir", tmp_path / "one")
    assert p.returncode == 0 and p.stdout.strip() == str(tmp_path / "one" / "tokenizer.json"), p.stderr
    p = cli("download", REPO, "extra/", "--local-dir", tmp_path / "folder")
    assert p.returncode == 0, p.stderr
    assert [x for x in _tree(tmp_path / "folder") if not x.startswith(".cache")] == ["extra", "extra/a.txt", "extra/b.txt"]
    # File names and --include/--exclude: both must match.
    p = cli("download", REPO, "extra", "--exclude", "*b.txt", "--local-dir", tmp_path / "both", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["files"] == 1, p.stderr
    # A name the repo does not have: one line, nothing fetched.
    before = len(hub.requests)
    p = cli("download", REPO, "config.json", "nope.safetensors", "--local-dir", tmp_path / "bad")
    assert_clean_error(p, "no file 'nope.safetensors' in org/tiny-glm@main", "/org/tiny-glm/tree/main")
    assert not (tmp_path / "bad").exists()
    assert all("/resolve/" not in r.path for r in hub.requests[before:])


def test_cache_dir(hub, tmp_path):
    files = _files()
    repo = hub.add_repo(REPO, files)
    cache = tmp_path / "elsewhere"
    p = cli("download", REPO, "--cache-dir", cache)
    assert p.returncode == 0, p.stderr
    snapshot = cache / "models--org--tiny-glm" / "snapshots" / repo.commit
    assert Path(p.stdout.strip()) == snapshot
    assert {k: (snapshot / k).read_bytes() for k in files} == files
    assert not (tmp_path / "hf-cache").exists()  # HF_HUB_CACHE untouched
    assert_clean_error(cli("download", REPO, "--cache-dir", cache, "--local-dir", tmp_path / "d"),
                       "--local-dir and --cache-dir")


def test_token_revision_and_max_workers(hub, tmp_path):
    files = _files()
    repo = hub.add_repo(REPO, files)
    p = cli("download", REPO, "--token", "hf_secret123", "--revision", repo.commit, "--max-workers", "1",
            "--local-dir", tmp_path / "d")
    assert p.returncode == 0, p.stderr
    hub_requests = [r for r in hub.requests if not r.path.startswith("/lfs/")]  # the CDN is another host: no token
    assert hub_requests and all(r.auth == "Bearer hf_secret123" for r in hub_requests)
    assert any(repo.commit in r.path for r in hub_requests)
    assert "hf_secret123" not in p.stdout + p.stderr
    assert_clean_error(cli("download", REPO, "--max-workers", "0"), "--max-workers must be >= 1 and <= 64 (got 0)")


def test_dry_run_writes_nothing(hub, tmp_path):
    files = _files()
    repo = hub.add_repo(REPO, files)
    before = _tree(tmp_path)
    p = cli("download", REPO, "--dry-run", "--local-dir", tmp_path / "d")
    assert p.returncode == 0, p.stderr
    assert _tree(tmp_path) == before  # no folder, no cache, no lock
    assert all(r.path.startswith("/api/models/") for r in hub.requests)  # the listing only
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"Dry run: {REPO}@{repo.commit[:8]} -> {tmp_path / 'd'}")
    for name, data in files.items():
        assert any(ln.split()[:3] == [name, *hublib.fmt_bytes(len(data)).split()] for ln in lines), (name, lines)
    assert lines[-1].startswith(f"{len(files)} files, {hublib.fmt_bytes(sum(map(len, files.values())))}")
    assert lines[-1].endswith(": fits.")


def test_dry_run_counts_what_is_already_here_and_says_when_it_does_not_fit(hub, tmp_path, monkeypatch):
    files = _files()
    hub.add_repo(REPO, files)
    target = tmp_path / "d"
    assert run("download", REPO, "config.json", "--local-dir", target).exit_code == 0
    weight = "model-00001-of-00002.safetensors"
    hub.cut(weight, 100_000)  # a partial weight on disk
    assert run("download", REPO, weight, "--local-dir", target, ok=False).exit_code == 1
    hub.cut_clear()
    monkeypatch.setattr(hublib, "free_bytes", lambda path: 1000)
    r = run("download", REPO, "--dry-run", "--local-dir", target, "--json")
    plan = json.loads(r.stdout)
    have = {f["path"]: f["have"] for f in plan["files"]}
    assert have["config.json"] == len(files["config.json"]) and 0 < have[weight] < len(files[weight])
    assert plan["needed"] == sum(map(len, files.values())) - sum(have.values()) and plan["fits"] is False
    text = run("download", REPO, "--dry-run", "--local-dir", target).stdout
    assert "already here" in text and "partial" in text and "does NOT fit" in text
