"""Turn a recaption output into a Hub-ready dataset: sized Parquet files, a preview split, a card.

Written to a local folder, `s3://bucket/prefix` or `hf://ORG/NAME`:

    README.md                               dataset card (dataset/card.py)
    data/train-00000-of-000NN.parquet       the ok rows of every committed shard, about `target_bytes` each
    data/preview-00000-of-00001.parquet     the first PREVIEW_ROWS ok rows

One output version (fingerprint) is published: its committed shards, resolved through their ledgers;
every row carries the `fingerprint` column. Error rows are not published: they have no recaption, and a
`train` split of usable pairs is what users load; the card lists how many were left out and why.

CLIP scores (scoring/) are joined by `key` as `re_clip_score` and `org_clip_score`, completing
Recap-DataComp-1B's columns, when every published shard has current scores (scored from its latest
recaption commit, by the one model the version records). When no shard has them, the dataset is
published without the two columns (the card says so). When only some have them, publishing stops
and names the unscored shards: finish scoring (`pipelines/score.py`), or pass `--no-scores`. Rows with
and without scores never mix silently.

Rows are streamed one Parquet batch at a time, so memory holds at most one row group, whatever the
size of the run. Output files are planned from the input files' sizes before anything is written, so
every name `-of-NNNNN` is known when its file is written. Readers switch from the old dataset to the new
one in one step (dataset/destinations.py): a Hub destination gets everything in one commit; a local or S3
destination gets the data files in a folder of this publish's own, then one write of the card switches
to them, and only then are the earlier publish's files removed.

One version is published: the output's current one (complete, or the first one still being captioned), or
another named with `fingerprint`; a version that is neither complete nor current (a `--new-version` still
being captioned) is refused unless `allow_incomplete`, so a scheduled publish never replaces a complete
dataset with part of a new one.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataset import hub, outputs, storage
from dataset.card import CardInfo, ScoreInfo, render_card
from dataset.destinations import CARD, DATA_DIR, data_dir, open_destination, upload_line
from dataset.outputs import ROW_SCHEMA
from dataset.scores import (
    SCORE_COLUMNS,
    SCORE_SCHEMA,
    ScoreCoverage,
    ScoreLookup,
    describe_scorer,
    score_name,
    score_schema,
    score_store,
    scores_to_join,
)
from dataset.stats import LengthStats

# Recap-DataComp-1B's columns first, in its order and types (its tools and img2dataset commands name
# them), then ours.
RECAP_COLUMNS = ["url", "re_caption", "org_caption", "sha256", "key", "re_clip_score", "org_clip_score",
                 "re_length", "org_length"]
OUR_COLUMNS = ["uid", "source_key", "width", "height", "num_tokens", "finish_reason", "quality", "notes", "shard",
               "fingerprint"]
RECAP_TYPES = {"re_length": pa.int64(), "org_length": pa.int64()}
PREVIEW_ROWS = 1000
CARD_SAMPLES = 5
TRAIN_PATTERN, PREVIEW_PATTERN = "train-*", "preview-*"
MB = 1_000_000


def published_schema(with_scores: bool, columns: tuple[str, ...] = ("re_caption",)) -> pa.Schema:
    """The published columns: Recap-DataComp-1B's nine (seven without scores), then ours, then each other caption
    column of the version's set: its caption, facts and (with scores) its CLIP score."""
    fields = []
    for name in RECAP_COLUMNS + OUR_COLUMNS:
        if name in SCORE_COLUMNS:
            if with_scores:
                fields.append(SCORE_SCHEMA.field(name))
        else:
            source = ROW_SCHEMA.field(name)
            fields.append(source.with_type(RECAP_TYPES.get(name, source.type)))
    rows = outputs.row_schema(columns)
    for column in (c for c in columns if c != "re_caption"):
        fields += [rows.field(name) for name in outputs.column_fields(column).values()]
        if with_scores:
            fields.append(pa.field(score_name(column), pa.float64()))
    return pa.schema(fields)


@dataclass(frozen=True)
class PublishConfig:
    target_bytes: int = 500 * MB      # train file size: few files for the Hub's limits, one downloads quickly
    row_group_bytes: int = 100 * MB   # in-memory Arrow bytes; the dataset viewer fails above ~286 MiB
    files_per_folder: int = 9_000     # sub-folders of data/ beyond this (Hub limit: 10,000 per folder)
    fingerprint: str | None = None    # the output version to publish (default: the current one)
    title: str | None = None          # card title (default: the destination's name)
    license_id: str = "cc-by-4.0"     # the license of the DataComp metadata
    public: bool = False              # hf:// only: create the repo public (default private)
    scores: bool = True               # join CLIP scores when the version has them (see the module docstring)
    dry_run: bool = False
    hub_endpoint: str | None = None
    allow_incomplete: bool = False    # publish a version that is neither complete nor current


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
    folder: str = DATA_DIR                # where the data files go (data/ or data/{publish id})
    scores: ScoreCoverage | None = None   # set when the scores are joined

    @property
    def data_files(self) -> dict[str, str]:
        """Split -> glob pattern, as the card's `configs` names them."""
        train = f"{self.folder}/*" if self.nested else self.folder
        return {"train": f"{train}/{TRAIN_PATTERN}", "preview": f"{self.folder}/{PREVIEW_PATTERN}"}

    @property
    def schema(self) -> pa.Schema:
        return published_schema(self.scores is not None, outputs.caption_columns(self.run.caption_config))

    @property
    def shards(self) -> list[str]:
        return [shard for f in self.train for shard in f.shards]

    def paths(self) -> set[str]:
        return {f.path for f in self.train} | {self.preview, CARD}


@dataclass
class Written:
    """What publishing measured while streaming rows (the card's numbers)."""
    rows: dict[str, int] = field(default_factory=lambda: {"train": 0, "preview": 0})
    arrow_bytes: dict[str, int] = field(default_factory=lambda: {"train": 0, "preview": 0})
    file_bytes: dict[str, int] = field(default_factory=dict)
    error_rows: int = 0
    org_length: LengthStats = field(default_factory=LengthStats)
    re_length: LengthStats = field(default_factory=LengthStats)
    score_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SCORE_COLUMNS, 0.0))
    scored_rows: int = 0
    samples: list[dict] = field(default_factory=list)


def _estimated_ok_bytes(ledger: outputs.RecaptionLedger) -> int:
    """Parquet bytes the shard's ok rows should take: its file size scaled by the ok share."""
    size = ledger["files"]["parquet"]["bytes"]
    return size * ledger["ok"] // max(ledger["rows_out"], 1)


def make_plan(run: outputs.FinishedRun, target_bytes: int, files_per_folder: int = 9_000,
              folder: str = DATA_DIR) -> Plan:
    """Group committed shards, in order, into train files of about `target_bytes` (a shard is never split)."""
    groups: list[list[outputs.RecaptionLedger]] = []
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
    nested = n >= files_per_folder  # keep every folder (the data folder also holds the preview) under the limit
    train = []
    for i, group in enumerate(groups):
        sub = f"{folder}/{i // files_per_folder:04d}" if nested else folder
        train.append(OutputFile(f"{sub}/train-{i:05d}-of-{n:05d}.parquet", [g["shard"] for g in group],
                                sum(_estimated_ok_bytes(g) for g in group)))
    return Plan(run, train, f"{folder}/preview-00000-of-00001.parquet", nested, folder)


def plan_lines(plan: Plan, dest: str) -> list[str]:
    """Human-readable plan: inputs, skipped shards, files with sizes, and how they will be sent."""
    run = plan.run
    lines = [f"input {run.out}: {len(run.ledgers)} committed shards of {run.output.describe()}, "
             f"{len(run.skipped)} skipped",
             *(f"  skipped {shard}: {reason}" for shard, reason in run.skipped),
             f"rows: {run.total('ok'):,} ok to publish, {run.total('error'):,} error rows left out",
             f"destination {dest}:"]
    lines += [f"  {f.path}  ~{human_bytes(f.estimated_bytes)} from {len(f.shards)} shards with ok rows"
              for f in plan.train]
    lines += [f"  {plan.preview}  {min(PREVIEW_ROWS, run.total('ok')):,} rows", "  README.md"]
    lines.append(upload_line(dest, len(plan.train) + 2))
    return lines


def ok_batches(plan: Plan, shards: list[str], written: Written) -> Iterator[pa.RecordBatch]:
    """The ok rows of `shards` in the plan's schema, batch by batch, scores joined by key when the plan has them."""
    run, schema = plan.run, plan.schema
    scored = set(score_schema(outputs.caption_columns(run.caption_config)).names) - {"key", "error"}
    row_columns = [name for name in schema.names if name not in scored]
    for shard in shards:
        path = run.parquet(shard)
        expected = run.by_shard[shard]["ok"]
        lookup = ScoreLookup(score_store(run.output), plan.scores.current[shard]) if plan.scores else None
        seen = 0
        for batch in outputs.iter_batches(path, ["status", *row_columns]):
            ok = batch.filter(pc.equal(batch["status"], "ok"))
            written.error_rows += batch.num_rows - ok.num_rows
            seen += ok.num_rows
            columns = {name: ok[name] for name in row_columns}
            if lookup is not None:
                columns.update(lookup.take(ok["key"]))
            yield pa.RecordBatch.from_arrays([columns[name].cast(schema.field(name).type) for name in schema.names],
                                             schema=schema)
        if seen != expected:
            raise ValueError(f"{path}: {seen} ok rows, but its ledger says {expected}")


def write_file(batches: Iterator[pa.RecordBatch], local: str, schema: pa.Schema, row_group_bytes: int,
               on_batch: Callable[[pa.RecordBatch], None] = lambda b: None) -> tuple[int, int]:
    """Stream batches into one Parquet file in row groups of at most about `row_group_bytes` (in memory).

    Returns (rows, in-memory bytes).
    """
    rows = nbytes = pending_bytes = 0
    pending: list[pa.RecordBatch] = []
    with pq.ParquetWriter(local, schema, compression="zstd") as writer:
        def flush() -> None:
            nonlocal pending, pending_bytes
            table = pa.Table.from_batches(pending, schema)
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


def preview_table(plan: Plan) -> pa.Table:
    """The first PREVIEW_ROWS ok rows."""
    batches, left = [], PREVIEW_ROWS
    for batch in ok_batches(plan, plan.shards, Written()):
        if left <= 0:
            break
        batches.append(batch.slice(0, left))
        left -= batches[-1].num_rows
    return pa.Table.from_batches(batches, plan.schema)


def is_data_file(rel: str) -> bool:
    """The files a publish owns under data/ (an earlier publish's are replaced)."""
    return rel.startswith(f"{DATA_DIR}/") and rel.endswith(".parquet")


def check_version(run: outputs.FinishedRun, allow_incomplete: bool) -> None:
    """Refuse a version that is neither complete nor current (see the module docstring)."""
    output = run.output
    if not output.complete and not output.current and not allow_incomplete:
        raise ValueError(f"{run.out}: {output.describe()} is still being captioned ({len(run.ledgers)} shards "
                         "committed); publishing it would replace a complete dataset with part of a new one. Publish "
                         "the current version (no --fingerprint), finish the run, or pass --allow-incomplete")


def publish(input_dir: str, dest: str, config: PublishConfig | None = None, log: Callable[[str], None] = print,
            **overrides) -> Plan:
    """Publish the committed shards of `input_dir` to `dest` (see the module docstring); returns the plan.

    `overrides` replace fields of `config` (e.g. `publish(out, dest, target_bytes=1 << 20)`).
    """
    config = dataclasses.replace(config or PublishConfig(), **overrides)
    run = outputs.load_finished(input_dir, config.fingerprint)
    if not run.ledgers:
        raise ValueError(f"{input_dir}: no committed shards to publish")
    check_version(run, config.allow_incomplete)
    plan = make_plan(run, config.target_bytes, config.files_per_folder, data_dir(dest))
    plan.scores, score_line = scores_to_join(run, plan.shards, config.scores)
    for line in [*plan_lines(plan, dest), score_line]:
        log(line)
    if config.dry_run:
        return plan
    written = Written()

    def measure(batch: pa.RecordBatch) -> None:
        written.org_length.add(batch["org_length"])
        written.re_length.add(batch["re_length"])
        if plan.scores:
            written.scored_rows += batch.num_rows - batch["re_clip_score"].null_count
            for name in SCORE_COLUMNS:
                written.score_sums[name] += pc.sum(batch[name]).as_py() or 0.0

    with tempfile.TemporaryDirectory(prefix="ov-publish-") as tmp:
        destination = open_destination(dest, CARD, os.path.join(tmp, "staging"), public=config.public,
                                       endpoint=config.hub_endpoint, log=log)

        def send(rel: str, split: str, batches: Iterator[pa.RecordBatch], on_batch=lambda b: None) -> None:
            local = os.path.join(tmp, rel.replace("/", "_"))
            rows, nbytes = write_file(batches, local, plan.schema, config.row_group_bytes, on_batch)
            written.rows[split] += rows
            written.arrow_bytes[split] += nbytes
            written.file_bytes[rel] = os.path.getsize(local)
            destination.put(local, rel)
            log(f"wrote {rel}: {rows:,} rows, {human_bytes(written.file_bytes[rel])}")

        for f in plan.train:
            send(f.path, "train", ok_batches(plan, f.shards, written), measure)
        preview = preview_table(plan)
        written.samples = preview.slice(0, CARD_SAMPLES).to_pylist()
        send(plan.preview, "preview", iter(preview.to_batches()))
        card = render_card(card_info(plan, dest, written, config)).encode()
        for path in destination.finish(card, plan.paths(), is_data_file):
            log(f"removed stale {path}")
    log(f"published {written.rows['train']:,} train rows in {len(plan.train)} files and "
        f"{written.rows['preview']:,} preview rows to {dest}; left out {written.error_rows:,} error rows")
    return plan


def card_info(plan: Plan, dest: str, written: Written, config: PublishConfig) -> CardInfo:
    run = plan.run
    repo = hub.repo_id(dest) if hub.is_hub(dest) else None
    scores = None
    if plan.scores:
        n = max(written.scored_rows, 1)
        scores = ScoreInfo(model=describe_scorer(plan.scores.scorer), re_mean=written.score_sums["re_clip_score"] / n,
                           org_mean=written.score_sums["org_clip_score"] / n,
                           unscored_rows=written.rows["train"] - written.scored_rows)
    return CardInfo(
        title=config.title or (repo or storage.basename(dest)).rsplit("/", 1)[-1], repo_id=repo,
        license=config.license_id, fingerprint=run.fingerprint, caption_config=run.caption_config,
        shards=len(run.ledgers), skipped_shards=len(run.skipped),
        ok_rows=written.rows["train"], error_rows=written.error_rows, errors_by_reason=dict(run.errors_by_reason()),
        duplicates=run.total("duplicates"), split_rows=dict(written.rows), split_bytes=dict(written.arrow_bytes),
        download_bytes=sum(written.file_bytes.values()), data_files=plan.data_files, nested=plan.nested,
        schema=plan.schema, org_length=written.org_length, re_length=written.re_length,
        samples=written.samples, scores=scores, complete=run.output.complete,
    )
