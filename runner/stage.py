"""What a stage plugs into the runner: where it commits, what it plans, and which actor does one shard.

A stage's worker is a Ray actor class built as `worker(*stage.worker_args(sizing), log_file=...)` with:
- `ready() -> dict`: start-up is done (`worker`: where it runs, `summary`: one line for people);
- `process(task) -> Outcome`: do one shard and commit it through dataset/protocol.py's Attempt with the
  task's registered attempt id; raise when the attempt failed (a read error), `WorkerDying` when the actor
  itself is going away;
- `abandon(shard)`: drop the shard; its `process` call answers 'abandoned'.
Adding a stage (an embedding or a safety-column stage) is one module with such a class and a `Stage`, plus a
thin CLI in pipelines/.
"""
from __future__ import annotations

from typing import Protocol

from dataset.protocol import ShardStore
from runner.pool import Sizing
from runner.records import Plan


class Stage(Protocol):
    @property
    def name(self) -> str: ...                   # console prefix, log and actor names: 'recaption', 'score'
    @property
    def out(self) -> str: ...                    # the output folder: logs go to OUT/_logs/
    @property
    def store(self) -> ShardStore: ...           # where the stage's shards commit
    @property
    def worker(self) -> type: ...                # the actor class
    @property
    def tensor_parallel_size(self) -> int: ...   # GPUs one worker's engine spans (the default GPUs per worker)

    def plan(self) -> Plan: ...
    def describe(self) -> str: ...                         # what runs, for the plan line
    def worker_args(self, sizing: Sizing) -> tuple: ...
    def worker_env(self) -> dict[str, str]: ...            # environment for the actors (test fault hooks)
