"""Streaming statistics of integer caption lengths (words): exact mean and median from a histogram."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc


@dataclass
class LengthStats:
    """A histogram {length: rows}; memory grows with distinct lengths, not with rows."""
    counts: Counter = field(default_factory=Counter)

    def add(self, lengths: pa.Array | pa.ChunkedArray) -> None:
        for item in pc.value_counts(pc.drop_null(lengths)).to_pylist():
            self.counts[item["values"]] += item["counts"]

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    @property
    def mean(self) -> float:
        return sum(k * v for k, v in self.counts.items()) / self.n if self.n else 0.0

    @property
    def median(self) -> float:
        """The middle value (mean of the two middle ones for an even count)."""
        if not self.n:
            return 0.0
        lower, upper = (self.n - 1) // 2, self.n // 2
        values: list[int] = []
        seen = 0
        for length in sorted(self.counts):
            seen += self.counts[length]
            while len(values) < 2 and seen > (lower, upper)[len(values)]:
                values.append(length)
        return (values[0] + values[1]) / 2
