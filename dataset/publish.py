"""Turn a recaption output folder into a Hub-ready dataset: sized Parquet files, a preview split, a card.

Written to a local folder, `s3://bucket/prefix` or `hf://ORG/NAME`:

    README.md                               dataset card (dataset/card.py)
    data/train-00000-of-000NN.parquet       the ok rows of every done shard, about `target_bytes` each
    data/preview-00000-of-00001.parquet     the first PREVIEW_ROWS ok rows

Only done shards are published (ledger present with the run's fingerprint). Error rows are not
published: they have no recaption, and a `train` split of usable pairs is what users load; the card
lists how many were left out and why. Rows are streamed one Parquet batch at a time, so memory holds
at most one row group, whatever the size of the run. Output files are planned from the input files'
sizes before anything is written, so every name `-of-NNNNN` is known when its file is written.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataset import hub, outputs, storage
from dataset.card import CardInfo, render_card
from dataset.outputs import ROW_SCHEMA
from dataset.stats import LengthStats

# Recap-DataComp-1B's columns first (users' img2dataset commands name them), then ours.
PUBLISHED_COLUMNS = ["url", "re_caption", "org_caption", "sha256", "key", "re_length", "org_length",
                     "uid", "width", "height", "num_tokens", "finish_reason", "quality", "shard"]
PUBLISHED_SCHEMA = pa.schema([ROW_SCHEMA.field(name) for name in PUBLISHED_COLUMNS])
PREVIEW_ROWS = 1000
CARD_SAMPLES = 5
DATA_DIR = "data"
TRAIN_PATTERN, PREVIEW_PATTERN = "train-*", "preview-*"
MB = 1_000_000


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


@dataclass
class OutputFile:
    """One train file to write: its path in the dataset and the shards whose ok rows it holds."""
    path: str
    shards: list[str]
    estimated_bytes: int


@dataclass
class Plan:
    run: outputs.FinishedRun
    train: list[OutputFile]
    preview: str
    nested: bool

    @property
    def data_files(self) -> dict[str, str]:
        """Split -> glob pattern, as the card's `configs` names them."""
        folder = f"{DATA_DIR}/*" if self.nested else DATA_DIR
        return {"train": f"{folder}/{TRAIN_PATTERN}", "preview": f"{DATA_DIR}/{PREVIEW_PATTERN}"}

    def paths(self) -> set[str]:
        return {f.path for f in self.train} | {self.preview, "README.md"}


@dataclass
class Written:
    """What publishing measured while streaming rows (the card's numbers)."""
    rows: dict[str, int] = field(default_factory=lambda: {"train": 0, "preview": 0})
    arrow_bytes: dict[str, int] = field(default_factory=lambda: {"train": 0, "preview": 0})
    file_bytes: dict[str, int] = field(default_factory=dict)
    error_rows: int = 0
    org_length: LengthStats = field(default_factory=LengthStats)
    re_length: LengthStats = field(default_factory=LengthStats)
    samples: list[dict] = field(default_factory=list)


def _estimated_ok_bytes(ledger: dict) -> int:
    """Parquet bytes the shard's ok rows should take: its file size scaled by the ok share."""
    size = ledger["files"]["parquet"]["bytes"]
    return size * ledger["ok"] // max(ledger["rows_out"], 1)


def make_plan(run: outputs.FinishedRun, target_bytes: int, files_per_folder: int = 9_000) -> Plan:
    """Group done shards, in order, into train files of about `target_bytes` (a shard is never split)."""
    groups: list[list[dict]] = []
    size = 0
    for ledger in run.ledgers:
        if not ledger["ok"]:
            continue
        if not groups or size + _estimated_ok_bytes(ledger) > target_bytes:
            groups.append([])
            size = 0
        groups[-1].append(ledger)
        size += _estimated_ok_bytes(ledger)
    n = len(groups)
    nested = n >= files_per_folder  # keep every folder (data/ also holds the preview) under the limit
    train = []
    for i, group in enumerate(groups):
        folder = f"{DATA_DIR}/{i // files_per_folder:04d}" if nested else DATA_DIR
        train.append(OutputFile(f"{folder}/train-{i:05d}-of-{n:05d}.parquet", [g["shard"] for g in group],
                                sum(_estimated_ok_bytes(g) for g in group)))
    return Plan(run, train, f"{DATA_DIR}/preview-00000-of-00001.parquet", nested)


def plan_lines(plan: Plan, dest: str, hub_batch_files: int) -> list[str]:
    """Human-readable plan: inputs, skipped shards, files with sizes, and how they will be sent."""
    run = plan.run
    lines = [f"input {run.out}: {len(run.ledgers)} done shards (fingerprint {run.fingerprint}), "
             f"{len(run.skipped)} skipped",
             *(f"  skipped {shard}: {reason}" for shard, reason in run.skipped),
             f"rows: {run.total('ok'):,} ok to publish, {run.total('error'):,} error rows left out",
             f"destination {dest}:"]
    lines += [f"  {f.path}  ~{human_bytes(f.estimated_bytes)} from {len(f.shards)} shards" for f in plan.train]
    lines += [f"  {plan.preview}  {min(PREVIEW_ROWS, run.total('ok')):,} rows", "  README.md"]
    files = len(plan.train) + 2
    if hub.is_hub(dest):
        per_commit = min(hub_batch_files, hub.FILES_PER_COMMIT)
        lines.append(f"upload: {files} files to dataset repo {hub.repo_id(dest)} with upload_folder, "
                     f"{hub_batch_files} staged at a time: about {math.ceil(files / per_commit)} commit(s); "
                     f"token {hub.token_status()}")
    elif storage.is_remote(dest):
        lines.append(f"upload: {files} objects, one PUT each (multipart for large files)")
    return lines


def ok_batches(run: outputs.FinishedRun, shards: list[str], written: Written) -> Iterator[pa.RecordBatch]:
    """The ok rows of `shards` in PUBLISHED_SCHEMA, batch by batch; counts the error rows left out."""
    for shard in shards:
        path = run.parquet(shard)
        expected = run.by_shard[shard]["ok"]
        seen = 0
        for batch in outputs.iter_batches(path, ["status", *PUBLISHED_COLUMNS]):
            ok = batch.filter(pc.equal(batch["status"], "ok"))
            written.error_rows += batch.num_rows - ok.num_rows
            seen += ok.num_rows
            yield ok.select(PUBLISHED_COLUMNS).cast(PUBLISHED_SCHEMA)
        if seen != expected:
            raise ValueError(f"{path}: {seen} ok rows, but its ledger says {expected}")


def write_file(batches: Iterator[pa.RecordBatch], local: str, row_group_bytes: int,
               on_batch: Callable[[pa.RecordBatch], None] = lambda b: None) -> tuple[int, int]:
    """Stream batches into one Parquet file in row groups of at most about `row_group_bytes` (in memory).

    Returns (rows, in-memory bytes).
    """
    rows = nbytes = pending_bytes = 0
    pending: list[pa.RecordBatch] = []
    with pq.ParquetWriter(local, PUBLISHED_SCHEMA, compression="zstd") as writer:
        def flush() -> None:
            nonlocal pending, pending_bytes
            table = pa.Table.from_batches(pending, PUBLISHED_SCHEMA)
            writer.write_table(table, row_group_size=max(table.num_rows, 1))  # the whole table: one row group
            pending, pending_bytes = [], 0

        for batch in batches:
            on_batch(batch)
            rows, nbytes = rows + batch.num_rows, nbytes + batch.nbytes
            pieces = max(1, math.ceil(batch.nbytes / row_group_bytes))
            step = max(1, math.ceil(batch.num_rows / pieces))
            for start in range(0, batch.num_rows, step):
                piece = batch.slice(start, step)
                if pending and pending_bytes + piece.nbytes > row_group_bytes:
                    flush()
                pending.append(piece)
                pending_bytes += piece.nbytes
        if pending or not rows:
            flush()
    return rows, nbytes


def preview_table(run: outputs.FinishedRun) -> pa.Table:
    """The first PREVIEW_ROWS ok rows."""
    batches, left = [], PREVIEW_ROWS
    shards = [ledger["shard"] for ledger in run.ledgers if ledger["ok"]]
    for batch in ok_batches(run, shards, Written()):
        if left <= 0:
            break
        batches.append(batch.slice(0, left))
        left -= batches[-1].num_rows
    return pa.Table.from_batches(batches, PUBLISHED_SCHEMA)


class StorageDestination:
    """A local folder or `s3://bucket/prefix`: files land under their dataset paths; stale data files go."""

    def __init__(self, dest: str):
        self.dest = dest

    def put(self, local_file: str, rel: str) -> None:
        storage.put_file(local_file, storage.join(self.dest, rel))

    def finish(self, keep: set[str]) -> list[str]:
        """Delete Parquet files left in our folders by an earlier publish; returns their paths."""
        stale = []
        for folder in sorted({rel.rsplit("/", 1)[0] for rel in keep if "/" in rel}):
            for path in storage.list_files(storage.join(self.dest, folder), ".parquet"):
                if f"{folder}/{storage.basename(path)}" not in keep:
                    storage.delete(path)
                    stale.append(path)
        return stale


def publish(input_dir: str, dest: str, *, target_bytes: int = 500 * MB, row_group_bytes: int = 100 * MB,
            files_per_folder: int = 9_000, dry_run: bool = False, fingerprint: str | None = None,
            title: str | None = None, license_id: str = "cc-by-4.0", hub_batch_files: int = 20,
            hub_endpoint: str | None = None, log: Callable[[str], None] = print) -> Plan:
    """Publish the done shards of `input_dir` to `dest` (see the module docstring); returns the plan."""
    run = outputs.load_finished(input_dir, fingerprint)
    if not run.ledgers:
        raise ValueError(f"{input_dir}: no done shards to publish")
    plan = make_plan(run, target_bytes, files_per_folder)
    for line in plan_lines(plan, dest, hub_batch_files):
        log(line)
    if dry_run:
        return plan
    destination = (hub.HubDestination(dest, batch_files=hub_batch_files, endpoint=hub_endpoint)
                   if hub.is_hub(dest) else StorageDestination(dest))
    written = Written()

    def count_lengths(batch: pa.RecordBatch) -> None:
        written.org_length.add(batch["org_length"])
        written.re_length.add(batch["re_length"])

    with tempfile.TemporaryDirectory(prefix="ov-publish-") as tmp:
        def send(rel: str, split: str, batches: Iterator[pa.RecordBatch], on_batch=lambda b: None) -> None:
            local = os.path.join(tmp, rel.replace("/", "_"))
            rows, nbytes = write_file(batches, local, row_group_bytes, on_batch)
            written.rows[split] += rows
            written.arrow_bytes[split] += nbytes
            written.file_bytes[rel] = os.path.getsize(local)
            destination.put(local, rel)
            log(f"wrote {rel}: {rows:,} rows, {human_bytes(written.file_bytes[rel])}")

        for f in plan.train:
            send(f.path, "train", ok_batches(run, f.shards, written), count_lengths)
        preview = preview_table(run)
        written.samples = preview.slice(0, CARD_SAMPLES).to_pylist()
        send(plan.preview, "preview", iter(preview.to_batches()))
        readme = os.path.join(tmp, "README.md")
        with open(readme, "w") as f:
            f.write(render_card(card_info(plan, dest, written, title, license_id)))
        destination.put(readme, "README.md")
        for path in destination.finish(plan.paths()):
            log(f"removed stale {path}")
    log(f"published {written.rows['train']:,} train rows in {len(plan.train)} files and "
        f"{written.rows['preview']:,} preview rows to {dest}; left out {written.error_rows:,} error rows")
    return plan


def card_info(plan: Plan, dest: str, written: Written, title: str | None, license_id: str) -> CardInfo:
    run = plan.run
    repo = hub.repo_id(dest) if hub.is_hub(dest) else None
    return CardInfo(
        title=title or (repo or storage.basename(dest)).rsplit("/", 1)[-1], repo_id=repo, license=license_id,
        fingerprint=run.fingerprint, caption_config=run.caption_config,
        shards=len(run.ledgers), skipped_shards=len(run.skipped),
        ok_rows=written.rows["train"], error_rows=written.error_rows, errors_by_reason=dict(run.errors_by_reason()),
        duplicates=run.total("duplicates"), split_rows=dict(written.rows), split_bytes=dict(written.arrow_bytes),
        download_bytes=sum(written.file_bytes.values()), data_files=plan.data_files, nested=plan.nested,
        schema=PUBLISHED_SCHEMA, org_length=written.org_length, re_length=written.re_length,
        samples=written.samples,
    )
