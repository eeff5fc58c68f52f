"""img2dataset-style input shards: `{00000..}.tar` with `.parquet` and `_stats.json` beside each."""
from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dataset.synthetic.bad_inputs import BAD_KINDS, bad_image
from dataset.synthetic.shapes import draw_shape, jpeg_bytes, random_sample, web_caption


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


def rewrite_members(tar_path: str | Path, change) -> None:
    """Rewrite a shard in place, each member's (name, data) passed through `change(name, data)`."""
    with tarfile.open(tar_path) as tar:
        members = [change(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data, time.time())


def fix_images(tar_path: str | Path, keys: set[str]) -> None:
    """Good JPEGs for the images of `keys`, as if a flaky source now served them."""
    from PIL import Image

    good = jpeg_bytes(Image.new("RGB", (64, 64), (200, 30, 30)))

    def change(name: str, data: bytes) -> tuple[str, bytes]:
        key, ext = name.split(".", 1)
        return (f"{key}.jpg", good) if key in keys and ext in ("jpg", "png") else (name, data)
    rewrite_members(tar_path, change)
