"""Read a recaption output folder: which shards are done (ledger with the run's fingerprint), and their rows."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from dataset import storage
from dataset.outputs import LEDGER_DIR, PARQUET_DIR, WDS_DIR, read_ledger

JOB_FILE, RUN_FILE = "_job.json", "_run.json"  # written by the recaption driver (recaption/driver.py)
LEDGER_READ_THREADS = 16  # ledgers are tiny; on S3 the latency of one GET each dominates


@dataclass
class FinishedRun:
    """The done shards of one run, and the shards left out with the reason.

    Ledgers are sorted by shard and kept without their caption_config (the run's is kept once).
    """
    out: str
    fingerprint: str
    caption_config: dict
    ledgers: list[dict]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    run: dict | None = None

    def __post_init__(self) -> None:
        self.by_shard = {ledger["shard"]: ledger for ledger in self.ledgers}

    def total(self, key: str) -> int:
        return sum(ledger.get(key) or 0 for ledger in self.ledgers)

    def summed(self, key: str) -> Counter:
        """Sum of a {name: count} field over the done shards' ledgers."""
        counts: Counter = Counter()
        for ledger in self.ledgers:
            counts.update(ledger.get(key) or {})
        return counts

    def errors_by_reason(self) -> Counter:
        return self.summed("errors_by_reason")

    def quality_flags(self) -> Counter:
        """Rows per quality flag (ledgers written by recaption/shard.py carry these counts)."""
        return self.summed("quality")

    def parquet(self, shard: str) -> str:
        return storage.join(self.out, PARQUET_DIR, f"{shard}.parquet")

    def wds(self, shard: str) -> str:
        return storage.join(self.out, WDS_DIR, f"{shard}.tar")


def _stem(path: str, suffix: str) -> str:
    return storage.basename(path)[: -len(suffix)]


def _read_json(path: str) -> dict | None:
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def load(out: str, fingerprint: str | None = None) -> FinishedRun:
    """Find the done shards of OUT.

    The run's fingerprint is the given one, else the current one in `_job.json` (the recaption
    job's record of the output's version), else `_run.json`'s, else the one all ledgers share.
    """
    job = _read_json(storage.join(out, JOB_FILE)) or {}
    run = _read_json(storage.join(out, RUN_FILE))
    shards = {_stem(p, ".parquet") for p in storage.list_files(storage.join(out, PARQUET_DIR), ".parquet")}
    with_ledger = sorted(_stem(p, ".json") for p in storage.list_files(storage.join(out, LEDGER_DIR), ".json"))
    with ThreadPoolExecutor(LEDGER_READ_THREADS) as pool:
        ledgers = list(pool.map(lambda shard: read_ledger(out, shard), with_ledger))
    fingerprint = (fingerprint or job.get("fingerprint") or (run or {}).get("fingerprint")
                   or _only_fingerprint(out, ledgers))
    skipped = [(shard, "no ledger (shard not finished)") for shard in sorted(shards - set(with_ledger))]
    done = []
    for shard, ledger in zip(with_ledger, ledgers):
        if ledger is None or ledger.get("fingerprint") != fingerprint:
            found = (ledger or {}).get("fingerprint")
            skipped.append((shard, f"ledger fingerprint {found} is not the run's {fingerprint}"))
        elif shard not in shards:
            skipped.append((shard, f"ledger exists but {storage.join(out, PARQUET_DIR, shard)}.parquet is missing"))
        else:
            done.append(ledger)
    if run and run.get("fingerprint") != fingerprint:
        run = None  # the summary of an earlier version of this output
    configs = [ledger.pop("caption_config", None) for ledger in done]  # one per run is enough in memory
    config = next((c for c in configs if c), None) or job.get("caption_config") or {}
    return FinishedRun(out, fingerprint, config, done, sorted(skipped), run)


def _only_fingerprint(out: str, ledgers: list[dict | None]) -> str:
    found = Counter(ledger["fingerprint"] for ledger in ledgers if ledger)
    if not found:
        raise ValueError(f"{out}: no ledgers under {LEDGER_DIR}/, so no shard is finished yet")
    if len(found) != 1:
        listed = ", ".join(f"{fp} ({n} shards)" for fp, n in found.most_common()) or "none"
        raise ValueError(f"{out}: no _job.json or _run.json, and the ledgers do not agree on one fingerprint: "
                         f"{listed}; pass --fingerprint")
    return next(iter(found))


def open_parquet(path: str) -> pq.ParquetFile:
    """A ParquetFile for a local path, or for an object fetched whole (one shard fits in memory)."""
    if storage.is_remote(path):
        return pq.ParquetFile(pa.BufferReader(storage.read_bytes(path)))
    return pq.ParquetFile(path)


def iter_batches(path: str, columns: list[str], batch_rows: int = 8192) -> Iterator[pa.RecordBatch]:
    """Record batches of `columns` from one shard's Parquet; errors name the file."""
    try:
        yield from open_parquet(path).iter_batches(batch_size=batch_rows, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: cannot read Parquet ({e})") from e
