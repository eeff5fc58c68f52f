"""Fenced per-shard claims: which driver works on a shard, and which of its attempts may still commit.

One object per shard, `{base}/_claims/{shard}.json` (a `ClaimRecord`). PROTOCOL.md states the rules this
module implements; in short:
- The claim is created with a conditional create (S3 `If-None-Match: *`) and every later write is a
  compare-and-swap on the etag just read (S3 `If-Match`), retried on conflict after reading again. It is
  never deleted: every write of a shard's claim is conditional on the one before.
- It is stale when released, or when its age by the storage's clock exceeds the `ttl` its holder wrote
  into it (the client's clock is never consulted; `at` is for people reading the file). A stale claim
  can be taken over; the taker's token replaces the holder's, who learns it at its next write.
- **Fences are per attempt.** Before an attempt writes anything its id is registered in `attempts`
  (with the generation it targets). To commit, the attempt itself moves its id to `committing`; an
  attempt whose id is no longer in `attempts` has been fenced and must not commit. A driver fences an
  attempt it gives up on by removing its id; a takeover and a release clear `attempts` (fencing every
  attempt of the old holding) and keep `committing`. Both the fence and the commit intent are writes of
  this one object, so the storage orders them: an attempt is either fenced before it could commit, or
  it is committing and is never fenced (its files stay until its ledger decides).
- A cleaner may delete an attempt's files only when `may_commit` is false for it and no ledger names
  it (dataset/protocol.py).
The token names one holding and survives renewals; the nonce changes on every write, because S3 ETags
are MD5s of the body and two identical bodies would share one.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypedDict

from dataset import storage

CLAIMS_DIR = "_claims"
HELD, RELEASED = "held", "released"
CAS_TRIES = 50        # read-modify-write rounds before a claim write gives up (a storm of writers)
RENEW_THREADS = 16

log = logging.getLogger(__name__)


class ClaimRecord(TypedDict):
    holder: str                    # who holds it: host:pid:random of the driver
    token: str                     # one holding; survives renewals
    state: str                     # HELD | RELEASED
    nonce: str                     # changes on every write
    at: float                      # the writer's clock, for people
    ttl: float                     # seconds without a write after which the claim is stale
    attempts: dict[str, int]       # attempt id -> generation: registered attempts that may still commit
    committing: dict[str, int]     # attempt id -> generation: attempts that began their commit


FenceResult = Literal["fenced", "committing"]


def claim_path(base: str, shard: str) -> str:
    return storage.join(base, CLAIMS_DIR, f"{shard}.json")


def parse_claim(path: str, version: storage.Versioned) -> ClaimRecord | None:
    """The claim's body, or None (with a warning) when it does not parse: such a claim is stale."""
    try:
        claim = json.loads(version.data)
        if isinstance(claim, dict):
            claim.setdefault("attempts", {})
            claim.setdefault("committing", {})
            return claim  # type: ignore[return-value]
    except ValueError:
        pass
    log.warning("%s: claim does not parse, treated as stale: %r", path, version.data[:200])
    return None


def is_stale(claim: ClaimRecord | None, age: float, default_ttl: float) -> bool:
    """Released, unreadable, or not renewed within the ttl its holder promised."""
    return claim is None or claim.get("state") != HELD or age > float(claim.get("ttl") or default_ttl)


def may_commit(claim: ClaimRecord | None, attempt_id: str) -> bool:
    """The attempt is registered or began its commit: its files may still become committed."""
    return claim is not None and (attempt_id in claim["attempts"] or attempt_id in claim["committing"])


def read_claim(base: str, shard: str) -> ClaimRecord | None:
    """The shard's claim, None when there is none (or it does not parse)."""
    path = claim_path(base, shard)
    version = storage.read_versioned(path)
    return None if version is None else parse_claim(path, version)


def _record(holder: str, token: str, state: str, ttl: float, attempts: dict[str, int],
            committing: dict[str, int]) -> ClaimRecord:
    return {"holder": holder, "token": token, "state": state, "nonce": uuid.uuid4().hex, "at": time.time(),
            "ttl": ttl, "attempts": dict(attempts), "committing": dict(committing)}


def _dump(claim: ClaimRecord) -> bytes:
    return json.dumps(claim, sort_keys=True).encode()


Change = Callable[[ClaimRecord | None, float], ClaimRecord | None]


def update(path: str, change: Change, known: tuple[ClaimRecord, str] | None = None
           ) -> tuple[ClaimRecord, str] | None:
    """Read-modify-write of one claim: `change(current, age)` returns the record to write, or None to write
    nothing. Returns (written record, etag), or None when `change` declined. `known` (a record and its etag
    from our last write) is tried first without a read; a conflict reads the claim again and re-applies."""
    current: ClaimRecord | None
    etag: str | None
    for _ in range(CAS_TRIES):
        if known is not None:
            current, etag, age = known[0], known[1], 0.0
            known = None
        else:
            version = storage.read_versioned(path)
            current = None if version is None else parse_claim(path, version)
            etag, age = (None, 0.0) if version is None else (version.etag, version.age)
        new = change(current, age)
        if new is None:
            return None
        written = storage.create_if_absent(path, _dump(new)) if etag is None else \
            storage.put_if_match(path, _dump(new), etag)
        if written is not None:
            return new, written
    raise OSError(f"{path}: still changing after {CAS_TRIES} compare-and-swap rounds")


def begin_commit(base: str, shard: str, attempt_id: str) -> bool:
    """The attempt's last step before it creates its ledger: move its id from `attempts` to `committing`.
    False when it is no longer registered (fenced: it must not commit and may delete its own files)."""
    def change(claim: ClaimRecord | None, _age: float) -> ClaimRecord | None:
        if claim is None or attempt_id not in claim["attempts"]:
            return None
        generation = claim["attempts"][attempt_id]
        attempts = {a: g for a, g in claim["attempts"].items() if a != attempt_id}
        return {**claim, "nonce": uuid.uuid4().hex, "attempts": attempts,
                "committing": {**claim["committing"], attempt_id: generation}}

    path = claim_path(base, shard)
    if update(path, change) is not None:
        return True
    claim = read_claim(base, shard)  # a lost answer to our own write shows as already committing
    return claim is not None and attempt_id in claim["committing"]


@dataclass
class _Holding:
    token: str
    known: tuple[ClaimRecord, str]   # our last write and its etag


class ClaimLost(RuntimeError):
    """Another driver holds the shard's claim now."""


class Claims:
    """The claims one driver (`holder`) takes on the shards under `base`."""

    def __init__(self, base: str, holder: str, ttl: float):
        self.base, self.holder, self.ttl = base, holder, ttl
        self._holdings: dict[str, _Holding] = {}
        self._lock = threading.Lock()   # guards the dict only; no storage call runs under it

    @property
    def held(self) -> dict[str, str]:
        """Shard -> token of every claim held now."""
        with self._lock:
            return {shard: holding.token for shard, holding in self._holdings.items()}

    def _holding(self, shard: str) -> _Holding | None:
        with self._lock:
            return self._holdings.get(shard)

    def _forget(self, shard: str, holding: _Holding) -> None:
        with self._lock:
            if self._holdings.get(shard) is holding:
                del self._holdings[shard]

    def acquire(self, shard: str, attempt_id: str, generation: int) -> str | None:
        """Claim the shard with its first attempt registered: the token, or None while another live driver
        holds it. A stale claim is taken over: every attempt of the old holding is fenced, those that began
        their commit are kept."""
        token = uuid.uuid4().hex

        def change(claim: ClaimRecord | None, age: float) -> ClaimRecord | None:
            if claim is not None and not is_stale(claim, age, self.ttl):
                return None
            committing = claim["committing"] if claim is not None else {}
            return _record(self.holder, token, HELD, self.ttl, {attempt_id: generation}, committing)

        written = update(claim_path(self.base, shard), change)
        if written is None:
            return None
        with self._lock:
            self._holdings[shard] = _Holding(token, written)
        return token

    def _ours(self, shard: str, holding: _Holding, change: Callable[[ClaimRecord], ClaimRecord | None]
              ) -> ClaimRecord | None:
        """Apply `change` to our claim; raises ClaimLost (and forgets the holding) when it is not ours."""
        lost = []

        def guarded(claim: ClaimRecord | None, _age: float) -> ClaimRecord | None:
            if claim is None or claim["token"] != holding.token or claim["state"] != HELD:
                lost.append(True)
                return None
            return change(claim)

        written = update(claim_path(self.base, shard), guarded, holding.known)
        if lost:
            self._forget(shard, holding)
            raise ClaimLost(shard)
        if written is not None:
            holding.known = written
        return written[0] if written else None

    def register(self, shard: str, attempt_id: str, generation: int) -> bool:
        """Register one more attempt (a retry, a speculative copy) before it starts; False: the claim is lost."""
        holding = self._holding(shard)
        if holding is None:
            return False
        try:
            self._ours(shard, holding, lambda c: {**c, "nonce": uuid.uuid4().hex,
                                                   "attempts": {**c["attempts"], attempt_id: generation}})
        except ClaimLost:
            return False
        return True

    def fence(self, shard: str, attempt_id: str) -> FenceResult:
        """Make sure the attempt can no longer commit: 'fenced', or 'committing' when it began its commit
        first (then only its ledger decides). Works whether or not we still hold the claim: a takeover or a
        release has already fenced every attempt that was not committing."""
        holding = self._holding(shard)
        if holding is not None:
            try:
                claim = self._ours(shard, holding, lambda c: None if attempt_id not in c["attempts"] else {
                    **c, "nonce": uuid.uuid4().hex,
                    "attempts": {a: g for a, g in c["attempts"].items() if a != attempt_id}})
                if claim is not None:
                    return "fenced"
            except ClaimLost:
                pass
        return "committing" if may_commit(read_claim(self.base, shard), attempt_id) else "fenced"

    def release(self, shard: str, committed_generation: int | None = None) -> None:
        """Mark the claim released so another driver may take it at once, fencing every registered attempt.
        `committed_generation`: the shard's ledger of that generation exists, so commit intents up to it are
        settled and dropped. No error if the claim was lost; a storage error is logged (it goes stale)."""
        with self._lock:
            holding = self._holdings.pop(shard, None)
        if holding is None:
            return

        def change(claim: ClaimRecord) -> ClaimRecord:
            committing = {a: g for a, g in claim["committing"].items()
                          if committed_generation is None or g > committed_generation}
            return _record(self.holder, holding.token, RELEASED, self.ttl, {}, committing)

        try:
            self._ours(shard, holding, change)
        except ClaimLost:
            pass
        except OSError as e:
            log.warning("releasing the claim on %s failed; it goes stale after %.0f s: %s", shard, self.ttl, e)

    def _renew_one(self, shard: str, holding: _Holding) -> bool:
        """Renew one claim; False if it was taken over."""
        try:
            self._ours(shard, holding, lambda c: {**c, "nonce": uuid.uuid4().hex, "at": time.time()})
        except ClaimLost:
            return False
        except OSError as e:  # still ours until someone takes it; the next renewal finds out
            log.warning("renewing the claim on %s failed, will try again: %s", shard, e)
        return True

    def renew(self) -> list[str]:
        """Renew every held claim; returns the shards lost (taken over by another driver)."""
        with self._lock:
            holdings = list(self._holdings.items())
        if not holdings:
            return []
        kept = storage.parallel_map(self.base, lambda item: self._renew_one(*item), holdings, RENEW_THREADS)
        return [shard for (shard, _), ok in zip(holdings, kept, strict=True) if not ok]

    def release_all(self) -> None:
        """Release everything held (a driver that stops)."""
        for shard in list(self.held):
            self.release(shard)
