"""What a running stage prints, and the cost model: shards done/total, images/s, tokens/s, the engines' busy
share, ETA, and the GPU-hours (and money) the whole input takes at the measured rate.

A GPU-hour here is one GPU held for an hour by a worker, busy or not: what a cloud bills. On a CPU-only run
the same numbers are worker-hours.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from dataset.protocol import Ledger

DUE_GAP_SECONDS = 5.0


@dataclass(frozen=True)
class Rates:
    images_per_s: float     # the whole pool
    tokens_per_s: float
    engine_busy: float      # share of the engines' time with at least one request in them
    engine_queued: float    # share with more requests than they run at once (never starved)

    @classmethod
    def measure(cls, images: int, tokens: int, seconds: float, engine: dict) -> Rates:
        wall = max(engine.get("wall_s", 0.0), 1e-9)
        return cls(images / max(seconds, 1e-9), tokens / max(seconds, 1e-9),
                   engine.get("busy_s", 0.0) / wall, engine.get("queued_s", 0.0) / wall)

    def line(self) -> str:
        text = f"{self.images_per_s:.1f} images/s"
        if self.tokens_per_s:
            text += (f" | {self.tokens_per_s:.0f} tokens/s | engine busy {self.engine_busy:.0%}, "
                     f"full {self.engine_queued:.0%}")
        return text


@dataclass(frozen=True)
class Projection:
    images: int             # the whole input
    wall_hours: float       # at the measured rate, with this pool
    gpu_hours: float        # GPUs held x wall hours (worker-hours without GPUs)
    cost: float | None      # gpu_hours x --gpu-hour-price
    unit: str               # 'GPU-hours' or 'worker-hours'

    def as_dict(self) -> dict:
        return {"images": self.images, "wall_hours": self.wall_hours, self.unit.replace("-", "_"): self.gpu_hours,
                "cost": self.cost}

    def line(self) -> str:
        cost = f", {self.cost:,.2f} at the given price" if self.cost is not None else ""
        return (f"whole input ~{self.images:,} images: {self.wall_hours:,.2f} h with this pool = "
                f"{hours(self.gpu_hours)} {self.unit}{cost}")


def project(images: int, images_per_s: float, workers: int, gpus_per_worker: float,
            price: float | None) -> Projection:
    """Cost of `images` at `images_per_s` with `workers` workers holding `gpus_per_worker` each."""
    wall_hours = images / max(images_per_s, 1e-9) / 3600
    held = workers * gpus_per_worker if gpus_per_worker else workers
    unit = "GPU-hours" if gpus_per_worker else "worker-hours"
    return Projection(images, wall_hours, wall_hours * held, None if price is None else wall_hours * held * price,
                      unit)


def hours(value: float) -> str:
    """Hours for people: 1,234.5 or 12.3, and two significant digits below 1 (0.0021, not 0.0)."""
    return f"{value:,.1f}" if value >= 1 else f"{value:.2g}"


class Progress:
    """Counts over the shards this run committed; `line()` is printed at most every `every` seconds."""

    def __init__(self, name: str, total: int, input_shards: int, every: float):
        self.name, self.total, self.input_shards, self.every = name, total, input_shards, every
        self.start = self.last_print = time.monotonic()
        self.done = self.failed = self.images = self.tokens = self.ok = self.errors = 0
        self.due = False   # print at the next chance (a shard finished)

    def add(self, ledger: Ledger) -> None:
        """A shard this run committed."""
        facts: dict = dict(ledger)
        self.done += 1
        self.images += facts.get("rows_out", 0)
        self.tokens += facts.get("tokens", 0)
        self.ok += facts.get("ok", 0)
        self.errors += facts.get("error", 0)
        self.due = True

    def restart_clock(self) -> None:
        """Rates count from the first ready worker, not from the job's start-up."""
        self.start = self.last_print = time.monotonic()

    def rates(self, engine: dict) -> Rates:
        return Rates.measure(self.images, self.tokens, time.monotonic() - self.start, engine)

    def projection(self, rates: Rates, workers: int, gpus_per_worker: float, price: float | None
                   ) -> Projection | None:
        """The whole input at the measured rate (rows per shard from the shards done so far)."""
        if not self.done:
            return None
        return project(round(self.images / self.done * self.input_shards), rates.images_per_s, workers,
                       gpus_per_worker, price)

    def eta(self) -> str:
        """Time left (H:MM:SS) at the pace of the shards finished so far; '?' before the first."""
        finished = self.done + self.failed
        if not finished:
            return "?"
        left = (self.total - finished) * max(time.monotonic() - self.start, 0.0) / finished
        return time.strftime("%H:%M:%S", time.gmtime(left))

    def line(self, rates: Rates, projection: Projection | None) -> str:
        cost = f" | {hours(projection.gpu_hours)} {projection.unit} for the input" if projection else ""
        return (f"[{self.name}] shards {self.done}/{self.total} done, {self.failed} failed | {rates.line()} | "
                f"ETA {self.eta()}{cost}")

    def should_print(self, force: bool = False) -> bool:
        """Every `every` seconds, and when a shard finished unless a line went out in the last few seconds
        (at thousands of shards an hour, a line per shard would bury everything else)."""
        now = time.monotonic()
        since = now - self.last_print
        if force or (self.due and since >= min(self.every, DUE_GAP_SECONDS)) or since >= self.every:
            self.last_print, self.due = now, False
            return True
        return False
