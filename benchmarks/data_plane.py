"""Data plane per CPU core: our worker's read -> prepare -> write path against the bare limit and Ray Data.

No model runs: a fixed caption (the null engine's) stands in, so what is measured is reading
WebDataset shards, decoding + RGB + downscaling every image with `prepare_image`, and writing one
Parquet row per sample.

- bare:     `prepare_image` over every image, already in memory, in one loop: the limit for this work.
- ours:     the caption worker in this process with the null engine (its reader, decode pool of one
            thread, engine thread, flow and commit), fed two shards at a time as the pool feeds it.
- Ray Data: `ray.data.read_webdataset(paths, decoder=None)` -> `map_batches` (the same
            `prepare_image` on every image, the same fixed caption and metadata columns) ->
            `write_parquet`.

Per core: the script pins itself to one core (os.sched_setaffinity) before it starts any thread or
process, and starts Ray with num_cpus=1, so Ray's GCS, raylet and workers inherit the same single
core. Every side then gets exactly one core, overheads included, and images/s over wall time is
images/s per core. The CPU seconds of the whole process tree (this process and all its
descendants, Ray's processes included) are printed too: they check that nothing ran beside the
pinned core (CPU s <= wall s), and images per CPU second is the steadier figure when other programs
share the core. Ray stays up for every side, so all pay its idle cost. Each side runs once untimed
on one shard (imports, worker start), then --repeats times alternately; the best run of each counts.

    python -m benchmarks.data_plane                      # 8 shards x 200 JPEGs of 512 px, max side 336
    python -m benchmarks.data_plane --max-side 1024      # the job's default: no downscaling of 512 px
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from dataset.images import ImageConfig, ImageError, prepare_image
from dataset.synthetic.input_shards import write_shards
from recaption.contract_adapter import ShardReader, shard_name
from recaption.engines import EngineConfig, NullEngine
from recaption.flow import ShardTask
from recaption.job import CaptionJob
from recaption.pool import PoolConfig
from recaption.tiny import build_tiny_llava
from recaption.worker import CaptionWorker


@dataclass
class Timing:
    rows: int
    wall_s: float
    cpu_s: float

    @property
    def images_per_s(self) -> float:
        return self.rows / self.wall_s

    @property
    def images_per_cpu_s(self) -> float:
        return self.rows / self.cpu_s


def tree_cpu_seconds() -> dict[int, float]:
    """User + system CPU seconds of this process and each of its descendants, by pid."""
    me = psutil.Process()
    seconds = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            seconds[proc.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return seconds


def timed(fn: Callable[[], int]) -> Timing:
    """Run fn() -> rows written; wall time and the process tree's CPU time it took."""
    before = tree_cpu_seconds()
    start = time.perf_counter()
    rows = fn()
    wall = time.perf_counter() - start
    after = tree_cpu_seconds()
    return Timing(rows, wall, sum(t - before.get(pid, 0.0) for pid, t in after.items()))


def bare(images: list[bytes], image_config: ImageConfig) -> Callable[[], int]:
    def run() -> int:
        for data in images:
            prepare_image(data, image_config)
        return len(images)
    return run


def ours(paths: list[str], out: str, job: CaptionJob) -> Callable[[], int]:
    """The worker is started (processor, model hash) before the timing: that is engine start-up, not data plane."""
    worker = CaptionWorker(job, out, out, on_engine_death=lambda: None)

    def run() -> int:
        try:
            with ThreadPoolExecutor(PoolConfig.tasks_per_worker) as pool:
                tasks = [ShardTask(shard_name(p), p, 1, None) for p in paths]
                return sum(o["ledger"]["rows_out"] for o in pool.map(worker.caption, tasks))
        finally:
            worker.close()
    return run


def caption_batch(batch: pa.Table, image_config: ImageConfig) -> pa.Table:
    """The Ray Data UDF: decode and downscale each image, attach the fixed caption and the metadata."""
    columns = {name: [] for name in ("key", "uid", "url", "sha256", "org_caption", "re_caption", "status",
                                     "error", "width", "height")}
    for key, image, text, meta_json in zip(*(batch[c].to_pylist() for c in ("__key__", "jpg", "txt", "json"))):
        meta = json.loads(meta_json) if meta_json else {}
        try:
            prepared = prepare_image(image or b"", image_config)
            status, error, width, height = "ok", None, prepared.width, prepared.height
        except ImageError as e:
            status, error, width, height = "error", str(e), None, None
        values = (key, meta.get("uid"), meta.get("url"), meta.get("sha256"),
                  text.decode("utf-8", errors="replace") if text else None,
                  NullEngine.CAPTION if status == "ok" else None, status, error, width, height)
        for name, value in zip(columns, values):
            columns[name].append(value)
    return pa.table(columns)


def ray_data(paths: list[str], out: str, image_config: ImageConfig) -> Callable[[], int]:
    import ray

    def run() -> int:
        (ray.data.read_webdataset(paths, decoder=None)
         .map_batches(caption_batch, batch_format="pyarrow", fn_kwargs={"image_config": image_config})
         .write_parquet(out))
        return sum(pq.read_metadata(f).num_rows for f in Path(out).glob("*.parquet"))
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=8, help="input shards (default 8)")
    p.add_argument("--per-shard", type=int, default=200, help="images per shard (default 200)")
    p.add_argument("--image-size", type=int, default=512,
                   help="side of the synthetic JPEGs; img2dataset stores DataComp at <= 512 px (default 512)")
    p.add_argument("--max-side", type=int, default=336,
                   help="downscale to this longest side, as for a 336 px vision tower (default 336)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs of each side, alternating; the best counts (default 2)")
    p.add_argument("--core", type=int, help="the core to pin to (default: the last one this process may use)")
    a = p.parse_args()

    core = a.core if a.core is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(root / "shards", a.shards, a.per_shard, image_size=a.image_size)
        paths = sorted(str(path) for path in (root / "shards").glob("*.tar"))
        model = str(build_tiny_llava(root / "model"))
        job = CaptionJob(EngineConfig(model=model, backend="null"), image=ImageConfig(max_side=a.max_side),
                         write_wds=False)
        images = [s.image for path in paths for s in ShardReader(path) if s.image]
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="warning")
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False

        sides = {
            "bare prepare_image loop (the limit)": lambda out, shard_paths: bare(
                images if len(shard_paths) == len(paths) else images[:a.per_shard], job.image),
            "ours (caption worker, null engine)": lambda out, shard_paths: ours(shard_paths, out, job),
            "Ray Data (read_webdataset -> map_batches -> write_parquet)":
                lambda out, shard_paths: ray_data(shard_paths, out, job.image),
        }
        results: dict[str, list[Timing]] = {name: [] for name in sides}
        for run in range(a.repeats + 1):
            for index, (name, side) in enumerate(sides.items()):
                out = str(root / f"out-{index}-{run}")
                if run == 0:
                    side(out, paths[:1])()  # warm-up, not timed
                else:
                    results[name].append(timed(side(out, paths)))
                shutil.rmtree(out, ignore_errors=True)
        ray.shutdown()

    best = {name: max(runs, key=lambda t: t.images_per_s) for name, runs in results.items()}
    print(f"\n{a.shards} shards x {a.per_shard} JPEGs of {a.image_size} px, max side {a.max_side}, "
          f"pinned to core {core}, best of {a.repeats}")
    print(f"{'path':<60}{'rows':>7}{'wall s':>8}{'images/s/core':>15}{'tree CPU s':>12}{'images/CPU-s':>14}")
    for name, t in best.items():
        print(f"{name:<60}{t.rows:>7}{t.wall_s:>8.2f}{t.images_per_s:>15.1f}{t.cpu_s:>12.2f}"
              f"{t.images_per_cpu_s:>14.1f}")
    for name, runs in results.items():
        print(f"  all runs, {name.split(' (')[0]}: " + " ".join(f"{t.images_per_s:.1f}" for t in runs) + " images/s")
    bare_t, ours_t, ray_t = best.values()
    print(f"ours / bare limit images/s per core: {ours_t.images_per_s / bare_t.images_per_s:.2f}  (goal >= 0.9); "
          f"ours / Ray Data: {ours_t.images_per_s / ray_t.images_per_s:.2f}  (goal > 1); "
          f"per CPU second: {ours_t.images_per_cpu_s / ray_t.images_per_cpu_s:.2f}")


if __name__ == "__main__":
    main()
