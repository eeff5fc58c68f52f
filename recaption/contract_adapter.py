"""Until the new reader and output contract land: their interfaces over today's dataset/shards.py and
dataset/outputs.py. The flow and the worker import these names from here only; at the merge this file
goes and those imports point at dataset.reader (ShardReader, InputSample, ShardReadError, shard_name),
dataset.outputs (ShardStore, Attempt, build_row, write_parquet, WdsWriter) and dataset.claims (holds).

Today's layout is kept (fixed file names, one ledger per shard, overwritten for generations >= 1), so
publish, report and the job tests read what this writes.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import tarfile
import time
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dataset import outputs, storage
from dataset.shards import read_shard, shard_name  # noqa: F401  (shard_name: part of the reader's interface)
from recaption.postprocess import clean_caption, word_count


class ShardReadError(OSError):
    """The tar could not be read to its end: the attempt fails, nothing is committed."""


@dataclass
class InputSample:
    key: str
    source_key: str | None
    image_ext: str | None
    image: bytes | None
    org_caption: str | None
    meta: dict
    notes: list[str] = field(default_factory=list)
    image_error: str | None = None   # 'reason: detail' when the image cannot even be attempted


@dataclass
class ReadStats:
    samples_in: int = 0
    duplicates: int = 0


class ShardReader:
    """Today's whole-shard reader behind the streaming interface (memory holds the shard, not one sample)."""

    def __init__(self, path: str, limits: object = None, expected_samples: int | None = None):
        self.path, self.expected_samples = path, expected_samples
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[InputSample]:
        shard = read_shard(self.path)
        self.stats = ReadStats(shard.member_groups, len(shard.duplicates))
        for s in shard.samples:
            missing = None if s.image is not None else "missing: no image member" + (
                f" ({'; '.join(s.problems)})" if s.problems else "")
            yield InputSample(s.key, None, s.image_ext, s.image, s.org_caption, s.meta, list(s.problems), missing)
        if shard.read_error:
            raise ShardReadError(shard.read_error)
        if self.expected_samples is not None and self.expected_samples != shard.member_groups:
            raise ShardReadError(f"{self.path}: {shard.member_groups} samples read, {self.expected_samples} expected "
                                 "(img2dataset's _stats.json)")


def build_row(sample: InputSample, *, shard: str, fingerprint: str, error: str | None = None,
              caption: str | None = None, finish_reason: str | None = None, num_tokens: int = 0,
              quality: str = "", width: int | None = None, height: int | None = None) -> dict:
    org = clean_caption(sample.org_caption or "")
    return {"key": sample.key, "uid": sample.meta.get("uid"), "url": sample.meta.get("url"), "org_caption": org,
            "re_caption": caption, "status": "error" if error else "ok", "error": error,
            "finish_reason": finish_reason, "num_tokens": num_tokens, "quality": None if error else quality,
            "width": width, "height": height, "sha256": sample.meta.get("sha256"), "org_length": word_count(org),
            "re_length": word_count(caption), "fingerprint": fingerprint, "shard": shard}


def write_parquet(rows: list[dict], local_file: str) -> int:
    pq.write_table(pa.Table.from_pylist(rows, schema=outputs.ROW_SCHEMA), local_file, compression="zstd")
    return os.path.getsize(local_file)


class WdsWriter:
    """Incremental local WebDataset tar: `{key}.{ext}`, `{key}.txt`, `{key}.re_caption.txt`, `{key}.json`."""

    def __init__(self, local_file: str):
        self.tar = tarfile.open(local_file, "w")
        self.mtime = int(time.time())

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), self.mtime, 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, ext: str, image: bytes, org: str, re: str, meta: dict) -> None:
        self._member(f"{key}.{ext}", image)
        self._member(f"{key}.txt", org.encode())
        self._member(f"{key}.re_caption.txt", re.encode())
        self._member(f"{key}.json", json.dumps(meta, sort_keys=True).encode())

    def close(self) -> None:
        self.tar.close()


KIND_FILES = {"parquet": (outputs.PARQUET_DIR, "parquet"), "wds": (outputs.WDS_DIR, "tar")}


class ShardStore:
    def __init__(self, base: str, kinds: tuple[str, ...] = ("parquet", "wds")):
        self.base, self.kinds = base, kinds

    def new_attempt(self, shard: str) -> Attempt:
        return Attempt(self, shard)

    def read_ledger(self, shard: str, generation: int | None = None) -> dict | None:
        return outputs.read_ledger(self.base, shard)

    def files(self, ledger: dict) -> dict[str, str]:
        return {kind: storage.join(self.base, f["path"]) for kind, f in ledger.get("files", {}).items()}


class Attempt:
    def __init__(self, store: ShardStore, shard: str):
        self.store, self.shard = store, shard
        self.attempt_id = secrets.token_hex(6)
        self.written: dict[str, dict] = {}

    def relative(self, kind: str) -> str:
        folder, ext = KIND_FILES[kind]
        return f"{folder}/{self.shard}.{ext}"

    def path(self, kind: str) -> str:
        return storage.join(self.store.base, self.relative(kind))

    def put(self, kind: str, local_file: str) -> dict:
        size = os.path.getsize(local_file)
        storage.put_file(local_file, self.path(kind))
        self.written[kind] = {"path": self.relative(kind), "bytes": size}
        return self.written[kind]

    def commit(self, ledger: dict, generation: int = 0) -> bool:
        ledger = {**ledger, "files": self.written, "attempt_id": self.attempt_id, "generation": generation}
        return outputs.write_ledger(self.store.base, self.shard, ledger, replace=generation > 0)

    def abandon(self) -> None:
        """Today's names are shared by attempts: files are left for the next attempt to overwrite."""


def holds(base: str, shard: str, token: str | None) -> bool:
    """Today's claims are not fenced: the driver's ClaimBook is all there is."""
    return True
