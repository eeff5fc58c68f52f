"""What a running job prints: shards done/total, images/s, tokens/s, the engines' busy share, ETA and
the GPU-hours (and cost) the whole input will take at the measured rate."""
from __future__ import annotations

import time

from recaption.cost import Projection, Rates, hours, project
from recaption.pool import Sizing

DUE_GAP_SECONDS = 5.0


class Progress:
    """Counts over the shards this run committed; `line()` is printed at most every `every` seconds."""

    def __init__(self, name: str, total: int, input_shards: int, every: float):
        self.name, self.total, self.input_shards, self.every = name, total, input_shards, every
        self.start = self.last_print = time.time()
        self.done = self.failed = self.images = self.tokens = self.ok = self.errors = 0
        self.due = False   # print at the next chance (a shard finished)

    def add(self, ledger: dict) -> None:
        """A shard this run committed."""
        self.done += 1
        self.images += ledger.get("rows_out", 0)
        self.tokens += ledger.get("tokens", 0)
        self.ok += ledger.get("ok", 0)
        self.errors += ledger.get("error", 0)
        self.due = True

    def restart_clock(self) -> None:
        """Rates count from the first ready worker, not from the job's start-up."""
        self.start = self.last_print = time.time()

    def rates(self, engine: dict) -> Rates:
        return Rates.measure(self.images, self.tokens, time.time() - self.start, engine)

    def projection(self, rates: Rates, sizing: Sizing, price: float | None) -> Projection | None:
        """The whole input at the measured rate (rows per shard from the shards done so far)."""
        if not self.done:
            return None
        return project(round(self.images / self.done * self.input_shards), rates.images_per_s, sizing.workers,
                       sizing.gpus, price)

    def eta(self) -> str:
        """Time left (H:MM:SS) at the pace of the shards finished so far; '?' before the first."""
        finished = self.done + self.failed
        if not finished:
            return "?"
        left = (self.total - finished) * max(time.time() - self.start, 0.0) / finished
        return time.strftime("%H:%M:%S", time.gmtime(left))

    def line(self, rates: Rates, projection: Projection | None) -> str:
        cost = f" | {hours(projection.gpu_hours)} {projection.unit} for the input" if projection else ""
        return (f"[{self.name}] shards {self.done}/{self.total} done, {self.failed} failed | {rates.line()} | "
                f"ETA {self.eta()}{cost}")

    def should_print(self, force: bool = False) -> bool:
        """Every `every` seconds, and when a shard finished unless a line went out in the last few seconds
        (at thousands of shards an hour, a line per shard would bury everything else)."""
        now = time.time()
        since = now - self.last_print
        if force or (self.due and since >= min(self.every, DUE_GAP_SECONDS)) or since >= self.every:
            self.last_print, self.due = now, False
            return True
        return False
