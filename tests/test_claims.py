"""Fenced claims on a local folder and on S3: one winner, takeovers noticed, the storage's clock only, and per-attempt
fences (PROTOCOL.md F1-F4)."""
from __future__ import annotations

import json
import threading
import time

import pytest

from dataset import storage
from dataset.claims import CLAIMS_DIR, Claims, begin_commit, claim_path, is_stale, may_commit, parse_claim, read_claim
from dataset.protocol import new_attempt_id


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
        tokens[i] = claims.acquire(shard, new_attempt_id(), 0)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(drivers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens


def held_by(base: str, shard: str) -> str | None:
    claim = read_claim(base, shard)
    return claim["token"] if claim and claim["state"] == "held" else None


def test_one_of_eight_drivers_takes_a_stale_claim_and_the_old_holder_learns_it(root, monkeypatch):
    old = Claims(root, "paused-driver", ttl=1.0)
    first_attempt = new_attempt_id()
    old_token = old.acquire("00007", first_attempt, 0)
    assert old_token and held_by(root, "00007") == old_token
    wait_until_stale(root, "00007")   # the holder was paused: no renewal within its ttl
    real_time = time.time
    # A client clock an hour slow would make the claim look fresh if liveness used it.
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)

    tokens = race(root, "00007", 8)

    winners = [i for i, token in tokens.items() if token]
    assert len(winners) == 1
    claim = read_claim(root, "00007")
    assert (claim["holder"], claim["token"], claim["state"]) == (f"driver-{winners[0]}", tokens[winners[0]], "held")
    assert not may_commit(claim, first_attempt), "the takeover fenced the old holder's attempt"
    assert not begin_commit(root, "00007", first_attempt)

    assert old.renew() == ["00007"] and old.held == {}   # it wakes up: its next renewal finds the claim taken
    assert read_claim(root, "00007")["token"] == tokens[winners[0]]


def test_live_claims_are_respected_whatever_the_clients_clock(root, monkeypatch):
    holder = Claims(root, "holder", ttl=30)
    token = holder.acquire("00001", new_attempt_id(), 0)
    real_time = time.time
    for skew in (3600, -3600):
        monkeypatch.setattr(time, "time", lambda skew=skew: real_time() + skew)
        assert Claims(root, "other", ttl=30).acquire("00001", new_attempt_id(), 0) is None
        assert held_by(root, "00001") == token
    assert holder.renew() == [] and held_by(root, "00001") == token


def test_released_claims_are_taken_at_once_and_never_deleted(root):
    first, second = Claims(root, "first", ttl=60), Claims(root, "second", ttl=60)
    for shard in ("00000", "00001", "00002"):
        assert first.acquire(shard, new_attempt_id(), 0)
    assert second.acquire("00000", new_attempt_id(), 0) is None
    first.release("00000")
    token = second.acquire("00000", new_attempt_id(), 0)   # no waiting for the ttl
    assert token and held_by(root, "00000") == token
    first.release("00000")                                  # no longer its claim: nothing happens
    assert held_by(root, "00000") == token
    first.release_all()
    second.release_all()
    names = sorted(storage.basename(p) for p in storage.list_files(storage.join(root, CLAIMS_DIR)))
    assert names == ["00000.json", "00001.json", "00002.json"]
    states = {name: json.loads(storage.read_bytes(storage.join(root, CLAIMS_DIR, name)))["state"] for name in names}
    assert states == dict.fromkeys(names, "released")
    third = Claims(root, "third", ttl=60)
    assert all(third.acquire(shard, new_attempt_id(), 0) for shard in ("00000", "00001", "00002"))


def test_a_claim_that_does_not_parse_is_stale(root, caplog):
    storage.write_bytes(claim_path(root, "00003"), b"{half a claim")
    assert not begin_commit(root, "00003", new_attempt_id()), "nothing commits on a claim that does not parse"
    token = Claims(root, "driver", ttl=60).acquire("00003", new_attempt_id(), 0)
    assert token and held_by(root, "00003") == token
    assert "does not parse" in caplog.text


def test_an_attempt_is_either_fenced_before_its_commit_or_committing_and_never_fenced(root):
    """F1: the driver's fence and the attempt's commit intent are writes of one object; whichever lands first
    decides, and the other sees it."""
    claims = Claims(root, "driver", ttl=60)
    first, retry, late = new_attempt_id(), new_attempt_id(), new_attempt_id()
    claims.acquire("00005", first, 0)
    assert claims.register("00005", retry, 0) and claims.register("00005", late, 0)

    assert claims.fence("00005", first) == "fenced"        # given up (a deadline, a lost actor) ...
    assert not begin_commit(root, "00005", first)          # ... so it can no longer commit
    assert begin_commit(root, "00005", retry)              # the retry begins its commit first ...
    assert claims.fence("00005", retry) == "committing"    # ... so it is never fenced: its ledger decides
    assert claims.renew() == [], "our own attempts' writes do not look like a takeover"
    claim = read_claim(root, "00005")
    assert claim["attempts"] == {late: 0} and claim["committing"] == {retry: 0}
    assert may_commit(claim, late) and may_commit(claim, retry) and not may_commit(claim, first)

    claims.release("00005")                                 # a release fences every registered attempt ...
    claim = read_claim(root, "00005")
    assert claim["attempts"] == {} and claim["committing"] == {retry: 0}   # ... and keeps the committing ones
    assert not begin_commit(root, "00005", late)
    taker = Claims(root, "taker", ttl=60)
    taker.acquire("00005", new_attempt_id(), 1)
    assert read_claim(root, "00005")["committing"] == {retry: 0}, "a takeover keeps commit intents too"
    taker.release("00005", committed_generation=0)          # generation 0's ledger exists: intents settled
    assert read_claim(root, "00005")["committing"] == {}


def test_concurrent_writers_of_one_claim_all_land(root):
    """F3: registrations, renewals and commit intents racing on one claim are retried, never lost."""
    claims = Claims(root, "driver", ttl=60)
    ids = [new_attempt_id() for _ in range(9)]
    claims.acquire("00006", ids[0], 0)
    start = threading.Barrier(8)
    results: dict[str, bool] = {}

    def write(i: int) -> None:
        start.wait()
        if i % 2:
            results[ids[i]] = claims.register("00006", ids[i], 0)
        else:
            results[f"renew-{i}"] = claims.renew() == []

    threads = [threading.Thread(target=write, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results.values())
    assert set(read_claim(root, "00006")["attempts"]) == {ids[0], *(ids[i] for i in range(1, 9) if i % 2)}


@pytest.mark.parametrize("ttl", [60.0])
def test_register_and_fence_after_the_claim_was_taken_over(root, ttl):
    paused = Claims(root, "paused", ttl=1.0)
    attempt = new_attempt_id()
    paused.acquire("00008", attempt, 0)
    wait_until_stale(root, "00008")
    Claims(root, "taker", ttl=ttl).acquire("00008", new_attempt_id(), 0)
    assert not paused.register("00008", new_attempt_id(), 0), "a lost claim registers nothing"
    assert paused.fence("00008", attempt) == "fenced", "the takeover fenced it already"
