"""A small in-memory Hugging Face Hub for tests: the real ``huggingface_hub`` client talks to it
over HTTP on 127.0.0.1 (``HF_ENDPOINT``), so pushes and downloads run the client's real code.

Implemented: the endpoints that huggingface_hub 2.4 calls for ``create_repo``,
``upload_folder`` / ``create_commit`` (``validate-yaml``, ``preupload``, ``commit``),
``model_info`` / ``repo_info``, ``list_repo_tree``, ``file_exists`` and ``hf_hub_download`` /
``snapshot_download`` (``resolve``), and ``agent-harnesses``, a registry the client fetches for
its user agent (answered empty). Model repositories only. Every file is answered as a regular
(non-LFS, non-Xet) git file: the ``preupload`` answer ``"uploadMode": "regular"`` makes the client
send file contents base64-encoded inside the commit, and downloads are plain HTTP. Writes need an
``Authorization`` header, as on the Hub. Any other request is answered 501 and recorded in
:attr:`FakeHub.unhandled`, so a test can assert that the client needed nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

NAMESPACE = "test-user"
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"


def git_blob_id(content: bytes) -> str:
    """The git object id of a file, which the Hub reports as a regular file's ``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    """A repository: its commits (oldest first), each a full ``path -> content`` snapshot."""

    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)

    def files(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision == "main":
            return self.commits[-1]
        return next((commit for commit in self.commits if commit[0] == revision), None)


class FakeHub:
    """The server; use as a context manager. ``url`` is the ``HF_ENDPOINT`` to set."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.unhandled: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The files of ``repo_id`` at ``main``."""
        return self.repos[repo_id].files("main")[1]

    # -- operations behind the endpoints -----------------------------------------------------

    def create_repo(self, repo_id: str) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            self.repos[repo_id] = Repo([(self._commit_id(repo_id, initial), initial)])
            return True

    def commit(self, repo_id: str, lines: list[dict]) -> str:
        with self.lock:
            files = dict(self.repos[repo_id].files("main")[1])
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: c for p, c in files.items() if not p.startswith(prefix)}
                elif key != "header":
                    raise ValueError(f"commit operation {key!r} is not supported by the fake Hub")
            sha = self._commit_id(repo_id, files)
            self.repos[repo_id].commits.append((sha, files))
            return sha

    def _commit_id(self, repo_id: str, files: dict[str, bytes]) -> str:
        digest = hashlib.sha1(f"{repo_id}:{len(self.repos.get(repo_id, Repo()).commits)}".encode())
        for path in sorted(files):
            digest.update(path.encode() + git_blob_id(files[path]).encode())
        return digest.hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet test output
            pass

        # -- plumbing -----------------------------------------------------------------------

        def _send(
            self,
            status: int,
            body: bytes = b"",
            headers: dict[str, str] | None = None,
            send_body: bool = True,
        ) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def _json(self, status: int, value: object, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(value).encode()
            self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str, message: str, send_body: bool = True) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message}
            self._send(status, json.dumps({"error": message}).encode(), headers, send_body)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _repo(self, repo_id: str, send_body: bool = True) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found", send_body)
            return repo

        def _authorized(self) -> bool:
            if not self.headers.get("Authorization", "").startswith("Bearer "):
                self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                return False
            return True

        def _route(self, method: str, routes: dict) -> None:
            path = urlsplit(self.path).path
            for pattern, action in routes.items():
                match = re.fullmatch(pattern, path)
                if match:
                    action(**{k: unquote(v) for k, v in match.groupdict().items() if v})
                    return
            hub.unhandled.append(f"{method} {self.path}")
            self._body()  # keep the connection usable
            self._error(501, "NotImplemented", f"fake Hub: {method} {path} is not implemented")

        def do_GET(self) -> None:
            self._route(
                "GET",
                {
                    r"/api/agent-harnesses": self.agent_harnesses,
                    rf"/api/models/{_REPO}": self.model_info,
                    rf"/api/models/{_REPO}/revision/{_REV}": self.model_info,
                    rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?": self.tree,
                    rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)": self.resolve,
                },
            )

        def do_HEAD(self) -> None:
            self._route(
                "HEAD",
                {rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)": partial(self.resolve, send_body=False)},
            )

        def do_POST(self) -> None:
            self._route(
                "POST",
                {
                    r"/api/repos/create": self.create_repo,
                    r"/api/validate-yaml": self.validate_yaml,
                    rf"/api/models/{_REPO}/preupload/{_REV}": self.preupload,
                    rf"/api/models/{_REPO}/commit/{_REV}": self.commit,
                },
            )

        # -- endpoints ----------------------------------------------------------------------

        def create_repo(self) -> None:
            payload = json.loads(self._body())
            if not self._authorized():
                return
            if payload.get("type", "model") != "model":
                self._error(400, "BadRequest", "the fake Hub holds model repositories only")
                return
            repo_id = f"{payload.get('organization') or NAMESPACE}/{payload['name']}"
            url = f"{hub.url}/{repo_id}"
            if not hub.create_repo(repo_id):
                self._json(409, {"error": "You already created this model repo", "url": url})
                return
            self._json(200, {"url": url, "name": repo_id})

        def agent_harnesses(self) -> None:
            self._json(200, {"standardEnvVars": [], "harnesses": {}})

        def validate_yaml(self) -> None:
            self._body()
            self._json(200, {"errors": [], "warnings": []})

        def preupload(self, repo: str, rev: str) -> None:
            payload = json.loads(self._body())
            if not self._authorized() or (found := self._repo(repo)) is None:
                return
            files = found.files(rev)[1]
            self._json(
                200,
                {
                    "files": [
                        {
                            "path": entry["path"],
                            "uploadMode": "regular",
                            "shouldIgnore": False,
                            "oid": git_blob_id(files[entry["path"]])
                            if entry["path"] in files
                            else None,
                        }
                        for entry in payload["files"]
                    ]
                },
            )

        def commit(self, repo: str, rev: str) -> None:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            if not self._authorized() or self._repo(repo) is None:
                return
            if rev != "main":
                self._error(400, "BadRequest", "the fake Hub commits to main only")
                return
            sha = hub.commit(repo, lines)
            self._json(
                200,
                {"commitUrl": f"{hub.url}/{repo}/commit/{sha}", "commitOid": sha, "success": True},
            )

        def _snapshot(self, repo: str, rev: str, send_body: bool = True):
            found = self._repo(repo, send_body)
            if found is None:
                return None
            snapshot = found.files(rev)
            if snapshot is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", send_body)
            return snapshot

        def model_info(self, repo: str, rev: str = "main") -> None:
            snapshot = self._snapshot(repo, rev)
            if snapshot is not None:
                sha, files = snapshot
                siblings = [{"rfilename": path} for path in sorted(files)]
                info = {"id": repo, "modelId": repo, "sha": sha, "private": False, "tags": []}
                self._json(200, {**info, "siblings": siblings})

        def tree(self, repo: str, rev: str, path: str = "") -> None:
            snapshot = self._snapshot(repo, rev)
            if snapshot is None:
                return
            recursive = urlsplit(self.path).query.lower().find("recursive=true") >= 0
            prefix = f"{path.rstrip('/')}/" if path else ""
            entries, folders = [], set()
            for name, content in sorted(snapshot[1].items()):
                if not name.startswith(prefix):
                    continue
                parts = name[len(prefix) :].split("/")
                for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                    folders.add(prefix + "/".join(parts[:depth]))
                if recursive or len(parts) == 1:
                    oid = git_blob_id(content)
                    entries.append({"type": "file", "path": name, "size": len(content), "oid": oid})
            entries += [
                {"type": "directory", "path": folder, "size": 0, "oid": git_blob_id(b"")}
                for folder in sorted(folders)
            ]
            self._json(200, entries)

        def resolve(self, repo: str, rev: str, path: str, send_body: bool = True) -> None:
            snapshot = self._snapshot(repo, rev, send_body)
            if snapshot is None:
                return
            sha, files = snapshot
            if path not in files:
                headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}
                self._send(404, b"Entry not found", headers, send_body)
                return
            content = files[path]
            headers = {
                "X-Repo-Commit": sha,
                "ETag": f'"{git_blob_id(content)}"',
                "Content-Type": "application/octet-stream",
            }
            self._send(200, content, headers, send_body)

    return Handler
