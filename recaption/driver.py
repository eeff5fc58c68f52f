"""The recaption job's driver: plan pending shards, stream them to CaptionWorker actors, account for all."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dataset import outputs, storage
from dataset.claims import Claims
from dataset.outputs import FingerprintMismatch, Output
from dataset.reader import shard_name
from recaption.job import CaptionJob

REPO_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass
class RunConfig:
    input: str
    output: str
    job: CaptionJob
    num_workers: int | None = None   # None: cluster GPUs / GPUs per worker, or 1 without GPUs
    gpus_per_worker: float | None = None  # None: tensor_parallel_size on a GPU cluster, else 0
    retry_errors: bool = False
    new_version: bool = False
    max_shards: int | None = None
    max_attempts: int = 3
    claim_ttl: float = 120.0
    progress_every: float = 30.0
    single_writer: bool = False   # skip the conditional-write probe: only one driver writes this output


@dataclass
class Task:
    path: str
    shard: str
    generation: int = 0     # the ledger generation this task commits
    retry: bool = False     # re-caption only the error rows of the committed generation before
    attempt: int = 1
    errors: list[str] = field(default_factory=list)


def read_ledgers(store: outputs.ShardStore, done: dict[str, int]) -> dict[str, dict | None]:
    with ThreadPoolExecutor(32) as pool:
        return dict(zip(done, pool.map(lambda s: store.read_ledger(s, done[s]), done)))


def plan(cfg: RunConfig, output: Output) -> tuple[list[Task], int]:
    """Pending tasks and the number of shards already done in this output version."""
    paths = storage.expand_inputs(cfg.input)
    names = [shard_name(p) for p in paths]
    for name in names:
        outputs.check_shard_name(name)
    clashes = sorted(n for n, count in Counter(names).items() if count > 1)
    if clashes:
        raise ValueError(f"input shards share output names {clashes[:5]}: one output folder per set of names")
    done = output.store.done()
    wanted = {name: done[name] for name in names if name in done}
    ledgers = read_ledgers(output.store, wanted) if cfg.retry_errors else {}
    tasks = []
    for path, name in zip(paths, names):
        if name not in done:
            tasks.append(Task(path, name))
        elif cfg.retry_errors and (ledgers[name] or {}).get("error", 0) > 0:
            tasks.append(Task(path, name, generation=done[name] + 1, retry=True))
    if cfg.max_shards is not None:
        tasks = tasks[: cfg.max_shards]
    return tasks, len(wanted)


class Progress:
    """Shards done/total, images/s, tokens/s and ETA, printed as one line at most every few seconds."""

    def __init__(self, total: int, every: float):
        self.total, self.every = total, every
        self.start = time.time()
        self.done = self.failed = self.images = self.tokens = self.ok = self.errors = 0
        self.last_print = 0.0

    def add(self, ledger: dict) -> None:
        self.done += 1
        self.images += ledger["rows_out"]
        self.tokens += ledger["tokens"]
        self.ok += ledger["ok"]
        self.errors += ledger["error"]

    def line(self) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        finished = self.done + self.failed
        eta = (self.total - finished) * elapsed / finished if finished else float("nan")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
        return (f"[recaption] shards {self.done}/{self.total} done, {self.failed} failed | "
                f"{self.images / elapsed:.1f} images/s | {self.tokens / elapsed:.0f} tokens/s | ETA {eta_text}")

    def maybe_print(self, force: bool = False) -> None:
        if force or time.time() - self.last_print >= self.every:
            print(self.line(), flush=True)
            self.last_print = time.time()


def init_ray() -> None:
    """Attach to the cluster under `ray job submit` (RAY_ADDRESS), else start a local instance."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    pythonpath = os.pathsep.join(p for p in [REPO_ROOT, os.environ.get("PYTHONPATH")] if p)
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
             log_to_driver=os.environ.get("OPENVISION_RAY_WORKER_LOGS", "1") == "1")


def worker_resources(cfg: RunConfig) -> tuple[int, float, float]:
    """(workers, GPUs per worker, CPUs per worker) from the flags and the cluster."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    tp = cfg.job.engine.tensor_parallel_size
    per_worker = cfg.gpus_per_worker if cfg.gpus_per_worker is not None else (tp if gpus else 0)
    workers = cfg.num_workers or (int(gpus // per_worker) if per_worker else 1)
    return max(workers, 1), per_worker, 1.0


class Scheduler:
    """Keeps every worker fed with two shards (one generating, one preparing) until none are left."""

    def __init__(self, cfg: RunConfig, output: Output, tasks: list[Task], claims: Claims, progress: Progress):
        import ray

        from recaption.worker import CaptionWorker

        self.ray, self.cfg, self.claims, self.progress = ray, cfg, claims, progress
        self.output, self.store = output, output.store
        self.actor_class = ray.remote(CaptionWorker)
        self.pending: deque[Task] = deque(tasks)
        self.waiting: list[Task] = []      # claimed by another live driver
        self.failed: dict[str, list[str]] = {}
        self.in_flight: dict = {}          # ObjectRef -> (worker index, Task)
        self.restarts = 0
        self.num_workers, self.gpus, self.cpus = worker_resources(cfg)
        self.workers = [self.new_worker() for _ in range(self.num_workers)]

    def new_worker(self):
        return self.actor_class.options(num_gpus=self.gpus, num_cpus=self.cpus, max_concurrency=2,
                                        max_restarts=0).remote(self.cfg.job, self.output.base)

    def wait_until_ready(self) -> list[str]:
        return self.ray.get([w.name.remote() for w in self.workers])

    def load(self, index: int) -> int:
        return sum(1 for w, _ in self.in_flight.values() if w == index)

    def submit(self) -> None:
        for index, worker in enumerate(self.workers):
            while self.pending and self.load(index) < 2:
                task = self.pending.popleft()
                token = self.claims.acquire(task.shard)  # the claim first, then the ledger check
                if token is None:
                    self.waiting.append(task)
                    continue
                if self.committed(task):
                    self.claims.release(task.shard)
                    self.progress.total -= 1   # finished by another driver meanwhile
                    continue
                if task.attempt > 1:
                    self.store.clean_leftovers(task.shard)
                ref = worker.caption.remote(task.path, task.shard, task.attempt, task.retry, task.generation, token)
                self.in_flight[ref] = (index, task)

    def committed(self, task: Task) -> bool:
        return storage.exists(self.store.ledger_path(task.shard, task.generation))

    def recheck_waiting(self) -> None:
        """Shards another driver holds: done when their ledger appears, ours when its claim goes stale."""
        still = []
        for task in self.waiting:
            if self.committed(task):
                self.progress.total -= 1
            elif self.claims.acquire(task.shard) is not None:
                self.pending.append(task)
            else:
                still.append(task)
        self.waiting = still

    def on_error(self, index: int, task: Task, error: Exception) -> None:
        task.errors.append(f"attempt {task.attempt}: {type(error).__name__}: {str(error)[-500:]}")
        if isinstance(error, self.ray.exceptions.RayActorError) and index >= 0:
            self.replace_worker(index)
        if task.attempt >= self.cfg.max_attempts:
            self.failed[task.shard] = task.errors
            self.progress.failed += 1
            self.claims.release(task.shard)
            print(f"[recaption] shard {task.shard} failed after {task.attempt} attempts: {task.errors[-1]}",
                  file=sys.stderr, flush=True)
            return
        print(f"[recaption] shard {task.shard} attempt {task.attempt} failed, re-queued: {task.errors[-1][:300]}",
              file=sys.stderr, flush=True)
        task.attempt += 1
        self.pending.appendleft(task)

    def replace_worker(self, index: int) -> None:
        self.restarts += 1
        if self.restarts > 3 * self.num_workers:
            raise RuntimeError(f"workers died {self.restarts} times; giving up (see the errors above)")
        self.ray.kill(self.workers[index], no_restart=True)
        self.workers[index] = self.new_worker()
        for ref, (w, task) in list(self.in_flight.items()):  # their results will raise too; keep them
            if w == index:
                self.in_flight[ref] = (-1, task)

    def run(self) -> None:
        while self.pending or self.in_flight or self.waiting:
            self.submit()
            if not self.in_flight:
                if self.waiting:
                    time.sleep(min(5.0, self.cfg.claim_ttl / 4))
                    self.recheck_waiting()
                continue
            ready, _ = self.ray.wait(list(self.in_flight), num_returns=1, timeout=min(5.0, self.cfg.claim_ttl / 4))
            for ref in ready:
                index, task = self.in_flight.pop(ref)
                try:
                    ledger = self.ray.get(ref)
                except (self.ray.exceptions.RayActorError, self.ray.exceptions.RayTaskError) as e:
                    self.on_error(index, task, e)
                    continue
                self.claims.release(task.shard)
                self.progress.add(ledger)
                if not ledger["written"]:
                    print(f"[recaption] shard {task.shard}: another driver wrote it first or took it over; "
                          "kept theirs", flush=True)
                self.progress.maybe_print(force=True)
            self.progress.maybe_print()


def ray_errors() -> tuple[type[Exception], ...]:
    import ray

    return ray.exceptions.RayActorError, ray.exceptions.RayTaskError


def write_run_summary(cfg: RunConfig, output: Output, progress: Progress, failed: dict[str, list[str]],
                      started: float, workers: int) -> dict:
    summary = {
        "fingerprint": cfg.job.fingerprint, "caption_config": cfg.job.caption_config(),
        "config": {"input": cfg.input, "output": cfg.output, "num_workers": workers,
                   "retry_errors": cfg.retry_errors, "new_version": cfg.new_version, "max_shards": cfg.max_shards,
                   "engine": asdict(cfg.job.engine), "write_wds": cfg.job.write_wds},
        "shards": {"total": progress.total, "done": progress.done, "failed": sorted(failed)},
        "failures": failed, "rows": {"ok": progress.ok, "error": progress.errors},
        "images_per_s": progress.images / max(time.time() - progress.start, 1e-9),
        "tokens_per_s": progress.tokens / max(time.time() - progress.start, 1e-9),
        "started_at": started, "finished_at": time.time(),
    }
    storage.write_bytes(output.run_path, json.dumps(summary, indent=1).encode())
    return summary


def run(cfg: RunConfig) -> int:
    """Run the job; returns the process exit code (0: every pending shard done)."""
    started = time.time()
    try:
        output = Output.register(cfg.output, cfg.job.fingerprint, cfg.job.caption_config(), cfg.new_version)
        tasks, done = plan(cfg, output)
    except (FingerprintMismatch, ValueError) as e:
        print(f"[recaption] error: {e}", file=sys.stderr)
        return 2
    print(f"[recaption] {len(tasks) + done} input shards: {done} done, {len(tasks)} pending "
          f"(fingerprint {cfg.job.fingerprint})", flush=True)
    if not tasks:
        print("[recaption] nothing pending", flush=True)
        return 0
    problem = None if cfg.single_writer else storage.probe_conditional_writes(output.base)
    if problem:
        print(f"[recaption] error: {problem}. Several drivers on this output could then overwrite each "
              "other's claims and commits; with one driver only, run with --single-writer.", file=sys.stderr)
        return 2
    init_ray()
    claims = Claims(output.base, f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", cfg.claim_ttl)
    progress = Progress(len(tasks), cfg.progress_every)
    scheduler = Scheduler(cfg, output, tasks, claims, progress)
    print(f"[recaption] starting {scheduler.num_workers} workers ({scheduler.gpus} GPU each)", flush=True)
    try:
        scheduler.wait_until_ready()
    except ray_errors() as e:
        print(f"[recaption] error: the caption workers could not start: {e}", file=sys.stderr)
        return 1
    progress.start = time.time()
    claims.start_renewing(lambda shard: print(f"[recaption] lost the claim on shard {shard} to another driver; "
                                              "this driver's attempt will not commit", file=sys.stderr, flush=True))
    try:
        scheduler.run()
    finally:
        claims.stop()
    swept = output.store.sweep(skip=set())
    if swept:
        print(f"[recaption] removed {len(swept)} files that no latest ledger names (attempts that did not "
              "commit, generations replaced by --retry-errors)", flush=True)
    summary = write_run_summary(cfg, output, progress, scheduler.failed, started, scheduler.num_workers)
    if scheduler.failed:
        print(f"[recaption] {len(scheduler.failed)} shards failed: {', '.join(sorted(scheduler.failed))}",
              file=sys.stderr)
        return 1
    print(f"[recaption] done: {summary['rows']['ok']} ok rows, {summary['rows']['error']} error rows "
          f"-> {cfg.output}", flush=True)
    return 0
