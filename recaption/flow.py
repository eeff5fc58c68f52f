"""One shard's flow: input samples -> prepared requests; engine results -> rows and files -> commit.

The worker (recaption/worker.py) decides when requests go to the engine; a flow only turns samples
into requests and results into output, so it holds one shard's rows (small) and writes its
WebDataset copy as results come back (in completion order), never holding the shard's images.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

from dataset import storage
from dataset.images import ImageError, PreparedImage, prepare_image
from dataset.outputs import (
    PARQUET_DIR,
    WDS_DIR,
    ColumnCaption,
    RecaptionLedger,
    WdsWriter,
    build_row,
    column_fields,
    failed_columns,
    make_ledger,
    read_rows,
    row_schema,
    write_parquet,
)
from dataset.protocol import ShardStore
from dataset.reader import InputSample, ShardReader, expected_samples
from dataset.wds import iter_samples
from recaption.engines import Generation, RequestRejected
from recaption.job import CaptionJob
from recaption.postprocess import clean_caption, quality_flags
from recaption.prompt import PromptBuilder
from runner.cluster import process_id
from runner.records import Outcome, Task

WDS_META = ("key", "uid", "url", "sha256", "width", "height", "finish_reason", "num_tokens", "quality", "fingerprint")
COLUMN_META = ("finish_reason", "num_tokens", "quality")   # of each other caption column, under its row names


@dataclass(frozen=True)
class ShardTask(Task):
    path: str = ""                   # the input tar
    stats_path: str | None = None    # img2dataset's {shard}_stats.json: the samples the tar must hold
    max_samples: int | None = None   # read only the first samples (--plan's sample runs)


@dataclass
class Item:
    """One input sample on its way: decoded, with a prompt per caption column it needs, or with the reason it
    cannot go to the engine; the engine's answers gather in `results` until every column is back."""
    seq: int
    sample: InputSample
    columns: tuple[str, ...]                            # the caption columns this attempt runs for the sample
    prompts: dict[str, str] = field(default_factory=dict)   # column -> prompt, once prepared
    image: PreparedImage | None = None
    error: str | None = None
    results: dict[str, Generation | RequestRejected] = field(default_factory=dict)

    @property
    def answered(self) -> bool:
        return len(self.results) == len(self.prompts)


class ShardFlow:
    def __init__(self, task: ShardTask, job: CaptionJob, fingerprint: str, store: ShardStore,
                 prompts: dict[str, PromptBuilder], worker: str = ""):
        """`prompts`: a builder per caption column of the job."""
        self.task, self.job, self.fingerprint, self.store, self.prompts = task, job, fingerprint, store, prompts
        self.columns = job.column_names
        self.schema = row_schema(self.columns)
        self.worker = worker or process_id()
        if task.attempt_id is None:
            raise ValueError(f"shard {task.shard}: a task needs an attempt id registered in its claim")
        self.attempt = store.attempt(task.shard, task.generation, task.attempt_id)
        entry = storage.stat(task.path)
        if entry is None:
            raise FileNotFoundError(f"{task.path}: the input shard is gone")
        self.input_bytes = entry.size
        expected = expected_samples(storage.read_bytes(task.stats_path)) if task.stats_path else None
        self.reader = ShardReader(task.path, job.limits, expected_samples=expected)
        self.tmp = tempfile.mkdtemp(prefix=f"ov-{task.shard}-")
        self.rows: dict[int, dict] = {}
        self.tokens = 0
        self.started = time.time()
        self.first_request: float | None = None
        self.last_result: float | None = None
        self.previous: list[dict] | None = None
        self.retry: dict[str, tuple[str, ...]] | None = None   # --retry-errors: key -> its failed columns
        self.previous_rows: dict[str, dict] = {}                # --retry-errors: the rows captioned again
        self.wds = WdsWriter(os.path.join(self.tmp, "samples.tar")) if job.write_wds else None
        if task.retry_errors:
            self._load_previous()

    def _load_previous(self) -> None:
        """The generation below's rows, and its WebDataset samples copied into this attempt's tar first."""
        below = self.task.generation - 1
        ledger = self.store.read_ledger(self.task.shard, below)
        if ledger is None:
            raise FileNotFoundError(f"--retry-errors: shard {self.task.shard} has no committed generation {below}")
        files = self.store.files(ledger)
        if missing := sorted(set(self.store.kinds) - set(files)):
            raise ValueError(f"--retry-errors: {self.store.ledger_path(self.task.shard, below)} commits no {missing}; "
                             "a generation keeps every kind of the one before")
        self.previous = read_rows(files[PARQUET_DIR])
        self.retry = {r["key"]: failed_columns(r, self.columns) for r in self.previous if r["status"] == "error"}
        self.previous_rows = {r["key"]: r for r in self.previous if r["key"] in self.retry}
        if self.wds is not None:
            others = [c for c in self.columns if c != "re_caption"]
            for sample in iter_samples(files[WDS_DIR]):
                self.wds.add(sample["key"], sample["image_ext"], sample["image"], sample["txt"].decode(),
                             sample["re_caption.txt"].decode(), json.loads(sample["json"]),
                             {c: sample[f"{c}.txt"].decode() for c in others})

    def samples(self) -> Iterator[tuple[int, InputSample]]:
        """(position in the shard, sample) for every sample this attempt captions."""
        for seq, sample in enumerate(self.reader):
            if self.task.max_samples is not None and seq >= self.task.max_samples:
                return
            if self.retry is None or sample.key in self.retry:
                yield seq, sample

    def columns_for(self, key: str) -> tuple[str, ...]:
        """The caption columns this attempt runs for the sample `key` (with --retry-errors: those that failed)."""
        return self.columns if self.retry is None else self.retry[key]

    def prepare(self, seq: int, sample: InputSample) -> Item:
        """Decode the sample and prompt each caption column it needs (with --retry-errors: the columns that
        failed) (thread-safe: runs on the worker's decode threads)."""
        columns = self.columns_for(sample.key)
        if sample.image_error or sample.image is None:
            return Item(seq, sample, columns, error=sample.image_error or "missing: no image member")
        try:
            image = prepare_image(sample.image, self.job.image)
        except ImageError as e:
            return Item(seq, sample, columns, error=str(e))
        org = sample.org_caption or ""
        return Item(seq, sample, columns, {c: self.prompts[c].build(org) for c in columns}, image)

    def sent(self) -> None:
        """A request of this shard entered the engine."""
        if self.first_request is None:
            self.first_request = time.time()

    def record(self, item: Item) -> None:
        """The row of one sample: a caption per column, or the reason a column has none (`engine: ...` if the
        engine refused its request); a column this attempt did not run keeps the previous generation's."""
        s = item.sample
        width, height = (item.image.width, item.image.height) if item.image else (None, None)
        if item.results:
            self.last_result = time.time()
        kept = self._kept_columns(s.key, item.columns)
        captions = {c: kept[c] if c in kept else self._caption(item, c) for c in self.columns}
        main = captions.pop("re_caption")
        row = build_row(s, shard=self.task.shard, fingerprint=self.fingerprint, error=main.error, caption=main.text,
                        finish_reason=main.finish_reason, num_tokens=main.num_tokens, quality=main.quality,
                        width=width, height=height, others=captions if len(self.columns) > 1 else None)
        if self.wds is not None and row["status"] == "ok":
            meta = {k: row[k] for k in WDS_META}
            meta.update({column_fields(c)[role]: row[column_fields(c)[role]] for c in captions for role in COLUMN_META})
            self.wds.add(s.key, s.image_ext or "jpg", s.image or b"", row["org_caption"], row["re_caption"], meta,
                         {c: row[c] for c in captions})
        self.rows[item.seq] = row

    def _caption(self, item: Item, column: str) -> ColumnCaption:
        result = item.results.get(column)
        if isinstance(result, Generation):
            text = clean_caption(result.text)
            self.tokens += result.num_tokens
            return ColumnCaption(text, result.finish_reason, result.num_tokens,
                                 quality_flags(text, result.token_ids, result.finish_reason))
        return ColumnCaption(error=item.error if result is None else f"engine: {result}")

    def _kept_columns(self, key: str, rerun: tuple[str, ...]) -> dict[str, ColumnCaption]:
        """--retry-errors: the captions of the columns of `key` that this attempt does not run again."""
        if self.previous is None or len(rerun) == len(self.columns):
            return {}
        row = self.previous_rows[key]
        kept = {}
        for column in set(self.columns) - set(rerun):
            f = column_fields(column)
            flags = ",".join(flag for flag in (row[f["quality"]] or "").split(",") if flag and flag != "truncated")
            kept[column] = ColumnCaption(row[f["text"]], row[f["finish_reason"]], row[f["num_tokens"]], flags)
        return kept

    def commit(self, stats: dict) -> Outcome:
        """Write the Parquet and WebDataset files, then commit (fenced: PROTOCOL.md A3-A4). A sample run
        (`max_samples`, --plan) writes nothing: its ledger only measures."""
        try:
            rows = [self.rows[seq] for seq in sorted(self.rows)]
            if self.previous is not None:
                fresh = {r["key"]: r for r in rows}
                rows = [fresh.get(r["key"], r) for r in self.previous]
            if self.task.max_samples is not None:
                return Outcome(self.task.shard, self.attempt.attempt_id, "measured", self._ledger(rows), stats)
            local = os.path.join(self.tmp, "rows.parquet")
            write_parquet(rows, local, self.schema)
            self.attempt.put(PARQUET_DIR, local, rows=len(rows))
            if self.wds is not None:
                samples = self.wds.samples
                self.wds.close()
                self.attempt.put(WDS_DIR, os.path.join(self.tmp, "samples.tar"), rows=samples)
            ledger = self._ledger(rows)
            kind = self.attempt.commit(ledger)
            return Outcome(self.task.shard, self.attempt.attempt_id, kind, ledger if kind == "committed" else None,
                           stats)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def abandon(self) -> None:
        if self.wds is not None:
            self.wds.close()
        self.attempt.abandon()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _ledger(self, rows: list[dict]) -> RecaptionLedger:
        finished = time.time()
        busy_from = self.first_request or self.started
        generating = max((self.last_result or finished) - busy_from, 1e-9)
        stats = self.reader.stats.as_dict()
        if self.task.max_samples is not None:  # a sample run (--plan) reads only part of the shard
            stats.update(samples_in=len(rows), duplicates=0)
        return make_ledger(
            rows, input=self.task.path, input_bytes=self.input_bytes, fingerprint=self.fingerprint,
            caption_config=self.job.caption_config(), columns=self.columns,
            started_at=self.started, finished_at=finished, worker=self.worker, **stats,
            first_request_at=self.first_request, generate_seconds=generating,
            generate_images_per_s=len(self.rows) / generating, generate_tokens_per_s=self.tokens / generating,
            attempt=self.task.attempt, heal=self.task.heal)
