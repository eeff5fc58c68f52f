"""The recaption job's driver: check the storage and the output's version, plan from listings, start the
worker pool, schedule shards under claims, account for every shard, and stop cleanly on SIGTERM."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dataset import storage
from dataset.claims import Claims
from dataset.logs import LogFile, quiet_environment
from dataset.outputs import FingerprintMismatch, Output
from recaption.cost import Rates as CostRates
from recaption.cost import ScratchOutput, project, samples_per_shard
from recaption.job import CaptionJob
from recaption.planning import Plan, plan
from recaption.pool import ClusterView, Pool, PoolConfig, PoolExhausted, size_workers
from recaption.progress import Progress
from recaption.scheduler import Scheduler, SchedulerConfig, run_to_the_end
from recaption.worker import CaptionWorker

REPO_ROOT = str(Path(__file__).resolve().parents[1])
EXIT_STOPPED = {signal.SIGTERM: 143, signal.SIGINT: 130}


@dataclass
class RunConfig:
    input: str
    output: str
    job: CaptionJob
    pool: PoolConfig = PoolConfig()
    schedule: SchedulerConfig = SchedulerConfig()
    retry_errors: bool = False
    new_version: bool = False
    single_writer: bool = False          # storage that ignores conditional writes, run knowingly by one driver
    max_shards: int | None = None
    progress_every: float = 30.0
    plan: bool = False                   # a short sample run and the cost projection; writes no outputs
    gpu_hour_price: float | None = None  # price of one GPU-hour, for the projection
    verbose: bool = False                # library logs and worker output on the console too


def say(text: str, error: bool = False) -> None:
    print(f"[recaption] {text}", file=sys.stderr if error else sys.stdout, flush=True)


_local_ray: list[bool] = []   # this process started a local Ray instance (it lives until the process ends)


def init_ray(verbose: bool) -> bool:
    """Attach to the cluster under `ray job submit` (RAY_ADDRESS), else start a local instance.
    Returns True when the instance is a local one this process started (no autoscaler can add GPUs)."""
    import ray

    if ray.is_initialized():
        return bool(_local_ray)
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING, "configure_logging": False}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
        return False
    pythonpath = os.pathsep.join(p for p in [REPO_ROOT, os.environ.get("PYTHONPATH")] if p)
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **quiet)
    _local_ray.append(True)
    return True


def start_pool(cfg: RunConfig, pending: int, base: str, log: LogFile) -> tuple[Pool, ClusterView]:
    """Size the caption workers and start them; they commit under `base`, log beside `log`."""
    import ray

    started_here = init_ray(cfg.verbose)
    if not cfg.verbose:
        log.capture_libraries()
    view = ClusterView(gpus=ray.cluster_resources().get("GPU", 0), started_here=started_here)
    sizing = size_workers(view, cfg.pool, cfg.job.engine.tensor_parallel_size, pending)
    where = "local Ray" if started_here else "the cluster (requested from its autoscaler)"
    say(f"starting {sizing.line()} on {where}")
    job = replace(cfg.job, decode_threads=max(1, int(sizing.cpus)))
    pool = Pool(CaptionWorker, (job, log.out, base), log.out, sizing, cfg.pool, verbose=cfg.verbose)
    pool.start()
    return pool, view


def check_storage(cfg: RunConfig) -> str | None:
    """A reason to refuse the output's storage, or None. Claims and ledgers rest on conditional writes."""
    if cfg.single_writer:
        return None
    problem = storage.probe_conditional_writes(cfg.output)
    if problem is None:
        return None
    return (f"{problem}. Two drivers on this output could caption a shard twice or overwrite a commit. "
            "Use storage that honours conditional writes, or --single-writer to run knowingly with one driver.")


def write_run_summary(cfg: RunConfig, output: Output, progress: Progress, scheduler: Scheduler | None,
                      pool: Pool, started: float, stopped: str | None) -> dict:
    rates = progress.rates(pool.engine_stats())
    projection = progress.projection(rates, pool.sizing, cfg.gpu_hour_price)
    failed = scheduler.failed if scheduler else {}
    summary = {
        "fingerprint": output.fingerprint, "caption_config": cfg.job.caption_config(),
        "config": {"input": cfg.input, "output": cfg.output, "workers": pool.sizing.workers,
                   "gpus_per_worker": pool.sizing.gpus, "cpus_per_worker": pool.sizing.cpus,
                   "retry_errors": cfg.retry_errors, "new_version": cfg.new_version, "max_shards": cfg.max_shards,
                   "engine": asdict(cfg.job.engine), "window": cfg.job.window, "write_wds": cfg.job.write_wds},
        "shards": {"total": progress.total, "done": progress.done, "failed": sorted(failed),
                   "in_flight_when_stopped": sorted(scheduler.running) if scheduler and stopped else []},
        "failures": failed, "rows": {"ok": progress.ok, "error": progress.errors},
        "images_per_s": rates.images_per_s, "tokens_per_s": rates.tokens_per_s,
        "engine_busy_share": rates.engine_busy, "engine_queued_share": rates.engine_queued,
        "engine_seconds": pool.engine_stats(), "projection": projection.as_dict() if projection else None,
        "gpu_hour_price": cfg.gpu_hour_price, "stopped": stopped, "started_at": started, "finished_at": time.time(),
    }
    storage.write_bytes(output.run_path, json.dumps(summary, indent=1).encode())
    return summary


def sample_run(cfg: RunConfig, work: Plan, log: LogFile) -> int:
    """--plan: caption a sample of the first pending shard on one worker into a scratch folder; print the cost."""
    first = work.tasks[0]
    started = time.time()
    with ScratchOutput() as scratch:
        scratch_store = Output.register(scratch, cfg.job.fingerprint, cfg.job.caption_config(), False)
        pool, view = start_pool(replace(cfg, pool=replace(cfg.pool, num_workers=1)), 1, scratch_store.base, log)
        try:
            while not pool.ready_workers:
                pool.wait(1.0)
            startup = time.time() - started
            window = pool.info()[0]["window"]
            pool.submit(replace(first, max_samples=4 * window, stats_path=None))
            events = []
            while not events:
                events = pool.wait(5.0)
        except PoolExhausted as e:
            say(f"plan: error: {e}", error=True)
            return 1
        finally:
            pool.close()
    event = events[0]
    if event.outcome is None:
        say(f"plan: the sample run failed: {event.error}", error=True)
        return 1
    ledger = event.outcome["ledger"]
    rates = CostRates.measure(ledger["rows_out"], ledger["tokens"], ledger["generate_seconds"],
                              event.outcome["engine"])
    per_shard = samples_per_shard(first.path)
    full = size_workers(view, cfg.pool, cfg.job.engine.tensor_parallel_size, work.inputs)
    projection = project(per_shard * work.inputs, rates.images_per_s * full.workers, full.workers, full.gpus,
                         cfg.gpu_hour_price)
    say(f"plan: {ledger['rows_out']} images of shard {first.shard} on one worker ({startup:.0f} s to start): "
        f"{rates.line()}")
    say(f"plan: {work.inputs} shards x ~{per_shard} images, {full.line()}: {projection.line()}")
    return 0


def run(cfg: RunConfig) -> int:
    """Run the job; returns the process exit code (0: every pending shard done)."""
    # --plan writes nothing under the output, its logs included.
    log = LogFile(cfg.output if not cfg.plan else str(Path(tempfile.gettempdir()) / "openvision-plan"), "driver.log")
    if not cfg.verbose:
        quiet_environment()
        log.capture_libraries()
    try:
        return run_logged(cfg, log)
    finally:
        log.close()


def run_logged(cfg: RunConfig, log: LogFile) -> int:
    started = time.time()
    try:
        cfg = replace(cfg, job=cfg.job.pinned())
        fingerprint = cfg.job.fingerprint
        if cfg.plan:  # a projection for the whole input: the output is neither read nor written
            with tempfile.TemporaryDirectory(prefix="ov-plan-") as nowhere:
                work = plan(cfg.input, Output(nowhere, fingerprint, nowhere, {}).store)
            output = None
        else:
            refused = check_storage(cfg)
            if refused:
                say(f"error: {refused}", error=True)
                return 2
            output = Output.register(cfg.output, fingerprint, cfg.job.caption_config(), cfg.new_version)
            work = plan(cfg.input, output.store, retry_errors=cfg.retry_errors, max_shards=cfg.max_shards)
    except (FingerprintMismatch, ValueError) as e:
        say(f"error: {e}", error=True)
        return 2
    engine = cfg.job.engine
    say(f"{work.inputs} input shards: {work.done} done, {len(work.tasks)} pending"
        f"{f', {len(work.not_ready)} not ready' if work.not_ready else ''} (fingerprint {fingerprint}; "
        f"{engine.backend} {engine.dtype}, context {engine.max_model_len})")
    if work.not_ready:
        say(f"not ready: {', '.join(work.not_ready[:10])}{' ...' if len(work.not_ready) > 10 else ''} have no "
            "_stats.json beside their tar yet (img2dataset writes it last): rerun when their download finished",
            error=True)
    if not cfg.verbose:
        say(f"library and worker logs: {log.shown}")
    if not work.tasks:
        say("nothing pending")
        return 1 if work.not_ready else 0
    if cfg.plan:
        return sample_run(cfg, work, log)
    return caption(cfg, output, work, log, started)


def caption(cfg: RunConfig, output: Output, work: Plan, log: LogFile, started: float) -> int:
    """Start the pool and schedule every pending shard; a stop signal ends the run cleanly."""
    claims = Claims(output.base, holder_id(), cfg.schedule.claim_ttl)
    progress = Progress("recaption", len(work.tasks), work.inputs, cfg.progress_every)
    pool, _ = start_pool(cfg, len(work.tasks), output.base, log)
    scheduler = Scheduler("recaption", work.tasks, output.store, claims, pool, progress, cfg.schedule)
    printer = ProgressPrinter(progress, pool, cfg.gpu_hour_price)
    scheduler.on_tick = printer
    stopped = None
    try:
        stopped = run_to_the_end(scheduler)
    except PoolExhausted as e:
        say(f"error: {e}", error=True)
        for task in list(scheduler.pending) + [run.task for run in scheduler.running.values()]:
            scheduler.failed.setdefault(task.shard, scheduler.errors.get(task.shard, []) + [str(e)])
    finally:
        printer(force=True)
        summary = write_run_summary(cfg, output, progress, scheduler, pool, started, stopped)
        log.sync()
    if stopped:
        say(f"stopped by {stopped}: {progress.done} shards committed, {len(scheduler.running)} in flight "
            f"left for the next run, claims released; {output.run_path}", error=True)
        return EXIT_STOPPED[signal.Signals[stopped]]
    if work.not_ready or scheduler.failed:
        if scheduler.failed:
            say(f"{len(scheduler.failed)} shards failed: {', '.join(sorted(scheduler.failed))}", error=True)
        return 1
    say(f"done: {summary['rows']['ok']} ok rows, {summary['rows']['error']} error rows -> {output.base}")
    return 0


def holder_id() -> str:
    """Who holds a claim: this driver process, uniquely."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ProgressPrinter:
    """Prints the progress line when a shard finished or every `every` seconds."""

    def __init__(self, progress: Progress, pool: Pool, price: float | None):
        self.progress, self.pool, self.price = progress, pool, price
        self.printed = (-1, -1)   # (done, failed) at the last line

    def __call__(self, force: bool = False) -> None:
        counts = (self.progress.done, self.progress.failed)
        if self.progress.should_print(force and counts != self.printed):
            rates = self.progress.rates(self.pool.engine_stats())
            print(self.progress.line(rates, self.progress.projection(rates, self.pool.sizing, self.price)),
                  flush=True)
            self.printed = counts

