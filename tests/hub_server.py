"""A loopback fake of the Hugging Face Hub, for download tests without internet.

It serves what huggingface_hub 2.x calls (checked against its source: hf_api.py, file_download.py):
- GET  /api/models/{repo}[/revision/{rev}]     model_info / repo_info (`?blobs=true`: sizes, blob ids, LFS info)
- GET  /api/models/{repo}/tree/{rev}[/{path}]  list_repo_tree (snapshot_download lists files with it)
- HEAD/GET /{repo}/resolve/{rev}/{path}        regular files: 200 with ETag, X-Repo-Commit, Content-Length;
  LFS files (weights): 302 to a second server on another port, the "CDN", carrying X-Repo-Commit,
  X-Linked-Etag (sha256) and X-Linked-Size, as the real Hub does
- HEAD/GET {cdn}/lfs/{sha256}/{path}           the bytes; `Range: bytes=N-` is answered by 206 (resume)

Errors carry the X-Error-Code header huggingface_hub maps to its exception classes (RepoNotFound, ...).
`cut(path, after)` drops the connection after that many body bytes of that file and then answers 503 for it,
like a CDN node failing mid-transfer, until `cut_clear()`; other files are still served, so which bytes reach
the disk does not depend on thread timing. `cut(..., stall=True)` instead holds the transfer there until
`cut_clear()` (time for a test to press Ctrl-C).

Uploads (what HfApi.create_repo + upload_folder send when hf_xet is off, as the `hub` fixture sets it):
- POST /api/repos/create                       {"name", "organization"} -> {"url"}; 409 if it exists
- POST /api/models/{repo}/preupload/{rev}      answers uploadMode "regular" for every file (so no LFS transfer),
  with the oid (git blob sha1) of a file already there, which the client then skips as unchanged
- POST /api/models/{repo}/commit/{rev}         ndjson: a header line, then {"key": "file", "value": {"path",
  "content" (base64)}} per file (and deletedFile); the repo gets a new commit, served like any other repo
`commits` records each commit as (repo, summary, {path: bytes}).

Hostile repos, for path-safety tests: `add_repo` takes any file names (`../x.safetensors`, `/abs/x.safetensors`,
`a\\b.safetensors`) and lists and serves them as given; a client that folds `..` out of the URL still gets the file.
Setting `FakeFile.linked_etag` makes `/resolve/` answer that X-Linked-Etag (e.g. `../../..`) instead of the sha256.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import posixpath
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".npz")


@dataclass
class FakeFile:
    data: bytes
    lfs: bool
    blob_id: str = ""  # git blob sha1: the ETag of a regular file
    sha256: str = ""  # the ETag of an LFS file
    linked_etag: str | None = None  # what /resolve/ sends as X-Linked-Etag (quoted), when not the sha256

    def __post_init__(self):
        self.blob_id = hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()
        self.sha256 = hashlib.sha256(self.data).hexdigest()


@dataclass
class FakeRepo:
    files: dict[str, FakeFile]
    commit: str
    gated: bool = False


@dataclass
class Request:
    method: str
    path: str  # decoded, without the query
    range: str | None
    status: int = 0
    auth: str | None = None  # the Authorization header, if any


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.open_sockets: set[socket.socket] = set()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request_thread(self, request, client_address):
        self.open_sockets.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.open_sockets.discard(request)

    def handle_error(self, request, client_address):
        pass  # clients dropping keep-alive connections is normal; a traceback here would land in test output

    def close(self) -> None:
        if self.thread.is_alive():
            self.shutdown()
            self.thread.join()
        self.server_close()
        for sock in list(self.open_sockets):  # keep-alive connections too: the host is gone
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class HubServer:
    """The fake Hub and its fake CDN, each a threaded HTTP server on a free port of 127.0.0.1."""

    def __init__(self):
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[Request] = []
        self.sent: dict[str, int] = {}  # repo file path -> body bytes sent
        self.cut_path: str | None = None
        self.cut_after = 0
        self.stall = False
        self.stalled = threading.Event()  # set once a stalled transfer waits
        self.down: set[str] = set()  # file paths answering 503
        self.commits: list[tuple[str, str, dict[str, bytes]]] = []  # uploads: (repo, summary, files added)
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._hub = _QuietServer(_handler_for(self))
        self._cdn = _QuietServer(_handler_for(self))
        self.url, self.cdn_url = self._hub.url, self._cdn.url

    def start(self) -> HubServer:
        self._hub.thread.start()
        self._cdn.thread.start()
        return self

    def stop(self) -> None:
        """Idempotent: a test may stop it early to simulate an unreachable Hub."""
        self._release.set()
        self._hub.close()
        self._cdn.close()

    def add_repo(self, repo_id: str, files: dict[str, bytes] | str | Path, *, gated: bool = False) -> FakeRepo:
        """Publish a repo from {path: bytes} or a folder; weights (.safetensors, ...) are stored as LFS."""
        if not isinstance(files, dict):
            root = Path(files)
            files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        fake = {path: FakeFile(data, lfs=path.endswith(LFS_SUFFIXES)) for path, data in files.items()}
        commit = hashlib.sha1(repo_id.encode() + b"".join(f.sha256.encode() for f in fake.values())).hexdigest()
        self.repos[repo_id] = FakeRepo(fake, commit, gated)
        return self.repos[repo_id]

    def cut(self, path: str, after: int, stall: bool = False) -> None:
        """Interrupt the next transfer of `path` after `after` body bytes: drop it (then 503), or stall it."""
        self.cut_path, self.cut_after, self.stall = path, after, stall
        self._release.clear()

    def cut_clear(self) -> None:
        self.cut_path = None
        self.down.clear()
        self._release.set()

    def gets(self, path: str) -> list[Request]:
        """The GETs that sent bytes of repo file `path` (from the CDN for LFS files)."""
        return [r for r in self.requests
                if r.method == "GET" and r.path.endswith("/" + path) and r.status in (200, 206)]


def _handler_for(server: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real hub; every response sets Content-Length

        def log_message(self, *args):  # keep test output quiet
            pass

        def send_response(self, code, message=None):
            self.record.status = code
            super().send_response(code, message)

        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        def do_POST(self):
            path = unquote(urlsplit(self.path).path)
            self.record = Request(self.command, path, None, auth=self.headers.get("Authorization"))
            with server._lock:
                server.requests.append(self.record)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if path == "/api/repos/create":
                return self._create(json.loads(body))
            parts = path.removeprefix("/api/models/").split("/")
            if path.startswith("/api/models/") and len(parts) >= 4 and parts[2] in ("preupload", "commit"):
                repo_id, action, rev = "/".join(parts[:2]), parts[2], "/".join(parts[3:])
                repo = self._repo(repo_id, rev)
                if repo:
                    (self._preupload if action == "preupload" else self._commit)(repo_id, repo, body)
                return
            self._error(404, None, "unknown api route")

        def _create(self, payload: dict):
            repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
            url = {"url": f"{server.url}/{repo_id}", "name": repo_id, "id": repo_id}
            if repo_id in server.repos:  # the Hub's 409 names the repo too: create_repo(exist_ok=True) reads its url
                body = json.dumps({"error": "You already created this model repo", **url}).encode()
                return self._send(409, body, {"Content-Type": "application/json"})
            server.add_repo(repo_id, {})
            self._json(url)

        def _preupload(self, repo_id: str, repo: FakeRepo, body: bytes):
            files = json.loads(body)["files"]
            self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                   "oid": repo.files[f["path"]].blob_id if f["path"] in repo.files else None}
                                  for f in files]})

        def _commit(self, repo_id: str, repo: FakeRepo, body: bytes):
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next((ln["value"] for ln in lines if ln["key"] == "header"), {})
            files = {path: f.data for path, f in repo.files.items()}
            added = {}
            for ln in lines:
                value = ln["value"]
                if ln["key"] == "file" and value.get("encoding") == "base64":
                    added[value["path"]] = base64.b64decode(value["content"])
                elif ln["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif ln["key"] != "header":  # lfsFile: preupload said "regular" for every file
                    return self._error(400, None, f"unexpected commit operation {ln['key']}")
            new = server.add_repo(repo_id, {**files, **added}, gated=repo.gated)
            server.commits.append((repo_id, header.get("summary", ""), added))
            self._json({"commitUrl": f"{server.url}/{repo_id}/commit/{new.commit}", "commitOid": new.commit})

        def _route(self, head: bool):
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            self.record = Request(self.command, path, self.headers.get("Range"), auth=self.headers.get("Authorization"))
            with server._lock:
                server.requests.append(self.record)
            if self.server is server._cdn:
                return self._cdn(path, head)
            if path.startswith("/api/models/"):
                return self._api(path[len("/api/models/") :], query)
            if "/resolve/" in path:
                repo_id, _, rest = path.lstrip("/").partition("/resolve/")
                rev, _, file_path = rest.partition("/")
                return self._resolve(*(_dotted(server, path) or (repo_id, rev, file_path)), head)
            self._error(404, None, "not found")

        def _repo(self, repo_id: str, rev: str | None) -> FakeRepo | None:
            repo = server.repos.get(repo_id)
            if repo is None:
                self._error(401, "RepoNotFound", "Repository not found")
            elif rev not in (None, "main", repo.commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            else:
                return repo
            return None

        def _api(self, rest: str, query: dict):
            parts = rest.split("/")
            repo_id, tail = "/".join(parts[:2]), parts[2:]
            flag = lambda name: query.get(name, ["false"])[0].lower() == "true"  # noqa: E731
            if tail[:1] == ["tree"] and len(tail) >= 2:
                repo = self._repo(repo_id, tail[1])
                if repo:
                    self._json(_tree(repo, "/".join(tail[2:]), flag("recursive")))
                return
            rev = tail[1] if tail[:1] == ["revision"] and len(tail) >= 2 else None
            if tail and rev is None:
                return self._error(404, None, "unknown api route")
            repo = self._repo(repo_id, rev)
            if repo:
                self._json(_model_info(repo_id, repo, blobs=flag("blobs")))

        def _resolve(self, repo_id: str, rev: str, file_path: str, head: bool):
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            if repo.gated:
                return self._error(403, "GatedRepo", "Access to this gated repo is restricted", repo.commit)
            if file_path in server.down:
                return self._error(503, None, "service unavailable")
            f = repo.files.get(file_path)
            if f is None:
                return self._error(404, "EntryNotFound", "Entry not found", repo.commit)
            if not f.lfs:
                return self._bytes(f, file_path, head, {"ETag": f'"{f.blob_id}"', "X-Repo-Commit": repo.commit})
            self.send_response(302)
            # safe="": '/' and '..' in a hostile name stay inside one URL segment, so the client cannot fold them
            self.send_header("Location", f"{server.cdn_url}/lfs/{f.sha256}/{quote(file_path, safe='')}")
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("X-Linked-Etag", f'"{f.linked_etag or f.sha256}"')
            self.send_header("X-Linked-Size", str(len(f.data)))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _cdn(self, path: str, head: bool):
            _, _, sha, file_path = path.split("/", 3)
            found = [f for repo in server.repos.values() for f in repo.files.values() if f.sha256 == sha]
            if not found:
                return self._error(404, None, "no such object")
            if file_path in server.down:
                return self._error(503, None, "service unavailable")
            self._bytes(found[0], file_path, head, {"ETag": f'"{sha}"'})

        def _bytes(self, f: FakeFile, file_path: str, head: bool, headers: dict[str, str]):
            total, start, status = len(f.data), 0, 200
            rng = self.headers.get("Range")
            if rng and not head:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= total:
                    return self._error(416, None, "range not satisfiable")
                status = 206
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(total - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
            self.end_headers()
            if head:
                return
            body, sent = f.data[start:], 0
            if server.cut_path == file_path and server.stall:
                server.cut_path = None
                self.wfile.write(body[: server.cut_after])
                self.wfile.flush()
                sent, body = server.cut_after, body[server.cut_after :]
                server.stalled.set()
                server._release.wait(30)
            elif server.cut_path == file_path:
                body, server.cut_path = body[: server.cut_after], None
                server.down.add(file_path)
                self.close_connection = True  # the client sees the body end early: an interrupted transfer
            self.wfile.write(body)
            self.wfile.flush()
            with server._lock:
                server.sent[file_path] = server.sent.get(file_path, 0) + sent + len(body)

        def _json(self, payload):
            self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})

        def _error(self, status: int, code: str | None, message: str, commit: str | None = None):
            headers = {"Content-Type": "application/json"}
            if code:
                headers.update({"X-Error-Code": code, "X-Error-Message": message})
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, json.dumps({"error": message}).encode(), headers)

        def _send(self, status: int, body: bytes, headers: dict[str, str]):
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def _dotted(server: HubServer, path: str) -> tuple[str, str, str] | None:
    """(repo, rev, file) whose /resolve/ URL a client folded to `path` (it drops `..` segments): hostile names."""
    for repo_id, repo in server.repos.items():
        for rev in ("main", repo.commit):
            for name in repo.files:
                if ".." in name.split("/") and posixpath.normpath(f"/{repo_id}/resolve/{rev}/{name}") == path:
                    return repo_id, rev, name
    return None


def _model_info(repo_id: str, repo: FakeRepo, blobs: bool) -> dict:
    siblings = []
    for path, f in repo.files.items():
        entry = {"rfilename": path}
        if blobs:
            entry.update(size=len(f.data), blobId=f.blob_id)
            if f.lfs:
                entry["lfs"] = {"size": len(f.data), "sha256": f.sha256, "pointerSize": 134}
        siblings.append(entry)
    return {"_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
            "gated": "manual" if repo.gated else False, "disabled": False, "tags": [], "siblings": siblings}


def _tree(repo: FakeRepo, under: str, recursive: bool) -> list[dict]:
    prefix = under.strip("/") + "/" if under.strip("/") else ""
    entries, folders = [], set()
    for path, f in repo.files.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        # Folders between `under` and the file: all of them when recursive, the first level otherwise.
        depth = len(parts) - 1 if recursive else min(1, len(parts) - 1)
        folders.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
        if len(parts) > 1 and not recursive:
            continue
        entry = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": path}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
        entries.append(entry)
    dirs = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(folders)]
    return dirs + entries
