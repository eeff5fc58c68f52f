"""The recaption job's driver: plan pending shards, stream them to CaptionWorker actors, account for all."""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dataset import outputs, storage
from dataset.shards import shard_name
from recaption.claims import ClaimBook
from recaption.flow import ShardTask
from recaption.job import CaptionJob
from recaption.plan import Projection, Rates, ScratchOutput, project, samples_per_shard
from recaption.pool import ClusterView, Event, Pool, PoolConfig, PoolExhausted, Sizing, size_workers
from recaption.quiet import LogFile, quiet_environment

JOB_FILE, RUN_FILE = "_job.json", "_run.json"
REPO_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass
class RunConfig:
    input: str
    output: str
    job: CaptionJob
    pool: PoolConfig = PoolConfig()
    retry_errors: bool = False
    new_version: bool = False
    max_shards: int | None = None
    max_attempts: int = 3
    claim_ttl: float = 120.0
    progress_every: float = 30.0
    plan: bool = False                  # a short sample run and the cost projection; writes no outputs
    gpu_hour_price: float | None = None  # price of one GPU-hour, for the projection
    verbose: bool = False               # library logs and worker output on the console too


@dataclass
class Task:
    shard: ShardTask
    replace: bool = False   # an existing ledger is replaced (retry-errors, new version)
    errors: list[str] = field(default_factory=list)


class FingerprintMismatch(RuntimeError):
    pass


def check_version(cfg: RunConfig) -> list[str]:
    """Record this run's fingerprint in OUT/_job.json; returns earlier fingerprints of this output."""
    path = storage.join(cfg.output, JOB_FILE)
    record = {"fingerprint": cfg.job.fingerprint, "caption_config": cfg.job.caption_config(), "history": []}
    if storage.put_if_absent(path, json.dumps(record, indent=1).encode()):
        return []
    existing = json.loads(storage.read_bytes(path))
    if existing["fingerprint"] == cfg.job.fingerprint:
        return existing.get("history", [])
    if not cfg.new_version:
        raise FingerprintMismatch(
            f"{cfg.output} holds captions with fingerprint {existing['fingerprint']} "
            f"(model {existing['caption_config'].get('model')}); this run's is {cfg.job.fingerprint}. "
            "Use another --output, or --new-version to recaption every shard into it.")
    record["history"] = existing.get("history", []) + [existing["fingerprint"]]
    storage.write_bytes(path, json.dumps(record, indent=1).encode())
    return record["history"]


def read_ledgers(out: str, shards: list[str]) -> dict[str, dict]:
    with ThreadPoolExecutor(32) as pool:
        return dict(zip(shards, pool.map(lambda s: outputs.read_ledger(out, s), shards)))


def plan(cfg: RunConfig, history: list[str]) -> tuple[list[Task], int]:
    """Pending tasks and the number of shards already done with this fingerprint."""
    paths = storage.expand_inputs(cfg.input)
    names = [shard_name(p) for p in paths]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"input shards share output names {clashes[:5]}: one output folder per set of names")
    ledgered = {storage.basename(p)[: -len(".json")]
                for p in storage.list_files(storage.join(cfg.output, outputs.LEDGER_DIR), ".json")}
    fp = cfg.job.fingerprint
    ledgers = read_ledgers(cfg.output, sorted(ledgered & set(names))) if (history or cfg.retry_errors) else {}
    tasks, done = [], 0
    for path, name in zip(paths, names):
        ledger = ledgers.get(name)
        if name not in ledgered:
            tasks.append(Task(ShardTask(name, path, 1, None)))
        elif ledger is not None and ledger["fingerprint"] != fp:
            tasks.append(Task(ShardTask(name, path, 1, None, generation=1), replace=True))
        else:
            done += 1
            if cfg.retry_errors and ledger is not None and ledger["error"] > 0:
                tasks.append(Task(ShardTask(name, path, 1, None, generation=1, retry_errors=True), replace=True))
    if cfg.max_shards is not None:
        tasks = tasks[: cfg.max_shards]
    return tasks, done


class Progress:
    """Shards done/total, the cost model's rates and projection, printed as one line at most every few seconds."""

    def __init__(self, total: int, input_shards: int, every: float):
        self.total, self.input_shards, self.every = total, input_shards, every
        self.start = time.time()
        self.done = self.failed = self.images = self.tokens = self.ok = self.errors = 0
        self.last_print = 0.0
        self.due = False   # print at the next chance (a shard finished)

    def add(self, ledger: dict) -> None:
        self.done += 1
        self.images += ledger["rows_out"]
        self.tokens += ledger["tokens"]
        self.ok += ledger["ok"]
        self.errors += ledger["error"]

    def rates(self, engine: dict) -> Rates:
        return Rates.measure(self.images, self.tokens, time.time() - self.start, engine)

    def projection(self, rates: Rates, sizing: Sizing, price: float | None) -> Projection | None:
        """The whole input at the measured rate (rows per shard from the shards done so far)."""
        if not self.done:
            return None
        return project(round(self.images / self.done * self.input_shards), rates.images_per_s, sizing.workers,
                       sizing.gpus, price)

    def line(self, rates: Rates, projection: Projection | None) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        finished = self.done + self.failed
        eta = (self.total - finished) * elapsed / finished if finished else float("nan")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
        cost = f" | {projection.gpu_hours:,.1f} {projection.unit} for the input" if projection else ""
        return (f"[recaption] shards {self.done}/{self.total} done, {self.failed} failed | {rates.line()} | "
                f"ETA {eta_text}{cost}")


def init_ray(verbose: bool) -> bool:
    """Attach to the cluster under `ray job submit` (RAY_ADDRESS), else start a local instance.
    Returns True when this call started a local instance (no autoscaler can add GPUs to it)."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING, "configure_logging": False}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
        return False
    pythonpath = os.pathsep.join(p for p in [REPO_ROOT, os.environ.get("PYTHONPATH")] if p)
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **quiet)
    return True


def cluster_view(started_here: bool) -> ClusterView:
    import ray

    return ClusterView(gpus=ray.cluster_resources().get("GPU", 0), started_here=started_here)


class Scheduler:
    """Keeps every ready worker fed with its share of shards until none are left; claims and retries."""

    def __init__(self, cfg: RunConfig, tasks: list[Task], claims: ClaimBook, progress: Progress, pool: Pool):
        self.cfg, self.claims, self.progress, self.pool = cfg, claims, progress, pool
        self.pending: deque[Task] = deque(tasks)
        self.waiting: list[Task] = []      # claimed by another live driver
        self.failed: dict[str, list[str]] = {}
        self.running: dict[str, Task] = {}

    def submit(self) -> None:
        while self.pending and self.pool.free_slots():
            task = self.pending.popleft()
            if outputs.read_ledger(self.cfg.output, task.shard.shard) is not None and not task.replace:
                self.progress.total -= 1   # finished by another driver meanwhile
                continue
            if not self.claims.try_claim(task.shard.shard):
                self.waiting.append(task)
                continue
            self.running[task.shard.shard] = task
            self.pool.submit(task.shard)

    def recheck_waiting(self) -> None:
        """Shards another driver holds: done when their ledger appears, ours when its claim goes stale."""
        still = []
        for task in self.waiting:
            ledger = outputs.read_ledger(self.cfg.output, task.shard.shard)
            if ledger is not None and ledger.get("fingerprint") == self.cfg.job.fingerprint:
                self.progress.total -= 1
            elif self.claims.try_claim(task.shard.shard):
                self.pending.append(task)
            else:
                still.append(task)
        self.waiting = still

    def on_event(self, event: Event) -> None:
        task = self.running.pop(event.task.shard)
        if event.outcome is not None:
            self.claims.release(task.shard.shard)
            if event.outcome["outcome"] == "committed":
                self.progress.add(event.outcome["ledger"])
                self.progress.due = True
            else:
                print(f"[recaption] shard {task.shard.shard}: another driver wrote it first; kept theirs "
                      f"({event.outcome['outcome']})", flush=True)
                self.progress.total -= 1
            return
        shard = task.shard
        task.errors.append(f"attempt {shard.attempt}: {event.error}")
        if not event.charged:
            print(f"[recaption] shard {shard.shard} re-queued, not charged: {event.error}", file=sys.stderr,
                  flush=True)
            self.pending.appendleft(task)
            return
        if shard.attempt >= self.cfg.max_attempts:
            self.failed[shard.shard] = task.errors
            self.progress.failed += 1
            self.claims.release(shard.shard)
            print(f"[recaption] shard {shard.shard} failed after {shard.attempt} attempts: {event.error}",
                  file=sys.stderr, flush=True)
            return
        print(f"[recaption] shard {shard.shard} attempt {shard.attempt} failed, re-queued: {event.error}",
              file=sys.stderr, flush=True)
        shard.attempt += 1
        self.pending.appendleft(task)

    def run(self) -> None:
        while self.pending or self.running or self.waiting:
            if not self.progress.done and not self.running:   # rates count from the first ready worker
                self.progress.start = self.progress.last_print = time.time()
            self.submit()
            self.claims.heartbeat()
            if not self.running and not self.pending:
                time.sleep(min(5.0, self.cfg.claim_ttl / 4))
                self.recheck_waiting()
                continue
            for event in self.pool.wait(min(5.0, self.cfg.claim_ttl / 4)):
                self.on_event(event)
            self.print_progress()
            if self.waiting and not self.pending:
                self.recheck_waiting()

    def print_progress(self, force: bool = False) -> None:
        now = time.time()
        progress = self.progress
        if force or progress.due or now - progress.last_print >= self.cfg.progress_every:
            rates = progress.rates(self.pool.engine_stats())
            projection = progress.projection(rates, self.pool.sizing, self.cfg.gpu_hour_price)
            print(progress.line(rates, projection), flush=True)
            progress.last_print, progress.due = now, False


def write_run_summary(cfg: RunConfig, progress: Progress, failed: dict[str, list[str]], started: float,
                      pool: Pool) -> dict:
    rates = progress.rates(pool.engine_stats())
    projection = progress.projection(rates, pool.sizing, cfg.gpu_hour_price)
    summary = {
        "fingerprint": cfg.job.fingerprint, "caption_config": cfg.job.caption_config(),
        "config": {"input": cfg.input, "output": cfg.output, "workers": pool.sizing.workers,
                   "gpus_per_worker": pool.sizing.gpus, "cpus_per_worker": pool.sizing.cpus,
                   "retry_errors": cfg.retry_errors, "new_version": cfg.new_version, "max_shards": cfg.max_shards,
                   "engine": asdict(cfg.job.engine), "window": cfg.job.window, "write_wds": cfg.job.write_wds},
        "shards": {"total": progress.total, "done": progress.done, "failed": sorted(failed)},
        "failures": failed, "rows": {"ok": progress.ok, "error": progress.errors},
        "images_per_s": rates.images_per_s, "tokens_per_s": rates.tokens_per_s,
        "engine_busy_share": rates.engine_busy, "engine_queued_share": rates.engine_queued,
        "engine_seconds": pool.engine_stats(), "projection": projection.as_dict() if projection else None,
        "gpu_hour_price": cfg.gpu_hour_price, "started_at": started, "finished_at": time.time(),
    }
    storage.write_bytes(storage.join(cfg.output, RUN_FILE), json.dumps(summary, indent=1).encode())
    return summary


def start_pool(cfg: RunConfig, pending: int, base: str, log: LogFile) -> tuple[Pool, ClusterView]:
    """Size the workers and start them; they write to `base` and their logs beside `log`."""
    started_here = init_ray(cfg.verbose)
    if not cfg.verbose:
        log.capture_libraries()
    view = cluster_view(started_here)
    sizing = size_workers(view, cfg.pool, cfg.job.engine.tensor_parallel_size, pending)
    where = "local Ray" if started_here else "the cluster (requested from its autoscaler)"
    print(f"[recaption] starting {sizing.line()} on {where}", flush=True)
    pool = Pool(cfg.job, log.out, base, sizing, cfg.pool, verbose=cfg.verbose)
    pool.start()
    return pool, view


def sample_run(cfg: RunConfig, tasks: list[Task], input_shards: int, log: LogFile) -> int:
    """--plan: caption a sample of the first pending shard on one worker into a scratch folder; print the cost."""
    first = tasks[0].shard
    started = time.time()
    with ScratchOutput() as scratch:
        pool, view = start_pool(replace(cfg, pool=replace(cfg.pool, num_workers=1)), 1, scratch, log)
        try:
            while not pool.ready_workers:
                pool.wait(1.0)
            startup = time.time() - started
            window = pool.info()[0]["window"]
            pool.submit(replace(first, max_samples=4 * window))
            events = []
            while not events:
                events = pool.wait(5.0)
        except PoolExhausted as e:
            print(f"[recaption] plan: error: {e}", file=sys.stderr)
            return 1
        finally:
            pool.close()
    event = events[0]
    if event.outcome is None:
        print(f"[recaption] plan: the sample run failed: {event.error}", file=sys.stderr)
        return 1
    ledger = event.outcome["ledger"]
    rates = Rates.measure(ledger["rows_out"], ledger["tokens"], ledger["generate_seconds"], event.outcome["engine"])
    per_shard = samples_per_shard(first.path)
    full = size_workers(view, cfg.pool, cfg.job.engine.tensor_parallel_size, input_shards)
    projection = project(per_shard * input_shards, rates.images_per_s * full.workers, full.workers, full.gpus,
                         cfg.gpu_hour_price)
    print(f"[recaption] plan: {ledger['rows_out']} images of shard {first.shard} on one worker "
          f"({startup:.0f} s to start): {rates.line()}")
    print(f"[recaption] plan: {input_shards} shards x ~{per_shard} images, {full.line()}: {projection.line()}")
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
        history = check_version(cfg) if not cfg.plan else []
        tasks, done = plan(cfg, history)
    except (FingerprintMismatch, ValueError) as e:
        print(f"[recaption] error: {e}", file=sys.stderr)
        return 2
    print(f"[recaption] {len(tasks) + done} input shards: {done} done, {len(tasks)} pending "
          f"(fingerprint {cfg.job.fingerprint}; {cfg.job.engine.backend} {cfg.job.engine.dtype}, "
          f"context {cfg.job.engine.max_model_len})", flush=True)
    if not cfg.verbose:
        print(f"[recaption] library and worker logs: {log.shown}", flush=True)
    if not tasks:
        print("[recaption] nothing pending", flush=True)
        return 0
    if cfg.plan:
        return sample_run(cfg, tasks, len(tasks) + done, log)
    claims = ClaimBook(cfg.output, f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", cfg.claim_ttl)
    progress = Progress(len(tasks), len(tasks) + done, cfg.progress_every)
    pool, _ = start_pool(cfg, len(tasks), cfg.output, log)
    scheduler = Scheduler(cfg, tasks, claims, progress, pool)
    try:
        scheduler.run()
    except PoolExhausted as e:
        print(f"[recaption] error: {e}", file=sys.stderr)
        for task in list(scheduler.pending) + list(scheduler.running.values()):
            scheduler.failed.setdefault(task.shard.shard, task.errors + [str(e)])
    finally:
        scheduler.print_progress(force=True)
        summary = write_run_summary(cfg, progress, scheduler.failed, started, pool)
        pool.close()
        log.sync()
    if scheduler.failed:
        print(f"[recaption] {len(scheduler.failed)} shards failed: {', '.join(sorted(scheduler.failed))}",
              file=sys.stderr)
        return 1
    print(f"[recaption] done: {summary['rows']['ok']} ok rows, {summary['rows']['error']} error rows "
          f"-> {cfg.output}", flush=True)
    return 0
