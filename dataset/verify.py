"""Check an output against its ledgers: every committed file is there with its recorded bytes and rows, keys are
unique across shards; with `repair`, mark what is broken so that the next run makes it again (PROTOCOL.md H1).

Per stage (the captions, and the CLIP scores when there are any) the latest ledger of every shard is read and
each file it names is checked against the listing (exists, bytes) and then read for its rows (Parquet: its
footer; a tar: its samples). Keys: the `key` column of every committed recaption Parquet file, hashed to 8
bytes each (memory: 8 bytes a row, about 10 GB for DataComp-1B's 1.3 billion rows; `keys=False` skips it),
and the shards of any repeated hash read again to name the keys.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dataset import outputs
from dataset.protocol import Ledger, Problem, ShardStore, verify
from dataset.scores import score_store
from dataset.versions import Output


@dataclass
class StageReport:
    name: str
    shards: int                              # shards with a ledger
    problems: list[Problem] = field(default_factory=list)
    marked: int = 0                          # problems marked broken (repair)


@dataclass
class Report:
    output: Output
    stages: list[StageReport]
    duplicates: dict[str, list[str]] = field(default_factory=dict)   # key -> the shards holding it

    @property
    def ok(self) -> bool:
        return not self.duplicates and not any(stage.problems for stage in self.stages)


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def duplicate_keys(store: ShardStore, ledgers: dict[str, Ledger]) -> dict[str, list[str]]:
    """Keys that more than one committed row holds, with their shards (two passes: hashes, then the keys)."""
    def keys(shard: str) -> list[str]:
        path = store.files(ledgers[shard])[outputs.PARQUET_DIR]
        return [key for batch in outputs.iter_batches(path, ["key"]) for key in batch.column(0).to_pylist()]

    hashes, owners = [], []
    for index, shard in enumerate(sorted(ledgers)):
        found = np.array([_key_hash(key) for key in keys(shard)], dtype=np.uint64)
        hashes.append(found)
        owners.append(np.full(len(found), index, dtype=np.int64))
    if not hashes:
        return {}
    every, shard_of = np.concatenate(hashes), np.concatenate(owners)
    order = np.argsort(every, kind="stable")
    repeated = every[order][1:] == every[order][:-1]
    suspects = set(shard_of[order][1:][repeated]) | set(shard_of[order][:-1][repeated])
    seen: dict[str, list[str]] = {}
    shards = sorted(ledgers)
    for index in sorted(suspects):
        for key in keys(shards[index]):
            seen.setdefault(key, []).append(shards[index])
    return {key: holders for key, holders in seen.items() if len(holders) > 1}


def check_stage(name: str, store: ShardStore, fingerprint: str | None, rows: bool, repair: bool,
                on_problem: Callable[[Problem], None]) -> tuple[StageReport, dict[str, Ledger]]:
    passed, problems = verify(store, fingerprint=fingerprint, rows=rows)
    report = StageReport(name, len(passed) + len({p.shard for p in problems}), problems)
    for problem in problems:
        on_problem(problem)
        if repair and store.mark_broken(problem.shard, problem.generation, problem.what):
            report.marked += 1
    return report, passed


def verify_output(out: str, fingerprint: str | None = None, *, rows: bool = True, keys: bool = True,
                  repair: bool = False, on_problem: Callable[[str, Problem], None] = lambda stage, p: None) -> Report:
    """Check the version's caption shards and CLIP scores against their ledgers (see the module docstring)."""
    output = Output.open(out, fingerprint)
    captions, passed = check_stage("recaption", output.store, output.fingerprint, rows, repair,
                                   lambda p: on_problem("recaption", p))
    stages = [captions]
    scores = score_store(output)
    if scores.done():
        stages.append(check_stage("clip_scores", scores, output.fingerprint, rows, repair,
                                  lambda p: on_problem("clip_scores", p))[0])
    report = Report(output, stages)
    if keys:
        report.duplicates = duplicate_keys(output.store, passed)
    return report
