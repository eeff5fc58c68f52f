"""The CLIP-score stage: per-shard score files over a recaption output, committed exactly once.

For every ok row of a committed recaption shard, the cosine of its image with `re_caption` and with
`org_caption` under one open_clip model (scoring/clip.py), written as one Parquet file per shard
(dataset/scores.py has the layout) and committed through the output contract: an attempt writes its
file under a name no other attempt uses, then creates the shard's score ledger exclusively; claims
live under the stage's own folder. Images come from the shard's committed `wds/` tar, or from its
input tar when the run wrote no WDS (`--no-wds`).

Driven as the caption stage is: `score_shard` is the unit of work, `ScoreWorker` the Ray actor running it
(ready / process / status / abandon), and `run_stage` schedules every pending shard on a pool of them
with the recaption job's scheduler (claims, retries, deadlines, a clean stop, the end-of-run sweep).
"""
from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from dataset import claims, outputs
from dataset.outputs import Output
from dataset.reader import ShardReader
from dataset.scores import SCORE_SCHEMA, is_current, latest_ledgers, register_scorer, score_store
from dataset.wds import iter_samples
from recaption.images import ImageError, prepare_image
from scoring.clip import ClipModelSpec

if TYPE_CHECKING:
    from scoring.clip import ClipScorer

CAPTION_COLUMNS = ["key", "status", "re_caption", "org_caption"]


@dataclass(frozen=True)
class ScoreConfig:
    """A score run: which output, which model, how many at a time."""
    input: str
    clip_model: str
    pretrained: str | None = None
    fingerprint: str | None = None    # the output version to score; default: the current one
    num_workers: int | None = None    # actors on the shared scheduler (default: cluster GPUs, 1 on CPU)
    batch_size: int = 256             # images per forward pass
    device: str | None = None         # default: cuda when available, else cpu
    claim_ttl: float = 120.0          # seconds without renewal before another run may take a shard

    @property
    def spec(self) -> ClipModelSpec:
        return ClipModelSpec(self.clip_model, self.pretrained)


@dataclass
class ScoreTask:
    """One shard to score: the scheduler's unit of work (the caption stage's ShardTask, for scores)."""
    shard: str
    attempt: int = 1
    claim_token: str | None = None    # the scheduler's claim on the stage; checked right before commit
    generation: int = 0               # score ledger generation to create (rescoring after --retry-errors: +1)


def pending(output: Output) -> dict[str, int]:
    """Shard -> score generation to create, for every committed recaption shard without current scores.

    One listing of each stage's ledgers, then one read per shard that has scores (to compare the
    recaption generation they scored with the shard's latest).
    """
    recaptioned = output.store.done()
    store = score_store(output)
    scored = store.done()
    ledgers = latest_ledgers(store, sorted(scored.keys() & recaptioned.keys()))
    todo = {}
    for shard, generation in sorted(recaptioned.items()):
        ledger = ledgers.get(shard)
        if ledger is None or (ledger.get("source") or {}).get("generation") != generation:
            todo[shard] = scored[shard] + 1 if shard in scored else 0
    return todo


def ok_rows(output: Output, ledger: dict) -> list[dict]:
    """The ok rows (key, both captions) of a committed recaption shard, through its ledger."""
    path = output.store.files(ledger)[outputs.PARQUET_DIR]
    rows = []
    for batch in outputs.iter_batches(path, CAPTION_COLUMNS):
        rows += [row for row in batch.to_pylist() if row["status"] == "ok"]
    return rows


def iter_images(output: Output, ledger: dict) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) of the shard's samples: from its committed WDS tar, else from its input tar."""
    files = output.store.files(ledger)
    if outputs.WDS_DIR in files:
        for sample in iter_samples(files[outputs.WDS_DIR]):
            yield sample["key"], sample["image"]
    else:
        for sample in ShardReader(ledger["input"]):
            yield sample.key, sample.image or b""


class _Batch:
    """Rows whose images are decoded, waiting for one forward pass."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.images: list = []
        self.captions: dict[str, list[str]] = {"re_clip_score": [], "org_clip_score": []}

    def add(self, row: dict, image) -> None:
        self.keys.append(row["key"])
        self.images.append(image)
        self.captions["re_clip_score"].append(row["re_caption"])
        self.captions["org_clip_score"].append(row["org_caption"] or "")


def compute_scores(output: Output, ledger: dict, scorer: ClipScorer, batch_size: int,
                   stop: Callable[[], bool] = lambda: False,
                   on_forward: Callable[[float], None] = lambda seconds: None) -> list[dict] | None:
    """SCORE_SCHEMA rows, one per ok row in the shard's row order; None when `stop()` turned true."""
    rows = {row["key"]: row for row in ok_rows(output, ledger)}
    scored: dict[str, dict] = {}
    batch = _Batch()

    def flush() -> None:
        nonlocal batch
        started = time.perf_counter()
        scores = scorer.scores(batch.images, batch.captions)
        on_forward(time.perf_counter() - started)
        for i, key in enumerate(batch.keys):
            scored[key] = {"key": key, **{name: float(values[i]) for name, values in scores.items()}, "error": None}
        batch = _Batch()

    for key, data in iter_images(output, ledger):
        if stop():
            return None
        row = rows.get(key)
        if row is None or key in scored:
            continue  # an error row's sample (input tar), or a key already seen
        try:
            batch.add(row, prepare_image(data).image)
        except ImageError as e:
            scored[key] = {"key": key, "re_clip_score": None, "org_clip_score": None, "error": str(e)}
        if len(batch.keys) >= batch_size:
            flush()
    if batch.keys:
        flush()
    missing = {"key": None, "re_clip_score": None, "org_clip_score": None,
               "error": "missing: no image for this key in the shard's tar"}
    return [scored.get(key) or {**missing, "key": key} for key in rows]


def score_ledger(rows: list[dict], *, output: Output, recaption: dict, scorer_identity: dict, started_at: float,
                 worker: str) -> dict:
    """A score ledger before `Attempt.commit` adds shard, attempt_id, generation and files."""
    finished_at = time.time()
    errors = Counter(row["error"].split(":", 1)[0] for row in rows if row["error"])
    seconds = max(finished_at - started_at, 1e-9)
    return {
        "fingerprint": output.fingerprint, "scorer": scorer_identity,
        "source": {"generation": recaption["generation"], "attempt_id": recaption["attempt_id"],
                   "parquet": recaption["files"][outputs.PARQUET_DIR]["path"]},
        "rows_out": len(rows), "scored": len(rows) - sum(errors.values()), "error": sum(errors.values()),
        "errors_by_reason": dict(errors), "started_at": started_at, "finished_at": finished_at,
        "seconds": seconds, "rows_per_s": len(rows) / seconds, "worker": worker,
    }


def score_shard(output: Output, task: ScoreTask, scorer: ClipScorer, scorer_identity: dict, *, batch_size: int = 256,
                worker: str = "", stop: Callable[[], bool] = lambda: False,
                on_forward: Callable[[float], None] = lambda seconds: None) -> dict:
    """Score one committed recaption shard and commit the scores; returns the outcome.

    {"shard", "outcome": "committed" | "lost" | "abandoned", "ledger"}: committed (by this attempt, or
    already current: then "already": True), lost (another attempt committed this generation first, or
    the claim was taken over: this attempt's file is deleted), abandoned (`stop()` turned true). Storage
    and read errors raise: the attempt failed and the shard stays pending.
    """
    store = score_store(output)
    recaption = output.store.read_ledger(task.shard)
    if recaption is None:
        raise FileNotFoundError(f"{output.base}: shard {task.shard} has no committed recaption ledger to score")
    if recaption.get("fingerprint") != output.fingerprint:
        raise ValueError(f"{output.store.ledger_path(task.shard, recaption['generation'])}: fingerprint "
                         f"{recaption.get('fingerprint')} is not the version's {output.fingerprint}; not scored")
    current = store.read_ledger(task.shard)
    if current is not None and is_current(current, recaption):
        return {"shard": task.shard, "outcome": "committed", "ledger": current, "already": True}
    started_at = time.time()
    rows = compute_scores(output, recaption, scorer, batch_size, stop, on_forward)
    if rows is None:
        return {"shard": task.shard, "outcome": "abandoned", "ledger": None}
    attempt = store.new_attempt(task.shard)
    with tempfile.TemporaryDirectory(prefix="ov-scores-") as tmp:
        local = os.path.join(tmp, f"{task.shard}.parquet")
        pq.write_table(pa.Table.from_pylist(rows, schema=SCORE_SCHEMA), local, compression="zstd")
        attempt.put(outputs.PARQUET_DIR, local, rows=len(rows))
    ledger = score_ledger(rows, output=output, recaption=recaption, scorer_identity=scorer_identity,
                          started_at=started_at, worker=worker)
    if not attempt.commit(ledger, task.generation, task.claim_token):
        return {"shard": task.shard, "outcome": "lost", "ledger": store.read_ledger(task.shard, task.generation)}
    return {"shard": task.shard, "outcome": "committed", "ledger": ledger}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ScoreWorker:
    """The score stage's actor: one model, shards scored one forward pass at a time.

    Created with `ray.remote(num_gpus=...)(ScoreWorker).options(max_concurrency=...)` by the scheduler;
    with max_concurrency > 1, one shard's reading overlaps another's forward passes (the model lock).
    """

    def __init__(self, out: str, fingerprint: str, spec: ClipModelSpec, batch_size: int = 256,
                 device: str | None = None, *, log_file: str | None = None):
        from dataset.logs import LogFile
        from scoring.clip import ClipScorer

        if log_file:  # library output of this process goes to OUT/_logs/, as the caption workers' does
            LogFile(out, log_file).capture_process()

        self.output = Output.open(out, fingerprint)
        self.spec, self.batch_size = spec, batch_size
        self.identity = spec.identity()
        register_scorer(score_store(self.output), self.identity)
        self.scorer = _LockedScorer(ClipScorer(spec, device))
        self.states: dict[str, str] = {}
        self.abandoned: set[str] = set()
        self.started = time.perf_counter()
        self.forward_seconds = 0.0

    def ready(self) -> dict:
        """The model is loaded: where, and which."""
        device = self.scorer.scorer.device
        return {"worker": worker_name(), "model": self.identity, "device": device,
                "context_length": self.scorer.scorer.context_length,
                "summary": f"{self.spec.describe()} on {device}, batch {self.batch_size}"}

    def process(self, task: ScoreTask) -> dict:
        """Score and commit one shard; the outcome dict of `score_shard` (raises when the attempt failed)."""
        self.abandoned.discard(task.shard)
        self.states[task.shard] = "scoring"

        def forward_done(seconds: float) -> None:
            self.forward_seconds += seconds

        try:
            return score_shard(self.output, task, self.scorer, self.identity, batch_size=self.batch_size,
                               worker=worker_name(), stop=lambda: task.shard in self.abandoned,
                               on_forward=forward_done)
        finally:
            self.states.pop(task.shard, None)
            self.abandoned.discard(task.shard)

    def status(self) -> dict:
        """Shards in progress, and the share of time spent in forward passes since the actor started."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {"shards": dict(self.states), "busy_share": self.forward_seconds / elapsed}

    def abandon(self, shard: str) -> None:
        """Stop scoring the shard at its next image; nothing of it is committed."""
        if shard in self.states:
            self.abandoned.add(shard)


class _LockedScorer:
    """One forward pass at a time when an actor scores several shards concurrently."""

    def __init__(self, scorer: ClipScorer):
        self.scorer, self.lock = scorer, threading.Lock()

    def scores(self, images: list, captions: dict[str, list[str]]):
        with self.lock:
            return self.scorer.scores(images, captions)


def run_stage(config: ScoreConfig, *, progress_every: float = 30.0, verbose: bool = False) -> dict:
    """Score every pending shard on a pool of `ScoreWorker` actors under the recaption job's scheduler
    (claims, retries, deadlines, a clean stop); the sweep of dead attempts' files comes last.

    Returns {"shards", "committed", "failed": {shard: errors}, "stopped": signal name or None}.
    """
    from dataset.logs import LogFile
    from recaption.driver import holder_id, init_ray
    from recaption.pool import ClusterView, Pool, PoolConfig, size_workers
    from recaption.progress import Progress
    from recaption.scheduler import Scheduler, SchedulerConfig, run_to_the_end

    output = Output.open(config.input, config.fingerprint)
    store = score_store(output)
    todo = pending(output)
    say(f"{len(output.store.done())} committed shards in {output.base}, {len(todo)} to score with "
        f"{config.spec.describe()}")
    summary = {"shards": len(todo), "committed": 0, "failed": {}, "stopped": None}
    if not todo:
        return summary
    register_scorer(store, config.spec.identity())   # another model's scores: refused here, before any actor
    import ray

    log = LogFile(config.input, "score-driver.log")
    if not verbose:
        log.capture_libraries()
    try:
        started_here = init_ray(verbose)
        view = ClusterView(gpus=ray.cluster_resources().get("GPU", 0), started_here=started_here)
        workers = PoolConfig(num_workers=config.num_workers, tasks_per_worker=2)
        sizing = size_workers(view, workers, tensor_parallel_size=1, pending_shards=len(todo))
        say(f"starting {sizing.line()}")
        pool = Pool(ScoreWorker, (config.input, output.fingerprint, config.spec, config.batch_size, config.device),
                    config.input, sizing, workers, method="process", name="score", verbose=verbose)
        pool.start()
        tasks = [ScoreTask(shard, generation=generation) for shard, generation in todo.items()]
        progress = Progress("score", len(tasks), len(tasks), progress_every)
        scheduler = Scheduler("score", tasks, store, claims.Claims(store.base, holder_id(), config.claim_ttl), pool,
                              progress, SchedulerConfig(claim_ttl=config.claim_ttl))

        def tick() -> None:
            if progress.should_print():
                say(f"shards {progress.done}/{progress.total} scored, {progress.failed} failed | "
                    f"{progress.rates({}).images_per_s:.1f} images/s | ETA {progress.eta()}")

        scheduler.on_tick = tick
        summary["stopped"] = run_to_the_end(scheduler)
    finally:
        log.sync()
        log.close()
    summary.update(committed=progress.done, failed=scheduler.failed)
    return summary


def say(text: str) -> None:
    print(f"[score] {text}", flush=True)
