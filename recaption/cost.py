"""The cost model: measured rates -> GPU-hours (and money) for the whole input; `--plan` measures them first.

A GPU-hour here is one GPU held for an hour by a caption worker, busy or not: what a cloud bills.
On a CPU-only run the same numbers are worker-hours.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass

from dataset import storage
from dataset.reader import ShardReader, expected_samples, stats_path


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
        return (f"{self.images_per_s:.1f} images/s | {self.tokens_per_s:.0f} tokens/s | engine busy "
                f"{self.engine_busy:.0%}, full {self.engine_queued:.0%}")


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
    """Cost of captioning `images` at `images_per_s` with `workers` workers holding `gpus_per_worker` each."""
    wall_hours = images / max(images_per_s, 1e-9) / 3600
    held = workers * gpus_per_worker if gpus_per_worker else workers
    unit = "GPU-hours" if gpus_per_worker else "worker-hours"
    return Projection(images, wall_hours, wall_hours * held, None if price is None else wall_hours * held * price,
                      unit)


def samples_per_shard(path: str) -> int:
    """img2dataset's count for one shard (`{shard}_stats.json`), else the samples its tar holds."""
    stats = stats_path(path)
    if storage.exists(stats):
        return expected_samples(storage.read_bytes(stats))
    reader = ShardReader(path)
    for _ in reader:
        pass
    return reader.stats.samples_in


class ScratchOutput:
    """Where a --plan sample run commits: a local temporary folder on the worker's node, never OUT."""

    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix="ov-plan-")
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def hours(value: float) -> str:
    """Hours for people: 1,234.5 or 12.3, and two significant digits below 1 (0.0021, not 0.0)."""
    return f"{value:,.1f}" if value >= 1 else f"{value:.2g}"

