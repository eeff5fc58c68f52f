"""The recaption stage's output contract: its kinds of file, the row schema, rows, ledgers, and the read side.

A recaption output OUT (a local folder or s3://bucket/prefix) holds versions (dataset/versions.py); each
version's shards are committed through the commit protocol (dataset/protocol.py, PROTOCOL.md):

    BASE/parquet/{shard}~{gen}.{attempt}.parquet  one row per input sample (`row_schema`), nothing dropped
    BASE/wds/{shard}~{gen}.{attempt}.tar          the ok samples, with the web caption and every caption column
    BASE/_ledger/{shard}[~{gen}].json             the commit: which files, their bytes and rows, the counts
    BASE/_run.json                                the last run's summary
    BASE/clip_scores/...                          the score stage (dataset/scores.py), the same shape

Readers go through ledgers only: `load_finished` for a version's committed shards, `wds_shards` for the
training data of an output; a path or glob inside an output is resolved through its ledgers or refused.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import pyarrow as pa
import pyarrow.parquet as pq

from dataset import storage
from dataset.protocol import Ledger, StoreListing
from dataset.versions import JOB_FILE, VERSIONS_DIR, Output

if TYPE_CHECKING:
    from dataset.reader import InputSample

PARQUET_DIR, WDS_DIR = "parquet", "wds"
RECAPTION_KINDS = {PARQUET_DIR: "parquet", WDS_DIR: "tar"}   # kind (= folder) -> file extension
PARQUET_ONLY = {PARQUET_DIR: "parquet"}                        # --no-wds


def recaption_kinds(write_wds: bool) -> dict[str, str]:
    return dict(RECAPTION_KINDS if write_wds else PARQUET_ONLY)


# One row per input sample. Names follow Recap-DataComp-1B where they overlap.
ROW_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source_key", pa.string()),      # the input's original key where the normalised `key` differs
    ("uid", pa.string()),
    ("url", pa.string()),
    ("org_caption", pa.string()),
    ("re_caption", pa.string()),
    ("status", pa.string()),          # 'ok' | 'error'
    ("error", pa.string()),           # 'reason: detail' when status == 'error'
    ("finish_reason", pa.string()),   # 'stop' | 'length' (null on error)
    ("num_tokens", pa.int32()),
    ("quality", pa.string()),         # comma-separated flags: 'length', 'repetition'; '' when clean
    ("notes", pa.string()),           # non-fatal problems with the input, '; '-joined; null when none
    ("width", pa.int32()),            # decoded image size (before any downscaling)
    ("height", pa.int32()),
    ("sha256", pa.string()),
    ("org_length", pa.int32()),       # words
    ("re_length", pa.int32()),
    ("fingerprint", pa.string()),
    ("shard", pa.string()),
])


# A caption set's columns beside `re_caption` (recaption/captions.py) add these fields each, after ROW_SCHEMA's,
# and one map of the failed columns' reasons; a run of `re_caption` alone writes ROW_SCHEMA as it is.
CAPTION_ERRORS = "caption_errors"   # column -> 'reason: detail' for each column that has no caption; null when none


def column_fields(column: str) -> dict[str, str]:
    """The row fields of one caption column, by role: Recap-DataComp-1B's names for `re_caption`."""
    if column == "re_caption":
        return {"text": "re_caption", "finish_reason": "finish_reason", "num_tokens": "num_tokens",
                "quality": "quality", "length": "re_length"}
    return {"text": column, "finish_reason": f"{column}_finish_reason", "num_tokens": f"{column}_num_tokens",
            "quality": f"{column}_quality", "length": f"{column}_length"}


_ROLE_TYPES = {"text": pa.string(), "finish_reason": pa.string(), "num_tokens": pa.int32(), "quality": pa.string(),
               "length": pa.int32()}


def row_schema(columns: tuple[str, ...] = ("re_caption",)) -> pa.Schema:
    """The rows of a run with these caption columns: ROW_SCHEMA, then each other column's fields and the
    per-column error map."""
    extra = [c for c in columns if c != "re_caption"]
    if not extra:
        return ROW_SCHEMA
    added = [pa.field(name, _ROLE_TYPES[role]) for c in extra for role, name in column_fields(c).items()]
    return pa.schema([*ROW_SCHEMA, *added, pa.field(CAPTION_ERRORS, pa.map_(pa.string(), pa.string()))])


@dataclass(frozen=True)
class ColumnCaption:
    """One caption column of one row: its text, or the reason it has none."""
    text: str | None = None
    finish_reason: str | None = None
    num_tokens: int = 0
    quality: str = ""
    error: str | None = None


def caption_columns(caption_config: dict) -> tuple[str, ...]:
    """The caption columns of an output version, from its caption config (`re_caption` alone before sets)."""
    return tuple(c["name"] for c in caption_config.get("captions") or ()) or ("re_caption",)


def failed_columns(row: dict, columns: tuple[str, ...]) -> tuple[str, ...]:
    """The caption columns of a row that have no caption (every one of an error row of a one-column run)."""
    if row["status"] != "error":
        return ()
    errors = dict(row.get(CAPTION_ERRORS) or ())
    return tuple(c for c in columns if c in errors) if errors else columns


def _words(text: str | None) -> int:
    return len(text.split()) if text else 0


class RecaptionLedger(Ledger, total=False):
    """A caption shard's commit: the protocol's fields, then what went in, counts over the rows, timings."""
    input: str                         # the input tar
    input_bytes: int                   # its size when it was captioned (the score stage checks it)
    caption_config: dict               # the settings behind the fingerprint (dropped by readers after the first)
    samples_in: int                    # = rows_out + duplicates
    duplicates: int
    duplicate_keys: list[str]
    rows_out: int
    ok: int
    error: int
    errors_by_reason: dict[str, int]
    quality: dict[str, int]
    nonregular: dict[str, int]         # input members that are links, folders or devices, by kind
    ignored: dict[str, int]
    members: int
    bytes: int                         # uncompressed tar bytes read
    tokens: int
    started_at: float
    finished_at: float
    seconds: float
    images_per_s: float
    tokens_per_s: float
    first_request_at: float | None
    generate_seconds: float
    generate_images_per_s: float
    generate_tokens_per_s: float
    worker: str
    attempt: int                       # tries of the shard in the run that committed it
    heal: str | None                   # why a committed generation was made again


# --- rows and files --------------------------------------------------------------------------

def build_row(sample: InputSample, *, shard: str, fingerprint: str, error: str | None = None,
              caption: str | None = None, finish_reason: str | None = None, num_tokens: int = 0,
              quality: str = "", width: int | None = None, height: int | None = None,
              others: dict[str, ColumnCaption] | None = None) -> dict:
    """One row (`row_schema`): `re_caption` as `caption`, or `error` ('reason: detail') when it has none; with
    `others`, the other caption columns of the set, each with its caption or its error.

    A row is 'ok' when every column has its caption; else 'error', its `error` the first failed column's
    reason (`re_caption` first) and, with `others`, `caption_errors` each failed column's. Captions are stored
    with whitespace runs collapsed; lengths are in words. The sample's own facts (`source_key`, `notes`, a web
    caption cut at its cap: quality flag 'truncated') go in on every row.
    """
    if error is None and caption is None:
        raise ValueError(f"{shard}/{sample.key}: a row needs a caption or an error")
    org = " ".join((sample.org_caption or "").split())
    columns = {"re_caption": ColumnCaption(caption, finish_reason, num_tokens, quality, error), **(others or {})}
    errors = {name: c.error for name, c in columns.items() if c.error is not None or c.text is None}
    ok = not errors
    row: dict[str, Any] = {
        "key": sample.key, "source_key": sample.source_key, "uid": sample.meta.get("uid"),
        "url": sample.meta.get("url"), "org_caption": org, "status": "ok" if ok else "error",
        "error": next(iter(errors.values()), None), "notes": "; ".join(sample.notes) or None,
        "width": width, "height": height, "sha256": sample.meta.get("sha256"), "org_length": _words(org),
        "fingerprint": fingerprint, "shard": shard,
    }
    for name, c in columns.items():
        good = name not in errors
        text = " ".join((c.text or "").split()) if good else None
        flags = [flag for flag in c.quality.split(",") if flag] if good else []
        if sample.org_caption_truncated:
            flags.append("truncated")
        fields = column_fields(name)
        row.update({fields["text"]: text, fields["finish_reason"]: c.finish_reason if good else None,
                    fields["num_tokens"]: c.num_tokens if good else 0,
                    fields["quality"]: ",".join(flags) if good else (",".join(flags) or None),
                    fields["length"]: _words(text)})
    if others is not None:
        row[CAPTION_ERRORS] = errors or None
    return row


def make_ledger(rows: list[dict], *, input: str, fingerprint: str, caption_config: dict, samples_in: int,
                started_at: float, finished_at: float, worker: str, duplicates: int = 0,
                columns: tuple[str, ...] = ("re_caption",), **extra) -> RecaptionLedger:
    """A shard's ledger before `Attempt.commit` adds shard, attempt_id, generation and files:
    what went in, counts over the rows (tokens of every caption column; with several, each column's captions
    and errors), timing, and any `extra` facts of the caller."""
    status = Counter(row["status"] for row in rows)
    counted = [column_fields(c)["num_tokens"] for c in columns]
    tokens = sum(row[field] or 0 for row in rows for field in counted)
    if len(columns) > 1:
        failed = Counter(c for row in rows for c in failed_columns(row, columns))
        extra["columns"] = {c: {"ok": len(rows) - failed[c], "error": failed[c]} for c in columns}
    seconds = max(finished_at - started_at, 1e-9)
    return cast(RecaptionLedger, {
        "input": input, "fingerprint": fingerprint, "caption_config": caption_config,
        "samples_in": samples_in, "duplicates": duplicates,
        "rows_out": len(rows), "ok": status["ok"], "error": status["error"],
        "errors_by_reason": dict(Counter(row["error"].split(":", 1)[0] for row in rows if row["status"] == "error")),
        "quality": dict(Counter(flag for row in rows if row["quality"] for flag in row["quality"].split(","))),
        "tokens": tokens, "started_at": started_at, "finished_at": finished_at, "seconds": seconds,
        "images_per_s": len(rows) / seconds, "tokens_per_s": tokens / seconds, "worker": worker, **extra,
    })


def write_parquet(rows: list[dict], local_file: str, schema: pa.Schema = ROW_SCHEMA) -> int:
    """Write rows (`schema` dicts) to a local Parquet file; returns its size (`Attempt.put` uploads it)."""
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), local_file, compression="zstd")
    return os.path.getsize(local_file)


class WdsWriter:
    """An output tar written sample by sample to a local file: `{key}.{ext}` (the image as read),
    `{key}.txt` (web caption), `{key}.re_caption.txt`, `{key}.{column}.txt` for each other caption column, and
    `{key}.json` (metadata, sorted keys)."""

    def __init__(self, local_file: str):
        from webdataset import TarWriter  # here, not at the top: webdataset imports torch, which drivers never need

        self.local_file, self.samples = local_file, 0
        self.tar = TarWriter(local_file, encoder=False, mode=0o644, mtime=int(time.time()))

    def add(self, key: str, ext: str, image: bytes, org: str, re: str, meta: dict,
            others: dict[str, str] | None = None) -> None:
        members = {f"{column}.txt": text.encode() for column, text in (others or {}).items()}
        self.tar.write({"__key__": key, ext: image, "txt": org.encode(), "re_caption.txt": re.encode(), **members,
                        "json": json.dumps(meta, sort_keys=True).encode()})
        self.samples += 1

    def close(self) -> int:
        """Finish the tar; returns its size."""
        self.tar.close()
        return os.path.getsize(self.local_file)

    def __enter__(self) -> WdsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.tar.close()


@dataclass
class WdsSample:
    """One training sample: the original image bytes and both captions."""
    key: str
    image_ext: str
    image: bytes
    org_caption: str
    re_caption: str
    meta: dict = field(default_factory=dict)


def write_wds(samples: list[WdsSample], local_file: str) -> int:
    """Write whole samples to a local output tar (WdsWriter's format); returns its size."""
    with WdsWriter(local_file) as writer:
        for s in samples:
            writer.add(s.key, s.image_ext, s.image, s.org_caption, s.re_caption, s.meta)
    return os.path.getsize(local_file)


# --- the read side ---------------------------------------------------------------------------

@dataclass
class FinishedRun:
    """The committed shards of one output version, and the shards left out with the reason.

    Ledgers are the latest generation of each shard, sorted by shard, kept without their
    caption_config (the version's is kept once).
    """
    output: Output
    caption_config: dict
    ledgers: list[RecaptionLedger]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    run: dict | None = None

    def __post_init__(self) -> None:
        self.by_shard = {ledger["shard"]: ledger for ledger in self.ledgers}
        self.store = self.output.store

    @property
    def out(self) -> str:
        return self.output.out

    @property
    def fingerprint(self) -> str:
        return self.output.fingerprint

    def total(self, key: str) -> int:
        """Sum of a count field over the done shards' ledgers."""
        return sum(int(facts.get(key) or 0) for facts in map(_facts, self.ledgers))

    def summed(self, key: str) -> Counter:
        """Sum of a {name: count} field over the done shards' ledgers."""
        counts: Counter = Counter()
        for facts in map(_facts, self.ledgers):
            counts.update(facts.get(key) or {})
        return counts

    def errors_by_reason(self) -> Counter:
        return self.summed("errors_by_reason")

    def quality_flags(self) -> Counter:
        return self.summed("quality")

    def parquet(self, shard: str) -> str:
        return self.store.files(self.by_shard[shard])[PARQUET_DIR]

    def wds(self, shard: str) -> str:
        return self.store.files(self.by_shard[shard])[WDS_DIR]


def _facts(ledger: RecaptionLedger) -> dict[str, Any]:
    """A ledger's fields by a name known only at run time."""
    return dict(ledger)


def committed(output: Output, listing: StoreListing | None = None
              ) -> tuple[list[RecaptionLedger], list[tuple[str, str]]]:
    """The latest ledgers of the version's shards whose files are all there with their recorded bytes, and
    (shard, reason) for the shards left out. Requests: the listings, then one read per committed shard."""
    store = output.store
    listing = listing if listing is not None else store.listing()
    done = listing.done()
    ledgers = store.read_ledgers(done)
    skipped = [(shard, "no ledger (shard not finished)") for shard in sorted(listing.data.keys() - done.keys())]
    found: list[RecaptionLedger] = []
    for shard in sorted(done):
        ledger = ledgers[shard]
        if ledger is None:
            skipped.append((shard, f"ledger {store.ledger_path(shard, done[shard])} does not parse"))
        elif done[shard] in listing.broken.get(shard, set()):
            skipped.append((shard, f"generation {done[shard]} is marked broken; a rerun captions it again"))
        elif ledger.get("fingerprint") != output.fingerprint:
            skipped.append((shard, f"ledger fingerprint {ledger.get('fingerprint')} is not the run's "
                                   f"{output.fingerprint}"))
        elif problems := store.check(ledger, listing):
            skipped.append((shard, f"its ledger names files that are not as committed: {'; '.join(problems)} "
                                   "(a rerun captions it again)"))
        else:
            found.append(cast(RecaptionLedger, ledger))
    return found, sorted(skipped)


def load_finished(out: str, fingerprint: str | None = None) -> FinishedRun:
    """The committed shards of OUT's current version (or of `fingerprint`'s), resolved through ledgers."""
    output = Output.open(out, fingerprint)
    ledgers, skipped = committed(output)
    configs = [ledger.pop("caption_config", None) for ledger in ledgers]
    config = output.caption_config or next((c for c in configs if c), {})
    summary = _read_json(output.run_path)
    if summary and summary.get("fingerprint") != output.fingerprint:
        summary = None  # the summary of a run before this version's
    return FinishedRun(output, config, ledgers, skipped, summary)


def _read_json(path: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        return None


def find_output(folder: str) -> tuple[str, str | None] | None:
    """(OUT, fingerprint or None for the current version) when `folder` is an output or one of its versions'
    folders (OUT/versions/FP), else None."""
    folder = folder.rstrip("/") or folder
    if storage.exists(storage.join(folder, JOB_FILE)):
        return folder, None
    versions = storage.parent(folder)
    if storage.basename(versions) == VERSIONS_DIR and storage.exists(storage.join(storage.parent(versions), JOB_FILE)):
        return storage.parent(versions), storage.basename(folder)
    return None


def committed_files(spec: str, kind: str = WDS_DIR) -> list[str] | None:
    """The committed files of `kind` when `spec` names an output (OUT, OUT/versions/FP) or one of its kind
    folders (OUT/wds, OUT/parquet); None when `spec` is not inside an output. A glob or brace range inside an
    output is refused: listing there shows in-flight, losing and superseded attempts beside committed ones."""
    pattern = spec.rstrip("/")
    folder, name = storage.parent(pattern), storage.basename(pattern)
    if storage.has_glob(pattern) or "{" in pattern:
        inside = find_output(folder) or find_output(storage.parent(folder))
        if inside is not None:
            where = inside[0] if inside[1] is None else storage.join(inside[0], VERSIONS_DIR, inside[1])
            raise ValueError(f"{spec} lists files inside the recaption output {inside[0]}, where files of attempts "
                             f"that did not commit can sit beside the committed ones; pass the output itself "
                             f"({where}): its committed files are read through its ledgers")
        return None
    if name in RECAPTION_KINDS and (inside := find_output(folder)) is not None:
        kind = name
    elif (inside := find_output(pattern)) is None:
        return None
    run = load_finished(*inside)
    return [files[kind] for shard in sorted(run.by_shard)
            if kind in (files := run.store.files(run.by_shard[shard]))]


def wds_shards(spec: str) -> list[str]:
    """The WebDataset shards `spec` names: a recaption output (its current version's committed `wds/` files,
    through the ledgers), or anything `storage.expand_inputs` takes outside an output."""
    found = committed_files(spec, WDS_DIR)
    return found if found is not None else storage.expand_inputs(spec)


def open_parquet(path: str) -> pq.ParquetFile:
    """A ParquetFile for a local path, or for an object fetched whole (one shard fits in memory; pyarrow needs
    a seekable file, which a streamed S3 body is not)."""
    if storage.is_remote(path):
        return pq.ParquetFile(pa.BufferReader(storage.read_bytes(path)))
    return pq.ParquetFile(path)


def read_rows(path: str) -> list[dict]:
    """Every row of one shard's Parquet file, local or remote."""
    try:
        return open_parquet(path).read().to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: cannot read Parquet ({e})") from e


def iter_batches(path: str, columns: list[str], batch_rows: int = 8192) -> Iterator[pa.RecordBatch]:
    """Record batches of `columns` from one shard's Parquet; errors name the file."""
    try:
        yield from open_parquet(path).iter_batches(batch_size=batch_rows, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: cannot read Parquet ({e})") from e
