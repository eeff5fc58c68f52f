"""A deterministic simulation of the commit protocol, in the style of FoundationDB's simulation testing: the real
protocol code (dataset/claims.py, dataset/protocol.py, runner/planning.py, runner/scheduler.py) runs against an
in-memory object store, driven by a seeded scheduler that decides which actor takes the next step.

- Actors (drivers, their claim renewals, workers) are threads, but exactly one runs at a time: each storage
  request is a point where the running actor hands over to one picked by the seeded generator, so a seed
  replays exactly. Time is simulated: it moves on when every live actor sleeps.
- The store (scheme `sim://`) behaves as S3 does for us (conditional creates and compare-and-swaps, etags,
  the server's clock) and can fail a request before or after it lands (a lost reply), delay a request, and
  show listings that lag behind.
- Drivers run the real scheduler on a pool whose workers write and commit through the real `Attempt`; faults:
  drivers killed (with their workers, or leaving them running: a partition), paused past their claims' ttl,
  stopped early, or ending on a subset of the shards while others commit; workers that crash, hang, or are
  reported lost while they go on.
- After the faults, one clean driver runs to the end; then the invariants are checked: every input key once
  across the committed files, every file a latest ledger names there with its recorded bytes and rows, and,
  over the whole history, no file deleted while the latest ledger of its shard named it, and no ledger
  created naming a file that was gone.

`python -m tests.simulation --seeds 10000` runs more seeds than `make test` does; a failing seed prints and
replays with `--seed N --verbose`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import BinaryIO

from dataset import protocol, storage
from dataset.claims import Claims
from dataset.protocol import LEDGER_DIR, ShardStore, parse_data_name, parse_ledger_name, verify
from runner.planning import Wanted, plan_shards
from runner.progress import Progress
from runner.records import Event, Outcome, Task
from runner.scheduler import Scheduler, SchedulerConfig, finish

SCHEME = "sim"
KINDS = {"parquet": "parquet", "wds": "tar"}
OUT = f"{SCHEME}://bucket/out"
INPUTS = f"{SCHEME}://bucket/in"


class Killed(BaseException):
    """Raised in an actor the world killed, at its next step (a BaseException: no `except Exception` keeps it)."""


# --- the world: actors, one step at a time ------------------------------------------------------------

@dataclass(eq=False)
class Actor:
    name: str
    target: Callable[[], None]
    go: threading.Event = field(default_factory=threading.Event)
    wake_at: float = 0.0
    waiting_on: object = None
    finished: bool = False
    killed: bool = False
    thread: threading.Thread | None = None


class World:
    """Seeded scheduling of actors and a simulated clock (see the module docstring)."""

    def __init__(self, seed: int, horizon: float = 2000.0, verbose: bool = False):
        self.rng = random.Random(seed)
        self.start = self.now = 1_000_000.0
        self.horizon = self.start + horizon
        self.actors: list[Actor] = []
        self.current: Actor | None = None
        self.ended = threading.Event()
        self.errors: list[str] = []
        self.faults = 0   # faults injected (failed, lost, slow or refused requests; kills, pauses; bad workers)
        self.verbose = verbose
        self._by_thread: dict[int, Actor] = {}

    def log(self, text: str) -> None:
        if self.verbose:
            actor = self.current.name if self.current else "-"
            print(f"{self.now - self.start:9.3f} {actor:<24} {text}", flush=True)

    def spawn(self, name: str, fn: Callable, *args) -> Actor:
        actor = Actor(name, lambda: fn(*args), wake_at=self.now)
        actor.thread = threading.Thread(target=self._body, args=(actor,), name=name, daemon=True)
        self.actors.append(actor)
        actor.thread.start()
        return actor

    def _body(self, actor: Actor) -> None:
        self._by_thread[threading.get_ident()] = actor
        actor.go.wait()
        try:
            if actor.killed:
                raise Killed()
            actor.target()
        except Killed:
            pass
        except BaseException as e:  # noqa: BLE001 - an actor's failure is the simulation's finding
            import traceback

            self.errors.append(f"{actor.name}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        actor.finished = True
        self._hand_over(actor)

    def run(self) -> None:
        """Run until every actor has finished (or the horizon passed: the rest are killed)."""
        self.ended.clear()
        self._hand_over(None)
        self.ended.wait()

    # the running actor's side

    def me(self) -> Actor:
        return self._by_thread[threading.get_ident()]

    def step(self) -> None:
        """A point where another actor may run (every storage request)."""
        self._switch(self.me())

    def sleep(self, seconds: float) -> None:
        actor = self.me()
        actor.wake_at = self.now + max(seconds, 0.0)
        self._switch(actor)

    def wait(self, channel: object, timeout: float) -> None:
        """Sleep until `notify(channel)` or `timeout` seconds."""
        actor = self.me()
        actor.waiting_on, actor.wake_at = channel, self.now + timeout
        self._switch(actor)
        actor.waiting_on = None

    def notify(self, channel: object) -> None:
        for actor in self.actors:
            if actor.waiting_on is channel:
                actor.wake_at, actor.waiting_on = self.now, None

    def kill(self, actor: Actor) -> None:
        actor.killed = True
        actor.wake_at = self.now

    def pause(self, actor: Actor, seconds: float) -> None:
        actor.wake_at = max(actor.wake_at, self.now + seconds)

    # scheduling

    def _pick(self) -> Actor | None:
        alive = [a for a in self.actors if not a.finished]
        if not alive:
            return None
        if self.now > self.horizon:
            for actor in alive:
                actor.killed = True
        runnable = [a for a in alive if a.wake_at <= self.now or a.killed]
        if not runnable:
            self.now = min(a.wake_at for a in alive)
            runnable = [a for a in alive if a.wake_at <= self.now]
        return self.rng.choice(runnable)

    def _switch(self, me: Actor) -> None:
        nxt = self._pick()
        if nxt is not me:
            me.go.clear()
            self.current = nxt
            nxt.go.set()   # type: ignore[union-attr]   (me is alive, so there is always one)
            me.go.wait()
        self.current = me
        if me.killed:
            raise Killed()

    def _hand_over(self, me: Actor | None) -> None:
        """A finished actor (or the start) passes the turn on."""
        nxt = self._pick()
        if nxt is None:
            self.ended.set()
            return
        self.current = nxt
        nxt.go.set()


# --- the store ------------------------------------------------------------------------------------------

@dataclass
class Obj:
    data: bytes
    etag: str
    mtime: float
    listed_from: float          # listings show it from then on (a lagging index)


@dataclass
class Violation:
    at: float
    what: str


class SimStore:
    """An in-memory S3 for `sim://` paths, with faults; it also watches the protocol's invariants over history."""

    concurrent = False   # storage.parallel_map runs our requests on the calling actor

    def __init__(self, world: World, fail: float = 0.0, lose_reply: float = 0.0, lag: float = 0.0,
                 latency: float = 0.002, slow: float = 0.0):
        self.world = world
        self.objects: dict[str, Obj] = {}
        self.gone: dict[str, tuple[Obj, float]] = {}   # deleted objects listings still show until then
        self.fail, self.lose_reply, self.lag, self.latency = fail, lose_reply, lag, latency
        self.slow = slow   # a request that takes minutes (botocore's retries, a congested link)
        # A conditional create that lands but answers "exists": NFS's EEXIST for a retransmitted link(), S3's 412
        # for botocore's retry of a create whose first answer was lost.
        self.refuse_own = lose_reply
        self.etags = itertools.count()
        self.violations: list[Violation] = []

    # requests: a step (and a little time) on the way there, maybe a failure, maybe a lost reply

    def _request(self, what: str, path: str) -> None:
        world = self.world
        if world.rng.random() < self.slow:
            world.faults += 1
            world.sleep(world.rng.uniform(5, 120))
        else:
            world.sleep(world.rng.uniform(0, self.latency))
        if world.rng.random() < self.fail:
            world.faults += 1
            world.log(f"{what} {path}: fails")
            raise OSError(f"{what} {path} failed: injected")

    def _reply(self, what: str, path: str) -> None:
        world = self.world
        if world.rng.random() < self.lose_reply:
            world.faults += 1
            world.log(f"{what} {path}: landed, reply lost")
            raise OSError(f"{what} {path} failed: injected lost reply")
        world.step()

    def _put(self, path: str, data: bytes) -> str:
        self._check_ledger(path, data)
        etag = f'"{next(self.etags)}"'
        self.objects[path] = Obj(data, etag, self.world.now, self.world.now + self.world.rng.uniform(0, self.lag))
        self.gone.pop(path, None)
        self.world.log(f"put {path}")
        return etag

    # Backend
    def read_bytes(self, path: str) -> bytes:
        self._request("read", path)
        if path not in self.objects:
            raise FileNotFoundError(f"read {path} failed: no such key")
        data = self.objects[path].data
        self.world.step()
        return data

    def read_versioned(self, path: str) -> storage.Versioned | None:
        self._request("read", path)
        obj = self.objects.get(path)
        self.world.step()
        return None if obj is None else storage.Versioned(obj.data, obj.etag, self.world.now - obj.mtime)

    def open_read(self, path: str) -> BinaryIO:
        import io

        return io.BytesIO(self.read_bytes(path))

    def stat(self, path: str) -> storage.Entry | None:
        self._request("stat", path)
        obj = self.objects.get(path)
        self.world.step()
        return None if obj is None else storage.Entry(path, len(obj.data), obj.mtime)

    def write_bytes(self, path: str, data: bytes) -> None:
        self._request("write", path)
        self._put(path, data)
        self._reply("write", path)

    def put_file(self, local_file: str, path: str) -> None:
        with open(local_file, "rb") as f:
            data = f.read()
        self.write_bytes(path, data)
        os.remove(local_file)

    def create_if_absent(self, path: str, data: bytes) -> str | None:
        self._request("create", path)
        if path in self.objects:
            self.world.step()
            return None
        etag = self._put(path, data)
        if self.world.rng.random() < self.refuse_own:
            self.world.faults += 1
            self.world.log(f"create {path}: landed, answered as refused")
            self.world.step()
            return None
        self._reply("create", path)
        return etag

    def put_if_match(self, path: str, data: bytes, etag: str) -> str | None:
        self._request("compare-and-swap", path)
        obj = self.objects.get(path)
        if obj is None or obj.etag != etag:
            self.world.step()
            return None
        new = self._put(path, data)
        self._reply("compare-and-swap", path)
        return new

    def delete(self, path: str) -> None:
        self._request("delete", path)
        obj = self.objects.pop(path, None)
        if obj is not None:
            self._check_delete(path)
            self.gone[path] = (obj, self.world.now + self.world.rng.uniform(0, self.lag))
            self.world.log(f"delete {path}")
        self._reply("delete", path)

    def list_entries(self, folder: str, suffix: str, name_prefix: str, recursive: bool) -> list[storage.Entry]:
        self._request("list", folder)
        prefix, now = folder.rstrip("/") + "/" + name_prefix, self.world.now
        found = [(path, obj) for path, obj in self.objects.items() if obj.listed_from <= now]
        found += [(path, obj) for path, (obj, until) in self.gone.items() if until > now]   # listed, yet gone
        entries = sorted({path: storage.Entry(path, len(obj.data), obj.mtime) for path, obj in found
                          if path.startswith(prefix) and path.endswith(suffix)
                          and (recursive or "/" not in path[len(folder.rstrip("/")) + 1:])}.values(),
                         key=lambda e: e.path)
        self.world.step()
        return entries

    def now(self, folder: str) -> float:
        self._request("clock", folder)
        return self.world.now

    def remove_stale_uploads(self, folder: str, older_than: float) -> list[str]:
        return []

    def where(self, path: str) -> str:
        return "the simulated store"

    # the invariants over history

    def _latest_ledger(self, shard: str) -> dict | None:
        folder = f"{OUT}/{LEDGER_DIR}/"
        generations = [g for path in self.objects if path.startswith(folder)
                       and (parsed := parse_ledger_name(path[len(folder):])) and parsed[0] == shard
                       for g in [parsed[1]]]
        if not generations:
            return None
        from dataset.protocol import ledger_name

        return json.loads(self.objects[folder + ledger_name(shard, max(generations))].data)

    def _check_delete(self, path: str) -> None:
        """Deleting a file the latest ledger of its shard names loses committed rows."""
        for kind, ext in KINDS.items():
            folder = f"{OUT}/{kind}/"
            if path.startswith(folder) and (parsed := parse_data_name(path[len(folder):], ext)):
                latest = self._latest_ledger(parsed.shard)
                if latest and any(f"{OUT}/{entry['path']}" == path for entry in latest["files"].values()):
                    self.violations.append(Violation(self.world.now, f"deleted {path}, which the latest ledger of "
                                                                     f"shard {parsed.shard} names"))

    def _check_ledger(self, path: str, data: bytes) -> None:
        """A ledger created naming a file that is not there (deleted first: a stale writer's commit)."""
        folder = f"{OUT}/{LEDGER_DIR}/"
        if path.startswith(folder) and parse_ledger_name(path[len(folder):]):
            ledger = json.loads(data)
            for entry in ledger["files"].values():
                if f"{OUT}/{entry['path']}" not in self.objects:
                    self.violations.append(Violation(self.world.now, f"ledger {path} created naming "
                                                                     f"{entry['path']}, which is gone"))


# --- a stage on the simulated store: what a worker does with one shard ---------------------------------------

def input_keys(shard: str) -> list[str]:
    return [f"{shard}-{i}" for i in range(3)]


def fails_first(seed: int, key: str) -> bool:
    """Error rows of generation 0 that --retry-errors fixes (as a flaky download would)."""
    return random.Random(f"{seed}:{key}").random() < 0.3


class Work:
    """One task in a worker actor: read the input, write both kinds, commit through the real Attempt."""

    def __init__(self, world: World, store: ShardStore, seed: int, tmp: str):
        self.world, self.store, self.seed, self.tmp = world, store, seed, tmp

    def __call__(self, task: Task, stop: Callable[[], bool], stall: float = 0.0) -> Outcome:
        keys = json.loads(storage.read_bytes(f"{INPUTS}/{task.shard}.tar"))
        if task.retry_errors:
            below = self.store.read_ledger(task.shard, task.generation - 1)
            if below is None:
                raise FileNotFoundError(f"shard {task.shard} has no generation {task.generation - 1}")
            rows = json.loads(storage.read_bytes(self.store.files(below)["parquet"]))
            rows = [{"key": r["key"], "status": "ok"} for r in rows]
        else:
            rows = [{"key": k, "status": "error" if fails_first(self.seed, k) else "ok"} for k in keys]
        self.world.sleep(self.world.rng.uniform(0.5, 2.0))   # the engine's time
        if stop():
            return Outcome(task.shard, task.attempt_id or "", "abandoned")
        attempt = self.store.attempt(task.shard, task.generation, task.attempt_id or "")
        for kind, payload in (("parquet", rows), ("wds", [r for r in rows if r["status"] == "ok"])):
            local = os.path.join(self.tmp, f"{task.attempt_id}.{kind}")
            with open(local, "w") as f:
                json.dump(payload, f)
            attempt.put(kind, local, rows=len(payload))
            if stop():
                attempt.abandon()
                return Outcome(task.shard, attempt.attempt_id, "abandoned")
        ledger = {"rows_out": len(rows), "error": sum(r["status"] == "error" for r in rows)}
        self.world.sleep(stall)
        kind = attempt.commit(ledger)   # type: ignore[arg-type]
        return Outcome(task.shard, attempt.attempt_id, kind, ledger if kind == "committed" else None)  # type: ignore[arg-type]


# --- the runtime and pool the real scheduler runs on ---------------------------------------------------------

class InlineExecutor:
    """Claims taken on the driver's own actor, at once."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Killed:
            raise
        except Exception as e:  # noqa: BLE001 - the scheduler reads it from the future, as from a thread
            future.set_exception(e)
        return future

    def map(self, fn, items):
        return [fn(item) for item in items]

    def shutdown(self) -> None:
        pass


class SimRuntime:
    def __init__(self, world: World, driver: DriverState):
        self.world, self.driver = world, driver

    def clock(self) -> float:
        return self.world.now

    def say(self, name: str, text: str, error: bool = False) -> None:
        self.world.log(f"[{name}] {text}")

    def executor(self, name: str) -> InlineExecutor:
        return InlineExecutor()

    def every(self, seconds: float, action: Callable[[], None], stop: threading.Event, name: str) -> None:
        def loop() -> None:
            while not stop.is_set():
                self.world.sleep(seconds)
                if not stop.is_set():
                    action()

        self.driver.actors.append(self.world.spawn(name, loop))


@dataclass
class Faults:
    crash: float = 0.0        # a worker's attempt raises (charged)
    lost: float = 0.0         # the driver hears the worker is lost while the attempt goes on (a zombie)
    hang: float = 0.0         # an attempt stalls for a long time
    stall: float = 0.0        # an attempt stalls between writing its files and its commit (a GC pause, a slow PUT)


class SimPool:
    def __init__(self, world: World, name: str, work: Work, workers: int, faults: Faults, driver: DriverState):
        self.world, self.name, self.work, self.workers, self.faults = world, name, work, workers, faults
        self.driver = driver
        self.tasks_per_worker = 2
        self.calls: dict[int, dict[str, Task]] = {w: {} for w in range(workers)}   # worker -> attempt id -> task
        self.events: list[Event] = []
        self.stopped: set[str] = set()   # attempt ids asked to stop
        self.channel = object()

    @property
    def ready_workers(self) -> int:
        return self.workers

    def capacity(self) -> int:
        return self.workers * self.tasks_per_worker

    def _open(self, avoid: str | None) -> list[int]:
        return [w for w, calls in self.calls.items() if len(calls) < self.tasks_per_worker
                and not any(t.shard == avoid for t in calls.values())]

    def free_slots(self, avoid: str | None = None) -> int:
        return sum(self.tasks_per_worker - len(self.calls[w]) for w in self._open(avoid))

    def submit(self, task: Task, avoid: str | None = None) -> None:
        worker = min(self._open(avoid), key=lambda w: len(self.calls[w]))
        attempt_id = task.attempt_id or ""
        self.calls[worker][attempt_id] = task
        rng = self.world.rng
        fault = next((kind for kind in ("crash", "lost", "hang") if rng.random() < getattr(self.faults, kind)), None)
        self.world.faults += fault is not None
        actor = self.world.spawn(f"{self.name}-w{worker}-{task.shard}-{attempt_id[:4]}", self._run, worker, task,
                                 fault)
        if fault != "lost":
            self.driver.workers.append(actor)

    def _run(self, worker: int, task: Task, fault: str | None) -> None:
        attempt_id = task.attempt_id or ""
        if fault == "lost":   # the driver is told at once; the attempt goes on unseen
            self._answer(worker, Event(task, error="worker lost: injected", charged=True, certain=False))
        if fault == "hang":
            self.world.sleep(self.world.rng.uniform(50, 300))
        try:
            if fault == "crash" and self.world.rng.random() < 0.5:
                raise RuntimeError("injected crash")
            stall = self.world.rng.uniform(1, 60) if self.world.rng.random() < self.faults.stall else 0.0
            self.world.faults += stall > 0
            outcome = self.work(task, lambda: attempt_id in self.stopped, stall)
            if fault == "crash":
                raise RuntimeError("injected crash after the work")
            event = Event(task, outcome=outcome)
        except (Killed, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - any failure of an attempt is reported, as Ray does
            event = Event(task, error=f"{type(e).__name__}: {e}", charged=True)
        if fault != "lost":
            self._answer(worker, event)

    def _answer(self, worker: int, event: Event) -> None:
        self.calls[worker].pop(event.task.attempt_id or "", None)
        self.events.append(event)
        self.world.notify(self.channel)

    def abandon(self, shard: str, attempt_id: str | None = None) -> None:
        for calls in self.calls.values():
            for key, task in calls.items():
                if task.shard == shard and attempt_id in (None, key):
                    self.stopped.add(key)

    def wait(self, timeout: float) -> list[Event]:
        if not self.events:
            self.world.wait(self.channel, timeout)
        events, self.events = self.events, []
        return events

    def close(self) -> None:
        for actor in self.driver.workers:
            self.world.kill(actor)


# --- drivers -------------------------------------------------------------------------------------------------

@dataclass
class DriverState:
    actors: list[Actor] = field(default_factory=list)    # the driver and its claim renewal
    workers: list[Actor] = field(default_factory=list)   # worker actors a lost node takes with it
    scheduler: Scheduler | None = None


@dataclass
class DriverPlan:
    name: str
    shards: list[str]
    start: float = 0.0
    retry_errors: bool = False
    kill_at: float | None = None
    take_workers: bool = True         # a killed driver's workers die with it (else they go on: a partition)
    pause_at: float | None = None
    pause_for: float = 0.0
    stop_at: float | None = None
    faults: Faults = field(default_factory=Faults)


def plan_tasks(store: ShardStore, shards: list[str], retry_errors: bool) -> list[Task]:
    listing = store.listing()
    wanted = [Wanted(s, lambda g, r, h, s=s: Task(s, generation=g, retry_errors=r, heal=h)) for s in shards]
    return plan_shards(store, listing, wanted, retry_errors=retry_errors).tasks


def drive(world: World, store: ShardStore, work: Work, plan: DriverPlan, config: SchedulerConfig,
          state: DriverState) -> None:
    """One driver's run; a storage error that ends it is what a user sees as the command's error (a rerun goes
    on), not a finding."""
    try:
        run_driver(world, store, work, plan, config, state)
    except OSError as e:
        world.log(f"{plan.name} ended with a storage error: {e}")


def run_driver(world: World, store: ShardStore, work: Work, plan: DriverPlan, config: SchedulerConfig,
               state: DriverState) -> None:
    world.sleep(plan.start)
    tasks = plan_tasks(store, plan.shards, plan.retry_errors)
    claims = Claims(store.base, plan.name, config.claim_ttl)
    pool = SimPool(world, plan.name, work, 2, plan.faults, state)
    progress = Progress(plan.name, len(tasks), len(plan.shards), every=1e9)
    scheduler = Scheduler(plan.name, tasks, store, claims, pool, progress, config, runtime=SimRuntime(world, state))
    state.scheduler = scheduler
    try:
        scheduler.run()
    finally:
        finish(scheduler)


def director(world: World, driver: DriverPlan, state: DriverState) -> None:
    """Kills, pauses or stops one driver at its planned moment."""
    events = [(t, kind) for t, kind in ((driver.kill_at, "kill"), (driver.pause_at, "pause"), (driver.stop_at, "stop"))
              if t is not None]
    clock = 0.0
    for at, kind in sorted(events):
        world.sleep(at - clock)
        clock = at
        world.faults += 1
        if kind == "kill":
            world.log(f"kill {driver.name}" + ("" if driver.take_workers else " (its workers go on)"))
            for actor in state.actors + (state.workers if driver.take_workers else []):
                world.kill(actor)
            return
        if kind == "pause":
            world.log(f"pause {driver.name} for {driver.pause_for:.0f} s")
            for actor in state.actors + state.workers:
                world.pause(actor, driver.pause_for)
        if kind == "stop" and state.scheduler is not None:
            world.log(f"stop {driver.name}")
            state.scheduler.stop.set()


# --- one schedule ------------------------------------------------------------------------------------------------

@dataclass
class Schedule:
    seed: int
    shards: list[str]
    drivers: list[DriverPlan]
    config: SchedulerConfig
    fail: float
    lose_reply: float
    lag: float
    slow: float = 0.0
    cleanups: list[float] = field(default_factory=list)   # moments a rerun with nothing pending cleans up


def janitor(world: World, store: ShardStore, moments: list[float], grace: float) -> None:
    """What a rerun with nothing left to do on its inputs does at its end, while other drivers work: cleanup."""
    clock = 0.0
    for at in sorted(moments):
        world.sleep(at - clock)
        clock = at
        try:
            store.cleanup(grace_s=grace)
        except OSError as e:
            world.log(f"cleanup ended with a storage error: {e}")


def random_schedule(seed: int) -> Schedule:
    rng = random.Random(seed)
    shards = [f"{i:05d}" for i in range(rng.randint(2, 6))]
    ttl = rng.choice([8.0, 20.0, 60.0])
    config = SchedulerConfig(max_attempts=rng.choice([2, 3]), claim_ttl=ttl, deadline_factor=rng.choice([0.0, 3.0]),
                             min_deadline=rng.uniform(2, 10), speculate_after=rng.choice([0.0, 1.5]),
                             cleanup_grace=rng.choice([0.0, 5.0, 1e6]))
    drivers = []
    split = rng.random() < 0.3   # drivers on disjoint input subsets: they end while others still commit
    for d in range(rng.randint(1, 3)):
        if split:
            subset = shards[d::3] or shards[:1]
        elif rng.random() < 0.5:
            subset = shards
        else:
            subset = sorted(rng.sample(shards, rng.randint(1, len(shards))))
        faults = Faults(crash=rng.choice([0.0, 0.2]), lost=rng.choice([0.0, 0.2]), hang=rng.choice([0.0, 0.1]),
                        stall=rng.choice([0.0, 0.3]))
        plan = DriverPlan(f"d{d}", subset, start=rng.uniform(0, 10), retry_errors=rng.random() < 0.3, faults=faults)
        fate = rng.random()
        if fate < 0.3:
            plan.kill_at, plan.take_workers = rng.uniform(0, 20), rng.random() < 0.5
        elif fate < 0.5:
            plan.pause_at, plan.pause_for = rng.uniform(0, 20), rng.uniform(ttl / 2, 3 * ttl)
        elif fate < 0.6:
            plan.stop_at = rng.uniform(0, 20)
        drivers.append(plan)
    cleanups = [rng.uniform(0, 60) for _ in range(rng.choice([0, 2, 10, 30]))]
    return Schedule(seed, shards, drivers, config, fail=rng.choice([0.0, 0.01, 0.05]),
                    lose_reply=rng.choice([0.0, 0.01, 0.05]), lag=rng.choice([0.0, 0.0, 2.0]),
                    slow=rng.choice([0.0, 0.0, 0.02]), cleanups=cleanups)


def scenario(name: str, seed: int) -> Schedule:
    """A random schedule (`random`), or one shaped for an interleaving that lost rows before (issue 19):
    `drivers-end`: drivers on disjoint subsets end and clean up while others commit (case 1);
    `zombies`: workers reported lost that go on and try to commit after their retry (case 2);
    `stalled-writers`: writers stall inside their commit while their claim goes stale and is taken over (case 3);
    `refused-creates`: ledger creates that land but answer "exists" (case 4: NFS, S3 retries)."""
    schedule = random_schedule(seed)
    rng = random.Random(f"{name}:{seed}")
    if name == "random":
        return schedule
    schedule.cleanups = [rng.uniform(0, 60) for _ in range(20)]
    if name == "drivers-end":
        for d, plan in enumerate(schedule.drivers):
            plan.shards = schedule.shards[d::len(schedule.drivers)] or schedule.shards[:1]
            plan.faults.stall = 0.5
    elif name == "zombies":
        for plan in schedule.drivers:
            plan.faults = Faults(lost=0.5, stall=0.5)
    elif name == "stalled-writers":
        schedule.slow, schedule.config = 0.2, SchedulerConfig(claim_ttl=8.0, cleanup_grace=0.0)
        schedule.drivers = [DriverPlan("d0", schedule.shards, pause_at=rng.uniform(0, 5), pause_for=200.0),
                            DriverPlan("d1", schedule.shards, start=rng.uniform(10, 30))]
    elif name == "refused-creates":
        schedule.lose_reply = 0.3
    else:
        raise ValueError(f"no scenario {name!r}")
    return schedule


SCENARIOS = ("random", "drivers-end", "zombies", "stalled-writers", "refused-creates")


@dataclass
class Result:
    seed: int
    violations: list[str]
    faults: int = 0      # injected
    rows: int = 0        # input keys checked at the end


def run_schedule(schedule: Schedule, verbose: bool = False) -> Result:
    world = World(schedule.seed, verbose=verbose)
    sim = SimStore(world, fail=schedule.fail, lose_reply=schedule.lose_reply, lag=schedule.lag, slow=schedule.slow)
    storage.register_backend(SCHEME, sim)
    ids, protocol._ids = protocol._ids, random.Random(schedule.seed)   # attempt ids replay with the seed
    try:
        with tempfile.TemporaryDirectory(prefix="ov-sim-") as tmp:
            store = ShardStore(OUT, KINDS)
            for shard in schedule.shards:
                sim.objects[f"{INPUTS}/{shard}.tar"] = Obj(json.dumps(input_keys(shard)).encode(), '"in"', world.now,
                                                           world.now)
            work = Work(world, store, schedule.seed, tmp)
            for plan in schedule.drivers:
                state = DriverState()
                state.actors.append(world.spawn(plan.name, drive, world, store, work, plan, schedule.config, state))
                world.spawn(f"{plan.name}-fate", director, world, plan, state)
            world.spawn("janitor", janitor, world, store, schedule.cleanups, schedule.config.cleanup_grace)
            world.run()
            problems = list(world.errors)
            # then one clean driver (and one under --retry-errors) on a store that no longer fails
            sim.fail = sim.lose_reply = sim.refuse_own = sim.lag = sim.slow = 0.0
            world.horizon = world.now + 4000
            settle = 10 * schedule.lag   # earlier writes show in listings by then
            for final in (DriverPlan("final", schedule.shards, start=settle),
                          DriverPlan("final-retry", schedule.shards, retry_errors=True)):
                state = DriverState()
                state.actors.append(world.spawn(final.name, drive, world, store, work, final, schedule.config, state))
                world.run()
            problems += world.errors[len(problems):]
            problems += [f"at {v.at - world.start:.3f}: {v.what}" for v in sim.violations]
            problems += check_end_state(world, store, schedule)
    finally:
        storage.register_backend(SCHEME, None)
        protocol._ids = ids
    return Result(schedule.seed, problems, world.faults, sum(len(input_keys(s)) for s in schedule.shards))


def check_end_state(world: World, store: ShardStore, schedule: Schedule) -> list[str]:
    """Every input key once across the committed files, every one ok after the --retry-errors run, every
    committed file as its ledger says."""
    problems = []

    def outside(fn, *args, **kwargs):   # run storage reads on a helper actor (every request is a step), once
        box: list = []                   # listings have caught up with the writes
        world.spawn("check", lambda: (world.sleep(10 * schedule.lag), box.append(fn(*args, **kwargs))))
        world.run()
        return box[0] if box else None

    found = outside(verify, store, rows=False)
    if found is None:
        return ["the end-state check did not finish: " + "; ".join(world.errors[-1:])]
    passed, broken = found
    problems += [p.line() for p in broken]
    keys: list[str] = []
    for shard in schedule.shards:
        ledger = passed.get(shard)
        if ledger is None:
            problems.append(f"shard {shard}: not committed after the final run")
            continue
        files = {kind: json.loads(outside(storage.read_bytes, path)) for kind, path in store.files(ledger).items()}
        problems += [f"shard {shard}: {kind} holds {len(rows)} rows, its ledger says {ledger['files'][kind]['rows']}"
                     for kind, rows in files.items() if len(rows) != ledger["files"][kind]["rows"]]
        rows = files["parquet"]
        keys += [r["key"] for r in rows]
        if any(r["status"] != "ok" for r in rows):
            problems.append(f"shard {shard}: error rows left after --retry-errors")
    expected = sorted(k for shard in schedule.shards for k in input_keys(shard))
    if sorted(keys) != expected:
        problems.append(f"keys committed {sorted(keys)} != the input's {expected}")
    return problems


@dataclass
class Summary:
    schedules: int = 0
    faults: int = 0
    rows: int = 0
    failed: list[Result] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.schedules:,} schedules simulated, {self.faults:,} faults injected, {self.rows:,} rows checked: "
                f"{len(self.failed)} schedules broke an invariant")


def run_seeds(seeds: range, verbose: bool = False, name: str = "random", first_failure: bool = False) -> Summary:
    import logging

    logging.getLogger("dataset").setLevel(logging.INFO if verbose else logging.CRITICAL)   # injected faults warn
    summary = Summary()
    for seed in seeds:
        result = run_schedule(scenario(name, seed), verbose=verbose)
        summary.schedules, summary.faults, summary.rows = (summary.schedules + 1, summary.faults + result.faults,
                                                           summary.rows + result.rows)
        if result.violations:
            summary.failed.append(result)
            if first_failure:
                break
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=1000, help="schedules to run, from --first")
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--seed", type=int, help="replay one seed")
    p.add_argument("--scenario", choices=SCENARIOS, default="random")
    p.add_argument("--verbose", action="store_true", help="print every step of the schedule")
    a = p.parse_args(argv)
    seeds = range(a.seed, a.seed + 1) if a.seed is not None else range(a.first, a.first + a.seeds)
    started = time.monotonic()
    summary = run_seeds(seeds, verbose=a.verbose, name=a.scenario)
    for result in summary.failed:
        print(f"seed {result.seed}:", *result.violations, sep="\n  ")
    print(f"{a.scenario}: {summary.line()} ({time.monotonic() - started:.1f} s)")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
