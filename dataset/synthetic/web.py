"""DataComp-like metadata whose urls point at a loopback image server with failing routes."""
from __future__ import annotations

import contextlib
import hashlib
import random
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dataset.synthetic.shapes import draw_shape, jpeg_bytes, random_sample, web_caption

URL_FAILURES = {
    "missing": "answers 404 Not Found",
    "hang": "sleeps for the server's hang time before answering (past any download timeout)",
    "corrupt": "answers 200 with JPEG magic followed by garbage",
}


def write_metadata(out_dir: str | Path, files: int, per_file: int, *, url_base: str, bad: bool = False,
                   seed: int = 0, min_size: int = 64, max_size: int = 768) -> dict:
    """Write DataComp-like `metadata/{00000..}.parquet` and the images their urls point at.

    Good rows point at `{url_base}/images/{uid}.jpg`; with `bad`, each file also gets one row per
    URL_FAILURES kind at `{url_base}/{kind}/{uid}.jpg`. Returns {"files", "good", "injected": {uid: kind}}.
    """
    out = Path(out_dir)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    injected: dict[str, str] = {}
    paths, good = [], 0
    for file_id in range(files):
        rng = random.Random(seed * 1_000_003 + file_id)
        kinds = [None] * per_file + (list(URL_FAILURES) if bad else [])
        rows = []
        for i, kind in enumerate(kinds):
            sample = random_sample(rng)
            img = draw_shape(sample, rng.randint(min_size, max_size), rng)
            data = jpeg_bytes(img)
            uid = hashlib.md5(f"{seed}-meta-{file_id}-{i}".encode()).hexdigest()
            if kind in (None, "hang"):
                (out / "images" / f"{uid}.jpg").write_bytes(data)
            if kind:
                injected[uid] = kind
            else:
                good += 1
            rows.append({
                "uid": uid, "url": f"{url_base.rstrip('/')}/{kind or 'images'}/{uid}.jpg",
                "text": web_caption(sample, rng), "original_width": img.width, "original_height": img.height,
                "sha256": hashlib.sha256(data).hexdigest(),
            })
        path = out / "metadata" / f"{file_id:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        paths.append(str(path))
    return {"files": paths, "good": good, "injected": injected}


class ImageServer(ThreadingHTTPServer):
    """Static server for `DIR/images/` with the URL_FAILURES routes; `stop()` releases hanging requests."""

    daemon_threads = True

    def __init__(self, root: str | Path, port: int = 0, hang_seconds: float = 60.0, host: str = "127.0.0.1"):
        self.images = Path(root) / "images"
        self.hang_seconds = hang_seconds
        self.stopping = threading.Event()
        super().__init__((host, port), _ImageHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{port}"

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()

    def handle_error(self, request, client_address) -> None:
        """A client that gave up (the /hang/ route outlives every download timeout) is expected: stay quiet."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _ImageHandler(BaseHTTPRequestHandler):
    server: ImageServer

    def do_GET(self) -> None:
        route, _, name = self.path.lstrip("/").partition("/")
        if route == "hang":
            self.server.stopping.wait(self.server.hang_seconds)
            route = "images"
        if route == "corrupt":
            body = b"\xff\xd8\xff\xe0" + hashlib.sha512(name.encode()).digest() * 16
        elif route == "images" and Path(name).name == name and (self.server.images / name).is_file():
            body = (self.server.images / name).read_bytes()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        """Silence the per-request access log."""


@contextlib.contextmanager
def serving(root: str | Path, port: int = 0, hang_seconds: float = 60.0) -> Iterator[ImageServer]:
    """Run an ImageServer in a background thread for the duration of the block."""
    server = ImageServer(root, port, hang_seconds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join()
