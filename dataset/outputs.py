"""The recaption output contract: versions, layout, rows, attempts, the commit protocol, and reading.

Layout of an output OUT (a local folder or s3://bucket/prefix):

    _job.json                             {"current": FP, "versions": {FP: {"root", "caption_config", "created_at"}}}
    BASE = OUT for the first fingerprint, OUT/versions/{FP} for each later one (--new-version):
    BASE/parquet/{shard}.{attempt}.parquet  one row per input sample (ROW_SCHEMA)
    BASE/wds/{shard}.{attempt}.tar          the samples that decoded, with both captions (for training)
    BASE/_ledger/{shard}.json               generation 0 of the shard: THE commit point
    BASE/_ledger/{shard}~{n}.json           generation n >= 1 (--retry-errors); the highest is the shard's state
    BASE/_claims/{shard}.json               fenced claims (dataset/claims.py)
    BASE/_run.json                          the last run's summary
    BASE/{stage}/...                        extra column groups (e.g. clip_scores/) with the same shape

The protocol (`ShardStore`, `Attempt`): an attempt writes its files under names no other attempt
uses (`attempt` is 12 random characters), then commits by creating the shard's ledger exclusively;
the ledger names the files (relative paths, bytes, rows). Exactly one attempt per generation wins;
a loser deletes only its own files. Ledgers are never overwritten and data files a ledger names are
never overwritten, so a reader that resolves files through the latest ledger sees one complete set.
A listing of the data folders can show in-flight attempts while a job runs; `sweep` at the end of a
run and `clean_leftovers` when a shard is taken remove what no latest ledger names.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import string
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from dataset import claims, storage

if TYPE_CHECKING:
    from dataset.reader import InputSample

JOB_FILE, RUN_FILE = "_job.json", "_run.json"
VERSIONS_DIR, LEDGER_DIR = "versions", "_ledger"
PARQUET_DIR, WDS_DIR = "parquet", "wds"
RECAPTION_KINDS = {PARQUET_DIR: "parquet", WDS_DIR: "tar"}   # kind (= folder) -> file extension
ATTEMPT_ID = re.compile(r"[0-9a-z]{12}")
LEDGER_READ_THREADS = 16   # ledgers are tiny; on S3 the latency of one GET each dominates
REGISTER_TRIES = 20        # compare-and-swap rounds on _job.json before giving up

log = logging.getLogger(__name__)

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


class FingerprintMismatch(ValueError):
    """The output holds another fingerprint's captions and the run did not ask for a new version."""


def check_shard_name(shard: str) -> None:
    """Shard names become file names: no '/', no '~' (ledger generations), not hidden, not empty."""
    if not shard or "/" in shard or "~" in shard or shard.startswith(".") or shard != shard.strip():
        raise ValueError(f"{shard!r} cannot name a shard's outputs: use names without '/', '~', "
                         "leading dots or surrounding spaces")


def _dump(record: dict) -> bytes:
    return json.dumps(record, indent=1, sort_keys=True).encode()


def _words(text: str | None) -> int:
    return len(text.split()) if text else 0


# --- versions --------------------------------------------------------------------------------

def _parse_job(path: str, data: bytes) -> dict:
    try:
        job = json.loads(data)
        job["versions"][job["current"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a recaption job record ({e}); move it away or use another output") from e
    return job


@dataclass(frozen=True)
class Output:
    """One version of a recaption output: the fingerprint of its captions and the folder they live in."""
    out: str
    fingerprint: str
    base: str
    caption_config: dict = field(default_factory=dict, compare=False)

    @classmethod
    def _version(cls, out: str, fingerprint: str, version: dict) -> Output:
        base = storage.join(out, version["root"]) if version["root"] else out
        return cls(out, fingerprint, base, version.get("caption_config") or {})

    @classmethod
    def open(cls, out: str, fingerprint: str | None = None) -> Output:
        """The output's current version, or the one with `fingerprint`."""
        path = storage.join(out, JOB_FILE)
        current = storage.read_versioned(path)
        if current is None:
            raise FileNotFoundError(f"{out}: no {JOB_FILE}, so no recaption job has written here")
        job = _parse_job(path, current.data)
        fingerprint = fingerprint or job["current"]
        if fingerprint not in job["versions"]:
            raise ValueError(f"{out} has no version {fingerprint}; it has {', '.join(sorted(job['versions']))}")
        return cls._version(out, fingerprint, job["versions"][fingerprint])

    @classmethod
    def register(cls, out: str, fingerprint: str, caption_config: dict, new_version: bool) -> Output:
        """The version a run with `fingerprint` writes to, recorded in OUT/_job.json.

        The first run creates the record (its version's root is OUT itself); a run with the current
        fingerprint gets that version; another fingerprint raises FingerprintMismatch unless
        `new_version`, which adds OUT/versions/{FP} (or returns to an earlier version of that
        fingerprint) and makes it current. Earlier versions stay as they are, readable through
        `Output.open(out, fingerprint)`.
        """
        path = storage.join(out, JOB_FILE)
        for _ in range(REGISTER_TRIES):
            current = storage.read_versioned(path)
            if current is None:
                version = {"root": "", "caption_config": caption_config, "created_at": time.time()}
                if storage.put_if_absent(path, _dump({"current": fingerprint, "versions": {fingerprint: version}})):
                    return cls._version(out, fingerprint, version)
                continue
            job = _parse_job(path, current.data)
            if job["current"] == fingerprint:
                return cls._version(out, fingerprint, job["versions"][fingerprint])
            if not new_version:
                raise FingerprintMismatch(_mismatch(out, job, fingerprint))
            version = job["versions"].get(fingerprint) or {
                "root": f"{VERSIONS_DIR}/{fingerprint}", "caption_config": caption_config, "created_at": time.time()}
            updated = {"current": fingerprint, "versions": {**job["versions"], fingerprint: version}}
            if storage.put_if_match(path, _dump(updated), current.etag) is not None:
                return cls._version(out, fingerprint, version)
        raise OSError(f"{path}: still changing after {REGISTER_TRIES} tries; are many jobs starting on {out}?")

    @property
    def store(self) -> ShardStore:
        """The recaption stage: Parquet and WDS files per shard."""
        return ShardStore(self.base, RECAPTION_KINDS)

    def stage(self, name: str) -> ShardStore:
        """An extra column group with its own per-shard Parquet files and ledgers, e.g. 'clip_scores'."""
        return ShardStore(storage.join(self.base, name), {PARQUET_DIR: "parquet"})

    @property
    def run_path(self) -> str:
        return storage.join(self.base, RUN_FILE)


def _mismatch(out: str, job: dict, fingerprint: str) -> str:
    current = job["current"]
    model = job["versions"][current].get("caption_config", {}).get("model")
    if fingerprint in job["versions"]:
        return (f"{out} holds captions with fingerprint {current} (model {model}); this run's fingerprint "
                f"{fingerprint} is an earlier version of it. Use --new-version to make it current again.")
    return (f"{out} holds captions with fingerprint {current} (model {model}); this run's is {fingerprint}. "
            f"Use another --output, or --new-version to caption into {out}/{VERSIONS_DIR}/{fingerprint} "
            "and keep the current version readable.")


# --- the commit protocol ---------------------------------------------------------------------

def _ledger_name(shard: str, generation: int) -> str:
    return f"{shard}.json" if generation == 0 else f"{shard}~{generation}.json"


def _parse_ledger_name(name: str) -> tuple[str, int] | None:
    """(shard, generation) of a ledger file name, None for anything else."""
    if not name.endswith(".json"):
        return None
    stem = name[: -len(".json")]
    shard, tilde, generation = stem.rpartition("~")
    if not tilde:
        return stem, 0
    return (shard, int(generation)) if generation.isdigit() and int(generation) > 0 and shard else None


def _parse_data_name(name: str, ext: str) -> tuple[str, str] | None:
    """(shard, attempt id) of a data file name `{shard}.{attempt}.{ext}`, None for anything else."""
    if not name.endswith(f".{ext}"):
        return None
    shard, _, attempt_id = name[: -len(ext) - 1].rpartition(".")
    return (shard, attempt_id) if shard and ATTEMPT_ID.fullmatch(attempt_id) else None


def new_attempt_id() -> str:
    return "".join(secrets.choice(string.digits + string.ascii_lowercase) for _ in range(12))


class ShardStore:
    """Per-shard files of one stage under `base`, committed through ledgers (see the module docstring).

    `kinds` maps each kind of file an attempt writes to its extension; the kind is also its folder.
    """

    def __init__(self, base: str, kinds: dict[str, str]):
        self.base, self.kinds = base, dict(kinds)

    def __repr__(self) -> str:
        return f"ShardStore({self.base!r}, {self.kinds!r})"

    def ledger_path(self, shard: str, generation: int = 0) -> str:
        check_shard_name(shard)
        return storage.join(self.base, LEDGER_DIR, _ledger_name(shard, generation))

    def new_attempt(self, shard: str) -> Attempt:
        return Attempt(self, shard)

    def done(self) -> dict[str, int]:
        """Shard -> latest generation of every committed shard, from one listing of the ledgers (no reads)."""
        latest: dict[str, int] = {}
        for path in storage.list_files(storage.join(self.base, LEDGER_DIR), ".json"):
            parsed = _parse_ledger_name(storage.basename(path))
            if parsed:
                shard, generation = parsed
                latest[shard] = max(latest.get(shard, 0), generation)
        return latest

    def _read(self, shard: str, generation: int) -> tuple[bool, dict | None]:
        """(exists, ledger); a ledger that does not parse is (True, None), with a warning."""
        path = self.ledger_path(shard, generation)
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            return False, None
        try:
            ledger = json.loads(data)
            if isinstance(ledger, dict) and isinstance(ledger.get("files"), dict):
                return True, ledger
        except ValueError:
            pass
        log.warning("%s: ledger does not parse, treated as absent: %r", path, data[:200])
        return True, None

    def _latest(self, shard: str) -> tuple[bool, dict | None]:
        """(any ledger exists, the latest that parses), reading generations in order until one is absent."""
        found, latest, generation = False, None, 0
        while True:
            exists, ledger = self._read(shard, generation)
            if not exists:
                return found, latest
            found, latest, generation = True, ledger or latest, generation + 1

    def read_ledger(self, shard: str, generation: int | None = None) -> dict | None:
        """The shard's ledger of `generation`, by default the latest that parses; None if there is none."""
        return self._latest(shard)[1] if generation is None else self._read(shard, generation)[1]

    def files(self, ledger: dict) -> dict[str, str]:
        """Kind -> full path of each file the ledger commits."""
        return {kind: storage.join(self.base, entry["path"]) for kind, entry in ledger["files"].items()}

    def _named(self, shard: str) -> set[str] | None:
        """Relative paths the shard's latest ledger names; None when ledgers exist but none parses
        (then nothing of the shard is deleted)."""
        found, ledger = self._latest(shard)
        if found and ledger is None:
            log.warning("%s: no ledger of shard %s parses; its files are left alone", self.base, shard)
            return None
        return {entry["path"] for entry in ledger["files"].values()} if ledger else set()

    def data_files(self, shard: str | None = None) -> dict[str, list[str]]:
        """Shard -> relative paths of its data files, from one listing per kind (narrowed to `shard`)."""
        found: dict[str, list[str]] = defaultdict(list)
        for kind, ext in self.kinds.items():
            prefix = f"{shard}." if shard is not None else ""
            for path in storage.list_files(storage.join(self.base, kind), f".{ext}", name_prefix=prefix):
                parsed = _parse_data_name(storage.basename(path), ext)
                if parsed and (shard is None or parsed[0] == shard):
                    found[parsed[0]].append(f"{kind}/{storage.basename(path)}")
        return found

    def _delete(self, rel_paths: list[str]) -> list[str]:
        paths = [storage.join(self.base, rel) for rel in rel_paths]
        for path in paths:
            storage.delete(path)
        return paths

    def clean_leftovers(self, shard: str) -> list[str]:
        """Delete the shard's data files that its latest ledger does not name; returns their paths.

        For the holder of the shard's claim (dead attempts cannot commit any more): one listing per
        kind, narrowed to the shard on S3 (a local folder is scanned), and one ledger read.
        """
        files = self.data_files(shard).get(shard, [])
        named = self._named(shard) if files else None
        return self._delete([rel for rel in files if rel not in named]) if named is not None else []

    def sweep(self, skip: set[str]) -> list[str]:
        """`clean_leftovers` for every shard not in `skip` whose claim nobody holds; returns the deleted paths.

        From listings: the ledgers and each kind's folder. A committed shard with one file per kind
        holds only its committed files (committed files are never deleted while a latest ledger names
        them), so ledgers and claims are read only for shards with more files than that.
        """
        done = self.done()
        deleted = []
        for shard, files in sorted(self.data_files().items()):
            if shard in skip or (shard in done and len(files) <= len(self.kinds)
                                 and len({rel.split("/", 1)[0] for rel in files}) == len(files)):
                continue
            named = self._named(shard) if shard in done else set()
            leftovers = [rel for rel in files if rel not in named] if named is not None else []
            if leftovers and not self._claimed(shard):
                deleted += self._delete(leftovers)
        return deleted

    def _claimed(self, shard: str) -> bool:
        """True while a live claim on the shard exists (its holder may still commit what it wrote)."""
        path = claims.claim_path(self.base, shard)
        version = storage.read_versioned(path)
        return version is not None and not claims.is_stale(claims.parse_claim(path, version), version.age, 0.0)


class Attempt:
    """One try at one shard: files under names no other attempt uses, then an exclusive commit."""

    def __init__(self, store: ShardStore, shard: str):
        check_shard_name(shard)
        self.store, self.shard, self.attempt_id = store, shard, new_attempt_id()
        self.written: dict[str, dict] = {}

    def path(self, kind: str) -> str:
        """Where this attempt writes `kind`."""
        if kind not in self.store.kinds:
            raise ValueError(f"{kind!r} is not a kind of {self.store}")
        return storage.join(self.store.base, kind, f"{self.shard}.{self.attempt_id}.{self.store.kinds[kind]}")

    def put(self, kind: str, local_file: str, rows: int | None = None) -> dict:
        """Move a finished local file into place; returns its ledger entry {"path" (relative), "bytes", "rows"}."""
        path = self.path(kind)
        entry = {"path": f"{kind}/{storage.basename(path)}", "bytes": os.path.getsize(local_file), "rows": rows}
        self.written[kind] = entry  # before the upload: abandon() also removes a half-done one
        storage.put_file(local_file, path)
        return entry

    def commit(self, ledger: dict, generation: int = 0, claim_token: str | None = None) -> bool:
        """Commit the files put so far by creating the shard's ledger of `generation` exclusively.

        With `claim_token` (the driver's claim on the shard), the claim is checked right before the create:
        a claim taken over (a paused or partitioned writer) loses as well. `shard`, `attempt_id`,
        `generation` and `files` are added to `ledger` (in place). False: another attempt committed this
        generation first, or the claim is no longer ours; this attempt's files are deleted. An OSError means
        the storage could not say; then the files stay (the ledger may name them) until `sweep` decides.
        """
        ledger.update(shard=self.shard, attempt_id=self.attempt_id, generation=generation, files=dict(self.written))
        fenced = claim_token is None or claims.holds(self.store.base, self.shard, claim_token)
        if fenced and storage.put_if_absent(self.store.ledger_path(self.shard, generation), _dump(ledger)):
            return True
        self.abandon()
        return False

    def abandon(self) -> None:
        """Delete this attempt's own files (never another attempt's)."""
        for kind in list(self.written):
            storage.delete(self.path(kind))
            del self.written[kind]


# --- rows and files --------------------------------------------------------------------------

def build_row(sample: InputSample, *, shard: str, fingerprint: str, error: str | None = None,
              caption: str | None = None, finish_reason: str | None = None, num_tokens: int = 0,
              quality: str = "", width: int | None = None, height: int | None = None) -> dict:
    """One ROW_SCHEMA row: an 'ok' row with its caption, or an 'error' row with `error` ('reason: detail').

    Captions are stored with whitespace runs collapsed; lengths are in words. The sample's own facts
    (`source_key`, `notes`, a web caption cut at its cap: quality flag 'truncated') go in on every row.
    """
    if error is None and caption is None:
        raise ValueError(f"{shard}/{sample.key}: a row needs a caption or an error")
    org = " ".join((sample.org_caption or "").split())
    ok = error is None
    text = " ".join(caption.split()) if ok else None
    flags = [flag for flag in quality.split(",") if flag] if ok else []
    if sample.org_caption_truncated:
        flags.append("truncated")
    return {
        "key": sample.key, "source_key": sample.source_key, "uid": sample.meta.get("uid"),
        "url": sample.meta.get("url"), "org_caption": org, "re_caption": text, "status": "ok" if ok else "error",
        "error": error, "finish_reason": finish_reason if ok else None, "num_tokens": num_tokens if ok else 0,
        "quality": ",".join(flags) if ok else (",".join(flags) or None), "notes": "; ".join(sample.notes) or None,
        "width": width, "height": height, "sha256": sample.meta.get("sha256"),
        "org_length": _words(org), "re_length": _words(text), "fingerprint": fingerprint, "shard": shard,
    }


def make_ledger(rows: list[dict], *, input: str, fingerprint: str, caption_config: dict, samples_in: int,
                started_at: float, finished_at: float, worker: str, duplicates: int = 0, **extra) -> dict:
    """A shard's ledger before `Attempt.commit` adds shard, attempt_id, generation and files:
    what went in, counts over the rows, timing, and any `extra` facts of the caller."""
    status = Counter(row["status"] for row in rows)
    tokens = sum(row["num_tokens"] or 0 for row in rows)
    seconds = max(finished_at - started_at, 1e-9)
    return {
        "input": input, "fingerprint": fingerprint, "caption_config": caption_config,
        "samples_in": samples_in, "duplicates": duplicates,
        "rows_out": len(rows), "ok": status["ok"], "error": status["error"],
        "errors_by_reason": dict(Counter(row["error"].split(":", 1)[0] for row in rows if row["status"] == "error")),
        "quality": dict(Counter(flag for row in rows if row["quality"] for flag in row["quality"].split(","))),
        "tokens": tokens, "started_at": started_at, "finished_at": finished_at, "seconds": seconds,
        "images_per_s": len(rows) / seconds, "tokens_per_s": tokens / seconds, "worker": worker, **extra,
    }


def write_parquet(rows: list[dict], local_file: str) -> int:
    """Write rows (ROW_SCHEMA dicts) to a local Parquet file; returns its size (`Attempt.put` uploads it)."""
    pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), local_file, compression="zstd")
    return os.path.getsize(local_file)


class WdsWriter:
    """An output tar written sample by sample to a local file: `{key}.{ext}` (the image as read),
    `{key}.txt` (web caption), `{key}.re_caption.txt` and `{key}.json` (metadata, sorted keys)."""

    def __init__(self, local_file: str):
        from webdataset import TarWriter  # here, not at the top: webdataset imports torch, which drivers never need

        self.local_file, self.samples = local_file, 0
        self.tar = TarWriter(local_file, encoder=False, mode=0o644, mtime=int(time.time()))

    def add(self, key: str, ext: str, image: bytes, org: str, re: str, meta: dict) -> None:
        self.tar.write({"__key__": key, ext: image, "txt": org.encode(), "re_caption.txt": re.encode(),
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
    ledgers: list[dict]
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
        return sum(ledger.get(key) or 0 for ledger in self.ledgers)

    def summed(self, key: str) -> Counter:
        """Sum of a {name: count} field over the done shards' ledgers."""
        counts: Counter = Counter()
        for ledger in self.ledgers:
            counts.update(ledger.get(key) or {})
        return counts

    def errors_by_reason(self) -> Counter:
        return self.summed("errors_by_reason")

    def quality_flags(self) -> Counter:
        return self.summed("quality")

    def parquet(self, shard: str) -> str:
        return self.store.files(self.by_shard[shard])[PARQUET_DIR]

    def wds(self, shard: str) -> str:
        return self.store.files(self.by_shard[shard])[WDS_DIR]


def load_finished(out: str, fingerprint: str | None = None) -> FinishedRun:
    """The committed shards of OUT's current version (or of `fingerprint`'s), resolved through ledgers.

    Requests: the ledger listing, the Parquet listing, and one read per committed shard (threaded).
    """
    output = Output.open(out, fingerprint)
    store = output.store
    done = store.done()
    data_files = store.data_files()
    shards = sorted(done)
    with ThreadPoolExecutor(LEDGER_READ_THREADS) as pool:
        ledgers = list(pool.map(lambda shard: store.read_ledger(shard, done[shard]), shards))
    skipped = [(shard, "no ledger (shard not finished)") for shard in sorted(data_files.keys() - done.keys())]
    committed = []
    for shard, ledger in zip(shards, ledgers):
        if ledger is None:
            skipped.append((shard, f"ledger {store.ledger_path(shard, done[shard])} does not parse"))
        elif ledger.get("fingerprint") != output.fingerprint:
            skipped.append((shard, f"ledger fingerprint {ledger.get('fingerprint')} is not the run's "
                                   f"{output.fingerprint}"))
        elif missing := [e["path"] for e in ledger["files"].values() if e["path"] not in data_files.get(shard, [])]:
            skipped.append((shard, f"its ledger names {', '.join(missing)}, which is missing"))
        else:
            committed.append(ledger)
    configs = [ledger.pop("caption_config", None) for ledger in committed]  # one per run is enough in memory
    config = output.caption_config or next((c for c in configs if c), None) or {}
    summary = _read_json(output.run_path)
    if summary and summary.get("fingerprint") != output.fingerprint:
        summary = None  # the summary of a run before this version's
    return FinishedRun(output, config, committed, sorted(skipped), summary)


def _read_json(path: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        return None


def wds_shards(spec: str) -> list[str]:
    """The WebDataset shards `spec` names: a recaption output folder OUT (the committed `wds/` files of its
    current version, found through the ledgers), or anything `storage.expand_inputs` takes."""
    if not any(c in spec for c in "*?[{") and storage.exists(storage.join(spec, JOB_FILE)):
        run = load_finished(spec)
        return [path for shard in sorted(run.by_shard)
                if (path := run.store.files(run.by_shard[shard]).get(WDS_DIR)) is not None]
    return storage.expand_inputs(spec)


def open_parquet(path: str) -> pq.ParquetFile:
    """A ParquetFile for a local path, or for an object fetched whole (one shard fits in memory)."""
    if storage.is_remote(path):
        return pq.ParquetFile(pa.BufferReader(storage.read_bytes(path)))
    return pq.ParquetFile(path)


def iter_batches(path: str, columns: list[str], batch_rows: int = 8192) -> Iterator[pa.RecordBatch]:
    """Record batches of `columns` from one shard's Parquet; errors name the file."""
    try:
        yield from open_parquet(path).iter_batches(batch_size=batch_rows, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: cannot read Parquet ({e})") from e
