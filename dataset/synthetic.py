"""Synthetic img2dataset-style shards: coloured shapes whose web captions describe them.

`python -m dataset.synthetic --out DIR --shards N --per-shard M [--bad]` writes
`DIR/{00000..}.tar` (+ `.parquet` and `_stats.json` like img2dataset) and prints what it injected.

`python -m dataset.synthetic --metadata-only --out DIR --shards N --per-shard M [--bad] --url-base URL`
writes DataComp-like metadata `DIR/metadata/{00000..}.parquet` (uid, url, text, original_width,
original_height, sha256) and the images it points at, `DIR/images/{uid}.jpg`;
`python -m dataset.synthetic serve DIR --port P` serves them on loopback for img2dataset.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import random
import struct
import sys
import tarfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 210, 30),
    "purple": (140, 40, 170), "orange": (245, 140, 20), "black": (15, 15, 15), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
CAPTION_TEMPLATES = (
    "a {color} {shape}", "{color} {shape} on a {bg} background", "photo of a {color} {shape}",
    "a {shape} in {color}", "simple {color} {shape} clipart", "{color} {shape} icon",
)
BACKGROUNDS = ("white", "black", "yellow", "blue")

# Bad samples `--bad` injects, each with whether a correct reader can still caption it.
BAD_KINDS = {
    "corrupt_jpeg": False,    # JPEG magic followed by garbage
    "truncated_jpeg": False,  # a valid JPEG cut in half
    "zero_bytes": False,      # empty image member
    "bomb_header": False,     # PNG whose header claims 30000x30000
    "missing_image": False,   # txt + json but no image member
    "missing_txt": True,      # image + json, no web caption
    "missing_json": True,     # image + txt, no metadata
    "png_alpha": True,        # RGBA PNG
    "cmyk_jpeg": True,        # CMYK JPEG
    "png_16bit": True,        # 16-bit greyscale PNG
    "duplicate_key": True,    # a second sample group reusing an earlier key (first one wins)
}


@dataclass(frozen=True)
class ShapeSample:
    color: str
    shape: str
    background: str

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"


def draw_shape(sample: ShapeSample, size: int, rng: random.Random) -> Image.Image:
    """Render one shape at a random position and scale on a plain background."""
    bg = COLORS[sample.background]
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = COLORS[sample.color]
    box = (cx - r, cy - r, cx + r, cy + r)
    if sample.shape == "circle":
        d.ellipse(box, fill=fill)
    elif sample.shape == "square":
        d.rectangle(box, fill=fill)
    elif sample.shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif sample.shape == "cross":
        w = r / 3
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    elif sample.shape == "ring":
        d.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    elif sample.shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    noise = np.random.default_rng(rng.randrange(2**32)).integers(-12, 13, (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def random_sample(rng: random.Random) -> ShapeSample:
    color = rng.choice(list(COLORS))
    background = rng.choice([b for b in BACKGROUNDS if b != color])
    return ShapeSample(color, rng.choice(SHAPES), background)


def web_caption(sample: ShapeSample, rng: random.Random) -> str:
    return rng.choice(CAPTION_TEMPLATES).format(color=sample.color, shape=sample.shape, bg=sample.background)


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png_bytes(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose IHDR claims a huge size (the pixels are never there)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def bad_image(kind: str, img: Image.Image, rng: random.Random) -> tuple[str, bytes]:
    """Return (extension, bytes) for an injected bad image member."""
    if kind == "corrupt_jpeg":
        return "jpg", b"\xff\xd8\xff\xe0" + rng.randbytes(2000)
    if kind == "truncated_jpeg":
        data = jpeg_bytes(img)
        return "jpg", data[: len(data) // 2]
    if kind == "zero_bytes":
        return "jpg", b""
    if kind == "bomb_header":
        return "png", bomb_png_bytes()
    if kind == "png_alpha":
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.new("L", img.size, 128))
        return "png", png_bytes(rgba)
    if kind == "cmyk_jpeg":
        return "jpg", jpeg_bytes(img.convert("CMYK"))
    if kind == "png_16bit":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257)
        return "png", png_bytes(Image.fromarray(arr.astype(np.uint16)))
    return "jpg", jpeg_bytes(img)


def add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    tar.addfile(info, io.BytesIO(data))


def write_shard(
    out_dir: Path, shard_id: int, per_shard: int, *, image_size: int = 128, bad: bool = False,
    seed: int = 0, url_base: str = "http://127.0.0.1:8000/images",
) -> dict:
    """Write one img2dataset-style shard; returns {"keys": [...], "injected": {key: kind}, "labels": {key: label}}."""
    rng = random.Random(seed * 1_000_003 + shard_id)
    name = f"{shard_id:05d}"
    mtime = time.time()
    bad_keys = list(BAD_KINDS) if bad else []
    injected: dict[str, str] = {}
    labels: dict[str, str] = {}
    keys: list[str] = []
    rows = []
    with tarfile.open(out_dir / f"{name}.tar", "w") as tar:
        for i in range(per_shard + (len(bad_keys) if bad else 0)):
            key = f"{shard_id:05d}{i:04d}"
            kind = bad_keys[i - per_shard] if i >= per_shard else None
            sample = random_sample(rng)
            img = draw_shape(sample, image_size, rng)
            caption = web_caption(sample, rng)
            if kind == "duplicate_key":
                key = keys[0]
            uid = hashlib.md5(f"{seed}-{key}-{i}".encode()).hexdigest()
            ext, data = bad_image(kind, img, rng) if kind else ("jpg", jpeg_bytes(img))
            meta = {
                "url": f"{url_base}/{uid}.{ext}", "uid": uid, "key": key, "caption": caption,
                "status": "success", "error_message": None, "width": img.width, "height": img.height,
                "original_width": img.width, "original_height": img.height, "exif": None,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            if kind != "missing_image":
                add_member(tar, f"{key}.{ext}", data, mtime)
            if kind != "missing_txt":
                add_member(tar, f"{key}.txt", caption.encode(), mtime)
            if kind != "missing_json":
                add_member(tar, f"{key}.json", json.dumps(meta).encode(), mtime)
            if kind:
                injected[key if kind != "duplicate_key" else f"{key}#dup"] = kind
            if kind != "duplicate_key":
                keys.append(key)
                labels[key] = sample.label
            rows.append({"key": key, "uid": uid, "url": meta["url"], "caption": caption, "status": "success"})
    pq.write_table(pa.Table.from_pylist(rows), out_dir / f"{name}.parquet")
    stats = {"count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0}
    (out_dir / f"{name}_stats.json").write_text(json.dumps(stats))
    return {"shard": name, "keys": keys, "injected": injected, "labels": labels}


def write_shards(out_dir: str | Path, shards: int, per_shard: int, *, bad: bool = False,
                 image_size: int = 128, seed: int = 0) -> list[dict]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [write_shard(out, s, per_shard, image_size=image_size, bad=bad, seed=seed) for s in range(shards)]


RECAPTION_TEMPLATES = (
    "The image shows a {color} {shape} on a plain {bg} background. The {shape} is drawn in a flat {color} colour. There is nothing else in the picture.",
    "A single {color} {shape} is placed on a {bg} background. The edges of the {shape} are sharp! The picture is simple and clean.",
    "This is a simple graphic of a {shape}. Its colour is {color} and the background is {bg}. The image has slight noise.",
)


def write_recaptioned_wds(out_dir: str | Path, shards: int, per_shard: int, *, image_size: int = 128,
                          seed: int = 0) -> list[dict]:
    """Write `out_dir/{00000..}.tar` in the recaption job's `wds/` format with descriptive recaptions.

    For training tests and demos that need captions which describe the image (a random-weight
    captioner's output does not). Returns [{"shard", "labels": {key: label}}].
    """
    from dataset.outputs import WdsSample, write_wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    infos = []
    for shard_id in range(shards):
        rng = random.Random(seed * 1_000_003 + shard_id)
        samples, labels = [], {}
        for i in range(per_shard):
            key = f"{shard_id:05d}{i:04d}"
            sample = random_sample(rng)
            img = draw_shape(sample, image_size, rng)
            fields = dict(color=sample.color, shape=sample.shape, bg=sample.background)
            re_caption = rng.choice(RECAPTION_TEMPLATES).format(**fields)
            samples.append(WdsSample(key, "jpg", jpeg_bytes(img), web_caption(sample, rng), re_caption,
                                     {"key": key, "label": sample.label}))
            labels[key] = sample.label
        write_wds(samples, str(out / f"{shard_id:05d}.tar"))
        infos.append({"shard": f"{shard_id:05d}", "labels": labels})
    return infos


def write_imagefolder(out_dir: str | Path, per_class: int, *, image_size: int = 128, seed: int = 1) -> list[str]:
    """Write a held-out ImageFolder tree `out_dir/{color shape}/NNN.jpg` for zero-shot evaluation."""
    out = Path(out_dir)
    rng = random.Random(seed)
    classes = [f"{c} {s}" for c in COLORS for s in SHAPES]
    for label in classes:
        color, shape = label.split()
        (out / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            bg = rng.choice([b for b in BACKGROUNDS if b != color])
            (out / label / f"{i:03d}.jpg").write_bytes(jpeg_bytes(draw_shape(ShapeSample(color, shape, bg), image_size, rng)))
    return classes


# URL failures `--metadata-only --bad` injects once each per metadata file. The loopback server
# tells them apart by the first path segment; good images live under /images/.
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
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


class _ImageHandler(BaseHTTPRequestHandler):
    server: ImageServer

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
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

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (signature of the base class)
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


RECAPTION_ERRORS = (
    ("decode", "cannot identify image file"),
    ("truncated", "image file is truncated (17 bytes not processed)"),
    ("empty", "zero-byte image"),
    ("bomb", "30000x30000 exceeds 89478485 pixels"),
)
SYNTHETIC_CAPTION_CONFIG = {
    "model": "synthetic/tiny-llava", "revision": "0" * 40, "backend": "synthetic",
    "prompt": "Please generate a detailed caption of this image. Please be as descriptive as possible.",
    "max_tokens": 128, "temperature": 0.0, "top_k": -1, "top_p": 1.0, "seed": 0, "image_size": 336,
}


def recaption_row(shard: str, i: int, sample: ShapeSample, rng: random.Random, fingerprint: str,
                  error: tuple[str, str] | None) -> dict:
    """One ROW_SCHEMA row as the recaption job writes it; `error` is (reason, detail) or None."""
    org = web_caption(sample, rng)
    key = f"{shard}{i:04d}"
    row = {
        "key": key, "uid": hashlib.md5(f"{fingerprint}-{key}".encode()).hexdigest(),
        "url": f"http://127.0.0.1:8000/images/{key}.jpg", "org_caption": org, "re_caption": None,
        "status": "error", "error": f"{error[0]}: {error[1]}" if error else None, "finish_reason": None,
        "num_tokens": None, "quality": None, "width": None, "height": None,
        "sha256": hashlib.sha256(key.encode()).hexdigest(), "org_length": len(org.split()), "re_length": None,
        "fingerprint": fingerprint, "shard": shard,
    }
    if error:
        return row
    fields = dict(color=sample.color, shape=sample.shape, bg=sample.background)
    re_caption = " ".join(rng.choice(RECAPTION_TEMPLATES).format(**fields) for _ in range(rng.randint(1, 3)))
    finish = "length" if rng.random() < 0.1 else "stop"
    size = rng.choice((128, 256, 512))
    row.update(status="ok", re_caption=re_caption, finish_reason=finish, num_tokens=len(re_caption.split()) * 4 // 3,
               quality="length" if finish == "length" else "", width=size, height=size,
               re_length=len(re_caption.split()))
    return row


def write_recaption_outputs(out: str, shards: int, per_shard: int, *, errors_per_shard: int = 3,
                            fingerprint: str = "f" * 16, seed: int = 0, image_size: int = 96,
                            start: float = 1_700_000_000.0) -> dict:
    """Write what a finished recaption run leaves in OUT (parquet, wds, ledgers, _run.json) without a model.

    For publish/report tests and demos: two simulated workers take shards in turn; error rows
    cycle through RECAPTION_ERRORS. Returns the `_run.json` summary.
    """
    from dataset import storage
    from dataset.outputs import WdsSample, parquet_path, wds_path, write_ledger, write_parquet, write_wds

    config = {**SYNTHETIC_CAPTION_CONFIG, "seed": seed}
    worker_clock = [start, start + 1.5]
    totals = {"ok": 0, "error": 0, "tokens": 0}
    for shard_id in range(shards):
        shard = f"{shard_id:05d}"
        rng = random.Random(seed * 1_000_003 + shard_id)
        n_errors = min(errors_per_shard, per_shard)
        error_at = {i * per_shard // n_errors: RECAPTION_ERRORS[(shard_id + i) % len(RECAPTION_ERRORS)]
                    for i in range(n_errors)}
        rows, samples = [], []
        for i in range(per_shard):
            sample = random_sample(rng)
            row = recaption_row(shard, i, sample, rng, fingerprint, error_at.get(i))
            rows.append(row)
            if row["status"] == "ok":
                image = jpeg_bytes(draw_shape(sample, image_size, rng))
                samples.append(WdsSample(row["key"], "jpg", image, row["org_caption"], row["re_caption"],
                                         {"key": row["key"], "uid": row["uid"], "url": row["url"]}))
        paths = {"parquet": parquet_path(out, shard), "wds": wds_path(out, shard)}
        files = {"parquet": {"path": paths["parquet"], "bytes": write_parquet(rows, paths["parquet"])},
                 "wds": {"path": paths["wds"], "bytes": write_wds(samples, paths["wds"])}}
        reasons = Counter(reason for reason, _ in error_at.values())
        worker = shard_id % 2
        seconds = 20.0 + 10.0 * rng.random()
        tokens = sum(r["num_tokens"] or 0 for r in rows)
        write_ledger(out, shard, {
            "shard": shard, "input": f"shards/{shard}.tar", "fingerprint": fingerprint, "caption_config": config,
            "samples_in": per_shard, "rows_out": per_shard, "ok": len(samples), "error": per_shard - len(samples),
            "duplicates": 0, "errors_by_reason": dict(reasons),
            "quality": dict(Counter(f for r in rows if r["quality"] for f in r["quality"].split(","))),
            "started_at": worker_clock[worker],
            "finished_at": worker_clock[worker] + seconds, "seconds": seconds, "images_per_s": per_shard / seconds,
            "tokens": tokens, "tokens_per_s": tokens / seconds, "worker": f"worker-{worker}", "attempt": 1,
            "files": files,
        }, replace=True)
        worker_clock[worker] += seconds + 0.5
        totals["ok"] += len(samples)
        totals["error"] += per_shard - len(samples)
        totals["tokens"] += tokens
    elapsed = max(worker_clock) - start
    run = {"fingerprint": fingerprint, "caption_config": config,
           "shards": {"total": shards, "done": shards, "failed": []},
           "rows": {"ok": totals["ok"], "error": totals["error"]},
           "images_per_s": shards * per_shard / elapsed, "tokens_per_s": totals["tokens"] / elapsed,
           "started_at": start, "finished_at": start + elapsed}
    storage.write_bytes(storage.join(out, "_run.json"), json.dumps(run, indent=1).encode())
    return run


def serve_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m dataset.synthetic serve",
                                description="Serve DIR/images/ on loopback with the injected-failure routes: "
                                + "; ".join(f"/{k}/: {v}" for k, v in URL_FAILURES.items()))
    p.add_argument("dir", help="folder written by --metadata-only")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--hang-seconds", type=float, default=60.0,
                   help="how long /hang/ requests sleep; longer than img2dataset's default 10 s timeout")
    a = p.parse_args(argv)
    server = ImageServer(a.dir, a.port, a.hang_seconds)
    print(f"serving {a.dir}/images at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        serve_main(argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--shards", type=int, default=2, help="shards (with --metadata-only: metadata files)")
    p.add_argument("--per-shard", type=int, default=32, help="good samples per shard (or per metadata file)")
    p.add_argument("--bad", action="store_true",
                   help=f"also inject one of each bad sample per shard: {', '.join(BAD_KINDS)}; "
                        f"with --metadata-only one of each failing url per file: {', '.join(URL_FAILURES)}")
    p.add_argument("--image-size", type=int, default=128, help="side of the square images in px (shards only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metadata-only", action="store_true",
                   help="write DataComp-like metadata parquet + the images it points at instead of shards")
    p.add_argument("--url-base", default="http://127.0.0.1:8000",
                   help="where `serve` will listen (--metadata-only); matches serve's default port")
    a = p.parse_args(argv)
    if a.metadata_only:
        info = write_metadata(a.out, a.shards, a.per_shard, url_base=a.url_base, bad=a.bad, seed=a.seed)
        print(f"{a.out}/metadata: {len(info['files'])} files, {info['good']} good urls, "
              f"{len(info['injected'])} failing ({', '.join(sorted(set(info['injected'].values()))) or 'none'})")
        return
    for info in write_shards(a.out, a.shards, a.per_shard, bad=a.bad, image_size=a.image_size, seed=a.seed):
        print(f"{a.out}/{info['shard']}.tar: {len(info['keys'])} keys, injected {len(info['injected'])} bad")


if __name__ == "__main__":
    main()
