"""img2dataset-style input shards: `{00000..}.tar` with `.parquet` and `_stats.json` beside each."""
from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import random
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dataset.reader import ReadLimits, normalise_key
from dataset.synthetic.bad_inputs import BAD_KINDS, LINK_KINDS, bad_caption, bad_image, bad_json, bad_name
from dataset.synthetic.shapes import draw_shape, jpeg_bytes, random_sample, web_caption


def add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float, link_type: bytes | None = None,
               link_to: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.mtime = int(mtime)
    if link_type is not None:
        info.type, info.linkname = link_type, link_to
        tar.addfile(info)
        return
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(
    out_dir: Path, shard_id: int, per_shard: int, *, image_size: int = 128, bad: bool = False,
    seed: int = 0, url_base: str = "http://127.0.0.1:8000/images", limits: ReadLimits = ReadLimits(),
) -> dict:
    """Write one img2dataset-style shard; returns {"keys": [...], "injected": {key: kind}, "labels": {key: label}}.

    Keys are the reader's normalised keys. A duplicate group of `kind` is listed as "FIRST_KEY#kind".
    Oversized members are one byte over `limits`.
    """
    rng = random.Random(seed * 1_000_003 + shard_id)
    name = f"{shard_id:05d}"
    mtime = time.time()
    bad_keys = list(BAD_KINDS) if bad else []
    injected: dict[str, str | None] = {}
    labels: dict[str, str] = {}
    keys: list[str] = []
    rows = []
    with tarfile.open(out_dir / f"{name}.tar", "w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for i in range(per_shard + len(bad_keys)):
            kind = bad_keys[i - per_shard] if i >= per_shard else None
            raw = bad_name(kind, f"{shard_id:05d}{i:04d}", keys[0] if keys else "")
            key = normalise_key(raw.encode("utf-8", "surrogateescape"))
            sample = random_sample(rng)
            img = draw_shape(sample, image_size, rng)
            caption = web_caption(sample, rng)
            uid = hashlib.md5(f"{seed}-{raw}-{i}".encode("utf-8", "surrogateescape")).hexdigest()
            ext, data = bad_image(kind, img, rng, limits)
            meta = {
                "url": f"{url_base}/{uid}.{ext}", "uid": uid, "key": key, "caption": caption,
                "status": "success", "error_message": None, "width": img.width, "height": img.height,
                "original_width": img.width, "original_height": img.height, "exif": None,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            if kind in LINK_KINDS:
                add_member(tar, f"{raw}.{ext}", b"", mtime, LINK_KINDS[kind], f"{keys[0]}.jpg")
            elif kind != "missing_image":
                add_member(tar, f"{raw}.{ext}", data, mtime)
            if kind != "missing_txt":
                add_member(tar, f"{raw}.txt", bad_caption(kind, caption, limits).encode(), mtime)
            if kind != "missing_json":
                add_member(tar, f"{raw}.json", bad_json(kind, meta, limits), mtime)
            if key in keys:
                injected[f"{key}#{kind}"] = kind
            else:
                if kind:
                    injected[key] = kind
                keys.append(key)
                labels[key] = sample.label
            rows.append({"key": key, "uid": uid, "url": meta["url"], "caption": caption, "status": "success"})
    pq.write_table(pa.Table.from_pylist(rows), out_dir / f"{name}.parquet")
    stats = {"count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0}
    (out_dir / f"{name}_stats.json").write_text(json.dumps(stats))
    return {"shard": name, "keys": keys, "injected": injected, "labels": labels}


def write_shards(out_dir: str | Path, shards: int, per_shard: int, *, bad: bool = False,
                 image_size: int = 128, seed: int = 0, limits: ReadLimits = ReadLimits()) -> list[dict]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [write_shard(out, s, per_shard, image_size=image_size, bad=bad, seed=seed, limits=limits)
            for s in range(shards)]


def cut_shard(tar: str | Path, keep: int) -> None:
    """Cut a tar to its first `keep` bytes, as a download that stopped (or a read that failed) leaves it."""
    path = Path(tar)
    path.write_bytes(path.read_bytes()[:keep])


def _data(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    file = tar.extractfile(member)
    return file.read() if file is not None else b""


def compress_shard(tar: str | Path, codec: str) -> None:
    """Compress a tar in place, keeping its name: `gzip`, `bzip2` or `xz` (tarfile would read all three)."""
    path = Path(tar)
    compressors: dict[str, Callable[[bytes], bytes]] = {"gzip": gzip.compress, "bzip2": bz2.compress,
                                                        "xz": lzma.compress}
    path.write_bytes(compressors[codec](path.read_bytes()))


def rewrite_members(tar_path: str | Path, change: Callable[[str, bytes], tuple[str, bytes]]) -> None:
    """Rewrite a shard in place, each member's (name, data) passed through `change(name, data)`."""
    with tarfile.open(tar_path) as tar:  # links and other non-regular members are kept as they are
        members = [(m, change(m.name, _data(tar, m)) if m.isfile() else None) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for member, changed in members:
            if changed is None:
                tar.addfile(member)
            else:
                add_member(tar, *changed, time.time())


def fix_images(tar_path: str | Path, keys: set[str]) -> None:
    """Good JPEGs for the images of `keys`, as if a flaky source now served them."""
    from PIL import Image

    good = jpeg_bytes(Image.new("RGB", (64, 64), (200, 30, 30)))

    def change(name: str, data: bytes) -> tuple[str, bytes]:
        key, ext = name.split(".", 1)
        return (f"{key}.jpg", good) if key in keys and ext in ("jpg", "png") else (name, data)
    rewrite_members(tar_path, change)
