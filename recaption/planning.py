"""Which input shards a run captions, decided from listings: the inputs (the same listing shows
img2dataset's `_stats.json` files beside them) and, at the same time, the output's `_ledger/` folder.
No per-shard reads, except the ledgers of done shards under `--retry-errors` (their error counts), so
a rerun over 140,000 done shards costs a few listings: on S3 one page per 1,000 files.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dataset import storage
from dataset.outputs import ShardStore
from dataset.reader import shard_name, stats_path
from recaption.flow import ShardTask

LEDGER_READ_THREADS = 32   # ledgers are tiny: on S3 the latency of one GET each dominates
LEDGER_READ_CHUNK = 4096   # ledgers read at once: memory holds a chunk's, not every done shard's


@dataclass
class Plan:
    tasks: list[ShardTask]                              # to caption now, in input order
    done: int                                           # committed already (by this or another run)
    not_ready: list[str] = field(default_factory=list)  # img2dataset shards whose _stats.json is missing

    @property
    def inputs(self) -> int:
        return len(self.tasks) + self.done + len(self.not_ready)


def img2dataset_stats(paths: list[str], listings: list[set[str]]) -> set[str]:
    """The `_stats.json` files beside the input tars: from the listings that found the tars (each one folder's
    files), and one listing of each folder they do not cover.

    img2dataset writes a shard's tar first and its `_stats.json` last: in a folder that has any stats
    file, a tar without one is a download still running (or one that died), not a finished shard.
    """
    covered = {storage.parent(next(iter(files))) for files in listings if files}
    listings = listings + [storage.list_files(folder, "_stats.json")
                           for folder in {storage.parent(path) for path in paths} - covered]
    return {path for files in listings for path in files if path.endswith("_stats.json")}


def plan(input_spec: str, store: ShardStore, *, retry_errors: bool = False, max_shards: int | None = None) -> Plan:
    """The pending tasks of a run: shards without a ledger, and with `retry_errors` the done shards that
    have error rows (as the next ledger generation). Shards img2dataset has not finished are left out."""
    with ThreadPoolExecutor(1) as lister:   # the ledgers are listed while the inputs are
        ledgers = lister.submit(store.done)
        paths, listings = storage.list_inputs(input_spec)
        names = [shard_name(path) for path in paths]
        clashes = sorted(name for name, count in Counter(names).items() if count > 1)
        if clashes:
            raise ValueError(f"input shards share output names {clashes[:5]}: one output folder per set of names")
        stats = img2dataset_stats(paths, listings)
        del listings   # every file of the input folders: 3 per shard from img2dataset
        done = ledgers.result()
    with_stats = {storage.parent(path) for path in stats}
    result = Plan([], 0)
    retry = []
    for path, name in zip(paths, names):
        expected = stats_path(path) if storage.parent(path) in with_stats else None
        if name in done:
            result.done += 1
            if retry_errors:
                retry.append(ShardTask(name, path, 1, None, generation=done[name] + 1, retry_errors=True,
                                       stats_path=expected))
        elif expected is not None and expected not in stats:
            result.not_ready.append(name)
        else:
            result.tasks.append(ShardTask(name, path, 1, None, stats_path=expected))
    result.tasks += with_errors(store, retry)
    if max_shards is not None:
        result.tasks = result.tasks[:max_shards]
    return result


def with_errors(store: ShardStore, tasks: list[ShardTask]) -> list[ShardTask]:
    """The retry tasks whose shard's latest ledger has error rows: one threaded read per shard, a chunk at a time."""
    def has_errors(task: ShardTask) -> bool:
        ledger = store.read_ledger(task.shard, task.generation - 1)
        return bool(ledger and ledger["error"] > 0)

    kept = []
    with ThreadPoolExecutor(LEDGER_READ_THREADS) as pool:
        for start in range(0, len(tasks), LEDGER_READ_CHUNK):
            chunk = tasks[start:start + LEDGER_READ_CHUNK]
            kept += [task for task, errors in zip(chunk, pool.map(has_errors, chunk)) if errors]
    return kept
