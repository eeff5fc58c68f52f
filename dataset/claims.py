"""Fenced per-shard claims, so that drivers sharing one output never caption the same shard at once.

One object per shard, `{base}/_claims/{shard}.json`, with the body
`{"holder", "token", "state": "held"|"released", "nonce", "at", "ttl"}`:
- created with a conditional create (S3 `If-None-Match: *`); renewed, released and taken over only
  with compare-and-swap on the etag last seen (S3 `If-Match`). Of several drivers racing for a stale
  claim exactly one wins, and a holder whose claim was taken over learns it at its next renewal.
- stale when its state is 'released', or when its age by the storage's clock exceeds the `ttl` its
  holder wrote into it. The client's clock is never consulted (`at` is for people reading the file).
- never deleted (released instead): every write of a shard's claim is conditional on the one before.
The token names one holding and survives renewals; the nonce changes on every write, because S3
ETags are MD5s of the body and two identical bodies would share one.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dataset import storage

CLAIMS_DIR = "_claims"
HELD, RELEASED = "held", "released"
# A writer commits only while its claim has at least this share of its ttl left: a driver that takes
# the claim over waits the whole ttl, so it cannot overlap a commit that passed `holds()` unless the
# writer stalls for half a ttl between that check and its commit.
HOLDS_SHARE = 0.5
RENEW_THREADS = 16

log = logging.getLogger(__name__)


def claim_path(base: str, shard: str) -> str:
    return storage.join(base, CLAIMS_DIR, f"{shard}.json")


def parse_claim(path: str, version: storage.Versioned) -> dict | None:
    """The claim's body, or None (with a warning) when it does not parse: such a claim is stale."""
    try:
        claim = json.loads(version.data)
        if isinstance(claim, dict):
            return claim
    except ValueError:
        pass
    log.warning("%s: claim does not parse, treated as stale: %r", path, version.data[:200])
    return None


def is_stale(claim: dict | None, age: float, default_ttl: float) -> bool:
    """Released, unreadable, or not renewed within the ttl its holder promised."""
    return claim is None or claim.get("state") != HELD or age > float(claim.get("ttl") or default_ttl)


def holds(base: str, shard: str, token: str) -> bool:
    """A writer's last check before it commits: the claim is still this holding's, and fresh."""
    path = claim_path(base, shard)
    version = storage.read_versioned(path)
    if version is None:
        return False
    claim = parse_claim(path, version)
    return (claim is not None and claim.get("token") == token and claim.get("state") == HELD
            and version.age < float(claim.get("ttl") or 0) * HOLDS_SHARE)


@dataclass
class _Holding:
    token: str
    etag: str
    lock: threading.Lock = field(default_factory=threading.Lock)  # renewal and release, one at a time


class Claims:
    """The claims one driver (`holder`) takes on the shards under `base`."""

    def __init__(self, base: str, holder: str, ttl: float):
        self.base, self.holder, self.ttl = base, holder, ttl
        self._holdings: dict[str, _Holding] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> dict[str, str]:
        """Shard -> token of every claim held now."""
        with self._lock:
            return {shard: holding.token for shard, holding in self._holdings.items()}

    def _body(self, token: str, state: str) -> bytes:
        return json.dumps({"holder": self.holder, "token": token, "state": state, "nonce": uuid.uuid4().hex,
                           "at": time.time(), "ttl": self.ttl}).encode()

    def acquire(self, shard: str) -> str | None:
        """Claim the shard: its token, or None while another live holder has it."""
        with self._lock:
            if shard in self._holdings:
                return self._holdings[shard].token
        path, token = claim_path(self.base, shard), uuid.uuid4().hex
        current = storage.read_versioned(path)
        if current is None:
            etag = storage.create_if_absent(path, self._body(token, HELD))
        elif is_stale(parse_claim(path, current), current.age, self.ttl):
            etag = storage.put_if_match(path, self._body(token, HELD), current.etag)
        else:
            return None
        if etag is None:  # another driver created or took it first
            return None
        with self._lock:
            self._holdings[shard] = _Holding(token, etag)
        return token

    def _renew_one(self, shard: str, holding: _Holding) -> bool:
        """Renew one claim; False if it was taken over."""
        with holding.lock:
            with self._lock:
                if self._holdings.get(shard) is not holding:  # released meanwhile
                    return True
            try:
                etag = storage.put_if_match(claim_path(self.base, shard), self._body(holding.token, HELD), holding.etag)
            except OSError as e:  # still ours until someone takes it; the next renewal finds out
                log.warning("renewing the claim on %s failed, will try again: %s", shard, e)
                return True
            if etag is None:
                with self._lock:
                    self._holdings.pop(shard, None)
                return False
            holding.etag = etag
            return True

    def renew(self) -> list[str]:
        """Renew every held claim; returns the shards lost (taken over by another driver)."""
        with self._lock:
            holdings = list(self._holdings.items())
        if not holdings:
            return []
        with ThreadPoolExecutor(min(RENEW_THREADS, len(holdings))) as pool:
            kept = list(pool.map(lambda item: self._renew_one(*item), holdings))
        return [shard for (shard, _), ok in zip(holdings, kept) if not ok]

    def release(self, shard: str) -> None:
        """Mark the claim released so another driver may take it at once; no error if it was lost."""
        with self._lock:
            holding = self._holdings.pop(shard, None)
        if holding is None:
            return
        with holding.lock:
            try:
                storage.put_if_match(claim_path(self.base, shard), self._body(holding.token, RELEASED), holding.etag)
            except OSError as e:
                log.warning("releasing the claim on %s failed; it goes stale after %.0f s: %s", shard, self.ttl, e)

    def start_renewing(self, on_lost: Callable[[str], None]) -> None:
        """Renew every ttl/4 seconds from a background thread; `on_lost(shard)` for each claim taken over."""
        def loop() -> None:
            while not self._stop.wait(self.ttl / 4):
                for shard in self.renew():
                    try:
                        on_lost(shard)
                    except Exception:
                        log.exception("on_lost(%s) failed", shard)

        self._stop.clear()
        self._thread = threading.Thread(target=loop, daemon=True, name="claims-renewal")
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and release everything held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for shard in list(self.held):
            self.release(shard)
