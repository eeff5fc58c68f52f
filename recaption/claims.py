"""Shard claims, so that two drivers on one output never caption the same shard at once.

A claim is `OUT/_claims/{shard}.{generation}.json`, created with an exclusive create (local
O_EXCL, S3 `If-None-Match: *`). Its holder rewrites it as a heartbeat; a claim not refreshed for
`ttl` seconds is stale (its driver died) and the next generation can be taken, again exclusively.
"""
from __future__ import annotations

import json
import time

from dataset import storage

CLAIMS_DIR = "_claims"


class ClaimBook:
    def __init__(self, out: str, driver_id: str, ttl: float = 120.0):
        self.folder = storage.join(out, CLAIMS_DIR)
        self.driver_id = driver_id
        self.ttl = ttl
        self.held: dict[str, str] = {}
        self.latest: dict[str, int] = {}
        self.last_beat = 0.0
        for path in storage.list_files(self.folder, ".json"):
            shard, generation = storage.basename(path)[: -len(".json")].rsplit(".", 1)
            self.latest[shard] = max(self.latest.get(shard, -1), int(generation))

    def _path(self, shard: str, generation: int) -> str:
        return storage.join(self.folder, f"{shard}.{generation}.json")

    def _body(self) -> bytes:
        return json.dumps({"driver": self.driver_id, "at": time.time()}).encode()

    def _is_live(self, path: str) -> bool:
        """True if `path` holds another driver's claim refreshed within the ttl."""
        try:
            claim = json.loads(storage.read_bytes(path))
        except FileNotFoundError:
            return False
        return claim.get("driver") != self.driver_id and time.time() - claim.get("at", 0) < self.ttl

    def try_claim(self, shard: str) -> bool:
        """Take the shard unless another live driver holds it."""
        if shard in self.held:
            return True
        generation = self.latest.get(shard, -1)
        if generation >= 0 and self._is_live(self._path(shard, generation)):
            return False
        while True:
            generation += 1
            path = self._path(shard, generation)
            if storage.put_if_absent(path, self._body()):
                self.held[shard], self.latest[shard] = path, generation
                return True
            self.latest[shard] = generation
            if self._is_live(path):
                return False

    def heartbeat(self, force: bool = False) -> None:
        """Refresh held claims, at most every ttl/4 seconds."""
        if not force and time.time() - self.last_beat < self.ttl / 4:
            return
        self.last_beat = time.time()
        for path in self.held.values():
            storage.write_bytes(path, self._body())

    def release(self, shard: str) -> None:
        path = self.held.pop(shard, None)
        if path:
            storage.delete(path)
