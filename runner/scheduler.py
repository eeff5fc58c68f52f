"""Feeding shard tasks to a pool of workers under fenced claims, until every task is committed or failed.

Per shard, in order: take the claim with the attempt registered in it (another live driver's shard
waits; a retry or a speculative copy registers one more attempt in the claim we hold), check that no
ledger of the target generation exists (another driver may have finished it meanwhile), send it to a
worker with its attempt id (the worker begins its commit in the claim, which fails once the attempt was
fenced), and release the claim after the answer (which fences every attempt still registered). The
storage requests of the first two steps and of the release run on a small thread pool beside the loop,
for the next tasks while the workers are busy: the loop itself makes no storage request per shard in the
common case. Failures:
- an attempt that ends without a commit is fenced in the claim before anything else happens to its
  shard, so a worker that is still running it (a lost actor, a reply that never came) can no longer
  commit; if it had already begun its commit, its ledger decides;
- a failed attempt is charged and re-queued up to `max_attempts`, then the shard is reported failed; a
  failure the worker says was not the shard's doing (its engine died while the shard only waited) is
  re-queued uncharged; an input the reader refuses (`InputError`) fails at once;
- a claim taken over by another driver (ours went stale: a paused or partitioned driver) makes us
  abandon the shard: the other driver owns it now;
- a shard running past `deadline_factor` x the median shard time is abandoned and re-queued, charged;
- near the end, when nothing else is left, a slow shard gets a second attempt on an idle worker
  (speculative execution, as MapReduce's backup tasks: Dean & Ghemawat, OSDI 2004): the first commit wins,
  and the release that follows it fences the other.
Time is the monotonic clock (an NTP step does not abandon shards). A stop request (SIGTERM, `ray job stop`)
ends the loop; `finish` closes the pool and releases the claims, so in-flight shards are left without a
ledger for the next run, then cleans up what no one can commit any more.
"""
from __future__ import annotations

import queue
import signal
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Protocol

from dataset import storage
from dataset.claims import Claims
from dataset.logs import say
from dataset.protocol import CLEANUP_GRACE_S, Ledger, ShardStore, new_attempt_id
from runner.progress import Progress
from runner.records import Event, Task

PERMANENT_ERRORS = ("InputError",)     # the reader refused the shard: retrying cannot help
MIN_DURATIONS = 3                      # committed shards needed before deadlines and speculation apply
DURATION_WINDOW = 1000                 # deadlines and speculation follow the median of the latest shard times
REQUEST_THREADS = 16                   # claims taken and released beside the loop (one or two round trips each)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class SchedulerConfig:
    max_attempts: int = 3
    claim_ttl: float = 120.0
    deadline_factor: float = 4.0       # x the median shard time; 0 turns deadlines off
    min_deadline: float = 60.0         # seconds: never abandon a shard sooner
    speculate_after: float = 1.5       # x the median shard time; 0 turns speculative attempts off
    cleanup_grace: float = CLEANUP_GRACE_S   # seconds before superseded files go (readers may still read them)


class PoolLike(Protocol):
    """What the scheduler needs of a pool (runner/pool.py's, or the protocol simulation's)."""
    @property
    def ready_workers(self) -> int: ...
    def capacity(self) -> int: ...
    def free_slots(self, avoid: str | None = None) -> int: ...
    def submit(self, task: Task, avoid: str | None = None) -> None: ...
    def abandon(self, shard: str, attempt_id: str | None = None) -> None: ...
    def wait(self, timeout: float) -> list[Event]: ...
    def close(self) -> None: ...


class Runtime:
    """The scheduler's time and concurrency: the monotonic clock, a thread pool for claim requests, a thread
    for claim renewals. The protocol simulation (tests/simulation.py) runs the same scheduler on its own."""

    def clock(self) -> float:
        return time.monotonic()

    def say(self, name: str, text: str, error: bool = False) -> None:
        say(name, text, error)

    def executor(self, name: str) -> Executor:
        return ThreadPoolExecutor(REQUEST_THREADS, thread_name_prefix=f"{name}-claims")

    def every(self, seconds: float, action: Callable[[], None], stop: threading.Event, name: str) -> None:
        def loop() -> None:
            while not stop.wait(seconds):
                action()

        threading.Thread(target=loop, daemon=True, name=name).start()


@dataclass
class Running:
    task: Task
    started: float
    attempts: dict[str, Task] = field(default_factory=dict)   # attempt id -> its task, in flight
    abandoned: str | None = None       # why we asked the workers to drop it: 'deadline' | 'lost'
    errors: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, name: str, tasks: list[Task], store: ShardStore, claims: Claims, pool: PoolLike,
                 progress: Progress, config: SchedulerConfig, runtime: Runtime | None = None):
        self.name, self.store, self.claims, self.pool = name, store, claims, pool
        self.progress, self.config = progress, config
        self.runtime = runtime or Runtime()
        self.pending: deque[Task] = deque(tasks)
        self.claiming: deque[tuple[Task, Future]] = deque()   # the next tasks, their claims being taken
        self.waiting: list[Task] = []                 # claimed by another live driver
        self.running: dict[str, Running] = {}
        self.failed: dict[str, list[str]] = {}
        self.errors: dict[str, list[str]] = {}        # earlier attempts' errors, by shard
        self.ours: dict[str, set[str]] = {}           # shard -> every attempt id this run sent
        self.durations: deque[float] = deque(maxlen=DURATION_WINDOW)   # seconds of the latest shards committed
        self.lost: queue.Queue[str] = queue.Queue()   # claims taken over, from the renewal thread
        self.stop = threading.Event()
        self.stop_renewing = threading.Event()
        self.last_recheck = self.runtime.clock()
        self.on_tick: Callable[[], None] = lambda: None   # e.g. print progress
        self.requests = self.runtime.executor(name)

    def say(self, text: str, error: bool = False) -> None:
        self.runtime.say(self.name, text, error)

    # ----- the loop

    def run(self) -> None:
        self.runtime.every(self.config.claim_ttl / 4, self.renew, self.stop_renewing, f"{self.name}-renewal")
        poll = min(2.0, self.config.claim_ttl / 8)
        try:
            while (self.pending or self.claiming or self.running or self.waiting) and not self.stop.is_set():
                if not self.pool.ready_workers and not self.progress.done:
                    self.progress.restart_clock()
                self.handle_lost()
                self.dispatch()
                events = self.pool.wait(poll)   # also starts workers and notices deaths
                for event in events:
                    self.on_event(event)
                if self.running:
                    self.check_deadlines()
                    self.speculate()
                if self.waiting and self.runtime.clock() - self.last_recheck >= self.config.claim_ttl / 4:
                    self.recheck_waiting()
                self.on_tick()
        finally:
            self.stop_renewing.set()
            self.requests.shutdown()   # claims being taken are held before `finish` releases every claim
            self.pending.extendleft(task for task, _ in reversed(self.claiming))
            self.claiming.clear()

    def renew(self) -> None:
        for shard in self.claims.renew():
            self.lost.put(shard)

    def ahead(self) -> int:
        """Tasks to claim ahead of the free slots: as many as the pool holds at once, and one for each thread."""
        return self.pool.capacity() + REQUEST_THREADS

    def claim_ahead(self) -> None:
        while self.pending and len(self.claiming) < self.ahead() and not self.stop.is_set():
            task = self.pending.popleft()
            self.claiming.append((task, self.requests.submit(self.take, task)))

    def dispatch(self) -> None:
        """Send claimed tasks to free slots, in order; settle those another driver holds or committed."""
        self.claim_ahead()
        while self.claiming and not self.stop.is_set():
            task, taken = self.claiming[0]
            if not taken.done() and not self.pool.free_slots():
                break
            try:
                ready, committed = taken.result()   # taken while the workers were busy, as a rule
            except Exception as e:  # noqa: BLE001 - a storage error taking the claim fails this attempt only
                self.claiming.popleft()
                self.retry(Running(task, self.runtime.clock()), f"taking its claim failed: {e}", charged=True)
                continue
            if ready is not None and committed is None and not self.pool.free_slots():
                break
            self.claiming.popleft()
            if ready is None:
                self.waiting.append(task)
            elif committed is not None:
                self.settle_committed_elsewhere(task, committed)
            else:
                self.running[task.shard] = Running(ready, self.runtime.clock(), {ready.attempt_id: ready})
                self.ours.setdefault(task.shard, set()).add(ready.attempt_id)
                self.pool.submit(ready)
        self.claim_ahead()

    def take(self, task: Task) -> tuple[Task | None, Ledger | dict | None]:
        """Beside the loop: the claim with a new attempt registered in it (None: another live driver holds it),
        then whether the ledger this task would create exists (then the claim is released; for a retry, that
        ledger is read, as it may be our own earlier attempt's)."""
        attempt_id = new_attempt_id()
        if task.shard in self.claims.held:
            if not self.claims.register(task.shard, attempt_id, task.generation):
                return None, None
        elif self.claims.acquire(task.shard, attempt_id, task.generation) is None:
            return None, None
        if self.committed(task):
            self.claims.release(task.shard, committed_generation=task.generation)
            ledger = self.store.read_ledger(task.shard, task.generation) if task.attempt > 1 else None
            return task, ledger or {}
        return replace(task, attempt_id=attempt_id), None

    def next(self, task: Task) -> None:
        """A task to run again goes first: ahead of the tasks already claimed, its claim taken at once (a shard
        that failed or ran past its deadline must not wait for the whole queue: it is the run's long tail)."""
        if self.stop.is_set():
            self.pending.appendleft(task)
        else:
            self.claiming.appendleft((task, self.requests.submit(self.take, task)))

    def committed(self, task: Task) -> bool:
        """The ledger this task would create exists already (another attempt committed the shard)."""
        return storage.exists(self.store.ledger_path(task.shard, task.generation))

    def committed_or_unknown(self, task: Task) -> bool | None:
        """`committed`, or None when the storage could not say (it is asked again later)."""
        try:
            return self.committed(task)
        except OSError as e:
            self.say(f"shard {task.shard}: checking its ledger failed, will check again: {e}", error=True)
            return None

    def settle_committed_elsewhere(self, task: Task, ledger: Ledger | dict) -> None:
        """The shard's generation was committed before this task ran: by our own earlier attempt (an answer
        that never came), or by another driver."""
        if ledger.get("attempt_id") in self.ours.get(task.shard, set()):
            self.progress.add(ledger)  # type: ignore[arg-type]
            self.say(f"shard {task.shard}: committed by attempt {ledger['attempt_id']}, whose answer was lost")
        else:
            self.progress.total -= 1

    def recheck_waiting(self) -> None:
        """Shards another driver holds: done once their ledger appears, else tried again (their claim may
        have gone stale)."""
        self.last_recheck = self.runtime.clock()
        waiting, self.waiting = self.waiting, []
        for task, committed in zip(waiting, self.requests.map(self.committed_or_unknown, waiting), strict=True):
            if committed:
                self.progress.total -= 1
            else:
                self.pending.append(task)

    # ----- answers

    def on_event(self, event: Event) -> None:
        task = event.task
        run = self.running.get(task.shard)
        if run is None or task.attempt_id not in run.attempts:   # an attempt answering after its shard settled
            return
        del run.attempts[task.attempt_id]
        outcome = event.outcome
        if outcome is not None and outcome.kind == "committed":
            self.running.pop(task.shard)
            self.requests.submit(self.claims.release, task.shard, task.generation)  # fences a speculative copy
            if outcome.ledger is not None:
                self.progress.add(outcome.ledger)
            self.durations.append(self.runtime.clock() - run.started)
            if run.attempts:
                self.pool.abandon(task.shard)   # the other copy: fenced by the release, told to stop
            return
        if event.error:
            run.errors.append(f"attempt {task.attempt}: {event.error}")
        if self.fence(task):                    # it had begun its commit and its ledger is there
            if not run.attempts:
                self.running.pop(task.shard)
            return
        if run.attempts:                        # the other copy may still commit
            return
        self.running.pop(task.shard)
        kind = outcome.kind if outcome is not None else None
        if kind == "lost" or run.abandoned == "lost" or (kind == "fenced" and run.abandoned is None):
            self.settle_lost(run)
        elif run.abandoned == "deadline":
            limit = self.deadline()
            self.retry(run, f"ran past the deadline of {limit:.0f} s ({self.config.deadline_factor:g} x the median "
                            "shard time)", charged=True)
        elif kind in ("abandoned", "fenced"):
            self.next(replace(run.task, attempt_id=None))
        else:
            permanent = (event.error or "").startswith(PERMANENT_ERRORS)
            self.retry(run, event.error or "no answer", charged=event.charged, permanent=permanent)

    def fence(self, task: Task) -> bool:
        """An attempt that ended without committing, or may still be running: make sure it cannot commit.
        True when it had begun its commit and its ledger exists (the shard is settled here). When the storage
        fails, the attempt stays registered until the claim's release fences it; it may still commit, and then
        the retry loses: one ledger either way."""
        try:
            if self.claims.fence(task.shard, task.attempt_id or "") == "fenced" or not self.committed(task):
                return False
            ledger = self.store.read_ledger(task.shard, task.generation) or {}
        except OSError as e:
            self.say(f"shard {task.shard}: fencing attempt {task.attempt_id} failed ({e}); its claim's release "
                     "fences it", error=True)
            return False
        self.settle_committed_elsewhere(task, ledger)
        self.requests.submit(self.claims.release, task.shard, task.generation)
        return True

    def settle_lost(self, run: Running) -> None:
        """Another attempt committed the shard first, or another driver took its claim over (it owns it now)."""
        shard = run.task.shard
        self.claims.release(shard)
        if self.committed_or_unknown(run.task):
            self.say(f"shard {shard}: another attempt committed it first; kept that one")
            self.progress.total -= 1
        else:
            self.say(f"shard {shard}: its claim was taken over by another driver; left to it", error=True)
            self.waiting.append(replace(run.task, attempt_id=None))

    def retry(self, run: Running, error: str, *, charged: bool, permanent: bool = False) -> None:
        task = run.task
        errors = self.errors.setdefault(task.shard, [])
        errors += run.errors or [f"attempt {task.attempt}: {error}"]
        if not charged and not permanent:
            self.say(f"shard {task.shard} re-queued, not charged: {error}", error=True)
            self.next(replace(task, attempt_id=None))
            return
        if permanent or task.attempt >= self.config.max_attempts:
            self.failed[task.shard] = errors
            self.progress.failed += 1
            self.requests.submit(self.claims.release, task.shard)
            tries = "its input is refused" if permanent else f"after {task.attempt} attempts"
            self.say(f"shard {task.shard} failed {tries}: {error}", error=True)
            return
        self.say(f"shard {task.shard} attempt {task.attempt} failed, re-queued: {error}", error=True)
        self.next(replace(task, attempt=task.attempt + 1, attempt_id=None))

    # ----- claims lost, deadlines, speculation

    def handle_lost(self) -> None:
        while not self.lost.empty():
            shard = self.lost.get()
            run = self.running.get(shard)
            if run is not None and run.abandoned is None:
                run.abandoned = "lost"
                self.pool.abandon(shard)

    def deadline(self) -> float:
        return max(self.config.min_deadline, self.config.deadline_factor * statistics.median(self.durations))

    def check_deadlines(self) -> None:
        """A shard past its deadline: its attempts are fenced at once and it is re-queued, charged, without
        waiting for a worker that may hang for good; an attempt that already began its commit is waited for."""
        if not self.config.deadline_factor or len(self.durations) < MIN_DURATIONS:
            return
        limit, now = self.deadline(), self.runtime.clock()
        for shard, run in list(self.running.items()):
            if run.abandoned is not None or now - run.started <= limit:
                continue
            run.abandoned = "deadline"
            for attempt_id in list(run.attempts):
                try:
                    fenced = self.claims.fence(shard, attempt_id) == "fenced"
                except OSError:
                    fenced = False   # it stays registered: its answer is waited for
                if fenced:
                    del run.attempts[attempt_id]
                    self.pool.abandon(shard, attempt_id)
            if not run.attempts:
                self.running.pop(shard)
                self.retry(run, f"ran past the deadline of {limit:.0f} s ({self.config.deadline_factor:g} x the "
                                "median shard time)", charged=True)

    def speculate(self) -> None:
        """With nothing left to start, give the slowest running shard a second attempt on an idle worker."""
        if (not self.config.speculate_after or self.pending or self.claiming or self.waiting
                or len(self.durations) < MIN_DURATIONS):
            return
        slow_after = self.config.speculate_after * statistics.median(self.durations)
        now = self.runtime.clock()
        candidates = sorted((run.started, shard) for shard, run in self.running.items()
                            if len(run.attempts) == 1 and run.abandoned is None and now - run.started > slow_after)
        for _, shard in candidates:
            if not self.pool.free_slots(avoid=shard):
                continue
            run = self.running[shard]
            attempt_id = new_attempt_id()
            try:
                if not self.claims.register(shard, attempt_id, run.task.generation):
                    continue   # the claim was lost: the renewal reports it
            except OSError:
                continue       # a backup attempt is an optimisation: not this time
            copy = replace(run.task, attempt_id=attempt_id)
            run.attempts[attempt_id] = copy
            self.ours[shard].add(attempt_id)
            self.pool.submit(copy, avoid=shard)
            median = slow_after / self.config.speculate_after
            self.say(f"shard {shard}: running {now - run.started:.0f} s (median {median:.0f} s); a second attempt "
                     "started on an idle worker")


def run_to_the_end(scheduler: Scheduler) -> str | None:
    """Run the scheduler with SIGTERM/SIGINT ending it cleanly, then `finish`. Returns the stopping signal's
    name, or None."""
    stopped: list[str] = []

    def stop(signum, _frame) -> None:
        stopped.append(signal.Signals(signum).name)
        scheduler.stop.set()

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        scheduler.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        finish(scheduler)
    return stopped[0] if stopped else None


def finish(scheduler: Scheduler) -> None:
    """Close the pool, release every claim (fencing the attempts still in flight), then remove the files no one
    can commit any more (PROTOCOL.md C1-C4)."""
    scheduler.pool.close()
    scheduler.claims.release_all()
    try:
        deleted = scheduler.store.cleanup(grace_s=scheduler.config.cleanup_grace)
    except OSError as e:   # what is left is removed by a later run's cleanup
        scheduler.say(f"cleanup stopped by a storage error, a later run finishes it: {e}", error=True)
        return
    if deleted:
        scheduler.say(f"removed {len(deleted)} files that no ledger names and no attempt can commit any more")
