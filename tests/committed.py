"""Reading what a run committed, through its ledgers (the only way a reader finds data files)."""
from __future__ import annotations

import io

import pyarrow.parquet as pq

from dataset import storage
from dataset.outputs import RECAPTION_KINDS, ShardStore


def store(base: str) -> ShardStore:
    return ShardStore(str(base), RECAPTION_KINDS)


def files(base: str, shard: str) -> dict[str, str]:
    """Kind ('parquet', 'wds') -> the committed file of `shard` (its latest ledger generation)."""
    s = store(base)
    ledger = s.read_ledger(shard)
    assert ledger is not None, f"{shard} has no ledger under {base}"
    return s.files(ledger)


def rows(base: str, shard: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(files(base, shard)["parquet"]))).to_pylist()


def keys(base: str) -> list[str]:
    """Every key over all committed Parquet files, duplicates kept (exactly once means no repeats)."""
    return [row["key"] for shard in sorted(store(base).done()) for row in rows(base, shard)]


def assert_only_fixed_rows_changed(before: dict[str, dict], after: dict[str, dict], fixed: set[str]) -> None:
    """A --retry-errors generation: the same keys in the same order, the `fixed` error rows now ok, every other
    row exactly as it was."""
    assert list(after) == list(before)
    for key, row in after.items():
        if key in fixed:
            assert before[key]["status"] == "error" and row["status"] == "ok"
        else:
            assert row == before[key]

