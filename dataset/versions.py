"""An output's versions: one per caption fingerprint, recorded in `OUT/_job.json`, and which one is current.

    {"current": FP, "versions": {FP: {"root", "caption_config", "kinds", "created_at", "complete_at"}}}

The first version lives in OUT itself (root ""); each later one (`--new-version`) in OUT/versions/{FP}/
with the same layout. Rules (PROTOCOL.md, V1-V3):
- V1: `_job.json` is created exclusively and changed only by compare-and-swap.
- V2: the first version is current from the start (there is nothing else to read). A later version is
  added beside the current one and becomes current only when a run of it finds every input shard
  committed (`complete`); until then readers, publish and training keep the complete version.
- V3: a version records the kinds of file its shards commit (e.g. parquet + wds); every run of it must
  write the same kinds, so no generation drops or shortens a kind another generation has.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dataset import storage
from dataset.protocol import ShardStore, dump

JOB_FILE, RUN_FILE = "_job.json", "_run.json"
VERSIONS_DIR = "versions"
REGISTER_TRIES = 20        # compare-and-swap rounds on _job.json before giving up
# Records written before versions recorded their kinds: every shard then had a Parquet file and a tar.
LEGACY_KINDS = {"parquet": "parquet", "wds": "tar"}


class FingerprintMismatch(ValueError):
    """The output holds another fingerprint's captions and the run did not ask for a new version."""


def _parse_job(path: str, data: bytes) -> dict[str, Any]:
    try:
        job = json.loads(data)
        job["versions"][job["current"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a recaption job record ({e}); move it away or use another output") from e
    return job


@dataclass(frozen=True)
class Output:
    """One version of an output: the fingerprint of its captions, the folder they live in, their kinds."""
    out: str
    fingerprint: str
    base: str
    caption_config: dict = field(default_factory=dict, compare=False)
    kinds: Mapping[str, str] = field(default_factory=dict, compare=False)
    current: bool = field(default=True, compare=False)
    complete: bool = field(default=False, compare=False)

    @classmethod
    def _version(cls, out: str, job: dict, fingerprint: str) -> Output:
        version = job["versions"][fingerprint]
        base = storage.join(out, version["root"]) if version["root"] else out
        return cls(out, fingerprint, base, version.get("caption_config") or {}, version.get("kinds") or LEGACY_KINDS,
                   job["current"] == fingerprint, version.get("complete_at") is not None)

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
        return cls._version(out, job, fingerprint)

    @classmethod
    def register(cls, out: str, fingerprint: str, caption_config: dict, new_version: bool,
                 kinds: Mapping[str, str]) -> Output:
        """The version a run with `fingerprint` writing `kinds` writes to (V1-V3).

        The first run creates the record and its version is current. A run with the current fingerprint gets
        that version. Another fingerprint raises FingerprintMismatch unless `new_version`, which adds
        OUT/versions/{FP} (or returns to the version of that fingerprint) without making it current.
        """
        path = storage.join(out, JOB_FILE)
        for _ in range(REGISTER_TRIES):
            current = storage.read_versioned(path)
            version = {"root": "", "caption_config": caption_config, "kinds": dict(kinds), "created_at": time.time(),
                       "complete_at": None}
            if current is None:
                job: dict[str, Any] = {"current": fingerprint, "versions": {fingerprint: version}}
                if storage.put_if_absent(path, dump(job)):
                    return cls._version(out, job, fingerprint)
                continue
            job = _parse_job(path, current.data)
            if fingerprint in job["versions"] and (job["current"] == fingerprint or new_version):
                found = cls._version(out, job, fingerprint)
                found.check_kinds(kinds)
                return found
            if not new_version:
                raise FingerprintMismatch(_mismatch(out, job, fingerprint))
            version["root"] = f"{VERSIONS_DIR}/{fingerprint}"
            updated = {"current": job["current"], "versions": {**job["versions"], fingerprint: version}}
            if storage.put_if_match(path, dump(updated), current.etag) is not None:
                return cls._version(out, updated, fingerprint)
        raise OSError(f"{path}: still changing after {REGISTER_TRIES} tries; are many jobs starting on {out}?")

    def check_kinds(self, kinds: Mapping[str, str]) -> None:
        """V3: a run writes the kinds its version's shards have."""
        recorded = dict(self.kinds)
        if recorded and recorded != dict(kinds):
            def named(k: Mapping[str, str]) -> str:
                return " + ".join(sorted(k))

            raise ValueError(
                f"{self.base}: this version's shards are committed as {named(recorded)}; this run would write "
                f"{named(kinds)}. Every shard of a version has the same files "
                f"({'drop --no-wds' if 'wds' in recorded else 'add --no-wds'}, or use another --output).")

    def mark_complete(self) -> Output:
        """V2: every input shard of this version is committed; it becomes the current version."""
        path = storage.join(self.out, JOB_FILE)
        for _ in range(REGISTER_TRIES):
            current = storage.read_versioned(path)
            if current is None:
                raise FileNotFoundError(f"{path} is gone")
            job = _parse_job(path, current.data)
            version = job["versions"][self.fingerprint]
            if job["current"] == self.fingerprint and version.get("complete_at") is not None:
                return Output._version(self.out, job, self.fingerprint)
            updated = {"current": self.fingerprint,
                       "versions": {**job["versions"],
                                    self.fingerprint: {**version, "complete_at": version.get("complete_at")
                                                       or time.time()}}}
            if storage.put_if_match(path, dump(updated), current.etag) is not None:
                return Output._version(self.out, updated, self.fingerprint)
        raise OSError(f"{path}: still changing after {REGISTER_TRIES} tries")

    @property
    def store(self) -> ShardStore:
        """The version's own shards."""
        return ShardStore(self.base, self.kinds)

    def stage(self, name: str, kinds: Mapping[str, str]) -> ShardStore:
        """An extra column group with its own per-shard files and ledgers, e.g. 'clip_scores'."""
        return ShardStore(storage.join(self.base, name), kinds)

    @property
    def run_path(self) -> str:
        return storage.join(self.base, RUN_FILE)

    def describe(self) -> str:
        state = "current" if self.current else "not current"
        return f"version {self.fingerprint} ({state}, {'complete' if self.complete else 'incomplete'})"


def _mismatch(out: str, job: dict, fingerprint: str) -> str:
    current = job["current"]
    model = job["versions"][current].get("caption_config", {}).get("model")
    if fingerprint in job["versions"]:
        return (f"{out} holds captions with fingerprint {current} (model {model}); this run's fingerprint "
                f"{fingerprint} is another version of it. Use --new-version to write to that version (it becomes "
                "current when every input shard is done).")
    return (f"{out} holds captions with fingerprint {current} (model {model}); this run's is {fingerprint}. "
            f"Use another --output, or --new-version to caption into {out}/{VERSIONS_DIR}/{fingerprint} "
            "(it becomes current when every input shard is done; the current version stays readable).")
