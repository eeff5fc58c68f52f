"""The caption actor: one long-lived engine fed from a bounded window of requests that spans shards.

Threads, one job each:
- a process() call per shard (Ray runs them concurrently): starts the shard's reader thread, then
  turns the shard's results into rows and files, and commits when its last row is back;
- a reader per shard: reads samples and hands them to the decode pool, at most `prefetch` ahead;
- the decode pool (--cpus-per-worker threads): image decode + resize + a prompt per caption column;
- the engine thread, the only one that touches the engine: keeps up to `window` requests in it,
  taking decoded samples from the shards in arrival order (the oldest shard first, the next one as
  soon as the oldest has sent everything, so the engine never drains at a shard boundary), steps
  the engine and routes each finished request back to its shard by request id.

An image's requests (one per caption column, recaption/captions.py) enter the engine together, one right
after the other, so vLLM's prefix cache serves the image part of the prompt they share (in the LLaVA turn
format the image comes before the instruction) and its multimodal processor cache the image's features; the
window counts requests, and a sample's row goes back to its shard when all of its requests are answered.

A request the engine refuses becomes that column's error in the sample's row. Any other engine error means the
engine is dead: every shard is answered (EngineDied, charged only where the shard had requests in
the engine), then the process exits and the pool starts a fresh actor. This follows the shape of
Ray Data LLM's vLLM stage (a bounded number of pending requests per engine, per-row errors,
EngineDeadError fatal), with one engine per actor serving a stream of shards instead of batches.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable

from PIL import Image

from dataset.logs import LogFile
from dataset.outputs import recaption_kinds
from dataset.protocol import ShardStore
from dataset.reader import InputSample
from recaption.engines import CaptionEngine, Generation, RequestRejected, SamplingConfig, make_engine
from recaption.flow import Item, ShardFlow, ShardTask
from recaption.job import CaptionJob
from recaption.prompt import PromptBuilder
from runner.cluster import process_id
from runner.records import Outcome, WorkerDying

log = logging.getLogger("recaption.worker")

# Test hook: "MODE:AFTER:MARKER", acted on once (by the first process to create MARKER). MODE 'raise':
# after AFTER requests were added the next engine step fails (an engine error: the worker answers);
# 'exit': the same step ends the process abruptly (kill -9, a lost node: the worker says nothing);
# 'start': the worker fails to start; 'stall': the first shard to finish waits right before its commit
# until MARKER.resume exists (a GC pause, a partition: the driver gives up on it meanwhile).
FAULT_ENV = "OPENVISION_FAULT_ENGINE"
# Most requests a window may hold by default; memory is one prepared image per request.
MAX_DEFAULT_WINDOW = 2048
# A worker writing to S3 copies its (growing) log there after a shard at most this often, and when it exits.
LOG_SYNC_SECONDS = 60.0


class EngineDied(WorkerDying):
    """The engine died while this shard was in the worker; `charged`: the shard had requests in it."""

    def __str__(self) -> str:
        where = "had requests in it" if self.charged else "was waiting (not charged)"
        return f"the engine died while shard {self.shard} {where}: {self.reason}"


@dataclass
class Feed:
    """One shard inside the worker: its flow, its samples decoded ahead, and the messages back to its call."""
    shard: str
    slots: threading.Semaphore
    _flow: ShardFlow | None = None   # set right after the feed takes its place
    ahead: deque[Future] = field(default_factory=deque)
    messages: queue.Queue = field(default_factory=queue.Queue)  # ('row', item) | ('read', n) | ('stop', exc)
    in_engine: set[str] = field(default_factory=set)
    state: str = "reading"          # reading -> generating -> writing

    @property
    def flow(self) -> ShardFlow:
        if self._flow is None:
            raise RuntimeError(f"shard {self.shard}: its flow is not set up yet")
        return self._flow

    @flow.setter
    def flow(self, flow: ShardFlow) -> None:
        self._flow = flow
    read_done: bool = False
    dropped: bool = False


@dataclass
class EngineClock:
    """Where the engine's time went, from its first request to its last result."""
    concurrency: int
    first: float | None = None
    last_tick: float = 0.0
    last_busy: float = 0.0
    unfinished: int = 0     # requests in the engine since the last tick
    busy_s: float = 0.0     # at least one request in the engine
    queued_s: float = 0.0   # more requests than it runs at once: it could always fill its batch

    def tick(self, unfinished: int) -> None:
        """The engine holds `unfinished` requests from now on; the time since the last tick is booked."""
        now = time.perf_counter()
        if self.first is None and unfinished:
            self.first = self.last_tick = now
        if self.first is not None:
            dt = now - self.last_tick
            self.busy_s += dt if self.unfinished else 0.0
            self.queued_s += dt if self.unfinished > self.concurrency else 0.0
            self.last_busy = now if self.unfinished else self.last_busy
            self.last_tick = now
        self.unfinished = unfinished

    def stats(self) -> dict:
        wall = (self.last_busy - self.first) if self.first is not None else 0.0
        return {"wall_s": wall, "busy_s": self.busy_s, "queued_s": self.queued_s}


class FaultyEngine:
    """Wraps an engine for FAULT_ENV: its step fails once after a number of added requests."""

    def __init__(self, engine: CaptionEngine, spec: str):
        mode, after, self.marker = spec.split(":", 2)
        self.mode, self.after, self.added, self.engine = mode, int(after), 0, engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def add(self, request_id, prompt, image, sampling=None) -> None:
        self.engine.add(request_id, prompt, image, sampling)
        self.added += 1

    def step(self):
        if self.added >= self.after and self._first():
            if self.mode == "exit":
                os._exit(137)
            raise RuntimeError("injected engine fault")
        return self.engine.step()

    def _first(self) -> bool:
        return first_to_create(self.marker)


def first_to_create(marker: str) -> bool:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def gpu_ids() -> list:
    """The GPUs Ray gave this actor (empty in-process)."""
    import ray

    return ray.get_gpu_ids() if ray.is_initialized() else []


class CaptionWorker:
    """Created as a Ray actor by runner/pool.py; usable in-process with a running engine (tests, benchmarks)."""

    def __init__(self, job: CaptionJob, out: str, fingerprint_base: str, *, engine: CaptionEngine | None = None,
                 log_file: str | None = None, on_engine_death: Callable[[], None] | None = None):
        self.name = process_id()
        self.log = LogFile(out, log_file) if log_file else None
        if self.log:
            self.log.capture_process()
        fault = os.environ.get(FAULT_ENV, "")
        if fault.startswith("start:") and first_to_create(fault.split(":", 2)[2]):
            raise RuntimeError("injected start failure")
        self.job = job.pinned()
        self.fingerprint = self.job.fingerprint
        self.store = ShardStore(fingerprint_base, recaption_kinds(self.job.write_wds))
        self.owns_engine = engine is None
        self.engine = engine or make_engine(self.job.engine, self.job.sampling)
        self.columns = {c.name: c for c in self.job.columns}
        self.prompts = {c.name: PromptBuilder(self.engine.processor, c.prompt) for c in self.job.columns}
        self._probe()
        if fault.startswith(("raise:", "exit:")):
            self.engine = FaultyEngine(self.engine, fault)
        self.window = self.job.window or min(2 * self.engine.concurrency, MAX_DEFAULT_WINDOW)
        threads = max(1, self.job.decode_threads)
        self.prefetch = max(4 * threads, min(self.window, 64))
        self.decoder = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.clock = EngineClock(self.engine.concurrency)
        self.request_log: deque[tuple[float, str, str]] = deque(maxlen=100_000)  # (time, 'add'|'done', id)
        self.on_engine_death = on_engine_death or self._exit_when_answered
        self.lock = threading.Lock()
        self.feeds: dict[str, Feed] = {}     # every attempt in this worker, by attempt id
        self.order: deque[Feed] = deque()    # shards still sending requests, oldest first
        self.requests: dict[str, tuple[Feed, Item, str]] = {}   # in the engine, by request id: (.., column)
        self.commands: queue.Queue = queue.Queue()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.dead: str | None = None
        self.active_calls = 0
        self.adding: Feed | None = None
        self.thread = threading.Thread(target=self._run_engine, name="engine", daemon=True)
        self.thread.start()

    def _probe(self) -> None:
        """A plain request per caption column before any shard: an engine that refuses one would turn every row
        into an error."""
        image = Image.new("RGB", (64, 64), (127, 127, 127))
        try:
            self.engine.generate([p.build("") for p in self.prompts.values()], [image] * len(self.prompts),
                                 [c.request_sampling("probe") for c in self.columns.values()])
        except RequestRejected as e:
            raise RuntimeError(f"the engine refuses a plain request, so it cannot caption: {e}") from None

    # ----- the actor's methods

    def ready(self) -> dict:
        """The engine is up: where this worker runs and what it runs."""
        return {"worker": self.name, "gpus": gpu_ids(), "engine": asdict(self.job.engine), "window": self.window,
                "concurrency": self.engine.concurrency, "decode_threads": self.job.decode_threads,
                "summary": f"window {self.window}, {self.job.decode_threads} decode threads"}

    def process(self, task: ShardTask) -> Outcome:
        """Caption one shard and commit it; the outcome says whether this attempt committed. Raises when the
        attempt failed (a read error, EngineDied)."""
        feed = Feed(task.shard, threading.BoundedSemaphore(self.prefetch))
        attempt_id = task.attempt_id or ""
        with self.lock:   # the shard's place in the engine's order is taken first: calls arrive in send order
            if self.dead:
                raise EngineDied(task.shard, False, self.dead)
            if attempt_id in self.feeds:
                raise ValueError(f"attempt {attempt_id} of shard {task.shard} is already in this worker")
            self.active_calls += 1
            self.feeds[attempt_id] = feed
            self.order.append(feed)
        try:
            feed.flow = ShardFlow(task, self.job, self.fingerprint, self.store, self.prompts, self.name)
            threading.Thread(target=self._read, args=(feed,), name=f"read-{task.shard}", daemon=True).start()
            return self._collect(feed)
        finally:
            feed.dropped = feed.dropped or feed.state != "writing"
            with self.lock:
                self.feeds.pop(attempt_id, None)
                self.active_calls -= 1
            if self.log:
                self.log.sync(every=LOG_SYNC_SECONDS)

    def status(self) -> dict:
        """Shards by state ('reading', 'generating', 'writing') and the engine's time so far."""
        with self.lock:
            shards = {feed.shard: feed.state for feed in self.feeds.values()}
        return {"worker": self.name, "shards": shards, "in_engine": len(self.requests), "window": self.window,
                "engine": self.clock.stats(), "dead": self.dead}

    def abandon(self, shard: str, attempt_id: str | None = None) -> None:
        """Drop the shard's queued and in-flight requests and its attempt (only `attempt_id`'s, when given); its
        process() returns 'abandoned'."""
        for key, feed in list(self.feeds.items()):
            if feed.shard == shard and attempt_id in (None, key):
                feed.messages.put(("stop", None))

    def close(self) -> None:
        """Stop the engine thread (in-process use); closes the engine if this worker started it."""
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout=30)
        self.decoder.shutdown(wait=False, cancel_futures=True)
        if self.owns_engine:
            self.engine.close()

    # ----- one shard: reader thread and the process() call's side

    def _read(self, feed: Feed) -> None:
        count = 0
        try:
            for seq, sample in feed.flow.samples():
                while not feed.slots.acquire(timeout=0.2):
                    if feed.dropped:
                        return
                if feed.dropped:
                    return
                future = self.decoder.submit(self._prepare, feed.flow, seq, sample)
                future.add_done_callback(lambda _: self.wake.set())
                feed.ahead.append(future)
                count += 1
            feed.messages.put(("read", count))
            feed.read_done = True
            self.wake.set()
        except BaseException as e:  # a read error fails the attempt; never a short commit
            feed.messages.put(("stop", e))

    @staticmethod
    def _prepare(flow: ShardFlow, seq: int, sample: InputSample) -> Item:
        try:
            return flow.prepare(seq, sample)
        except Exception as e:  # an unexpected decode failure is this sample's error, not the shard's
            return Item(seq, sample, flow.columns_for(sample.key), error=f"prepare: {type(e).__name__}: {e}")

    def _collect(self, feed: Feed) -> Outcome:
        answered, total = 0, None
        while total is None or answered < total:
            message = feed.messages.get()
            if message[0] == "row":
                feed.flow.record(message[1])
                answered += 1
            elif message[0] == "read":
                total = message[1]
            else:
                self.commands.put(("drop", feed))
                self.wake.set()
                feed.flow.abandon()
                if message[1] is None:
                    return Outcome(feed.shard, feed.flow.attempt.attempt_id, "abandoned", None, self.clock.stats())
                raise message[1]
        feed.state = "writing"
        self._stall_before_commit(feed)
        outcome = feed.flow.commit(self.clock.stats())
        if outcome.kind in ("fenced", "lost"):
            log.warning("attempt %s of shard %s was %s at its commit: its files are deleted", outcome.attempt_id,
                        outcome.shard, outcome.kind)
        return outcome

    def _stall_before_commit(self, feed: Feed) -> None:
        kind, _, rest = os.environ.get(FAULT_ENV, "").partition(":")
        marker = rest.partition(":")[2]
        if kind == "stall" and first_to_create(marker):
            with open(f"{marker}.who", "w") as who:
                who.write(f"{feed.shard} {feed.flow.attempt.attempt_id}")
            log.warning("injected stall before a commit, until %s.resume exists", marker)
            while not os.path.exists(f"{marker}.resume"):
                time.sleep(0.05)

    # ----- the engine thread

    def _run_engine(self) -> None:
        try:
            while not self.stopping.is_set():
                self.wake.clear()
                self._run_commands()
                self._fill()
                unfinished = self.engine.num_unfinished()
                self.clock.tick(unfinished)
                if unfinished:
                    for request_id, result in self.engine.step():
                        self._finished(request_id, result)
                else:
                    self.wake.wait(0.1)
        except BaseException as e:
            self._engine_died(e)

    def _run_commands(self) -> None:
        while not self.commands.empty():
            command, feed = self.commands.get()
            if command == "drop":
                feed.dropped = True
                for future in feed.ahead:
                    future.cancel()
                if feed.in_engine:
                    self.engine.abort(sorted(feed.in_engine))
                for request_id in feed.in_engine:
                    self.requests.pop(request_id, None)
                feed.in_engine.clear()

    def _fill(self) -> None:
        """Add decoded samples to the engine, oldest shard first, until the window holds `window` requests; a
        sample's requests go in together (the window may end up to a caption set's size minus one over)."""
        while len(self.requests) < self.window:
            with self.lock:
                feed = self.order[0] if self.order else None
                if feed is not None and (feed.dropped or (feed.read_done and not feed.ahead)):
                    self.order.popleft()
                    continue
            if feed is None or not feed.ahead or not feed.ahead[0].done():
                return
            item: Item = feed.ahead.popleft().result()
            feed.slots.release()
            if item.error or not item.prompts or item.image is None:
                feed.messages.put(("row", item))
                continue
            self.adding = feed
            try:
                for column, prompt in item.prompts.items():
                    self._add(feed, item, column, prompt)
            finally:
                self.adding = None
            if item.answered:   # the engine refused every request of the sample
                feed.messages.put(("row", item))

    def _add(self, feed: Feed, item: Item, column: str, prompt: str) -> None:
        assert item.image is not None
        request_id = f"{feed.shard}:{feed.flow.attempt.attempt_id}:{item.seq}:{column}"
        sampling: SamplingConfig = self.columns[column].request_sampling(item.sample.key)
        try:
            self.engine.add(request_id, prompt, item.image.image, sampling)
        except RequestRejected as e:
            item.results[column] = e
            return
        feed.state = "generating"
        feed.flow.sent()
        feed.in_engine.add(request_id)
        self.requests[request_id] = (feed, item, column)
        self.request_log.append((time.time(), "add", request_id))

    def _finished(self, request_id: str, result: Generation | RequestRejected) -> None:
        entry = self.requests.pop(request_id, None)
        if entry is None:  # its shard was dropped meanwhile
            return
        feed, item, column = entry
        feed.in_engine.discard(request_id)
        self.request_log.append((time.time(), "done", request_id))
        item.results[column] = result
        if item.answered:
            feed.messages.put(("row", item))

    def _engine_died(self, error: BaseException) -> None:
        log.error("caption engine died in %s:\n%s", self.name, "".join(traceback.format_exception(error)))
        with self.lock:  # a process() call either sees `dead` or is in `feeds` here
            self.dead = f"{type(error).__name__}: {error}"
            feeds = list(self.feeds.values())
        for feed in feeds:
            if feed.state != "writing":
                charged = bool(feed.in_engine) or feed is self.adding
                feed.messages.put(("stop", EngineDied(feed.shard, charged, self.dead)))
        self.on_engine_death()

    def _exit_when_answered(self) -> None:
        """End the actor once every process() call has answered (shards being written finish first)."""
        deadline = time.time() + 300
        while self.active_calls and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # Ray sends the replies after the calls return
        if self.log:
            self.log.sync()
        closing = threading.Thread(target=self.engine.close, daemon=True)
        closing.start()
        closing.join(timeout=10)
        os._exit(1)
