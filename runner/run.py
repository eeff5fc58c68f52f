"""`run_stage`: one stage, start to end. Plan from listings, start the pool, schedule every pending shard under
claims, print progress, stop cleanly on SIGTERM/SIGINT, account for every shard, clean up.

The stage's entry point does what only it knows first (its version, its model) and calls `check_storage`
before it writes anything; `logs` sets up its log file.
"""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field

from dataset import storage
from dataset.claims import Claims
from dataset.logs import LogFile, quiet_environment, say
from runner import cluster
from runner.pool import ClusterView, Pool, PoolConfig, PoolExhausted, Sizing, size_workers
from runner.progress import Progress, Projection, Rates
from runner.records import Plan
from runner.scheduler import Scheduler, SchedulerConfig, run_to_the_end
from runner.stage import Stage

EXIT_STOPPED = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}   # 143, 130: as a shell reports
# Claims on remote storage are aged by a clock that ticks in whole seconds and renewed every ttl/4 over a
# network: below this, live claims would look stale.
MIN_REMOTE_CLAIM_TTL = 5.0


@dataclass(frozen=True)
class RunnerConfig:
    pool: PoolConfig = PoolConfig()
    schedule: SchedulerConfig = SchedulerConfig()
    single_writer: bool = False          # storage that ignores conditional writes, run knowingly by one driver
    progress_every: float = 30.0
    gpu_hour_price: float | None = None  # price of one GPU-hour, for the projection
    verbose: bool = False                # library logs and worker output on the console too

    def check(self, out: str) -> None:
        """Refuse settings that cannot work on the output's storage, before anything starts."""
        if storage.is_remote(out) and self.schedule.claim_ttl < MIN_REMOTE_CLAIM_TTL:
            raise ValueError(f"--claim-ttl {self.schedule.claim_ttl:g}: claims on remote storage need at least "
                             f"{MIN_REMOTE_CLAIM_TTL:g} s (the storage's clock ticks in whole seconds; renewals cross "
                             "the network)")


@dataclass
class RunResult:
    plan: Plan
    progress: Progress | None = None
    sizing: Sizing | None = None
    failed: dict[str, list[str]] = field(default_factory=dict)
    stopped: str | None = None
    in_flight: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)      # the workers' summed running figures
    rates: Rates | None = None
    projection: Projection | None = None

    @property
    def complete(self) -> bool:
        """Every input shard is committed: nothing failed, stopped, not ready or left for later."""
        return not (self.failed or self.stopped or self.plan.not_ready or self.plan.deferred)

    @property
    def exit_code(self) -> int:
        if self.stopped:
            return EXIT_STOPPED[self.stopped]
        return 0 if self.complete else 1


@contextlib.contextmanager
def logs(out: str, name: str, verbose: bool) -> Iterator[LogFile]:
    """The driver's log file OUT/_logs/NAME: library output and warnings go there unless `verbose`."""
    log = LogFile(out, name)
    if not verbose:
        quiet_environment()
        log.capture_libraries()
    try:
        yield log
    finally:
        log.sync()
        log.close()


def check_storage(out: str, single_writer: bool) -> str | None:
    """A reason to refuse the output's storage, or None. Claims and ledgers rest on conditional writes."""
    if single_writer:
        return None
    problem = storage.probe_conditional_writes(out)
    if problem is None:
        return None
    return (f"{problem}. Two drivers on this output could both commit a shard, or clean up another's commit. "
            "Use storage that honours conditional writes, or --single-writer to run knowingly with one driver.")


def start_pool(stage: Stage, config: RunnerConfig, pending: int, log: LogFile) -> tuple[Pool, ClusterView]:
    """Size the stage's workers and start them."""
    import ray

    started_here = cluster.init_ray(config.verbose)
    if not config.verbose:
        log.capture_libraries()   # ray.init changed the handlers of Ray's logger
    view = ClusterView(gpus=ray.cluster_resources().get("GPU", 0), started_here=started_here)
    sizing = size_workers(view, config.pool, stage.tensor_parallel_size, pending)
    where = "local Ray" if started_here else "the cluster (requested from its autoscaler)"
    say(stage.name, f"starting {sizing.line()} on {where}")
    pool = Pool(stage.worker, stage.worker_args(sizing), log.out, sizing, config.pool, name=stage.name,
                verbose=config.verbose, env=stage.worker_env(), progress_every=config.progress_every)
    pool.start()
    return pool, view


def plan_lines(stage: Stage, plan: Plan) -> list[tuple[str, bool]]:
    """What the run will do, as (line, is_a_problem)."""
    not_ready = f", {len(plan.not_ready)} not ready" if plan.not_ready else ""
    later = f", {plan.deferred} left for a later run" if plan.deferred else ""
    lines = [(f"{plan.inputs} input shards: {plan.done} done, {len(plan.tasks)} pending{not_ready}{later} "
              f"({stage.describe()})", False)]
    lines += [(f"shard {shard}: committed, but {why}; made again as its next generation", True)
              for shard, why in plan.healed]
    if plan.not_ready:
        shown = ", ".join(plan.not_ready[:10]) + (" ..." if len(plan.not_ready) > 10 else "")
        lines.append((f"not ready: {shown} have no _stats.json beside their tar yet (img2dataset writes it last): "
                      "rerun when their download finished", True))
    return lines


def run_stage(stage: Stage, config: RunnerConfig, log: LogFile) -> RunResult:
    """Plan and run every pending shard of `stage`; the result says what happened (see RunResult)."""
    plan = stage.plan()
    for line, problem in plan_lines(stage, plan):
        say(stage.name, line, error=problem)
    if not config.verbose:
        say(stage.name, f"library and worker logs: {log.shown}")
    result = RunResult(plan)
    if not plan.tasks:
        say(stage.name, "nothing pending")
        if plan.listing is not None:   # what earlier runs left: planning's listing, no new one (PROTOCOL.md C1)
            deleted = stage.store.cleanup(plan.listing, grace_s=config.schedule.cleanup_grace)
            if deleted:
                say(stage.name, f"removed {len(deleted)} files that no ledger names and no attempt can commit any more")
        return result
    pool, _ = start_pool(stage, config, len(plan.tasks), log)
    claims = Claims(stage.store.base, cluster.holder_id(), config.schedule.claim_ttl)
    progress = Progress(stage.name, len(plan.tasks), plan.inputs, config.progress_every)
    scheduler = Scheduler(stage.name, plan.tasks, stage.store, claims, pool, progress, config.schedule)
    printer = ProgressPrinter(progress, pool, config.gpu_hour_price)
    scheduler.on_tick = printer
    result.progress, result.sizing = progress, pool.sizing
    try:
        result.stopped = run_to_the_end(scheduler)
    except PoolExhausted as e:
        say(stage.name, f"error: {e}", error=True)
        for task in list(scheduler.pending) + [run.task for run in scheduler.running.values()]:
            scheduler.failed.setdefault(task.shard, scheduler.errors.get(task.shard, []) + [str(e)])
    finally:
        printer(force=True)
        log.sync()
    result.failed = scheduler.failed
    result.in_flight = sorted(scheduler.running) if result.stopped else []
    result.stats = pool.stats()
    result.rates = progress.rates(result.stats)
    result.projection = progress.projection(result.rates, pool.sizing.workers, pool.sizing.gpus,
                                            config.gpu_hour_price)
    if result.stopped:
        say(stage.name, f"stopped by {result.stopped}: {progress.done} shards committed, {len(result.in_flight)} in "
                        "flight left for the next run, claims released", error=True)
    elif result.failed:
        say(stage.name, f"{len(result.failed)} shards failed: {', '.join(sorted(result.failed))}", error=True)
    return result


class ProgressPrinter:
    """Prints the progress line when a shard finished or every `every` seconds."""

    def __init__(self, progress: Progress, pool: Pool, price: float | None):
        self.progress, self.pool, self.price = progress, pool, price
        self.printed = (-1, -1)   # (done, failed) at the last line

    def __call__(self, force: bool = False) -> None:
        counts = (self.progress.done, self.progress.failed)
        if self.progress.should_print(force and counts != self.printed):
            rates = self.progress.rates(self.pool.stats())
            sizing = self.pool.sizing
            print(self.progress.line(rates, self.progress.projection(rates, sizing.workers, sizing.gpus, self.price)),
                  flush=True)
            self.printed = counts
