"""Feeding shard tasks to a pool of workers under fenced claims, until every task is committed or failed.

Per shard, in order: take the claim (another live driver's shard waits), check that no ledger of the
target generation exists (another driver may have finished it meanwhile), send it to a worker with
the claim's token (the worker checks it right before its commit), release the claim after the
answer. The storage requests of the first two steps and of the release run on a small thread pool
beside the loop, for the next tasks while the workers are busy: the loop itself makes no storage
request per shard, which keeps a driver's rate from being one S3 round trip after another. Failures:
- an attempt that fails is charged and re-queued up to `max_attempts`, then the shard is reported
  failed; a failure the worker says was not the shard's doing (its engine died while the shard only
  waited) is re-queued uncharged; an input the reader refuses (`InputError`) fails at once;
- a claim taken over by another driver (ours went stale: a paused or partitioned driver) makes us
  abandon the shard: the other driver owns it now;
- a shard running past `deadline_factor` x the median shard time is abandoned and re-queued, charged;
- near the end, when nothing else is left, a slow shard gets a second attempt on an idle worker
  (speculative execution, as MapReduce's backup tasks: Dean & Ghemawat, OSDI 2004): the first
  commit wins and the commit protocol makes the other harmless.
A stop request (SIGTERM, `ray job stop`) ends the loop; the caller closes the pool and releases the
claims, so in-flight shards are left without a ledger for the next run.
"""
from __future__ import annotations

import queue
import signal
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from dataset import storage
from dataset.claims import Claims
from dataset.outputs import ShardStore
from recaption.flow import ShardTask
from recaption.pool import Event, Pool

PERMANENT_ERRORS = ("InputError",)     # the reader refused the shard: retrying cannot help
MIN_DURATIONS = 3                      # committed shards needed before deadlines and speculation apply
DURATION_WINDOW = 1000                 # deadlines and speculation follow the median of the latest shard times
REQUEST_THREADS = 16                   # claims taken and released beside the loop (one or two round trips each)


@dataclass(frozen=True)
class SchedulerConfig:
    max_attempts: int = 3
    claim_ttl: float = 120.0
    deadline_factor: float = 4.0       # x the median shard time; 0 turns deadlines off
    min_deadline: float = 60.0         # seconds: never abandon a shard sooner
    speculate_after: float = 1.5       # x the median shard time; 0 turns speculative attempts off


@dataclass
class Running:
    task: ShardTask
    started: float
    copies: int = 1                    # attempts in flight (2 with a speculative one)
    abandoned: str | None = None       # why we asked the workers to drop it: 'deadline' | 'lost'
    errors: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(self, name: str, tasks: list[ShardTask], store: ShardStore, claims: Claims, pool: Pool,
                 progress, config: SchedulerConfig):
        self.name, self.store, self.claims, self.pool = name, store, claims, pool
        self.progress, self.config = progress, config
        self.pending: deque[ShardTask] = deque(tasks)
        self.claiming: deque[tuple[ShardTask, Future]] = deque()   # the next tasks, their claims being taken
        self.waiting: list[ShardTask] = []            # claimed by another live driver
        self.running: dict[str, Running] = {}
        self.failed: dict[str, list[str]] = {}
        self.errors: dict[str, list[str]] = {}        # earlier attempts' errors, by shard
        self.durations: deque[float] = deque(maxlen=DURATION_WINDOW)   # seconds of the latest shards committed
        self.lost: queue.Queue[str] = queue.Queue()   # claims taken over, from the renewal thread
        self.stop = threading.Event()
        self.last_recheck = 0.0
        self.on_tick: Callable[[], None] = lambda: None   # e.g. print progress
        self.requests = ThreadPoolExecutor(REQUEST_THREADS, thread_name_prefix=f"{name}-claims")

    def say(self, text: str, error: bool = False) -> None:
        print(f"[{self.name}] {text}", file=sys.stderr if error else sys.stdout, flush=True)

    # ----- the loop

    def run(self) -> None:
        self.claims.start_renewing(self.lost.put)
        poll = min(2.0, self.config.claim_ttl / 8)
        try:
            while (self.pending or self.claiming or self.running or self.waiting) and not self.stop.is_set():
                if not self.pool.ready_workers and not self.progress.done:
                    self.progress.restart_clock()
                self.handle_lost()
                self.dispatch()
                if self.running:
                    for event in self.pool.wait(poll):
                        self.on_event(event)
                    self.check_deadlines()
                    self.speculate()
                else:
                    self.pool.wait(poll)   # starts workers and notices deaths
                if self.waiting and time.time() - self.last_recheck >= self.config.claim_ttl / 4:
                    self.recheck_waiting()
                self.on_tick()
        finally:
            self.requests.shutdown()   # claims being taken are held before the caller releases every claim
            self.pending.extendleft(task for task, _ in reversed(self.claiming))
            self.claiming.clear()

    def ahead(self) -> int:
        """Tasks to claim ahead of the free slots: as many as the pool holds at once, and one for each thread."""
        return self.pool.sizing.workers * self.pool.config.tasks_per_worker + REQUEST_THREADS

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
            token, committed = taken.result()   # taken while the workers were busy, as a rule
            if token is not None and not committed and not self.pool.free_slots():
                break
            self.claiming.popleft()
            if token is None:
                self.waiting.append(task)
            elif committed:
                self.progress.total -= 1
            else:
                task = replace(task, claim_token=token)
                self.running[task.shard] = Running(task, time.time())
                self.pool.submit(task)
        self.claim_ahead()

    def take(self, task: ShardTask) -> tuple[str | None, bool]:
        """Beside the loop: the claim (token None: another live driver holds it), then whether the ledger this
        task would create exists (then the claim is released); for a retry, our earlier attempts' files go."""
        token = self.claims.acquire(task.shard)
        if token is None:
            return None, False
        if self.committed(task):
            self.claims.release(task.shard)
            return token, True
        if task.attempt > 1:  # an earlier attempt of ours may have left files behind
            self.store.clean_leftovers(task.shard)
        return token, False

    def committed(self, task: ShardTask) -> bool:
        """The ledger this task would create exists already (another driver committed the shard)."""
        return storage.exists(self.store.ledger_path(task.shard, task.generation))

    def recheck_waiting(self) -> None:
        """Shards another driver holds: done once their ledger appears, else tried again (their claim may
        have gone stale)."""
        self.last_recheck = time.time()
        waiting, self.waiting = self.waiting, []
        for task, committed in zip(waiting, self.requests.map(self.committed, waiting)):
            if committed:
                self.progress.total -= 1
            else:
                self.pending.append(task)

    # ----- answers

    def on_event(self, event: Event) -> None:
        shard = event.task.shard
        run = self.running.get(shard)
        if run is None:  # a second attempt answering after its shard was settled
            return
        run.copies -= 1
        outcome = (event.outcome or {}).get("outcome")
        if outcome == "committed":
            self.settle(shard)
            self.progress.add(event.outcome["ledger"])
            self.durations.append(time.time() - run.started)
            if run.copies:
                self.pool.abandon(shard)   # the other attempt's commit would lose anyway
            return
        if event.error:
            run.errors.append(f"attempt {event.task.attempt}: {event.error}")
        if run.copies:  # the other attempt may still commit
            return
        self.running.pop(shard)
        if outcome == "lost" or run.abandoned == "lost":
            self.settle_lost(run)
        elif run.abandoned == "deadline":
            limit = self.deadline()
            self.retry(run, f"ran past the deadline of {limit:.0f} s ({self.config.deadline_factor:g} x the median "
                            "shard time)", charged=True)
        elif outcome == "abandoned":
            self.pending.appendleft(run.task)
        else:
            permanent = (event.error or "").startswith(PERMANENT_ERRORS)
            self.retry(run, event.error or "no answer", charged=event.charged, permanent=permanent)

    def settle(self, shard: str) -> None:
        self.running.pop(shard, None)
        self.requests.submit(self.claims.release, shard)   # the shard is done: nothing waits for this

    def settle_lost(self, run: Running) -> None:
        """Another driver committed the shard first, or took its claim over (it owns the shard now)."""
        shard = run.task.shard
        self.claims.release(shard)
        if self.committed(run.task):
            self.say(f"shard {shard}: another driver committed it first; kept theirs")
            self.progress.total -= 1
        else:
            self.say(f"shard {shard}: its claim was taken over by another driver; left to it", error=True)
            self.waiting.append(replace(run.task, claim_token=None))

    def retry(self, run: Running, error: str, *, charged: bool, permanent: bool = False) -> None:
        task = run.task
        errors = self.errors.setdefault(task.shard, [])
        errors += run.errors or [f"attempt {task.attempt}: {error}"]
        if not charged and not permanent:
            self.say(f"shard {task.shard} re-queued, not charged: {error}", error=True)
            self.pending.appendleft(task)
            return
        if permanent or task.attempt >= self.config.max_attempts:
            self.failed[task.shard] = errors
            self.progress.failed += 1
            self.requests.submit(self.claims.release, task.shard)
            tries = "its input is refused" if permanent else f"after {task.attempt} attempts"
            self.say(f"shard {task.shard} failed {tries}: {error}", error=True)
            return
        self.say(f"shard {task.shard} attempt {task.attempt} failed, re-queued: {error}", error=True)
        self.pending.appendleft(replace(task, attempt=task.attempt + 1, claim_token=None))

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
        if not self.config.deadline_factor or len(self.durations) < MIN_DURATIONS:
            return
        limit, now = self.deadline(), time.time()
        for shard, run in self.running.items():
            if run.abandoned is None and now - run.started > limit:
                run.abandoned = "deadline"
                self.pool.abandon(shard)

    def speculate(self) -> None:
        """With nothing left to start, give the slowest running shard a second attempt on an idle worker."""
        if (not self.config.speculate_after or self.pending or self.waiting
                or len(self.durations) < MIN_DURATIONS):
            return
        slow_after = self.config.speculate_after * statistics.median(self.durations)
        now = time.time()
        candidates = sorted((run.started, shard) for shard, run in self.running.items()
                            if run.copies == 1 and run.abandoned is None and now - run.started > slow_after)
        for _, shard in candidates:
            if not self.pool.free_slots(avoid=shard):
                continue
            run = self.running[shard]
            run.copies += 1
            self.pool.submit(run.task, avoid=shard)
            median = slow_after / self.config.speculate_after
            self.say(f"shard {shard}: running {now - run.started:.0f} s (median {median:.0f} s); a second attempt "
                     "started on an idle worker")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_to_the_end(scheduler: Scheduler) -> str | None:
    """Run the scheduler with SIGTERM/SIGINT ending it cleanly, then close its pool, release its claims and
    sweep the files of attempts that did not commit. Returns the stopping signal's name, or None."""
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
        scheduler.pool.close()
        scheduler.claims.stop()
        swept = scheduler.store.sweep(set())
        if swept:
            scheduler.say(f"removed {len(swept)} files of attempts that did not commit")
    return stopped[0] if stopped else None

