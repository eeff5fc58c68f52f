"""Recaption one input shard end to end: read, prepare, generate, write Parquet + WDS, then the ledger."""
from __future__ import annotations

import os
import queue
import socket
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator

from dataset import claims, outputs
from dataset.reader import InputSample, ReadStats, ShardReader, shard_name
from recaption.engines import CaptionEngine, Generation
from recaption.images import ImageError, PreparedImage, prepare_image
from recaption.job import CaptionJob
from recaption.postprocess import clean_caption, quality_flags
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
    size = {"width": p.image.width, "height": p.image.height} if p.image else {}
    if gen is None:
        return outputs.build_row(p.sample, shard=shard, fingerprint=fp, error=p.error, **size)
    text = clean_caption(gen.text)
    return outputs.build_row(p.sample, shard=shard, fingerprint=fp, caption=text, finish_reason=gen.finish_reason,
                             num_tokens=gen.num_tokens, quality=quality_flags(text, gen.token_ids, gen.finish_reason),
                             **size)


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


def recaption_shard(path: str, store: outputs.ShardStore, engine: CaptionEngine, prompts: PromptBuilder,
                    job: CaptionJob, *, attempt: int = 1, engine_lock: threading.Lock | None = None,
                    previous_rows: list[dict] | None = None, generation: int = 0,
                    claim_token: str | None = None) -> dict:
    """Caption every sample of one shard, write its outputs, commit its ledger, and return the ledger.

    With `previous_rows` (from a done shard), only their `status='error'` keys are captioned again
    and the result is committed as ledger `generation`; the other rows are kept as they were.
    `engine_lock` lets two calls share one engine: the second prepares its first chunks while the
    first still generates. With `claim_token`, the claim is checked right before the commit.
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
    return write_outputs(store, shard, rows, list(wds.values()), job, started=started,
                         generate_seconds=generate_seconds, attempt=attempt, generation=generation,
                         claim_token=claim_token)


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


def write_outputs(store: outputs.ShardStore, shard: InputShard, rows: list[dict], wds: list[outputs.WdsSample],
                  job: CaptionJob, *, started: float, generate_seconds: float, attempt: int, generation: int,
                  claim_token: str | None) -> dict:
    """Parquet, then WDS, under this attempt's own names, then the ledger: its creation commits the shard.

    `written` in the result says whether this attempt's ledger is the one on storage (False: another
    writer finished the shard first, or the claim was lost; this attempt's files are gone then).
    """
    this_attempt = store.new_attempt(shard.name)
    with tempfile.TemporaryDirectory(prefix="ov-shard-") as tmp:
        local = os.path.join(tmp, "rows.parquet")
        outputs.write_parquet(rows, local)
        this_attempt.put("parquet", local, rows=len(rows))
        if job.write_wds:
            local = os.path.join(tmp, "samples.tar")
            outputs.write_wds(wds, local)
            this_attempt.put("wds", local, rows=len(wds))
    ledger = outputs.make_ledger(
        rows, input=shard.path, fingerprint=job.fingerprint, caption_config=job.caption_config(),
        started_at=started, finished_at=time.time(), worker=f"{socket.gethostname()}:{os.getpid()}",
        **shard.stats.as_dict(), generate_seconds=generate_seconds, attempt=attempt)
    if claim_token is not None and not claims.holds(store.base, shard.name, claim_token):
        this_attempt.abandon()
        return {**ledger, "written": False}
    ledger["written"] = this_attempt.commit(ledger, generation)
    return ledger


def recaption_shards(paths: list[str], store: outputs.ShardStore, engine: CaptionEngine, prompts: PromptBuilder,
                     job: CaptionJob) -> list[dict]:
    """Caption shards one after another in this process, skipping done ones; returns new ledgers."""
    done = store.done()
    return [recaption_shard(p, store, engine, prompts, job) for p in paths if shard_name(p) not in done]
