"""The CLIP-score stage: per-shard score files over a recaption output, committed exactly once.

For every ok row of a committed recaption shard, the cosine of its image with each caption column
(`re_caption`, and every other column of the version's caption set: `{column}_clip_score`) and with
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
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, cast

import pyarrow as pa
import pyarrow.parquet as pq

from dataset import outputs, storage
from dataset.images import ImageError, prepare_image
from dataset.protocol import Ledger, ShardStore
from dataset.reader import ReadLimits, ShardReader
from dataset.scores import ScoreLedger, is_current, register_scorer, score_name, score_schema, score_store
from dataset.versions import Output
from dataset.wds import iter_samples
from runner.cluster import process_id
from runner.planning import Wanted, plan_shards
from runner.pool import PoolConfig, Sizing
from runner.records import Outcome, Plan, Task
from runner.run import RunnerConfig, RunResult, check_storage, logs, run_stage
from scoring.clip import ClipModelSpec, Scorer

if TYPE_CHECKING:
    from scoring.clip import ClipScorer

NAME = "score"
# Shards in a scorer at once: one reading its images while another runs its forward passes.
SCORE_RUNNER = RunnerConfig(pool=PoolConfig(tasks_per_worker=2))


@dataclass(frozen=True)
class ScoreConfig:
    """A score run: which output, which model, how many at a time."""
    input: str
    clip_model: str
    pretrained: str | None = None
    fingerprint: str | None = None    # the output version to score; default: the current one
    batch_size: int = 256             # images per forward pass
    device: str | None = None         # default: cuda when available, else cpu
    runner: RunnerConfig = SCORE_RUNNER

    @property
    def spec(self) -> ClipModelSpec:
        return ClipModelSpec(self.clip_model, self.pretrained)




@dataclass(frozen=True)
class ScoreTask(Task):
    """One shard to score (generation: of its score ledgers)."""


def plan_scores(output: Output, store: ShardStore) -> Plan:
    """A task for every committed recaption shard without current scores: no score ledger yet, scores of an
    earlier recaption generation (a --retry-errors), or score files that are gone (the next generation).

    The listings of both stages, then one read per shard with scores (to compare the recaption generation they
    scored with the shard's latest)."""
    recaptioned = output.store.done()
    listing = store.listing()
    scored = listing.done()
    ledgers = store.read_ledgers({shard: scored[shard] for shard in sorted(scored.keys() & recaptioned.keys())})
    stale = [shard for shard, generation in recaptioned.items()
             if (ledger := cast("ScoreLedger | None", ledgers.get(shard))) is not None
             and ("source" not in ledger or ledger["source"]["generation"] != generation)]
    wanted = [Wanted(shard, partial(_task, shard)) for shard in sorted(recaptioned)]
    return plan_shards(store, listing, wanted, redo=stale)


def _task(shard: str, generation: int, retry_errors: bool, heal: str | None) -> Task:
    return ScoreTask(shard, generation=generation, heal=heal)


def ok_rows(output: Output, ledger: Ledger) -> list[dict]:
    """The ok rows (key, every caption) of a committed recaption shard, through its ledger."""
    path = output.store.files(ledger)[outputs.PARQUET_DIR]
    rows = []
    for batch in outputs.iter_batches(path, ["key", "status", "org_caption",
                                             *outputs.caption_columns(output.caption_config)]):
        rows += [row for row in batch.to_pylist() if row["status"] == "ok"]
    return rows


def iter_images(output: Output, ledger: Ledger) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) of the shard's samples: from its committed WDS tar, else from its input tar, read with
    the caps it was captioned with, and only if it is still the tar that was captioned (same size)."""
    files = output.store.files(ledger)
    if outputs.WDS_DIR in files:
        for sample in iter_samples(files[outputs.WDS_DIR]):
            yield sample["key"], sample["image"]
        return
    facts: dict = dict(ledger)
    source = facts["input"]
    size = storage.size(source)
    if facts.get("input_bytes") is not None and size != facts["input_bytes"]:
        raise ValueError(f"{source}: {size:,} bytes, but it had {facts['input_bytes']:,} when shard "
                         f"{ledger['shard']} was captioned; the images to score are not the ones captioned")
    caps = (facts.get("caption_config") or output.caption_config).get("input") or {}
    limits = ReadLimits(**{name: value for name, value in caps.items() if name in ReadLimits.__dataclass_fields__})
    for read in ShardReader(source, limits):
        yield read.key, read.image or b""


class _Batch:
    """Rows whose images are decoded, waiting for one forward pass: each score's captions (row field -> score)."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts
        self.keys: list[str] = []
        self.images: list = []
        self.captions: dict[str, list[str]] = {score: [] for score in texts.values()}

    def add(self, row: dict, image) -> None:
        self.keys.append(row["key"])
        self.images.append(image)
        for field, score in self.texts.items():
            self.captions[score].append(row[field] or "")


def compute_scores(output: Output, ledger: Ledger, scorer: Scorer, batch_size: int,
                   stop: Callable[[], bool] = lambda: False,
                   on_forward: Callable[[float], None] = lambda seconds: None) -> list[dict] | None:
    """`score_schema` rows, one per ok row in the shard's row order; None when `stop()` turned true."""
    rows = {row["key"]: row for row in ok_rows(output, ledger)}
    columns = outputs.caption_columns(output.caption_config)
    texts = {**{c: score_name(c) for c in columns}, "org_caption": "org_clip_score"}
    unscored = dict.fromkeys(texts.values())
    scored: dict[str, dict] = {}
    batch = _Batch(texts)

    def flush() -> None:
        nonlocal batch
        started = time.perf_counter()
        scores = scorer.scores(batch.images, batch.captions)
        on_forward(time.perf_counter() - started)
        for i, key in enumerate(batch.keys):
            scored[key] = {"key": key, **{name: float(values[i]) for name, values in scores.items()}, "error": None}
        batch = _Batch(texts)

    for key, data in iter_images(output, ledger):
        if stop():
            return None
        row = rows.get(key)
        if row is None or key in scored:
            continue  # an error row's sample (input tar), or a key already seen
        try:
            batch.add(row, prepare_image(data).image)
        except ImageError as e:
            scored[key] = {"key": key, **unscored, "error": str(e)}
        if len(batch.keys) >= batch_size:
            flush()
    if batch.keys:
        flush()
    missing = {"key": None, **unscored, "error": "missing: no image for this key in the shard's tar"}
    return [scored.get(key) or {**missing, "key": key} for key in rows]


def score_ledger(rows: list[dict], *, output: Output, recaption: Ledger, scorer_identity: dict, started_at: float,
                 worker: str) -> ScoreLedger:
    """A score ledger before `Attempt.commit` adds shard, attempt_id, generation and files."""
    finished_at = time.time()
    errors = Counter(row["error"].split(":", 1)[0] for row in rows if row["error"])
    seconds = max(finished_at - started_at, 1e-9)
    return cast(ScoreLedger, {
        "fingerprint": output.fingerprint, "scorer": scorer_identity,
        "source": {"generation": recaption["generation"], "attempt_id": recaption["attempt_id"],
                   "parquet": recaption["files"][outputs.PARQUET_DIR]["path"]},
        "rows_out": len(rows), "scored": len(rows) - sum(errors.values()), "error": sum(errors.values()),
        "errors_by_reason": dict(errors), "started_at": started_at, "finished_at": finished_at,
        "seconds": seconds, "rows_per_s": len(rows) / seconds, "worker": worker,
    })


def score_shard(output: Output, task: ScoreTask, scorer: Scorer, scorer_identity: dict, *, batch_size: int = 256,
                worker: str = "", stop: Callable[[], bool] = lambda: False,
                on_forward: Callable[[float], None] = lambda seconds: None) -> Outcome:
    """Score one committed recaption shard and commit the scores (fenced: PROTOCOL.md A3-A4).

    The outcome is committed (by this attempt, or already current: then its ledger is the current one),
    lost (another attempt committed this generation first), fenced (the driver gave this attempt up) or
    abandoned (`stop()` turned true); a lost or fenced attempt's file is deleted. Storage and read errors
    raise: the attempt failed and the shard stays pending.
    """
    store = score_store(output)
    attempt_id = task.attempt_id or ""
    recaption = output.store.read_ledger(task.shard)
    if recaption is None:
        raise FileNotFoundError(f"{output.base}: shard {task.shard} has no committed recaption ledger to score")
    if recaption.get("fingerprint") != output.fingerprint:
        raise ValueError(f"{output.store.ledger_path(task.shard, recaption['generation'])}: fingerprint "
                         f"{recaption.get('fingerprint')} is not the version's {output.fingerprint}; not scored")
    current = cast("ScoreLedger | None", store.read_ledger(task.shard))
    if current is not None and is_current(current, recaption):
        return Outcome(task.shard, attempt_id, "committed", current)
    started_at = time.time()
    rows = compute_scores(output, recaption, scorer, batch_size, stop, on_forward)
    if rows is None:
        return Outcome(task.shard, attempt_id, "abandoned")
    attempt = store.attempt(task.shard, task.generation, attempt_id)
    with tempfile.TemporaryDirectory(prefix="ov-scores-") as tmp:
        local = os.path.join(tmp, f"{task.shard}.parquet")
        schema = score_schema(outputs.caption_columns(output.caption_config))
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), local, compression="zstd")
        attempt.put(outputs.PARQUET_DIR, local, rows=len(rows))
    ledger = score_ledger(rows, output=output, recaption=recaption, scorer_identity=scorer_identity,
                          started_at=started_at, worker=worker)
    kind = attempt.commit(ledger)
    return Outcome(task.shard, attempt_id, kind, ledger if kind == "committed" else None)


class ScoreWorker:
    """The score stage's actor: one model, shards scored one forward pass at a time.

    Created as a Ray actor by runner/pool.py; with several tasks per worker, one shard's reading overlaps another's
    forward passes (the model lock).
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
        return {"worker": process_id(), "model": self.identity, "device": device,
                "context_length": self.scorer.scorer.context_length,
                "summary": f"{self.spec.describe()} on {device}, batch {self.batch_size}"}

    def process(self, task: ScoreTask) -> Outcome:
        """Score and commit one shard; the outcome of `score_shard` (raises when the attempt failed)."""
        self.abandoned.discard(task.shard)
        self.states[task.shard] = "scoring"

        def forward_done(seconds: float) -> None:
            self.forward_seconds += seconds

        try:
            return score_shard(self.output, task, self.scorer, self.identity, batch_size=self.batch_size,
                               worker=process_id(), stop=lambda: task.shard in self.abandoned,
                               on_forward=forward_done)
        finally:
            self.states.pop(task.shard, None)
            self.abandoned.discard(task.shard)

    def status(self) -> dict:
        """Shards in progress, and the share of time spent in forward passes since the actor started."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {"shards": dict(self.states), "busy_share": self.forward_seconds / elapsed}

    def abandon(self, shard: str, attempt_id: str | None = None) -> None:
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


class ScoreStage:
    """The score stage as the runner sees it (runner/stage.py)."""
    name = NAME
    worker = ScoreWorker
    tensor_parallel_size = 1

    def __init__(self, config: ScoreConfig, output: Output):
        self.config, self.output = config, output
        self.out, self.store = config.input, score_store(output)

    def plan(self) -> Plan:
        plan = plan_scores(self.output, self.store)
        if plan.tasks:   # another model's scores: refused here, before any actor starts
            register_scorer(self.store, self.config.spec.identity())
        return plan

    def describe(self) -> str:
        return f"{self.config.spec.describe()}, {self.output.describe()}"

    def worker_args(self, sizing: Sizing) -> tuple:
        c = self.config
        return c.input, self.output.fingerprint, c.spec, c.batch_size, c.device

    def worker_env(self) -> dict[str, str]:
        return {}


def score(config: ScoreConfig) -> RunResult:
    """Score every pending shard of the output version on a pool of `ScoreWorker` actors (runner/run.py)."""
    output = Output.open(config.input, config.fingerprint)
    config.runner.check(config.input)
    config.spec.check()
    with logs(config.input, "score-driver.log", config.runner.verbose) as log:
        refused = check_storage(config.input, config.runner.single_writer)
        if refused:
            raise ValueError(refused)
        return run_stage(ScoreStage(config, output), config.runner, log)
