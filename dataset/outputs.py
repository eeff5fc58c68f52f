"""The recaption output contract (DESIGN.md): per-shard Parquet, WebDataset tar and ledger."""
from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from dataset import storage

PARQUET_DIR, WDS_DIR, LEDGER_DIR = "parquet", "wds", "_ledger"

# One row per input sample. Names follow Recap-DataComp-1B where they overlap.
ROW_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("uid", pa.string()),
    ("url", pa.string()),
    ("org_caption", pa.string()),
    ("re_caption", pa.string()),
    ("status", pa.string()),          # 'ok' | 'error'
    ("error", pa.string()),           # readable reason when status == 'error'
    ("finish_reason", pa.string()),   # 'stop' | 'length' (null on error)
    ("num_tokens", pa.int32()),
    ("quality", pa.string()),         # comma-separated flags: 'length', 'repetition'; '' when clean
    ("width", pa.int32()),            # decoded image size (before any downscaling)
    ("height", pa.int32()),
    ("sha256", pa.string()),
    ("org_length", pa.int32()),       # words
    ("re_length", pa.int32()),
    ("fingerprint", pa.string()),
    ("shard", pa.string()),
])


def parquet_path(out: str, shard: str) -> str:
    return storage.join(out, PARQUET_DIR, f"{shard}.parquet")


def wds_path(out: str, shard: str) -> str:
    return storage.join(out, WDS_DIR, f"{shard}.tar")


def ledger_path(out: str, shard: str) -> str:
    return storage.join(out, LEDGER_DIR, f"{shard}.json")


@dataclass
class WdsSample:
    """One training sample: the original image bytes and both captions."""
    key: str
    image_ext: str
    image: bytes
    org_caption: str
    re_caption: str
    meta: dict = field(default_factory=dict)


def _tmp_local(suffix: str) -> str:
    fd, path = tempfile.mkstemp(prefix="ov-", suffix=suffix)
    os.close(fd)
    return path


def write_parquet(rows: list[dict], path: str) -> int:
    """Write rows (dicts with ROW_SCHEMA fields) atomically; returns the file size."""
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    local = _tmp_local(".parquet")
    pq.write_table(table, local, compression="zstd")
    size = os.path.getsize(local)
    storage.put_file(local, path)
    return size


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_wds(samples: list[WdsSample], path: str) -> int:
    """Write `{key}.{ext}`, `{key}.txt` (web caption), `{key}.re_caption.txt` and `{key}.json` per sample."""
    local = _tmp_local(".tar")
    mtime = int(time.time())
    with tarfile.open(local, "w") as tar:
        for s in samples:
            _add(tar, f"{s.key}.{s.image_ext}", s.image, mtime)
            _add(tar, f"{s.key}.txt", s.org_caption.encode(), mtime)
            _add(tar, f"{s.key}.re_caption.txt", s.re_caption.encode(), mtime)
            _add(tar, f"{s.key}.json", json.dumps(s.meta, sort_keys=True).encode(), mtime)
    size = os.path.getsize(local)
    storage.put_file(local, path)
    return size


def read_ledger(out: str, shard: str) -> dict | None:
    path = ledger_path(out, shard)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_bytes(path))


def write_ledger(out: str, shard: str, ledger: dict, *, replace: bool = False) -> bool:
    """Mark the shard done. Without `replace` only the first writer wins; False means another did."""
    data = json.dumps(ledger, indent=1, sort_keys=True).encode()
    if replace:
        storage.write_bytes(ledger_path(out, shard), data)
        return True
    return storage.put_if_absent(ledger_path(out, shard), data)
