"""The commit protocol every stage uses: attempts, fences, ledgers, generations, cleanup, health, reading.

PROTOCOL.md (repository root) is the specification, rule by rule; this module implements it for one
stage's files under a base folder (`ShardStore`). Layout under the base:

    {kind}/{shard}~{gen}.{attempt}.{ext}   an attempt's data file (kind = folder, e.g. parquet/, wds/)
    _ledger/{shard}.json                   generation 0 of the shard: THE commit point (created exclusively)
    _ledger/{shard}~{n}.json               generation n >= 1 (a retry of error rows, a repair)
    _ledger/{shard}~{n}.broken             generation n named files that are gone or wrong (pipelines/verify)
    _claims/{shard}.json                   the shard's claim and attempt fences (dataset/claims.py)

In short: an attempt is registered in the shard's claim before it writes (rule A1), writes files under
names no other attempt uses (A2), moves itself to `committing` in the claim (A3) and then creates the
ledger of its generation exclusively (A4). Ledgers are never overwritten or deleted, and the highest
generation is the shard's state. Cleanup deletes an attempt's files only when the claim, read after the
files were listed, shows the attempt can no longer commit and a fresh read of its generation's ledger shows
it does not name them (C1-C3). A shard whose latest ledger names a file that is gone is planned again as the
next generation (H1), so a lost race costs rework, never rows. Readers reach data files only through
ledgers (R1).
"""
from __future__ import annotations

import json
import logging
import os
import random
import string
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, TypedDict

from dataset import claims, storage

LEDGER_DIR = "_ledger"
LEDGER_EXT, BROKEN_EXT = ".json", ".broken"
ATTEMPT_CHARS = string.digits + string.ascii_lowercase
ATTEMPT_LENGTH = 12
LEDGER_READ_THREADS = 16   # ledgers are tiny; on S3 the latency of one GET each dominates
# Superseded generations, and files no rule can place (an older layout), are removed only this long after
# the ledger that replaced them: a reader that resolved the older generation has that long to finish.
CLEANUP_GRACE_S = 3600.0

log = logging.getLogger(__name__)

CommitResult = Literal["committed", "lost", "fenced"]
Health = Literal["ok", "broken", "unsure"]


class FileEntry(TypedDict):
    """One file a ledger commits."""
    path: str          # relative to the stage's base: "{kind}/{name}"
    bytes: int
    rows: int | None


class Ledger(TypedDict, total=False):
    """A shard's commit. The protocol's fields are written by `Attempt.commit`; stages add their facts
    (counts, timings, their config) under other names."""
    shard: str
    attempt_id: str
    generation: int
    files: dict[str, FileEntry]   # kind -> file
    fingerprint: str


def check_shard_name(shard: str) -> None:
    """Shard names become file names: no '/', no '~' (generations), not hidden, not empty."""
    if not shard or "/" in shard or "~" in shard or shard.startswith(".") or shard != shard.strip():
        raise ValueError(f"{shard!r} cannot name a shard's outputs: use names without '/', '~', "
                         "leading dots or surrounding spaces")


_ids = random.SystemRandom()   # the protocol simulation swaps in a seeded generator, to replay a schedule exactly


def new_attempt_id() -> str:
    return "".join(_ids.choice(ATTEMPT_CHARS) for _ in range(ATTEMPT_LENGTH))


def is_attempt_id(text: str) -> bool:
    return len(text) == ATTEMPT_LENGTH and all(c in ATTEMPT_CHARS for c in text)


def dump(record: Mapping) -> bytes:
    return json.dumps(record, indent=1, sort_keys=True).encode()


# --- names -------------------------------------------------------------------------------------

def ledger_name(shard: str, generation: int, ext: str = LEDGER_EXT) -> str:
    return f"{shard}{ext}" if generation == 0 else f"{shard}~{generation}{ext}"


def parse_ledger_name(name: str, ext: str = LEDGER_EXT) -> tuple[str, int] | None:
    """(shard, generation) of a ledger (or marker) file name, None for anything else."""
    if not name.endswith(ext):
        return None
    shard, tilde, generation = name[: -len(ext)].rpartition("~")
    if not tilde:
        return name[: -len(ext)], 0
    return (shard, int(generation)) if generation.isdigit() and int(generation) > 0 and shard else None


def data_name(shard: str, generation: int, attempt_id: str, ext: str) -> str:
    return f"{shard}~{generation}.{attempt_id}.{ext}"


@dataclass(frozen=True)
class DataName:
    shard: str
    generation: int | None   # None: a file of the older layout `{shard}.{attempt}.{ext}`
    attempt_id: str


def parse_data_name(name: str, ext: str) -> DataName | None:
    """The parts of a data file name, None for anything else."""
    if not name.endswith(f".{ext}"):
        return None
    stem, _, attempt_id = name[: -len(ext) - 1].rpartition(".")
    if not stem or not is_attempt_id(attempt_id):
        return None
    shard, tilde, generation = stem.rpartition("~")
    if tilde and shard and generation.isdigit():
        return DataName(shard, int(generation), attempt_id)
    return DataName(stem, None, attempt_id) if "~" not in stem else None


# --- listings ------------------------------------------------------------------------------------

AttemptKey = tuple[int | None, str]   # (generation, attempt id)


@dataclass
class StoreListing:
    """One stage's files from listings alone: `_ledger/` first, then each kind's folder (rule H2: a ledger
    seen here was created before the data listing began, so every file it names shows unless deleted)."""
    ledgers: dict[str, dict[int, storage.Entry]] = field(default_factory=dict)   # shard -> generation -> entry
    broken: dict[str, set[int]] = field(default_factory=dict)                     # shard -> marked generations
    data: dict[str, dict[AttemptKey, dict[str, storage.Entry]]] = field(default_factory=dict)
    kinds: tuple[str, ...] = ()

    def latest(self, shard: str) -> int | None:
        generations = self.ledgers.get(shard)
        return max(generations) if generations else None

    def done(self) -> dict[str, int]:
        """Shard -> latest generation of every shard with a ledger."""
        return {shard: max(generations) for shard, generations in self.ledgers.items()}

    def health(self, shard: str) -> Health:
        """Of the shard's latest generation, from the listing: 'broken' (marked, or no data file of that
        generation exists at all), 'ok' (exactly one attempt's complete set), or 'unsure' (several attempts'
        files: a read of the ledger decides, `ShardStore.check`)."""
        latest = self.latest(shard)
        if latest is None:
            raise ValueError(f"shard {shard} has no ledger")
        if latest in self.broken.get(shard, set()):
            return "broken"
        candidates = [files for (generation, _), files in self.data.get(shard, {}).items()
                      if generation == latest or generation is None]
        if not candidates:
            return "broken"
        complete = [files for files in candidates if set(files) >= set(self.kinds)]
        return "ok" if len(candidates) == 1 and len(complete) == 1 else "unsure"


# --- the store -----------------------------------------------------------------------------------

class ShardStore:
    """Per-shard files of one stage under `base`, committed through ledgers (see PROTOCOL.md).

    `kinds` maps each kind of file an attempt writes to its extension; the kind is also its folder.
    """

    def __init__(self, base: str, kinds: Mapping[str, str]):
        self.base, self.kinds = base, dict(kinds)

    def __repr__(self) -> str:
        return f"ShardStore({self.base!r}, {self.kinds!r})"

    def ledger_path(self, shard: str, generation: int = 0, ext: str = LEDGER_EXT) -> str:
        check_shard_name(shard)
        return storage.join(self.base, LEDGER_DIR, ledger_name(shard, generation, ext))

    def attempt(self, shard: str, generation: int, attempt_id: str) -> Attempt:
        """The attempt `attempt_id` (registered in the shard's claim by its driver) at `generation`."""
        return Attempt(self, shard, generation, attempt_id)

    # ----- listings

    def list_ledgers(self) -> StoreListing:
        listing = StoreListing(kinds=tuple(self.kinds))
        for entry in storage.list_entries(storage.join(self.base, LEDGER_DIR)):
            name = storage.basename(entry.path)
            if parsed := parse_ledger_name(name):
                listing.ledgers.setdefault(parsed[0], {})[parsed[1]] = entry
            elif parsed := parse_ledger_name(name, BROKEN_EXT):
                listing.broken.setdefault(parsed[0], set()).add(parsed[1])
        return listing

    def list_data(self, listing: StoreListing, shard: str | None = None) -> StoreListing:
        """Add each kind's data files to `listing` (narrowed to one shard on S3 with `shard`)."""
        def one_kind(kind: str) -> list[tuple[str, DataName, storage.Entry]]:
            ext = self.kinds[kind]
            entries = storage.list_entries(storage.join(self.base, kind), f".{ext}",
                                           name_prefix=f"{shard}~" if shard is not None else "")
            if shard is not None:   # files of the older layout `{shard}.{attempt}.{ext}`
                entries += storage.list_entries(storage.join(self.base, kind), f".{ext}", name_prefix=f"{shard}.")
            return [(kind, parsed, entry) for entry in entries
                    if (parsed := parse_data_name(storage.basename(entry.path), ext))
                    and (shard is None or parsed.shard == shard)]

        for found in storage.parallel_map(self.base, one_kind, self.kinds, len(self.kinds)):
            for kind, parsed, entry in found:
                key = (parsed.generation, parsed.attempt_id)
                listing.data.setdefault(parsed.shard, {}).setdefault(key, {})[kind] = entry
        return listing

    def listing(self, shard: str | None = None) -> StoreListing:
        """Ledgers, then data files (H2's order)."""
        listing = self.list_ledgers()
        if shard is not None:
            listing.ledgers = {s: g for s, g in listing.ledgers.items() if s == shard}
            listing.broken = {s: g for s, g in listing.broken.items() if s == shard}
        return self.list_data(listing, shard)

    def done(self) -> dict[str, int]:
        """Shard -> latest generation of every committed shard, from one listing of the ledgers (no reads)."""
        return self.list_ledgers().done()

    # ----- ledgers

    def _read(self, shard: str, generation: int) -> tuple[bool, Ledger | None]:
        """(exists, ledger); a ledger that does not parse is (True, None), with a warning."""
        path = self.ledger_path(shard, generation)
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            return False, None
        try:
            ledger = json.loads(data)
            if isinstance(ledger, dict) and isinstance(ledger.get("files"), dict):
                return True, ledger  # type: ignore[return-value]
        except ValueError:
            pass
        log.warning("%s: ledger does not parse, treated as absent: %r", path, data[:200])
        return True, None

    def read_ledger(self, shard: str, generation: int | None = None) -> Ledger | None:
        """The shard's ledger of `generation`; by default the latest that parses. None if there is none."""
        if generation is not None:
            return self._read(shard, generation)[1]
        latest, generation = None, 0
        while True:
            exists, ledger = self._read(shard, generation)
            if not exists:
                return latest
            latest, generation = ledger or latest, generation + 1

    def read_ledgers(self, wanted: Mapping[str, int | None]) -> dict[str, Ledger | None]:
        """Shard -> its ledger of the given generation (None: the latest), read on threads."""
        shards = list(wanted)
        ledgers = storage.parallel_map(self.base, lambda shard: self.read_ledger(shard, wanted[shard]), shards,
                                       LEDGER_READ_THREADS)
        return dict(zip(shards, ledgers, strict=True))

    def files(self, ledger: Ledger) -> dict[str, str]:
        """Kind -> full path of each file the ledger commits."""
        return {kind: storage.join(self.base, entry["path"]) for kind, entry in ledger["files"].items()}

    def check(self, ledger: Ledger, listing: StoreListing) -> list[str]:
        """What is wrong with the files the ledger names, judged by the listing (exists, bytes); [] if nothing."""
        shard = ledger["shard"]
        present = {f"{kind}/{storage.basename(entry.path)}": entry
                   for files in listing.data.get(shard, {}).values() for kind, entry in files.items()}
        problems = []
        for named in ledger["files"].values():
            entry = present.get(named["path"])
            if entry is None:
                problems.append(f"{named['path']} is missing")
            elif entry.size != named["bytes"]:
                problems.append(f"{named['path']} has {entry.size:,} bytes, its ledger says {named['bytes']:,}")
        return problems

    def mark_broken(self, shard: str, generation: int, reason: str) -> bool:
        """Record that the shard's generation names files that are gone or wrong: planning then makes the next
        generation from the input (H1). False if it was marked already."""
        return storage.put_if_absent(self.ledger_path(shard, generation, BROKEN_EXT),
                                     dump({"shard": shard, "generation": generation, "reason": reason}))

    # ----- cleanup

    def cleanup(self, listing: StoreListing | None = None, *, grace_s: float = CLEANUP_GRACE_S) -> list[str]:
        """Delete the data files no one can commit any more and no latest ledger names (rules C1-C4); returns
        their paths. `listing`: one made by `listing()` (the data listing must come before the claim reads)."""
        listing = listing if listing is not None else self.listing()
        now = None
        deleted: list[str] = []
        for shard, attempts in sorted(listing.data.items()):
            if self._clean_at_a_glance(listing, shard, attempts):
                continue
            if now is None:
                now = storage.now(self.base)
            deleted += self._clean_shard(listing, shard, attempts, now - grace_s)
        for folder in [*self.kinds, LEDGER_DIR, claims.CLAIMS_DIR]:
            deleted += storage.remove_stale_uploads(storage.join(self.base, folder), grace_s)
        return deleted

    def _clean_at_a_glance(self, listing: StoreListing, shard: str,
                           attempts: dict[AttemptKey, dict[str, storage.Entry]]) -> bool:
        """One attempt of the latest generation with one file per kind: nothing to delete, no reads."""
        latest = listing.latest(shard)
        return latest is not None and len(attempts) == 1 and next(iter(attempts))[0] == latest

    def _clean_shard(self, listing: StoreListing, shard: str, attempts: dict[AttemptKey, dict[str, storage.Entry]],
                     cutoff: float) -> list[str]:
        claim = claims.read_claim(self.base, shard)   # C1: the claim is read after the data was listed
        ledgers: dict[int, Ledger | None] = {}

        def ledger(generation: int) -> Ledger | None:  # C2: read fresh, after the claim
            if generation not in ledgers:
                ledgers[generation] = self.read_ledger(shard, generation)
            return ledgers[generation]

        latest = listing.latest(shard)
        doomed: list[storage.Entry] = []
        for (generation, attempt_id), files in attempts.items():
            if generation is None:          # C4: an older layout's file, kept while the latest ledger names it
                named = latest is not None and ledger(latest) is not None and \
                    ledger(latest)["attempt_id"] == attempt_id  # type: ignore[index]
                if not named:
                    doomed += [entry for entry in files.values() if entry.mtime < cutoff]
                continue
            if claims.may_commit(claim, attempt_id):
                continue                    # C2: registered or committing: it may still commit
            own = ledger(generation)
            if own is None or own.get("attempt_id") != attempt_id:
                doomed += files.values()    # C2: it can never commit, and no ledger names it
            elif latest is not None and generation < latest and self._superseded(listing, shard, latest, cutoff):
                doomed += files.values()    # C3: a later generation replaced it long enough ago
        for entry in doomed:
            storage.delete(entry.path)
        return [entry.path for entry in doomed]

    def _superseded(self, listing: StoreListing, shard: str, latest: int, cutoff: float) -> bool:
        """The latest generation's files are all there and its ledger is older than the grace period."""
        if listing.ledgers[shard][latest].mtime >= cutoff:
            return False
        newest = self.read_ledger(shard, latest)
        return newest is not None and not self.check(newest, listing)


class Attempt:
    """One try at one shard's generation: files under names no other attempt uses, then a fenced, exclusive
    commit (A1-A4). Its id was registered in the shard's claim by the driver before it was sent."""

    def __init__(self, store: ShardStore, shard: str, generation: int, attempt_id: str):
        check_shard_name(shard)
        if not is_attempt_id(attempt_id):
            raise ValueError(f"{attempt_id!r} is not an attempt id")
        self.store, self.shard, self.generation, self.attempt_id = store, shard, generation, attempt_id
        self.written: dict[str, FileEntry] = {}
        self.result: CommitResult | None = None

    def path(self, kind: str) -> str:
        """Where this attempt writes `kind`."""
        if kind not in self.store.kinds:
            raise ValueError(f"{kind!r} is not a kind of {self.store}")
        name = data_name(self.shard, self.generation, self.attempt_id, self.store.kinds[kind])
        return storage.join(self.store.base, kind, name)

    def put(self, kind: str, local_file: str, rows: int | None = None) -> FileEntry:
        """Move a finished local file into place; returns its ledger entry."""
        path = self.path(kind)
        entry: FileEntry = {"path": f"{kind}/{storage.basename(path)}", "bytes": os.path.getsize(local_file),
                            "rows": rows}
        self.written[kind] = entry  # before the upload: abandon() also removes a half-done one
        storage.put_file(local_file, path)
        return entry

    def commit(self, ledger: Ledger) -> CommitResult:
        """Commit the files put so far: begin the commit in the claim (A3), then create the ledger of this
        generation exclusively (A4). `shard`, `attempt_id`, `generation` and `files` are added to `ledger`.

        'committed'; 'fenced' (the driver gave this attempt up: its files are deleted); 'lost' (another
        attempt committed this generation first: its files are deleted). Every kind of the store must have
        been put. An OSError means the storage could not say; the files then stay until cleanup decides.
        """
        if missing := sorted(set(self.store.kinds) - set(self.written)):
            raise ValueError(f"shard {self.shard}: a commit needs every kind of {self.store}; {missing} not written")
        ledger["shard"], ledger["attempt_id"], ledger["generation"] = self.shard, self.attempt_id, self.generation
        ledger["files"] = dict(self.written)
        self.result = self._commit(ledger)
        return self.result

    def _commit(self, ledger: Ledger) -> CommitResult:
        if not claims.begin_commit(self.store.base, self.shard, self.attempt_id):
            self.abandon()
            return "fenced"
        if storage.put_if_absent(self.store.ledger_path(self.shard, self.generation), dump(ledger)):
            return "committed"
        winner = self.store.read_ledger(self.shard, self.generation)
        if winner is not None and winner.get("attempt_id") == self.attempt_id:
            return "committed"   # our create landed and its answer was lost
        self.abandon()
        return "lost"

    def abandon(self) -> None:
        """Delete this attempt's own files (never another attempt's)."""
        for kind in list(self.written):
            storage.delete(self.path(kind))
            del self.written[kind]


@contextmanager
def claimed_attempt(store: ShardStore, shard: str, generation: int = 0, *, holder: str = "single writer",
                    ttl: float = 120.0) -> Iterator[Attempt]:
    """One attempt registered in the shard's claim by a driver of its own (fixtures, tools, tests that write a
    shard outside a run); the claim is released afterwards. Raises while another live driver holds it."""
    holding = claims.Claims(store.base, holder, ttl)
    attempt_id = new_attempt_id()
    if holding.acquire(shard, attempt_id, generation) is None:
        raise RuntimeError(f"{claims.claim_path(store.base, shard)} is held by a live driver")
    attempt = store.attempt(shard, generation, attempt_id)
    try:
        yield attempt
    finally:
        holding.release(shard, committed_generation=generation if attempt.result == "committed" else None)


# --- checking what was committed -------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    shard: str
    generation: int
    what: str

    def line(self) -> str:
        return f"shard {self.shard} generation {self.generation}: {self.what}"


def count_rows(path: str, ext: str) -> int | None:
    """Rows of a committed file: Parquet from its footer, a tar by its samples (member groups by key)."""
    if ext == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if storage.is_remote(path):
            return pq.ParquetFile(pa.BufferReader(storage.read_bytes(path))).metadata.num_rows
        return pq.ParquetFile(path).metadata.num_rows
    if ext == "tar":
        import tarfile

        keys: set[str] = set()
        with storage.open_read(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                tar.members = []  # type: ignore[attr-defined]  # stream mode keeps every TarInfo otherwise
                keys.add(storage.basename(member.name).partition(".")[0])
        return len(keys)
    return None


def verify(store: ShardStore, *, fingerprint: str | None = None, rows: bool = True
           ) -> tuple[dict[str, Ledger], list[Problem]]:
    """Check every shard's latest ledger against the files: it parses, has `fingerprint`, every file it names
    exists with its recorded bytes and (with `rows`) its recorded rows. Returns the ledgers that passed and
    the problems found."""
    listing = store.listing()
    latest = listing.done()
    ledgers = store.read_ledgers(latest)
    passed: dict[str, Ledger] = {}
    problems: list[Problem] = []
    for shard, generation in sorted(latest.items()):
        ledger = ledgers[shard]
        found: list[str] = []
        if generation in listing.broken.get(shard, set()):
            found.append("marked broken (a rerun makes the next generation)")
        elif ledger is None or ledger.get("generation") != generation:
            found.append("its ledger does not parse")
        elif fingerprint is not None and ledger.get("fingerprint") != fingerprint:
            found.append(f"fingerprint {ledger.get('fingerprint')} is not the version's {fingerprint}")
        else:
            found += store.check(ledger, listing)
            if rows and not found:
                for kind, named in ledger["files"].items():
                    counted = count_rows(storage.join(store.base, named["path"]), store.kinds.get(kind, ""))
                    if named["rows"] is not None and counted is not None and counted != named["rows"]:
                        found.append(f"{named['path']} holds {counted:,} rows, its ledger says {named['rows']:,}")
        problems += [Problem(shard, generation, what) for what in found]
        if not found and ledger is not None:
            passed[shard] = ledger
    return passed, problems
