"""A minimal Hugging Face Hub on loopback: what `create_repo`, `dataset_info`, `preupload_lfs_files` and
`create_commit` call, with LFS storage, so a test can see what each commit did and when files arrived.

Endpoints (as huggingface_hub 2.x's client code calls them): create repo (records `private`; makes the
initial commit the Hub makes), dataset info (`private`, head `sha`), preupload (answers "lfs" for the
file types the Hub's default .gitattributes sends to LFS, "regular" for the rest), the LFS batch API
with a basic-transfer upload URL and a verify URL, commit (NDJSON: inline regular files, `lfsFile`
entries naming uploaded objects, deletions; refused with 412 when `parentCommit` is not the head),
the tree listing, README metadata validation (parses the YAML front matter, as the Hub rejects a card
it cannot read). Anything else is answered 404 and recorded in `unhandled`.

Set `HF_HUB_DISABLE_XET=1` (or `huggingface_hub.constants.HF_HUB_DISABLE_XET = True`): the stub speaks
LFS, not Xet. `events` is the ordered log: ("lfs-upload", oid), ("commit", oid).
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

REPO = r"(?P<kind>datasets|models|spaces)/(?P<repo>[^/]+/[^/]+?)"
LFS_SUFFIXES = (".parquet", ".tar", ".bin", ".safetensors", ".arrow", ".zst")
GITATTRIBUTES = b"".join(b"*%s filter=lfs diff=lfs merge=lfs -text\n" % s.encode() for s in LFS_SUFFIXES)
ROUTES = {   # (method, pattern) -> handler; `open` routes need no token (pre-signed in the real Hub)
    ("POST", re.compile(r"/api/repos/create")): "create",
    ("GET", re.compile(rf"/api/{REPO}")): "info",
    ("GET", re.compile(rf"/api/{REPO}/revision/(?P<rev>[^/]+)")): "info",
    ("POST", re.compile(rf"/api/{REPO}/preupload/(?P<rev>[^/]+)")): "preupload",
    ("POST", re.compile(rf"/{REPO}\.git/info/lfs/objects/batch")): "lfs_batch",
    ("PUT", re.compile(r"/lfs-upload/(?P<oid>[0-9a-f]{64})")): "lfs_upload",
    ("POST", re.compile(r"/lfs-verify")): "lfs_verify",
    ("POST", re.compile(rf"/api/{REPO}/commit/(?P<rev>[^/]+)")): "commit",
    ("GET", re.compile(rf"/api/{REPO}/tree/(?P<rev>[^/]+)(?P<path>/.*)?")): "tree",
    ("POST", re.compile(r"/api/validate-yaml")): "validate_yaml",
}
OPEN = {"lfs_upload"}


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStub(ThreadingHTTPServer):
    """Repos live in memory: `repos["datasets/ORG/NAME"] = {path: bytes}`; `commits` records every commit
    as {"repo", "summary", "parent", "added", "deleted", "oid"}; `private["datasets/ORG/NAME"]` its visibility."""

    daemon_threads = True

    def __init__(self, token: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}
        self.private: dict[str, bool] = {}
        self.heads: dict[str, str] = {}
        self.lfs: dict[str, bytes] = {}   # sha256 -> content, uploaded but not necessarily committed
        self.commits: list[dict] = []
        self.events: list[tuple[str, str]] = []
        self.calls: list[str] = []
        self.unhandled: list[str] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def commits_to(self, repo: str) -> list[dict]:
        """The commits to `repo` (ORG/NAME) after its creation."""
        return [c for c in self.commits if c["repo"] == repo and c["summary"] != "initial commit"]

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
        for (route_method, pattern), name in ROUTES.items():  # noqa: B007 - the match found is used below
            match = pattern.fullmatch(path)
            if route_method == method and match:
                break
        else:
            self.server.unhandled.append(f"{method} {path}")
            return self._json(404, {"error": f"stub does not implement {method} {path}"})
        if name not in OPEN and self.headers.get("Authorization") != f"Bearer {self.server.token}":
            return self._json(401, {"error": "Invalid credentials in Authorization header"})
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.calls.append(name)
            getattr(self, name)(match.groupdict(), body)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def _json(self, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _key(self, groups: dict) -> str:
        return f"{groups['kind']}/{groups['repo']}"

    def _repo(self, groups: dict) -> dict[str, bytes] | None:
        return self.server.repos.get(self._key(groups))

    def _record_commit(self, repo: str, key: str, record: dict, body: bytes) -> str:
        oid = hashlib.sha1(body + self.server.heads.get(key, "").encode()).hexdigest()
        self.server.commits.append({**record, "repo": repo, "parent": self.server.heads.get(key), "oid": oid})
        self.server.events.append(("commit", oid))
        self.server.heads[key] = oid
        return oid

    def create(self, _groups: dict, body: bytes) -> None:
        request = json.loads(body)
        repo_id = f"{request['organization']}/{request['name']}"
        key = f"{request.get('type', 'model')}s/{repo_id}"
        url = f"{self.server.url}/{key}"
        if key in self.server.repos:
            return self._json(409, {"error": "You already created this repo", "url": url})
        self.server.repos[key] = {".gitattributes": GITATTRIBUTES}
        self.server.private[key] = request.get("visibility", "private" if request.get("private") else "public") \
            == "private"
        self._record_commit(repo_id, key, {"summary": "initial commit", "added": [".gitattributes"], "deleted": []},
                            body)
        self._json(200, {"url": url, "name": repo_id})

    def info(self, groups: dict, _body: bytes) -> None:
        files = self._repo(groups)
        if files is None:
            return self._json(404, {"error": "Repository not found"})
        key = self._key(groups)
        self._json(200, {"id": groups["repo"], "sha": self.server.heads[key], "private": self.server.private[key],
                         "siblings": [{"rfilename": path} for path in sorted(files)]})

    def preupload(self, groups: dict, body: bytes) -> None:
        files = self._repo(groups)
        if files is None:
            return self._json(404, {"error": "Repository not found"})
        answer = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                   "shouldIgnore": False, "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None}
                  for f in json.loads(body)["files"]]
        self._json(200, {"files": answer})

    def lfs_batch(self, groups: dict, body: bytes) -> None:
        if self._repo(groups) is None:
            return self._json(404, {"error": "Repository not found"})
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.server.lfs:
                entry["actions"] = {"upload": {"href": f"{self.server.url}/lfs-upload/{obj['oid']}"},
                                    "verify": {"href": f"{self.server.url}/lfs-verify"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, groups: dict, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != groups["oid"]:
            return self._json(400, {"error": "content does not match its oid"})
        self.server.lfs[groups["oid"]] = body
        self.server.events.append(("lfs-upload", groups["oid"]))
        self._json(200, {})

    def lfs_verify(self, _groups: dict, body: bytes) -> None:
        obj = json.loads(body)
        ok = len(self.server.lfs.get(obj["oid"], b"")) == obj["size"] and obj["oid"] in self.server.lfs
        self._json(200 if ok else 404, {} if ok else {"error": "object not uploaded"})

    def commit(self, groups: dict, body: bytes) -> None:
        files = self._repo(groups)
        if files is None:
            return self._json(404, {"error": "Repository not found"})
        key = self._key(groups)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        parent = header.get("parentCommit")
        if parent is not None and parent != self.server.heads[key]:
            return self._json(412, {"error": f"parent commit {parent} is not the head {self.server.heads[key]}"})
        changes: dict[str, bytes | None] = {}
        for line in lines:
            kind, value = line["key"], line["value"]
            if kind == "file" and value.get("encoding") == "base64":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif kind == "lfsFile":
                if value["oid"] not in self.server.lfs:
                    return self._json(400, {"error": f"{value['path']}: LFS object {value['oid']} was not uploaded"})
                changes[value["path"]] = self.server.lfs[value["oid"]]
            elif kind == "deletedFile":
                changes[value["path"]] = None
            elif kind != "header":
                return self._json(400, {"error": f"stub cannot take commit entry {kind!r}"})
        for path, data in changes.items():   # all or nothing: applied only once every entry checked out
            if data is None:
                files.pop(path, None)
            else:
                files[path] = data
        record = {"summary": header["summary"], "added": sorted(p for p, d in changes.items() if d is not None),
                  "deleted": sorted(p for p, d in changes.items() if d is None)}
        oid = self._record_commit(groups["repo"], key, record, body)
        self._json(200, {"commitUrl": f"{self.server.url}/{key}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None})

    def tree(self, groups: dict, _body: bytes) -> None:
        files = self._repo(groups)
        if files is None:
            return self._json(404, {"error": "Repository not found"})
        prefix = (groups["path"] or "/").lstrip("/")
        self._json(200, [{"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
                         for path, data in sorted(files.items()) if path.startswith(prefix)])

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
