"""Publishing streams: its Arrow memory peak stays near one row group while the data grows.

For each number of shards (--shards, the same --per-shard rows each: the data grows, each shard and
row group stays the size it is), builds a synthetic finished run (no model), then alternates for --rounds rounds: the
baseline, a plain `pyarrow.parquet.read_table` of the run's Parquet files (all of it in memory), and
`pipelines/publish.py` to a fresh folder (as users run it, in-process). Reports rows/s of each and the
ratio, and publish's Arrow memory peak (a fresh proxy of Arrow's default pool per publish, so one
round's allocations do not hide the next one's) against the whole table's size. The peak should stay
flat as the rows grow fourfold.

    python -m benchmarks.publish_stream --shards 5 20 --per-shard 4000
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.record import Record, alternate, parse
from dataset.synthetic import finished_runs
from pipelines import publish as publish_cli

SMOKE = {"shards": [1, 2], "per_shard": 50, "rounds": 2}


class Side:
    """One side of a round: its rows/s, and (publish) its Arrow memory peaks."""

    def __init__(self, out: str, tmp: Path, row_group_mb: float):
        self.out, self.tmp, self.row_group_mb = out, tmp, row_group_mb
        self.peaks: list[int] = []
        self.table_bytes = self.rows = 0

    def read(self) -> float:
        start = time.perf_counter()
        table = pq.read_table(Path(self.out, "parquet"))
        seconds = time.perf_counter() - start
        self.table_bytes, self.rows = table.nbytes, table.num_rows
        return table.num_rows / seconds

    def publish(self) -> float:
        dest = self.tmp / "dest"
        shutil.rmtree(dest, ignore_errors=True)
        pool = pa.proxy_memory_pool(pa.default_memory_pool())
        saved = pa.default_memory_pool()
        pa.set_memory_pool(pool)
        try:
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                publish_cli.main(["--input", self.out, "--dest", str(dest), "--target-file-mb", "50",
                                  "--row-group-mb", str(self.row_group_mb)])
            seconds = time.perf_counter() - start
        finally:
            pa.set_memory_pool(saved)
        self.peaks.append(pool.max_memory())
        return self.rows / seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, nargs="+", default=[5, 20], help="shards of each run (default 5 and 20)")
    p.add_argument("--per-shard", type=int, default=4000, help="rows per shard (default 4000)")
    p.add_argument("--row-group-mb", type=float, default=4, help="small, so the peak is visibly below the data size")
    p.add_argument("--rounds", type=int, default=3, help="alternating read / publish timings per size (default 3)")
    a = parse(p, argv, SMOKE)
    record = Record("publish_stream", a, argv)
    for shards in a.shards:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp, "out"))
            finished_runs.write_recaption_outputs(out, shards, a.per_shard, errors_per_shard=min(10, a.per_shard),
                                                  image_size=8)
            side = Side(out, Path(tmp), a.row_group_mb)
            side.read()   # the row count publish's rate is taken over; the file cache warm for both sides
            rates = alternate(a.rounds, {"read": side.read, "publish": side.publish})
        name = f"{side.rows:,} rows"
        peak_mb, table_mb = max(side.peaks) / 1e6, side.table_bytes / 1e6
        record.figures[f"{name}: publish Arrow peak MB"] = round(peak_mb, 2)
        record.figures[f"{name}: whole table MB"] = round(table_mb, 2)
        record.figures[f"{name}: peak / whole table"] = round(peak_mb / table_mb, 4)
        print(f"{name}: publish Arrow peak {peak_mb:.1f} MB of a {table_mb:.1f} MB table "
              f"({peak_mb / table_mb:.2f}); row groups of {a.row_group_mb:g} MB")
        record.compare(name, "rows/s", ("plain read_table", rates["read"]), ("publish", rates["publish"]))
    record.write()


if __name__ == "__main__":
    main()
