"""Publishing streams: its Arrow memory peak stays near one row group while the data grows.

Builds a synthetic finished run (no model), publishes it to a temporary folder, then reads the
same Parquet whole with pyarrow as the baseline, all in one process. Reports ratios:
publish time / plain read time, and publish's Arrow memory peak / the whole table's size.

    python -m benchmarks.publish_stream --shards 10 --per-shard 10000
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dataset import publish
from dataset.synthetic import finished_runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--per-shard", type=int, default=10_000)
    p.add_argument("--row-group-mb", type=float, default=4, help="small, so the peak is visibly below the data size")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out, dest = str(Path(tmp, "out")), str(Path(tmp, "dest"))
        finished_runs.write_recaption_outputs(out, a.shards, a.per_shard, errors_per_shard=10, image_size=8)
        pool = pa.default_memory_pool()
        base = pool.max_memory()
        t0 = time.perf_counter()
        publish.publish(out, dest, target_bytes=50 * publish.MB, row_group_bytes=int(a.row_group_mb * publish.MB),
                        log=lambda line: None)
        publish_s = time.perf_counter() - t0
        publish_peak = pool.max_memory() - base
        t0 = time.perf_counter()
        whole = pq.read_table(Path(out, "parquet"))
        read_s = time.perf_counter() - t0
    rows = whole.num_rows
    print(f"rows {rows:,}; publish {publish_s:.2f} s ({rows / publish_s:,.0f} rows/s), plain read {read_s:.2f} s")
    print(f"publish time / plain read time: {publish_s / read_s:.1f}x")
    print(f"publish Arrow peak / whole table in memory: {publish_peak / whole.nbytes:.2f} "
          f"({publish_peak / 1e6:.1f} MB of {whole.nbytes / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
