"""A stage's actors: how many and how big, started asynchronously, fed tasks, replaced when they die, and a
visible wait while none can start.

Sizing comes from the flags and the engine, not from what the cluster shows at start: an autoscaling
cluster starts with no GPU nodes, so it is asked for the workers it should have
(`ray.autoscaler.sdk.request_resources`) and the pool grows as actors become ready. While no worker is
ready the pool says, every `progress_every` seconds, what it waits for and what the cluster has, and after
`start_timeout` seconds it stops with an error naming the resource and the flags to change. A worker that
fails to start or dies is replaced within a budget of deaths per hour (a rate, so a week on spot
instances survives). A worker lost without an answer (its node gone, its actor unreachable) may still be
running its tasks: those events are marked uncertain and the scheduler fences their attempts.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dataset.logs import say, shown_path
from runner import cluster
from runner.records import Event, Outcome, Task, WorkerDying


@dataclass(frozen=True)
class PoolConfig:
    num_workers: int | None = None       # None: the cluster's GPUs / GPUs per worker (1 without GPUs)
    gpus_per_worker: float | None = None   # None: the engine's tensor-parallel size (0 on a local Ray without GPUs)
    cpus_per_worker: float | None = None   # None: 4 with a GPU (read + decode ahead of the engine), else 1
    # Shards in a worker at once: one working, one read ahead, one more so that a shard being written
    # (a large WebDataset tar going to S3) never leaves the worker without the next one.
    tasks_per_worker: int = 3
    deaths_per_hour: float | None = None   # restart budget; None: max(4, 2 x workers)
    start_timeout: float = 900.0          # seconds without any ready worker before the run stops (0: wait for ever)


@dataclass(frozen=True)
class ClusterView:
    gpus: float           # GPUs the cluster has right now
    started_here: bool    # a local Ray this job started (nothing behind it can add nodes)


@dataclass(frozen=True)
class Sizing:
    workers: int
    gpus: float
    cpus: float
    bundles: list[dict] | None    # what to ask the autoscaler for; None on our own local instance

    def line(self) -> str:
        return f"{self.workers} worker{'s' if self.workers != 1 else ''} x ({self.gpus:g} GPU, {self.cpus:g} CPU)"


DEFAULT_CPUS_WITH_GPU = 4


def size_workers(view: ClusterView, config: PoolConfig, tensor_parallel_size: int, pending_shards: int) -> Sizing:
    """Workers, GPUs and CPUs per worker, and the autoscaler request (pure: tested without a cluster)."""
    if config.gpus_per_worker is not None:
        gpus = config.gpus_per_worker
    else:
        gpus = 0 if view.started_here and view.gpus == 0 else tensor_parallel_size
    cpus = config.cpus_per_worker if config.cpus_per_worker is not None else (DEFAULT_CPUS_WITH_GPU if gpus else 1)
    if config.num_workers is not None:
        workers = config.num_workers
    elif gpus:
        workers = max(1, math.floor(view.gpus / gpus))
    else:
        workers = 1
    workers = max(1, min(workers, pending_shards))
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return Sizing(workers, gpus, cpus, None if view.started_here else [bundle] * workers)


@dataclass
class Slot:
    index: int
    actor: Any                                  # a Ray actor handle (None once killed)
    log: str | None
    ready: bool = False
    alive: bool = True
    info: dict = field(default_factory=dict)    # the worker's ready() answer
    calls: dict = field(default_factory=dict)   # ObjectRef -> Task
    stats: dict = field(default_factory=dict)   # the worker's latest running figures


class PoolExhausted(RuntimeError):
    """No worker is left and the restart budget is spent, or none could start in time."""


class Pool:
    """Actors of `actor_class`, each built as `actor_class(*actor_args, log_file=...)`, answering
    `ready() -> dict`, `process(task) -> Outcome` and `abandon(shard)`."""

    def __init__(self, actor_class: type, actor_args: tuple, out: str, sizing: Sizing, config: PoolConfig,
                 *, name: str, verbose: bool = False, env: dict[str, str] | None = None,
                 progress_every: float = 30.0):
        import ray

        self.ray = ray
        self.actor_args, self.name = actor_args, name
        self.out, self.sizing, self.config, self.verbose = out, sizing, config, verbose
        self.budget = config.deaths_per_hour or max(4.0, 2.0 * sizing.workers)
        self.deaths: deque[float] = deque()
        self.slots: list[Slot] = []
        self.starting: dict = {}        # ready() ObjectRef -> Slot
        self.last_error = ""
        self.started_at = self.last_wait_line = time.monotonic()
        self.progress_every = progress_every
        self.options = dict(num_gpus=sizing.gpus, num_cpus=sizing.cpus, max_restarts=0,
                            max_concurrency=config.tasks_per_worker + 2,
                            **({"runtime_env": {"env_vars": dict(env)}} if env else {}))
        self.actor_class: Any = ray.remote(actor_class)
        self.on_wait: Callable[[str], None] = lambda line: say(self.name, line)

    def start(self) -> None:
        if self.sizing.bundles:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=self.sizing.bundles)
        for _ in range(self.sizing.workers):
            self._launch()

    def _launch(self) -> None:
        index = len(self.slots)
        log = None if self.verbose else f"{self.name}-worker-{index:03d}.log"
        actor = self.actor_class.options(**self.options).remote(*self.actor_args, log_file=log)
        slot = Slot(index, actor, shown_path(self.out, log) if log else None)
        self.slots.append(slot)
        self.starting[actor.ready.remote()] = slot

    @property
    def ready_workers(self) -> int:
        return sum(s.ready and s.alive for s in self.slots)

    def info(self) -> list[dict]:
        """What the ready workers run (their ready() answers)."""
        return [s.info for s in self.slots if s.ready and s.alive]

    def _open(self, avoid: str | None) -> list[Slot]:
        """Ready workers with room for a task, except those already working on shard `avoid`."""
        return [s for s in self.slots if s.ready and s.alive and len(s.calls) < self.config.tasks_per_worker
                and not any(task.shard == avoid for task in s.calls.values())]

    def capacity(self) -> int:
        """Tasks the pool holds at once when every worker is up."""
        return self.sizing.workers * self.config.tasks_per_worker

    def free_slots(self, avoid: str | None = None) -> int:
        return sum(self.config.tasks_per_worker - len(s.calls) for s in self._open(avoid))

    def submit(self, task: Task, avoid: str | None = None) -> None:
        """Send a task to the ready worker with the fewest shards (call only when free_slots(avoid) > 0);
        `avoid`: not to a worker already working on that shard (a speculative second attempt)."""
        slot = min(self._open(avoid), key=lambda s: len(s.calls))
        slot.calls[slot.actor.process.remote(task)] = task

    def abandon(self, shard: str, attempt_id: str | None = None) -> None:
        """Ask every worker holding `shard` (its attempt `attempt_id`, when given) to drop it; their calls answer
        'abandoned'."""
        for slot in self.slots:
            if slot.alive and slot.actor is not None and any(
                    t.shard == shard and attempt_id in (None, t.attempt_id) for t in slot.calls.values()):
                slot.actor.abandon.remote(shard, attempt_id)

    def wait(self, timeout: float) -> list[Event]:
        """Events of the tasks that ended within `timeout` seconds; starts, deaths and waiting are handled here."""
        calls = {ref: slot for slot in self.slots for ref in slot.calls}
        refs = list(self.starting) + list(calls)
        if not refs:
            self._check_exhausted()
            time.sleep(timeout)
            return []
        done, rest = self.ray.wait(refs, num_returns=1, timeout=timeout)
        if done and rest:
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
            done += more
        events = []
        for ref in done:
            if ref in self.starting:
                self._started(ref, self.starting.pop(ref))
            else:
                events.append(self._answered(ref, calls[ref]))
        for slot in self.slots:
            if not slot.alive and not slot.calls and slot.actor is not None:
                self.ray.kill(slot.actor, no_restart=True)   # it may already have exited
                slot.actor = None
        self._check_exhausted()
        self._check_waiting()
        return events

    def _started(self, ref, slot: Slot) -> None:
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            self._died(slot, f"failed to start: {one_line(e)}")
            return
        slot.ready, slot.info = True, info
        where = f"; log {slot.log}" if slot.log else ""
        say(self.name, f"worker {slot.index} ready on {info['worker']} ({info['summary']}){where}")

    def _answered(self, ref, slot: Slot) -> Event:
        task = slot.calls.pop(ref)
        try:
            outcome: Outcome = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None) or e
            if isinstance(cause, WorkerDying):
                self._died(slot, cause.reason)
                return Event(task, error=str(cause), charged=cause.charged)
            return Event(task, error=f"{type(cause).__name__}: {one_line(cause)}", charged=True)
        except self.ray.exceptions.RayError as e:
            # The actor is unreachable or gone without an answer (killed, node lost, partitioned): it may
            # still be running this attempt, so the attempt is uncertain and must be fenced before a retry.
            self._died(slot, one_line(e))
            return Event(task, error=f"worker {slot.index} lost: {one_line(e)}", charged=True, certain=False)
        slot.stats = outcome.stats or slot.stats
        return Event(task, outcome=outcome)

    def _died(self, slot: Slot, reason: str) -> None:
        if not slot.alive:
            return
        slot.alive = False
        self.last_error = reason
        now = time.monotonic()
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - 3600:
            self.deaths.popleft()
        log = f" (log {slot.log})" if slot.log else ""
        if len(self.deaths) > self.budget:
            say(self.name, f"worker {slot.index} died: {reason}{log}; not replaced: {len(self.deaths)} deaths "
                           f"in the last hour exceed the budget of {self.budget:g}", error=True)
            return
        say(self.name, f"worker {slot.index} died: {reason}{log}; starting a new one ({len(self.deaths)} deaths in "
                       f"the last hour, budget {self.budget:g})", error=True)
        self._launch()

    def _check_exhausted(self) -> None:
        if not any(s.alive for s in self.slots):
            raise PoolExhausted(f"every {self.name} worker died ({len(self.deaths)} in the last hour, budget "
                                f"{self.budget:g}); the last error: {self.last_error}")

    def _check_waiting(self) -> None:
        """While no worker is ready: say what we wait for every `progress_every` s; stop after `start_timeout`."""
        if self.ready_workers or any(s.ready for s in self.slots):
            return
        now = time.monotonic()
        waited = now - self.started_at
        timeout = self.config.start_timeout
        if timeout and waited > timeout:
            raise PoolExhausted(self.stuck_message(waited))
        if now - self.last_wait_line >= self.progress_every:
            self.last_wait_line = now
            self.on_wait(f"waiting {waited:.0f} s for {self.sizing.line()} to start: {cluster.resources().line()}"
                         + (f" (stops after {timeout:.0f} s: --start-timeout)" if timeout else ""))

    def stuck_message(self, waited: float) -> str:
        have = cluster.resources()
        wanted = []
        if self.sizing.gpus and have.gpus < self.sizing.gpus:
            wanted.append(f"{self.sizing.gpus:g} GPU per worker but the cluster has {have.gpus:g} GPUs "
                          "(on CPUs: --gpus-per-worker 0 --cpus-per-worker 1)")
        if have.cpus < self.sizing.cpus:
            wanted.append(f"{self.sizing.cpus:g} CPUs per worker but the cluster has {have.cpus:g} "
                          "(--cpus-per-worker)")
        why = "; ".join(wanted) or f"{have.line()}; the last error: {self.last_error or 'none'}"
        return (f"no {self.name} worker started in {waited:.0f} s: each needs {why}. Change the flags, or wait "
                "longer with --start-timeout SECONDS (0: for ever)")

    def stats(self) -> dict:
        """The workers' running figures summed over every worker so far (an engine's wall, busy, queued time)."""
        totals: dict[str, float] = {}
        for slot in self.slots:
            for key, value in slot.stats.items():
                if isinstance(value, (int, float)):
                    totals[key] = totals.get(key, 0.0) + value
        return totals

    def close(self) -> None:
        for slot in self.slots:
            if slot.actor is not None:
                self.ray.kill(slot.actor, no_restart=True)
                slot.actor = None
        if self.sizing.bundles:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[])


def one_line(error: BaseException) -> str:
    """The last line of an error's message (Ray's carry a traceback first)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]

