"""Recaption one input shard end to end: read, prepare, generate, write Parquet + WDS, then the ledger."""
from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator

from dataset import outputs
from dataset.reader import InputSample, ReadStats, ShardReader, shard_name
from recaption.engines import CaptionEngine, Generation
from recaption.images import ImageError, PreparedImage, prepare_image
from recaption.job import CaptionJob
from recaption.postprocess import clean_caption, quality_flags, word_count
from recaption.prompt import PromptBuilder


@dataclass
class Prepared:
    sample: InputSample
    image: PreparedImage | None
    error: str | None


@dataclass
class InputShard:
    """One input shard read whole (this module captions shard by shard)."""
    name: str
    path: str
    samples: list[InputSample]
    stats: ReadStats


def read_shard(path: str) -> InputShard:
    """Every sample of the tar; raises ShardReadError / InputError rather than return a shard cut short."""
    reader = ShardReader(path)
    samples = list(reader)
    return InputShard(shard_name(path), path, samples, reader.stats)


def prepare_sample(sample: InputSample, job: CaptionJob) -> Prepared:
    if sample.image is None:
        return Prepared(sample, None, sample.image_error)
    try:
        return Prepared(sample, prepare_image(sample.image, job.image), None)
    except ImageError as e:
        return Prepared(sample, None, str(e))


def prepared_chunks(shard: InputShard, job: CaptionJob, only_keys: set[str] | None = None,
                    depth: int = 2) -> Iterator[list[Prepared]]:
    """Start decoding images in a background thread now, up to `depth` chunks ahead of the consumer."""
    samples = [s for s in shard.samples if only_keys is None or s.key in only_keys]
    chunks: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()  # set when the consumer goes away early (an engine error)

    def put(item) -> bool:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for start in range(0, len(samples), job.chunk_size):
                if not put([prepare_sample(s, job) for s in samples[start:start + job.chunk_size]]):
                    return
        except BaseException as e:  # surfaced in the consumer, never swallowed
            put(e)
        put(_DONE)

    threading.Thread(target=produce, daemon=True, name=f"prepare-{shard.name}").start()
    return _drain(chunks, stop)


_DONE = object()


def _drain(chunks: queue.Queue, stop: threading.Event) -> Iterator[list[Prepared]]:
    try:
        while (item := chunks.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def build_row(p: Prepared, gen: Generation | None, shard: str, fp: str) -> dict:
    s = p.sample
    org = clean_caption(s.org_caption or "")
    row = {
        "key": s.key, "uid": s.meta.get("uid"), "url": s.meta.get("url"), "org_caption": org,
        "re_caption": None, "status": "error", "error": p.error, "finish_reason": None, "num_tokens": 0,
        "quality": None, "width": p.image.width if p.image else None, "height": p.image.height if p.image else None,
        "sha256": s.meta.get("sha256"), "org_length": word_count(org), "re_length": 0,
        "fingerprint": fp, "shard": shard,
    }
    if gen is not None:
        text = clean_caption(gen.text)
        row.update(re_caption=text, status="ok", error=None, finish_reason=gen.finish_reason,
                   num_tokens=gen.num_tokens, quality=quality_flags(text, gen.token_ids, gen.finish_reason),
                   re_length=word_count(text))
    return row


def caption_chunk(chunk: list[Prepared], engine: CaptionEngine, prompts: PromptBuilder) -> list[Generation | None]:
    """Generate for the decodable images of a chunk; None where the image failed."""
    good = [p for p in chunk if p.image is not None]
    gens = iter(engine.generate([prompts.build(p.sample.org_caption or "") for p in good],
                                [p.image.image for p in good]) if good else [])
    return [next(gens) if p.image is not None else None for p in chunk]


def wds_sample(p: Prepared, row: dict) -> outputs.WdsSample:
    meta = {k: row[k] for k in ("key", "uid", "url", "sha256", "width", "height", "finish_reason",
                                "num_tokens", "quality", "fingerprint")}
    return outputs.WdsSample(p.sample.key, p.sample.image_ext or "jpg", p.sample.image, row["org_caption"],
                             row["re_caption"], meta)


def recaption_shard(path: str, out: str, engine: CaptionEngine, prompts: PromptBuilder, job: CaptionJob, *,
                    attempt: int = 1, engine_lock: threading.Lock | None = None,
                    previous_rows: list[dict] | None = None, replace: bool = False) -> dict:
    """Caption every sample of one shard, write its outputs and ledger, and return the ledger.

    With `previous_rows` (from a done shard), only their `status='error'` keys are captioned again;
    the other rows are kept as they were. `engine_lock` lets two calls share one engine: the second
    prepares its first chunks while the first still generates. `replace` overwrites an existing
    ledger (retries, new versions); otherwise the first ledger written wins.
    """
    started = time.time()
    shard = read_shard(path)
    fp = job.fingerprint
    retry_keys = {r["key"] for r in previous_rows if r["status"] == "error"} if previous_rows is not None else None
    new_rows: dict[str, dict] = {}
    wds: dict[str, outputs.WdsSample] = {}
    generate_seconds = 0.0
    chunks = prepared_chunks(shard, job, retry_keys)  # decoding starts before we wait for the engine
    with engine_lock or nullcontext():
        for chunk in chunks:
            t0 = time.time()
            gens = caption_chunk(chunk, engine, prompts)
            generate_seconds += time.time() - t0
            for p, gen in zip(chunk, gens):
                row = new_rows[p.sample.key] = build_row(p, gen, shard.name, fp)
                if gen is not None:
                    wds[p.sample.key] = wds_sample(p, row)
    rows = [new_rows.get(r["key"], r) for r in previous_rows] if previous_rows is not None else list(new_rows.values())
    if job.write_wds and previous_rows is not None:
        wds = keep_wds_order(rows, wds, shard)
    return write_outputs(out, shard, rows, list(wds.values()), job, started=started,
                         generate_seconds=generate_seconds, attempt=attempt, replace=replace)


def keep_wds_order(rows: list[dict], fresh: dict[str, outputs.WdsSample], shard: InputShard) -> dict:
    """All ok rows' samples in row order: freshly captioned ones plus the earlier ones rebuilt from input."""
    by_key = {s.key: s for s in shard.samples}
    samples = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        if row["key"] in fresh:
            samples[row["key"]] = fresh[row["key"]]
        elif row["key"] in by_key and by_key[row["key"]].image is not None:
            samples[row["key"]] = wds_sample(Prepared(by_key[row["key"]], None, None), row)
    return samples


def write_outputs(out: str, shard: InputShard, rows: list[dict], wds: list[outputs.WdsSample], job: CaptionJob, *,
                  started: float, generate_seconds: float, attempt: int, replace: bool) -> dict:
    """Parquet, then WDS, then the ledger last: the ledger's presence means the shard is done.

    Without `replace` the ledger is created only if absent; `written` in the result says whether
    this call's ledger is the one on storage (False: another writer finished the shard first).
    """
    files = {"parquet": {"path": outputs.parquet_path(out, shard.name)}}
    files["parquet"]["bytes"] = outputs.write_parquet(rows, files["parquet"]["path"])
    if job.write_wds:
        files["wds"] = {"path": outputs.wds_path(out, shard.name)}
        files["wds"]["bytes"] = outputs.write_wds(wds, files["wds"]["path"])
    finished = time.time()
    status = Counter(r["status"] for r in rows)
    tokens = sum(r["num_tokens"] or 0 for r in rows)
    seconds = max(finished - started, 1e-9)
    ledger = {
        "shard": shard.name, "input": shard.path, "fingerprint": job.fingerprint,
        "caption_config": job.caption_config(),
        **shard.stats.as_dict(), "rows_out": len(rows), "ok": status["ok"], "error": status["error"],
        "errors_by_reason": dict(Counter(r["error"].split(":", 1)[0] for r in rows if r["status"] == "error")),
        "quality": dict(Counter(f for r in rows if r["quality"] for f in r["quality"].split(","))),
        "started_at": started, "finished_at": finished, "seconds": seconds, "generate_seconds": generate_seconds,
        "images_per_s": len(rows) / seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
        "worker": f"{socket.gethostname()}:{os.getpid()}", "attempt": attempt, "files": files,
    }
    ledger["written"] = outputs.write_ledger(out, shard.name, ledger, replace=replace)
    return ledger


def is_done(out: str, shard: str, fingerprint: str) -> bool:
    """A shard is done iff its ledger exists with this run's fingerprint."""
    ledger = outputs.read_ledger(out, shard)
    return ledger is not None and ledger.get("fingerprint") == fingerprint


def recaption_shards(paths: list[str], out: str, engine: CaptionEngine, prompts: PromptBuilder,
                     job: CaptionJob) -> list[dict]:
    """Caption shards one after another in this process, skipping done ones; returns new ledgers."""
    return [recaption_shard(p, out, engine, prompts, job) for p in paths
            if not is_done(out, shard_name(p), job.fingerprint)]
