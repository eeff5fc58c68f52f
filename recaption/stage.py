"""The caption stage: plan input shards, caption each on a CaptionWorker, and the recaption job's `run`.

`run(cfg)` pins the model (its exact revision enters the fingerprint), checks the storage, registers the
output's version, then hands the stage to the runner (runner/run.py): planning from listings, the actor
pool, the scheduler under claims, progress and cost lines, a clean stop, cleanup. At the end it writes
`_run.json` and, when every input shard is committed, makes the version complete (and current: a
`--new-version` becomes what readers see only then). `--plan` captions a sample of the first pending shard
on one worker, writes nothing, and prints what the whole input would cost.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import cast

from dataset import storage
from dataset.logs import LogFile, say
from dataset.outputs import recaption_kinds
from dataset.protocol import ShardStore, new_attempt_id
from dataset.reader import ShardReader, expected_samples, shard_name, stats_path
from dataset.versions import FingerprintMismatch, Output
from recaption.flow import ShardTask
from recaption.job import CaptionJob
from recaption.worker import FAULT_ENV, CaptionWorker
from runner.planning import Wanted, plan_shards
from runner.pool import PoolExhausted, Sizing, size_workers
from runner.progress import Rates, project
from runner.records import Event, Plan
from runner.run import RunnerConfig, RunResult, check_storage, logs, run_stage, start_pool

NAME = "recaption"


@dataclass(frozen=True)
class RunConfig:
    input: str
    output: str
    job: CaptionJob
    runner: RunnerConfig = RunnerConfig()
    retry_errors: bool = False
    new_version: bool = False
    max_shards: int | None = None
    plan: bool = False                   # a short sample run and the cost projection; writes no outputs


def img2dataset_stats(paths: list[str], listings: list[set[str]]) -> set[str]:
    """The `_stats.json` files beside the input tars: from the listings that found the tars (each one folder's
    files), and one listing of each folder they do not cover.

    img2dataset writes a shard's tar first and its `_stats.json` last: in a folder that has any stats
    file, a tar without one is a download still running (or one that died), not a finished shard.
    """
    covered = {storage.parent(next(iter(files))) for files in listings if files}
    listings = listings + [set(storage.list_files(folder, "_stats.json"))
                           for folder in {storage.parent(path) for path in paths} - covered]
    return {path for files in listings for path in files if path.endswith("_stats.json")}


def plan_captions(input_spec: str, store: ShardStore, *, retry_errors: bool = False,
                  max_shards: int | None = None) -> Plan:
    """The pending tasks of a run: shards without a ledger; committed shards whose files are gone, as their next
    generation; with `retry_errors`, the done shards that have error rows (as the next generation). Shards
    img2dataset has not finished are left out."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as lister:   # the output is listed while the inputs are
        listed = lister.submit(store.listing)
        paths, listings = storage.list_inputs(input_spec)
        names = [shard_name(path) for path in paths]
        clashes = sorted(name for name, count in Counter(names).items() if count > 1)
        if clashes:
            raise ValueError(f"input shards share output names {clashes[:5]}: one output folder per set of names")
        stats = img2dataset_stats(paths, listings)
        del listings   # every file of the input folders: 3 per shard from img2dataset
        listing = listed.result()
    with_stats = {storage.parent(path) for path in stats}
    wanted, not_ready = [], []
    for path, name in zip(paths, names, strict=True):
        expected = stats_path(path) if storage.parent(path) in with_stats else None
        if name not in listing.ledgers and expected is not None and expected not in stats:
            not_ready.append(name)
            continue
        wanted.append(Wanted(name, partial(_task, name, path, expected)))
    plan = plan_shards(store, listing, wanted, retry_errors=retry_errors)
    plan.not_ready, plan.inputs = not_ready, plan.inputs + len(not_ready)
    if max_shards is not None and len(plan.tasks) > max_shards:
        plan.deferred, plan.tasks = len(plan.tasks) - max_shards, plan.tasks[:max_shards]
    return plan


def _task(shard: str, path: str, stats: str | None, generation: int, retry_errors: bool, heal: str | None
          ) -> ShardTask:
    return ShardTask(shard, generation=generation, retry_errors=retry_errors, heal=heal, path=path, stats_path=stats)


class CaptionStage:
    """The caption stage as the runner sees it (runner/stage.py)."""
    name = NAME
    worker = CaptionWorker

    def __init__(self, cfg: RunConfig, job: CaptionJob, output: Output):
        self.cfg, self.job, self.output = cfg, job, output
        self.out, self.store = cfg.output, output.store
        self.tensor_parallel_size = job.engine.tensor_parallel_size

    def plan(self) -> Plan:
        return plan_captions(self.cfg.input, self.store, retry_errors=self.cfg.retry_errors,
                             max_shards=self.cfg.max_shards)

    def describe(self) -> str:
        e = self.job.engine
        return f"fingerprint {self.job.fingerprint}; {e.backend} {e.dtype}, context {e.max_model_len}"

    def worker_args(self, sizing: Sizing) -> tuple:
        return replace(self.job, decode_threads=max(1, int(sizing.cpus))), self.out, self.output.base

    def worker_env(self) -> dict[str, str]:
        import os

        return {FAULT_ENV: os.environ[FAULT_ENV]} if os.environ.get(FAULT_ENV) else {}


def run(cfg: RunConfig) -> int:
    """Run the job; returns the process exit code (0: every input shard committed)."""
    cfg.runner.check(cfg.output)
    # --plan writes nothing under the output, its logs included.
    log_out = cfg.output if not cfg.plan else storage.join(tempfile.gettempdir(), "openvision-plan")
    with logs(log_out, "driver.log", cfg.runner.verbose) as log:
        try:
            job = cfg.job.pinned()
            if cfg.plan:
                return sample_run(cfg, job, log)
            refused = check_storage(cfg.output, cfg.runner.single_writer)
            if refused:
                say(NAME, f"error: {refused}", error=True)
                return 2
            output = Output.register(cfg.output, job.fingerprint, job.caption_config(), cfg.new_version,
                                     recaption_kinds(job.write_wds))
        except (FingerprintMismatch, ValueError) as e:
            say(NAME, f"error: {e}", error=True)
            return 2
        started = time.time()
        if not output.current:
            say(NAME, f"{output.describe()}: it becomes current when every input shard is committed")
        result = run_stage(CaptionStage(cfg, job, output), cfg.runner, log)
        if result.progress is not None:
            write_run_summary(cfg, job, output, result, started)
        if result.complete and not (output.complete and output.current):
            output = output.mark_complete()
            say(NAME, f"every input shard is committed: {output.describe()}")
        if result.exit_code == 0 and result.progress is not None:
            say(NAME, f"done: {result.progress.ok} ok rows, {result.progress.errors} error rows -> {output.base}")
        return result.exit_code


def write_run_summary(cfg: RunConfig, job: CaptionJob, output: Output, result: RunResult, started: float) -> dict:
    progress, sizing = result.progress, result.sizing
    assert progress is not None and sizing is not None and result.rates is not None
    summary = {
        "fingerprint": output.fingerprint, "caption_config": job.caption_config(),
        "config": {"input": cfg.input, "output": cfg.output, "workers": sizing.workers,
                   "gpus_per_worker": sizing.gpus, "cpus_per_worker": sizing.cpus,
                   "retry_errors": cfg.retry_errors, "new_version": cfg.new_version, "max_shards": cfg.max_shards,
                   "engine": asdict(job.engine), "window": job.window, "write_wds": job.write_wds},
        "shards": {"total": progress.total, "done": progress.done, "failed": sorted(result.failed),
                   "in_flight_when_stopped": result.in_flight, "healed": dict(result.plan.healed)},
        "failures": result.failed, "rows": {"ok": progress.ok, "error": progress.errors},
        "images_per_s": result.rates.images_per_s, "tokens_per_s": result.rates.tokens_per_s,
        "engine_busy_share": result.rates.engine_busy, "engine_queued_share": result.rates.engine_queued,
        "engine_seconds": result.stats, "projection": result.projection.as_dict() if result.projection else None,
        "gpu_hour_price": cfg.runner.gpu_hour_price, "stopped": result.stopped, "started_at": started,
        "finished_at": time.time(),
    }
    storage.write_bytes(output.run_path, json.dumps(summary, indent=1).encode())
    return summary


def samples_per_shard(path: str) -> int:
    """img2dataset's count for one shard (`{shard}_stats.json`), else the samples its tar holds."""
    stats = stats_path(path)
    if storage.exists(stats):
        return expected_samples(storage.read_bytes(stats))
    reader = ShardReader(path)
    for _ in reader:
        pass
    return reader.stats.samples_in


def sample_run(cfg: RunConfig, job: CaptionJob, log: LogFile) -> int:
    """--plan: caption a sample of the first pending shard on one worker (which writes nothing); print the cost."""
    with tempfile.TemporaryDirectory(prefix="ov-plan-") as nowhere:
        work = plan_captions(cfg.input, ShardStore(nowhere, recaption_kinds(job.write_wds)))
        say(NAME, f"{work.inputs} input shards (fingerprint {job.fingerprint})")
        if not work.tasks:
            say(NAME, "nothing pending")
            return 1 if work.not_ready else 0
        first = cast(ShardTask, work.tasks[0])
        output = Output(nowhere, job.fingerprint, nowhere, kinds=recaption_kinds(job.write_wds))
        stage = CaptionStage(cfg, job, output)
        stage.out = log.out   # worker logs too stay out of OUT
        one = replace(cfg.runner, pool=replace(cfg.runner.pool, num_workers=1))
        started = time.time()
        pool, view = start_pool(stage, one, 1, log)
        try:
            while not pool.ready_workers:
                pool.wait(1.0)
            startup = time.time() - started
            window = pool.info()[0]["window"]
            pool.submit(replace(first, attempt_id=new_attempt_id(), max_samples=4 * window, stats_path=None))
            events: list[Event] = []
            while not events:
                events = pool.wait(5.0)
        except PoolExhausted as e:
            say(NAME, f"plan: error: {e}", error=True)
            return 1
        finally:
            pool.close()
    event = events[0]
    if event.outcome is None or event.outcome.ledger is None:
        say(NAME, f"plan: the sample run failed: {event.error}", error=True)
        return 1
    ledger: dict = dict(event.outcome.ledger)
    rates = Rates.measure(ledger["rows_out"], ledger["tokens"], ledger["generate_seconds"], event.outcome.stats)
    per_shard = samples_per_shard(first.path)   # type: ignore[attr-defined]
    full = size_workers(view, cfg.runner.pool, job.engine.tensor_parallel_size, work.inputs)
    projection = project(per_shard * work.inputs, rates.images_per_s * full.workers, full.workers, full.gpus,
                         cfg.runner.gpu_hour_price)
    say(NAME, f"plan: {ledger['rows_out']} images of shard {first.shard} on one worker ({startup:.0f} s to start): "
              f"{rates.line()}")
    say(NAME, f"plan: {work.inputs} shards x ~{per_shard} images, {full.line()}: {projection.line()}")
    return 0
