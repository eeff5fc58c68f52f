"""Fenced claims on a local folder and on S3: one winner, takeovers noticed, storage clock only."""
from __future__ import annotations

import json
import os
import threading
import time

from dataset import storage
from dataset.claims import CLAIMS_DIR, Claims, claim_path, holds, is_stale, parse_claim


def wait_until_stale(base: str, shard: str) -> None:
    """Poll until the claim is stale by the storage's clock (S3 dates have whole seconds: up to ttl + 2 s)."""
    path = claim_path(base, shard)
    for _ in range(100):
        version = storage.read_versioned(path)
        if is_stale(parse_claim(path, version), version.age, 0.0):
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} did not go stale")


def race(base: str, shard: str, drivers: int) -> dict[int, str | None]:
    """`drivers` drivers try to acquire the shard at the same moment; driver -> token or None."""
    start = threading.Barrier(drivers)
    tokens: dict[int, str | None] = {}

    def take(i: int) -> None:
        claims = Claims(base, f"driver-{i}", ttl=60)
        start.wait()
        tokens[i] = claims.acquire(shard)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(drivers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens


def test_one_of_eight_drivers_takes_a_stale_claim_and_the_old_holder_learns_it(root, monkeypatch):
    old = Claims(root, "paused-driver", ttl=1.0)
    old_token = old.acquire("00007")
    assert old_token and holds(root, "00007", old_token)
    wait_until_stale(root, "00007")   # the holder was paused: no renewal within its ttl
    real_time = time.time
    # A client clock an hour slow would make the claim look fresh if liveness used it.
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)

    tokens = race(root, "00007", 8)

    winners = [i for i, token in tokens.items() if token]
    assert len(winners) == 1
    claim = json.loads(storage.read_bytes(claim_path(root, "00007")))
    assert (claim["holder"], claim["token"], claim["state"]) == (f"driver-{winners[0]}", tokens[winners[0]], "held")
    assert holds(root, "00007", tokens[winners[0]]) and not holds(root, "00007", old_token)

    lost = []
    old.start_renewing(lost.append)   # it wakes up: its next renewal finds the claim taken over
    deadline = real_time() + 10
    while not lost and real_time() < deadline:
        time.sleep(0.05)
    old.stop()
    assert lost == ["00007"] and old.held == {}
    assert json.loads(storage.read_bytes(claim_path(root, "00007")))["token"] == tokens[winners[0]]


def test_live_claims_are_respected_whatever_the_clients_clock(root, monkeypatch):
    holder = Claims(root, "holder", ttl=30)
    token = holder.acquire("00001")
    real_time = time.time
    for skew in (3600, -3600):
        monkeypatch.setattr(time, "time", lambda skew=skew: real_time() + skew)
        assert Claims(root, "other", ttl=30).acquire("00001") is None
        assert holds(root, "00001", token)
    assert holder.acquire("00001") == token       # asking again for a shard it holds
    assert holder.renew() == [] and holds(root, "00001", token)


def test_released_claims_are_taken_at_once_and_never_deleted(root):
    first, second = Claims(root, "first", ttl=60), Claims(root, "second", ttl=60)
    for shard in ("00000", "00001", "00002"):
        assert first.acquire(shard)
    assert second.acquire("00000") is None
    first.release("00000")
    token = second.acquire("00000")                # no waiting for the ttl
    assert token and holds(root, "00000", token)
    first.release("00000")                         # no longer its claim: nothing happens
    assert holds(root, "00000", token)
    first.stop()
    second.stop()
    names = sorted(storage.basename(p) for p in storage.list_files(storage.join(root, CLAIMS_DIR)))
    assert names == ["00000.json", "00001.json", "00002.json"]
    states = {name: json.loads(storage.read_bytes(storage.join(root, CLAIMS_DIR, name)))["state"] for name in names}
    assert states == dict.fromkeys(names, "released")
    third = Claims(root, "third", ttl=60)
    assert all(third.acquire(shard) for shard in ("00000", "00001", "00002"))


def test_a_claim_that_does_not_parse_is_stale(root, caplog):
    storage.write_bytes(claim_path(root, "00003"), b"{half a claim")
    token = Claims(root, "driver", ttl=60).acquire("00003")
    assert token and holds(root, "00003", token)
    assert "does not parse" in caplog.text


def test_a_writer_does_not_commit_on_a_claim_with_less_than_half_its_ttl_left(tmp_path):
    base = str(tmp_path)
    claims = Claims(base, "driver", ttl=100)
    token = claims.acquire("00004")
    assert holds(base, "00004", token)
    path = claim_path(base, "00004")
    os.utime(path, (os.stat(path).st_atime, os.stat(path).st_mtime - 60))   # not renewed for 60 s of its 100 s
    assert not holds(base, "00004", token)
