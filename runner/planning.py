"""Which shards a run works on, decided from listings: the stage's `_ledger/` folder, then its data folders
(PROTOCOL.md H2), next to the stage's sources (input tars, or another stage's commits).

Per source shard: no ledger -> generation 0; a committed generation whose files are gone (or marked broken
by `pipelines/verify --repair`) -> the next generation, made from the source again (H1), said on the
console; with `retry_errors`, a committed shard whose ledger counts error rows -> the next generation, redoing
those rows. Ledgers are read only where a listing cannot decide (several attempts' files of the latest
generation) and under `retry_errors` (their error counts): a rerun over 140,000 done shards costs a few
listings, on S3 one page per 1,000 files.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from dataset.protocol import Ledger, ShardStore, StoreListing
from runner.records import Plan, Task

LEDGER_READ_CHUNK = 4096   # ledgers read at once: memory holds a chunk's, not every done shard's


@dataclass(frozen=True)
class Wanted:
    """One source shard and the task that would make its generation `generation`."""
    shard: str
    make: Callable[[int, bool, str | None], Task]   # (generation, retry_errors, heal) -> task


def plan_shards(store: ShardStore, listing: StoreListing, wanted: Iterable[Wanted], *, retry_errors: bool = False,
                has_errors: Callable[[Ledger], bool] = lambda ledger: bool(dict(ledger).get("error")),
                redo: Collection[str] = ()) -> Plan:
    """The tasks for `wanted` (in its order) given the stage's `listing` (made by `store.listing()`); the committed
    shards in `redo` (e.g. scores of an older recaption generation) are made again as their next generation."""
    plan = Plan([], listing=listing)
    to_read: list[tuple[Wanted, int, bool]] = []   # (wanted, latest generation, only unsure)
    for want in wanted:
        plan.inputs += 1
        latest = listing.latest(want.shard)
        if latest is None:
            plan.tasks.append(want.make(0, False, None))
            continue
        plan.done += 1
        health = listing.health(want.shard)
        if want.shard in redo:
            plan.tasks.append(want.make(latest + 1, False, None))
        elif health == "broken":
            why = ("verify marked it broken" if latest in listing.broken.get(want.shard, set())
                   else f"no file of its generation {latest} is left")
            plan.healed.append((want.shard, why))
            plan.tasks.append(want.make(latest + 1, False, why))
        elif health == "unsure" or retry_errors:
            to_read.append((want, latest, health == "unsure"))
    for (want, latest, unsure), ledger in zip(to_read, _read(store, [(w.shard, g) for w, g, _ in to_read]),
                                              strict=True):
        problems = ["its ledger does not parse"] if ledger is None else (
            store.check(ledger, listing) if unsure else [])
        if problems:
            why = "; ".join(problems)
            plan.healed.append((want.shard, why))
            plan.tasks.append(want.make(latest + 1, False, why))
        elif retry_errors and ledger is not None and has_errors(ledger):
            plan.tasks.append(want.make(latest + 1, True, None))
    return plan

def _read(store: ShardStore, wanted: list[tuple[str, int]]) -> list[Ledger | None]:
    """Ledgers of (shard, generation), a chunk at a time: memory holds a chunk's, not every done shard's."""
    found: list[Ledger | None] = []
    for start in range(0, len(wanted), LEDGER_READ_CHUNK):
        chunk = dict(wanted[start:start + LEDGER_READ_CHUNK])
        found += store.read_ledgers(chunk).values()
    return found
