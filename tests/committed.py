"""Reading what a run committed, through its ledgers (the only way a reader finds data files)."""
from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

from dataset import storage
from dataset.claims import Claims
from dataset.outputs import RECAPTION_KINDS, read_rows
from dataset.protocol import ShardStore, new_attempt_id
from dataset.versions import JOB_FILE, Output
from runner.records import Task

T = TypeVar("T", bound=Task)


def store(base: str) -> ShardStore:
    """The current version's shards when `base` is an output, else a store of both kinds at `base`."""
    base = str(base)
    if storage.exists(storage.join(base, JOB_FILE)):
        return Output.open(base).store
    return ShardStore(base, RECAPTION_KINDS)


def files(base: str, shard: str) -> dict[str, str]:
    """Kind ('parquet', 'wds') -> the committed file of `shard` (its latest ledger generation)."""
    s = store(base)
    ledger = s.read_ledger(shard)
    assert ledger is not None, f"{shard} has no ledger under {base}"
    return s.files(ledger)


def rows(base: str, shard: str) -> list[dict]:
    return read_rows(files(base, shard)["parquet"])


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



_claims: dict[str, Claims] = {}


def registered(task: T, base) -> T:
    """What a driver does before it sends a task: a new attempt registered in the shard's claim (PROTOCOL.md A1)."""
    claims = _claims.setdefault(str(base), Claims(str(base), "test driver", ttl=3600))
    attempt_id = new_attempt_id()
    if task.shard in claims.held:
        assert claims.register(task.shard, attempt_id, task.generation)
    else:
        assert claims.acquire(task.shard, attempt_id, task.generation), f"{task.shard} is claimed by another driver"
    return replace(task, attempt_id=attempt_id)
