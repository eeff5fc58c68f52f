"""One shard's flow: input samples -> prepared requests; engine results -> rows and files -> commit.

The worker (recaption/worker.py) decides when requests go to the engine; a flow only turns samples
into requests and results into output, so it holds one shard's rows (small) and writes its
WebDataset copy as results come back (in completion order), never holding the shard's images.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import pyarrow.parquet as pq

from dataset import storage
from recaption.contract_adapter import (
    InputSample,
    ShardReader,
    ShardStore,
    WdsWriter,
    build_row,
    holds,
    write_parquet,
)
from recaption.engines import Generation, RequestRejected
from recaption.images import ImageError, PreparedImage, prepare_image
from recaption.job import CaptionJob
from recaption.postprocess import clean_caption, quality_flags
from recaption.prompt import PromptBuilder

WDS_META = ("key", "uid", "url", "sha256", "width", "height", "finish_reason", "num_tokens", "quality", "fingerprint")


@dataclass
class ShardTask:
    shard: str
    path: str
    attempt: int
    claim_token: str | None          # the driver's claim; checked with holds() right before the commit
    generation: int = 0              # ledger generation to create (retry-errors: latest + 1)
    retry_errors: bool = False       # re-caption only the error rows of the committed generation
    expected_samples: int | None = None   # from img2dataset's _stats.json
    max_samples: int | None = None   # read only the first samples (--plan's sample runs)


@dataclass
class Item:
    """One input sample on its way: decoded and prompted, or with the reason it cannot go to the engine."""
    seq: int
    sample: InputSample
    prompt: str | None = None
    image: PreparedImage | None = None
    error: str | None = None


class ShardFlow:
    def __init__(self, task: ShardTask, job: CaptionJob, fingerprint: str, store: ShardStore,
                 prompts: PromptBuilder, worker: str = ""):
        self.task, self.job, self.fingerprint, self.store, self.prompts = task, job, fingerprint, store, prompts
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.attempt = store.new_attempt(task.shard)
        self.reader = ShardReader(task.path, expected_samples=task.expected_samples)
        self.tmp = tempfile.mkdtemp(prefix=f"ov-{task.shard}-")
        self.rows: dict[int, dict] = {}
        self.tokens = 0
        self.started = time.time()
        self.first_request: float | None = None
        self.last_result: float | None = None
        self.previous: list[dict] | None = None
        self.wds = WdsWriter(os.path.join(self.tmp, "samples.tar")) if job.write_wds else None
        if task.retry_errors:
            self._load_previous()

    def _load_previous(self) -> None:
        """The committed rows, and its WebDataset samples copied into this attempt's tar first."""
        ledger = self.store.read_ledger(self.task.shard)
        if ledger is None:
            raise FileNotFoundError(f"--retry-errors: shard {self.task.shard} has no committed ledger")
        files = self.store.files(ledger)
        with storage.open_read(files["parquet"]) as f:
            self.previous = pq.read_table(f).to_pylist()
        if self.wds is not None and "wds" in files:
            with storage.open_read(files["wds"]) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for key, members in _sample_groups(tar):
                    image_ext = next(ext for ext in members if ext not in ("txt", "re_caption.txt", "json"))
                    self.wds.add(key, image_ext, members[image_ext], members["txt"].decode(),
                                 members["re_caption.txt"].decode(), json.loads(members["json"]))

    def samples(self) -> Iterator[tuple[int, InputSample]]:
        """(position in the shard, sample) for every sample this attempt captions."""
        retry = None if self.previous is None else {r["key"] for r in self.previous if r["status"] == "error"}
        for seq, sample in enumerate(self.reader):
            if self.task.max_samples is not None and seq >= self.task.max_samples:
                return
            if retry is None or sample.key in retry:
                yield seq, sample

    def prepare(self, seq: int, sample: InputSample) -> Item:
        """Decode and prompt one sample (thread-safe: runs on the worker's decode threads)."""
        if sample.image_error:
            return Item(seq, sample, error=sample.image_error)
        try:
            image = prepare_image(sample.image, self.job.image)
        except ImageError as e:
            return Item(seq, sample, error=str(e))
        return Item(seq, sample, self.prompts.build(sample.org_caption or ""), image)

    def sent(self) -> None:
        """A request of this shard entered the engine."""
        if self.first_request is None:
            self.first_request = time.time()

    def record(self, item: Item, result: Generation | RequestRejected | None) -> None:
        """The row of one sample: its caption, or the reason it has none (`engine: ...` if the engine refused)."""
        s = item.sample
        size = {"width": item.image.width, "height": item.image.height} if item.image else {}
        if isinstance(result, Generation):
            self.last_result = time.time()
            text = clean_caption(result.text)
            row = build_row(s, shard=self.task.shard, fingerprint=self.fingerprint, caption=text,
                            finish_reason=result.finish_reason, num_tokens=result.num_tokens,
                            quality=quality_flags(text, result.token_ids, result.finish_reason), **size)
            self.tokens += result.num_tokens
            if self.wds is not None:
                self.wds.add(s.key, s.image_ext or "jpg", s.image, row["org_caption"], text,
                             {k: row[k] for k in WDS_META})
        else:
            if result is not None:
                self.last_result = time.time()
            error = item.error if result is None else f"engine: {result}"
            row = build_row(s, shard=self.task.shard, fingerprint=self.fingerprint, error=error, **size)
        self.rows[item.seq] = row

    def commit(self) -> dict:
        """Write the Parquet and WebDataset files, then commit the ledger if the claim is still ours."""
        try:
            rows = [self.rows[seq] for seq in sorted(self.rows)]
            if self.previous is not None:
                fresh = {r["key"]: r for r in rows}
                rows = [fresh.get(r["key"], r) for r in self.previous]
            local = os.path.join(self.tmp, "rows.parquet")
            write_parquet(rows, local)
            self.attempt.put("parquet", local)
            if self.wds is not None:
                self.wds.close()
                self.attempt.put("wds", os.path.join(self.tmp, "samples.tar"))
            ledger = self._ledger(rows)
            if not holds(self.store.base, self.task.shard, self.task.claim_token):
                self.attempt.abandon()
                return {"shard": self.task.shard, "outcome": "lost", "ledger": ledger}
            committed = self.attempt.commit(ledger, self.task.generation)
            return {"shard": self.task.shard, "outcome": "committed" if committed else "lost", "ledger": ledger}
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def abandon(self) -> None:
        if self.wds is not None:
            self.wds.close()
        self.attempt.abandon()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _ledger(self, rows: list[dict]) -> dict:
        finished = time.time()
        status = Counter(r["status"] for r in rows)
        tokens = sum(r["num_tokens"] or 0 for r in rows)
        busy_from = self.first_request or self.started
        generating = max((self.last_result or finished) - busy_from, 1e-9)
        stats = self.reader.stats
        return {
            "shard": self.task.shard, "input": self.task.path, "fingerprint": self.fingerprint,
            "caption_config": self.job.caption_config(),
            "samples_in": stats.samples_in if self.task.max_samples is None else len(rows),
            "duplicates": stats.duplicates, "rows_out": len(rows), "ok": status["ok"], "error": status["error"],
            "errors_by_reason": dict(Counter(r["error"].split(":", 1)[0] for r in rows if r["status"] == "error")),
            "quality": dict(Counter(f for r in rows if r["quality"] for f in r["quality"].split(","))),
            "started_at": self.started, "first_request_at": self.first_request, "finished_at": finished,
            "seconds": finished - self.started, "generate_seconds": generating,
            "images_per_s": len(self.rows) / generating, "tokens": tokens, "tokens_per_s": self.tokens / generating,
            "worker": self.worker, "attempt": self.task.attempt,
        }


def _sample_groups(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive members sharing a key, as {extension: bytes} (our own WebDataset tars)."""
    key, members = None, {}
    for member in tar:
        if not member.isfile():
            continue
        name_key, ext = member.name.split(".", 1)
        if name_key != key and members:
            yield key, members
            members = {}
        key = name_key
        members[ext] = tar.extractfile(member).read()
    if members:
        yield key, members
