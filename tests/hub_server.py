"""A loopback fake of the Hugging Face Hub HTTP API, just enough for push and pull.

It serves the endpoints huggingface_hub 2.4 calls for ``create_repo``,
``create_branch``, ``upload_folder`` (validate-yaml, preupload, NDJSON commit
with base64 "regular" files) and ``snapshot_download`` (model_info, tree,
``resolve`` with ETag / X-Repo-Commit headers). Every request must carry
``Authorization: Bearer <token>``; every request is recorded, and commit
payloads are checked line by line, so a change in the client protocol makes
the tests fail instead of silently passing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}

    def resolve(self, rev: str) -> str | None:
        return self.branches.get(rev) or (rev if rev in self.commits else None)


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None
    body: bytes


class FakeHub:
    """Start with ``with FakeHub(token) as hub:``; ``hub.endpoint`` is the base URL."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.protocol_errors: list[str] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

            def do_POST(self) -> None:
                hub._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- dispatch --------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = urlsplit(h.path).path
        auth = h.headers.get("Authorization")
        with self.lock:
            self.requests.append(Request(method, h.path, auth, body))
        if auth != f"Bearer {self.token}":
            return self._send(h, 401, {"error": "Invalid credentials in Authorization header"}, method)
        parts = [unquote(p) for p in path.strip("/").split("/")]
        try:
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(h, json.loads(body))
            if method == "POST" and path == "/api/validate-yaml":
                content = json.loads(body)["content"]
                ok = content.startswith("---\n") and "base_model:" in content
                return self._send(h, 200 if ok else 400, {"errors": [] if ok else [{"message": "no front matter"}],
                                                          "warnings": []}, method)
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = "/".join(parts[2:4]), parts[4:]
                return self._api_model(h, method, repo_id, rest, body)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(h, method, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        except (KeyError, ValueError) as exc:
            self.protocol_errors.append(f"{method} {h.path}: {exc!r}")
            return self._send(h, 400, {"error": f"bad request: {exc!r}"}, method)
        self.protocol_errors.append(f"unexpected endpoint {method} {h.path}")
        return self._send(h, 404, {"error": "no such endpoint"}, method)

    def _send(self, h, status: int, payload, method: str, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if status >= 400:
            h.send_header("X-Error-Message", str((payload or {}).get("error", "error")))
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(data)

    # ---- write side ------------------------------------------------------------------------------
    def _create_repo(self, h, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            # the real Hub answers 409 with the url too; create_repo(exist_ok=True) reads it
            return self._send(h, 409, {"error": "You already created this model repo",
                                       "url": f"{self.endpoint}/{repo_id}"}, "POST")
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self.repos[repo_id].branches["main"] = self._commit(self.repos[repo_id], {})
        return self._send(h, 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}, "POST")

    def _commit(self, repo: Repo, files: dict[str, bytes]) -> str:
        digest = hashlib.sha1(json.dumps(sorted((k, git_blob_sha1(v)) for k, v in files.items())).encode())
        digest.update(str(len(repo.commits)).encode())
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        return sha

    def _api_model(self, h, method: str, repo_id: str, rest: list[str], body: bytes) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._send(h, 404, {"error": "Repository not found"}, method)
        if method == "POST" and rest[:1] == ["preupload"]:
            files = json.loads(body)["files"]
            current = repo.commits[repo.resolve(rest[1]) or repo.branches["main"]]
            out = []
            for f in files:
                base64.b64decode(f["sample"], validate=True)
                if not isinstance(f["size"], int):
                    raise ValueError("size must be an int")
                old = current.get(f["path"])
                out.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                            "oid": git_blob_sha1(old) if old is not None else None})
            return self._send(h, 200, {"files": out}, method)
        if method == "POST" and rest[:1] == ["commit"]:
            return self._commit_endpoint(h, repo_id, repo, rest[1], body)
        if method == "POST" and rest[:1] == ["branch"]:
            if rest[1] not in repo.branches:
                repo.branches[rest[1]] = repo.branches["main"]
            return self._send(h, 200, {}, method)
        if method == "GET" and (not rest or rest[0] == "revision"):
            sha = repo.resolve(rest[1] if rest else "main")
            if sha is None:
                return self._send(h, 404, {"error": "Invalid rev id"}, method, {"X-Error-Code": "RevisionNotFound"})
            siblings = [{"rfilename": p} for p in sorted(repo.commits[sha])]
            return self._send(h, 200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                                       "siblings": siblings, "tags": []}, method)
        if method == "GET" and rest[:1] == ["tree"]:
            sha = repo.resolve(rest[1])
            if sha is None:
                return self._send(h, 404, {"error": "Invalid rev id"}, method, {"X-Error-Code": "RevisionNotFound"})
            tree = [{"type": "file", "path": p, "size": len(c), "oid": git_blob_sha1(c)}
                    for p, c in sorted(repo.commits[sha].items())]
            return self._send(h, 200, tree, method)
        raise KeyError(f"unknown model endpoint {rest}")

    def _commit_endpoint(self, h, repo_id: str, repo: Repo, rev: str, body: bytes) -> None:
        if h.headers.get("Content-Type") != "application/x-ndjson":
            raise ValueError(f"commit body must be NDJSON, got {h.headers.get('Content-Type')}")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header" or not lines[0]["value"]["summary"]:
            raise ValueError("first NDJSON line must be the commit header with a summary")
        parent = repo.resolve(rev)
        if parent is None:
            return self._send(h, 404, {"error": "Invalid rev id"}, "POST", {"X-Error-Code": "RevisionNotFound"})
        files = dict(repo.commits[parent])
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                if value["encoding"] != "base64":
                    raise ValueError("file content must be base64")
                files[value["path"]] = base64.b64decode(value["content"], validate=True)
            elif line["key"] == "deletedFile":
                files.pop(value["path"])
            else:
                raise ValueError(f"unsupported commit operation {line['key']}")
        sha = self._commit(repo, files)
        repo.branches[rev] = sha
        return self._send(h, 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                                   "pullRequestUrl": None}, "POST")

    # ---- read side -------------------------------------------------------------------------------
    def _resolve(self, h, method: str, repo_id: str, rev: str, filename: str) -> None:
        repo = self.repos.get(repo_id)
        sha = repo.resolve(rev) if repo else None
        if sha is None:
            return self._send(h, 404, {"error": "Repository not found"}, method, {"X-Error-Code": "RepoNotFound"})
        content = repo.commits[sha].get(filename)
        if content is None:
            return self._send(h, 404, {"error": "Entry not found"}, method,
                              {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
        return self._send(h, 200, None, method, {"ETag": f'"{git_blob_sha1(content)}"', "X-Repo-Commit": sha},
                          raw=content)
