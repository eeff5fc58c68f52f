"""A minimal Hugging Face Hub on loopback: just what `HfApi.create_repo` and `upload_folder` call.

Endpoints (FACTS.md): create repo, preupload (answers "regular" for every file, so contents travel
inline in the commit and no LFS/Xet storage is needed), commit (NDJSON); plus three that
huggingface_hub 2.x also calls: the tree listing (`list_repo_files`, `upload_folder(delete_patterns=...)`),
README metadata validation (parses the YAML front matter, as the Hub rejects a card it cannot read)
and repo info at a revision (asked when an upload finds every file unchanged). Anything else is
answered 404 and recorded in `unhandled`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

REPO = r"(?P<kind>datasets|models|spaces)/(?P<repo>[^/]+/[^/]+)"
ROUTES = {
    ("POST", re.compile(r"/api/repos/create")): "create",
    ("POST", re.compile(rf"/api/{REPO}/preupload/(?P<rev>[^/]+)")): "preupload",
    ("POST", re.compile(rf"/api/{REPO}/commit/(?P<rev>[^/]+)")): "commit",
    ("GET", re.compile(rf"/api/{REPO}/tree/(?P<rev>[^/]+)(?P<path>/.*)?")): "tree",
    ("POST", re.compile(r"/api/validate-yaml")): "validate_yaml",
    ("GET", re.compile(rf"/api/{REPO}/revision/(?P<rev>[^/]+)")): "revision",
}


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStub(ThreadingHTTPServer):
    """Repos live in memory: `repos["datasets/ORG/NAME"] = {path: bytes}`; `commits` records every commit."""

    daemon_threads = True

    def __init__(self, token: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.calls: list[str] = []
        self.unhandled: list[str] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> HubStub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join()


class _Handler(BaseHTTPRequestHandler):
    server: HubStub

    def _dispatch(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        for (route_method, pattern), name in ROUTES.items():
            match = pattern.fullmatch(path)
            if route_method == method and match:
                break
        else:
            self.server.unhandled.append(f"{method} {path}")
            return self._json(404, {"error": f"stub does not implement {method} {path}"})
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            return self._json(401, {"error": "Invalid credentials in Authorization header"})
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.calls.append(name)
            getattr(self, name)(match.groupdict(), body)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _json(self, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _repo(self, groups: dict) -> dict[str, bytes] | None:
        return self.server.repos.get(f"{groups['kind']}/{groups['repo']}")

    def create(self, _groups: dict, body: bytes) -> None:
        request = json.loads(body)
        repo_id = f"{request['organization']}/{request['name']}"
        key = f"{request.get('type', 'model')}s/{repo_id}"
        url = f"{self.server.url}/{key}"
        if key in self.server.repos:
            return self._json(409, {"error": "You already created this repo", "url": url})
        self.server.repos[key] = {}
        self._json(200, {"url": url, "name": repo_id})

    def preupload(self, groups: dict, body: bytes) -> None:
        files = self._repo(groups)
        if files is None:
            return self._json(404, {"error": "Repository not found"})
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                   "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None}
                  for f in json.loads(body)["files"]]
        self._json(200, {"files": answer})

    def commit(self, groups: dict, body: bytes) -> None:
        files = self._repo(groups)
        if files is None:
            return self._json(404, {"error": "Repository not found"})
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        record = {"repo": groups["repo"], "summary": None, "added": [], "deleted": []}
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                record["summary"] = value["summary"]
            elif key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
                record["added"].append(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
                record["deleted"].append(value["path"])
            else:
                error = f"stub cannot take commit entry {key!r} (it asked for regular uploads)"
                return self._json(400, {"error": error})
        oid = hashlib.sha1(body).hexdigest()
        record["oid"] = oid
        self.server.commits.append(record)
        self._json(200, {"commitUrl": f"{self.server.url}/{groups['kind']}/{groups['repo']}/commit/{oid}",
                         "commitOid": oid, "pullRequestUrl": None})

    def tree(self, groups: dict, _body: bytes) -> None:
        files = self._repo(groups)
        if files is None:
            return self._json(404, {"error": "Repository not found"})
        prefix = (groups["path"] or "/").lstrip("/")
        self._json(200, [{"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
                         for path, data in sorted(files.items()) if path.startswith(prefix)])

    def revision(self, groups: dict, _body: bytes) -> None:
        files = self._repo(groups)
        if files is None:
            return self._json(404, {"error": "Repository not found"})
        head = next((c["oid"] for c in reversed(self.server.commits) if c["repo"] == groups["repo"]), "0" * 40)
        self._json(200, {"id": groups["repo"], "sha": head, "private": False,
                         "siblings": [{"rfilename": path} for path in sorted(files)]})

    def validate_yaml(self, _groups: dict, body: bytes) -> None:
        content = json.loads(body)["content"]
        parts = content.split("---\n", 2)
        try:
            metadata = yaml.safe_load(parts[1]) if content.startswith("---\n") and len(parts) == 3 else None
        except yaml.YAMLError as e:
            return self._json(400, {"errors": [{"message": f"YAML front matter does not parse: {e}"}]})
        if not isinstance(metadata, dict):
            return self._json(400, {"errors": [{"message": "no YAML front matter mapping between --- lines"}]})
        self._json(200, {"errors": [], "warnings": []})

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (signature of the base class)
        """Silence the per-request access log."""
