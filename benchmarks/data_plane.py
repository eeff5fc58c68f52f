"""Data plane per CPU core: the recaption job's read -> prepare -> write path against the bare limit and Ray Data.

No model runs: the null engine's fixed caption stands in, so what is measured is reading WebDataset
shards, decoding + RGB + downscaling every image with `prepare_image`, and writing one Parquet row per
sample.

- bare:     `prepare_image` over every image, already in memory, in one loop: the limit for this work.
- ours:     the job as users run it (`pipelines/recaption.py`'s main, `--backend null`, one worker of one
            CPU) into a fresh output: the driver, its claims and commits, the worker's reader, decode
            thread, engine thread and writer. Images/s over the span from the first shard started to
            the last committed (the ledgers' times): the worker's start-up (its processor) is excluded,
            as engine start-up is elsewhere.
- Ray Data: `ray.data.read_webdataset(paths, decoder=None)` -> `map_batches` (the same
            `prepare_image` on every image, the same fixed caption and metadata columns) ->
            `write_parquet`, images/s over the call.

Per core: the script pins itself to one core (os.sched_setaffinity) before it starts any thread or
process, and starts Ray with num_cpus=1, so Ray's GCS, raylet and workers inherit the same single
core; the job attaches to that Ray. Every side then gets exactly one core, overheads included, and
images/s is images/s per core. The CPU seconds of the whole process tree (this process and all its
descendants, Ray's processes included) over each call are printed too: they check that nothing ran
beside the pinned core (CPU s <= wall s). Ray stays up for every side, so all pay its idle cost. Each
side runs once untimed on one shard (imports, first start), then alternately for --rounds rounds
(bare first); the medians and the per-round ratios count.

    python -m benchmarks.data_plane                      # 8 shards x 200 JPEGs of 512 px, max side 336
    python -m benchmarks.data_plane --max-side 1024      # the job's default: no downscaling of 512 px
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.record import Record, alternate, parse
from dataset.images import ImageConfig, ImageError, prepare_image
from dataset.outputs import load_finished
from dataset.reader import ShardReader
from dataset.synthetic.input_shards import write_shards
from pipelines import recaption as recaption_cli
from recaption.engines import NullEngine
from recaption.tiny import build_tiny_llava

SMOKE = {"shards": 2, "per_shard": 8, "image_size": 64, "max_side": 32, "rounds": 1}


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


class Sides:
    """The three sides over the same shards; each call makes a fresh output and returns images/s."""

    def __init__(self, root: Path, paths: list[str], model: str, image_config: ImageConfig):
        self.root, self.paths, self.image_config = root, paths, image_config
        self.images = [s.image for path in paths for s in ShardReader(path) if s.image]
        self.job_argv = ["--model", model, "--backend", "null", "--max-side", str(image_config.max_side), "--no-wds",
                         "--num-workers", "1", "--gpus-per-worker", "0", "--cpus-per-worker", "1",
                         "--progress-every", "3600"]
        self.calls = 0
        self.cpu: dict[str, list[float]] = {}   # side -> tree CPU seconds / wall seconds, per timed call

    def fresh(self) -> str:
        self.calls += 1
        out = self.root / f"out-{self.calls}"
        shutil.rmtree(out, ignore_errors=True)
        return str(out)

    def timed(self, side: str, run, paths: list[str]) -> float:
        before = tree_cpu_seconds()
        start = time.perf_counter()
        rows, seconds = run(paths)
        wall = time.perf_counter() - start
        after = tree_cpu_seconds()
        cpu = sum(t - before.get(pid, 0.0) for pid, t in after.items())
        self.cpu.setdefault(side, []).append(cpu / wall)
        return rows / seconds

    def bare(self, paths: list[str]) -> tuple[int, float]:
        images = self.images if len(paths) == len(self.paths) else self.images[:len(self.images) // len(self.paths)]
        start = time.perf_counter()
        for data in images:
            prepare_image(data, self.image_config)
        return len(images), time.perf_counter() - start

    def ours(self, paths: list[str]) -> tuple[int, float]:
        out = self.fresh()
        inputs = paths[0] if len(paths) == 1 else str(Path(paths[0]).parent)   # one tar, or the shards' folder
        with contextlib.redirect_stdout(io.StringIO()):
            code = recaption_cli.main(["--input", inputs, "--output", out, *self.job_argv])
        if code != 0:
            raise SystemExit(f"the recaption job failed (exit {code}); see {out}/_logs")
        ledgers = load_finished(out).ledgers
        span = max(ledger["finished_at"] for ledger in ledgers) - min(ledger["started_at"] for ledger in ledgers)
        return sum(ledger["rows_out"] for ledger in ledgers), span

    def ray_data(self, paths: list[str]) -> tuple[int, float]:
        import ray

        out = self.fresh()
        start = time.perf_counter()
        (ray.data.read_webdataset(paths, decoder=None)
         .map_batches(caption_batch, batch_format="pyarrow", fn_kwargs={"image_config": self.image_config})
         .write_parquet(out))
        seconds = time.perf_counter() - start
        return sum(pq.read_metadata(f).num_rows for f in Path(out).glob("*.parquet")), seconds


def caption_batch(batch: pa.Table, image_config: ImageConfig) -> pa.Table:
    """The Ray Data UDF: decode and downscale each image, attach the fixed caption and the metadata."""
    columns = {name: [] for name in ("key", "uid", "url", "sha256", "org_caption", "re_caption", "status",
                                     "error", "width", "height")}
    members = (batch[c].to_pylist() for c in ("__key__", "jpg", "txt", "json"))
    for key, image, text, meta_json in zip(*members, strict=True):
        meta = json.loads(meta_json) if meta_json else {}
        try:
            prepared = prepare_image(image or b"", image_config)
            status, error, width, height = "ok", None, prepared.width, prepared.height
        except ImageError as e:
            status, error, width, height = "error", str(e), None, None
        values = (key, meta.get("uid"), meta.get("url"), meta.get("sha256"),
                  text.decode("utf-8", errors="replace") if text else None,
                  NullEngine.CAPTION if status == "ok" else None, status, error, width, height)
        for name, value in zip(columns, values, strict=True):
            columns[name].append(value)
    return pa.table(columns)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=8, help="input shards (default 8)")
    p.add_argument("--per-shard", type=int, default=200, help="images per shard (default 200)")
    p.add_argument("--image-size", type=int, default=512,
                   help="side of the synthetic JPEGs; img2dataset stores DataComp at <= 512 px (default 512)")
    p.add_argument("--max-side", type=int, default=336,
                   help="downscale to this longest side, as for a 336 px vision tower (default 336)")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each side, alternating (default 3)")
    p.add_argument("--core", type=int, help="the core to pin to (default: the last one this process may use)")
    a = parse(p, argv, SMOKE)
    record = Record("data_plane", a, argv)

    core = a.core if a.core is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_shards(root / "shards", a.shards, a.per_shard, image_size=a.image_size)
        paths = sorted(str(path) for path in (root / "shards").glob("*.tar"))
        model = str(build_tiny_llava(root / "model"))
        sides = Sides(root, paths, model, ImageConfig(max_side=a.max_side))
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="warning")
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False

        runs = {"bare": sides.bare, "ours": sides.ours, "Ray Data": sides.ray_data}
        for run in runs.values():
            run(paths[:1])   # warm-up, not timed
        rates = alternate(a.rounds, {name: lambda name=name, run=run: sides.timed(name, run, paths)
                                     for name, run in runs.items()})
        ray.shutdown()

    print(f"\n{a.shards} shards x {a.per_shard} JPEGs of {a.image_size} px, max side {a.max_side}, "
          f"pinned to core {core}, {a.rounds} alternating rounds")
    record.figures.update({"images": len(sides.images), "core": core,
                           **{f"{name}: tree CPU s / wall s": [round(x, 3) for x in cpu]
                              for name, cpu in sides.cpu.items()}})
    for name, cpu in sides.cpu.items():
        print(f"  {name}: tree CPU s / wall s per round " + " ".join(f"{x:.2f}" for x in cpu))
    record.compare("ours vs the bare limit", "images/s per core", ("bare prepare_image loop", rates["bare"]),
                   ("ours (the job, null engine)", rates["ours"]))
    record.compare("ours vs Ray Data", "images/s per core", ("Ray Data", rates["Ray Data"]),
                   ("ours (the job, null engine)", rates["ours"]))
    record.write()


if __name__ == "__main__":
    main()
