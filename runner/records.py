"""The records that cross the runner's modules and the Ray boundary: a shard task, a worker's outcome, what
became of a task, and a stage's plan."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dataset.protocol import Ledger, StoreListing

# committed by this attempt; lost (another attempt committed the generation first); fenced (its driver gave it
# up); abandoned (asked to stop); measured (a --plan sample run: worked and counted, wrote nothing)
OutcomeKind = Literal["committed", "lost", "fenced", "abandoned", "measured"]


@dataclass(frozen=True)
class Task:
    """One attempt at one shard's generation. Stages subclass it with what their workers need."""
    shard: str
    generation: int = 0                # the ledger generation this attempt creates
    attempt: int = 1                   # tries of this shard in this run, this one included
    attempt_id: str | None = None      # registered in the shard's claim before the task is sent
    retry_errors: bool = False         # redo only the error rows of the committed generation below
    heal: str | None = None            # why a committed generation is made again (its files are gone)


@dataclass
class Outcome:
    """A worker's answer for one task that did not raise."""
    shard: str
    attempt_id: str
    kind: OutcomeKind
    ledger: Ledger | None = None       # the committed ledger
    stats: dict = field(default_factory=dict)   # the worker's running figures (an engine's clock)


@dataclass
class Event:
    """What became of one task: an outcome, or why the attempt failed."""
    task: Task
    outcome: Outcome | None = None
    error: str | None = None
    charged: bool = False              # the failure counts against the shard's attempts
    certain: bool = True               # False: the worker may still be running the attempt (a lost actor)


@dataclass
class Plan:
    """What a run does: its tasks in order, and what it leaves alone."""
    tasks: list[Task]
    inputs: int = 0                                     # shards the run covers, done or not
    done: int = 0                                       # committed already (by this or another run)
    not_ready: list[str] = field(default_factory=list)  # inputs still being written (img2dataset's)
    deferred: int = 0                                   # tasks left for a later run (--max-shards)
    healed: list[tuple[str, str]] = field(default_factory=list)   # (shard, why) committed shards made again
    listing: StoreListing | None = None                 # the stage's files as planning saw them


class WorkerDying(RuntimeError):
    """A worker's answer for a task when the worker itself is going away (its engine died): the pool replaces
    it. `charged`: the task's attempt counts (it had work in the dying engine)."""

    def __init__(self, shard: str, charged: bool, reason: str):
        super().__init__(shard, charged, reason)

    shard = property(lambda self: self.args[0])
    charged = property(lambda self: self.args[1])
    reason = property(lambda self: self.args[2])

    def __str__(self) -> str:
        where = "had work in it" if self.charged else "was waiting (not charged)"
        return f"the worker died while shard {self.shard} {where}: {self.reason}"
