"""The commit protocol (dataset/protocol.py, PROTOCOL.md) on a local folder and on S3, rule by rule, and each
interleaving that lost committed shards before: written as the exact order of the steps of the drivers,
workers and cleaners involved. The deterministic simulation (tests/test_simulation.py) runs the same code
over thousands of random schedules."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from test_claims import wait_until_stale

from dataset import storage
from dataset.claims import Claims, begin_commit, read_claim
from dataset.outputs import RECAPTION_KINDS
from dataset.protocol import (
    Attempt,
    ShardStore,
    claimed_attempt,
    data_name,
    new_attempt_id,
    parse_data_name,
    verify,
)


def put_files(attempt: Attempt, tmp_path: Path) -> Attempt:
    """Every kind's file, each naming its attempt."""
    for kind in attempt.store.kinds:
        local = tmp_path / f"{attempt.attempt_id}.{kind}"
        local.write_bytes(f"{kind} of {attempt.attempt_id}".encode())
        attempt.put(kind, str(local), rows=1)
    return attempt


def attempt_of(store: ShardStore, claims: Claims, shard: str, tmp_path: Path, generation: int = 0) -> Attempt:
    """A1: registered in the claim (taken, or held by `claims` already), then its files written."""
    attempt_id = new_attempt_id()
    if shard in claims.held:
        assert claims.register(shard, attempt_id, generation)
    else:
        assert claims.acquire(shard, attempt_id, generation)
    return put_files(store.attempt(shard, generation, attempt_id), tmp_path)


def data_files(store: ShardStore) -> set[str]:
    return {storage.join(store.base, kind, storage.basename(p)) for kind in store.kinds
            for p in storage.list_files(storage.join(store.base, kind))}


def assert_committed_intact(store: ShardStore) -> None:
    """Every latest ledger's files are there with their recorded bytes."""
    passed, problems = verify(store, rows=False)
    assert problems == [], [p.line() for p in problems]


@pytest.fixture
def store(root) -> ShardStore:
    return ShardStore(root, RECAPTION_KINDS)


def test_names_carry_the_generation_and_the_attempt():
    attempt_id = new_attempt_id()
    name = data_name("00001.part", 3, attempt_id, "parquet")
    assert name == f"00001.part~3.{attempt_id}.parquet"
    parsed = parse_data_name(name, "parquet")
    assert (parsed.shard, parsed.generation, parsed.attempt_id) == ("00001.part", 3, attempt_id)
    old = parse_data_name(f"00001.{attempt_id}.tar", "tar")   # the layout before generations were in names
    assert (old.shard, old.generation) == ("00001", None)
    assert parse_data_name("00001~1.not-an-attempt.tar", "tar") is None


def test_two_attempts_of_one_shard_leave_one_ledger_and_the_winners_files(store, tmp_path):
    claims = Claims(store.base, "driver", 60)
    first = attempt_of(store, claims, "00000", tmp_path)
    second = attempt_of(store, claims, "00000", tmp_path)   # a speculative copy
    assert first.path("parquet") != second.path("parquet")

    assert first.commit({"ok": 1}) == "committed"
    assert second.commit({"ok": 1}) == "lost"

    ledger = store.read_ledger("00000")
    assert (ledger["attempt_id"], ledger["generation"], ledger["shard"]) == (first.attempt_id, 0, "00000")
    for kind, path in store.files(ledger).items():
        assert storage.read_bytes(path) == f"{kind} of {first.attempt_id}".encode()
    assert data_files(store) == {first.path(kind) for kind in store.kinds}


def test_racing_commits_have_one_winner(store, tmp_path):
    claims = Claims(store.base, "driver", 60)
    attempts = [attempt_of(store, claims, "00001", tmp_path) for _ in range(4)]
    start = threading.Barrier(len(attempts))
    won: dict[str, str] = {}

    def commit(attempt: Attempt) -> None:
        start.wait()
        won[attempt.attempt_id] = attempt.commit({})

    threads = [threading.Thread(target=commit, args=(a,)) for a in attempts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [attempt_id for attempt_id, result in won.items() if result == "committed"]
    assert len(winners) == 1 and store.read_ledger("00001")["attempt_id"] == winners[0]
    assert sorted(won.values()) == ["committed", "lost", "lost", "lost"]
    assert data_files(store) == {storage.join(store.base, kind, data_name("00001", 0, winners[0], ext))
                                 for kind, ext in store.kinds.items()}


def test_an_attempt_needs_every_kind_and_its_registration(store, tmp_path):
    claims = Claims(store.base, "driver", 60)
    attempt_id = new_attempt_id()
    claims.acquire("00002", attempt_id, 0)
    half = store.attempt("00002", 0, attempt_id)
    local = tmp_path / "rows"
    local.write_bytes(b"rows")
    half.put("parquet", str(local))
    with pytest.raises(ValueError, match=r"every kind .* \['wds'\] not written"):
        half.commit({})
    unregistered = put_files(store.attempt("00002", 0, new_attempt_id()), tmp_path)
    assert unregistered.commit({}) == "fenced" and store.read_ledger("00002") is None
    assert not any(storage.exists(unregistered.path(kind)) for kind in store.kinds)


def test_a_generation_commit_switches_the_whole_view_at_once(store, tmp_path):
    with claimed_attempt(store, "00002") as attempt:
        assert put_files(attempt, tmp_path).commit({"error": 3}) == "committed"
    seen: list[tuple[bytes, ...]] = []
    stop = threading.Event()

    def read() -> None:  # resolves and reads the shard's files over and over while generations commit
        while not stop.is_set():
            files = store.files(store.read_ledger("00002"))
            seen.append(tuple(storage.read_bytes(files[kind]).split(b" of ")[1] for kind in ("parquet", "wds")))

    reader = threading.Thread(target=read)
    reader.start()
    for generation in range(1, 4):
        with claimed_attempt(store, "00002", generation) as attempt:
            assert put_files(attempt, tmp_path).commit({"error": 3 - generation}) == "committed"
    with claimed_attempt(store, "00002", 3) as late:
        assert put_files(late, tmp_path).commit({}) == "lost" and not storage.exists(late.path("wds"))
    stop.set()
    reader.join()

    assert seen and all(parquet_of == wds_of for parquet_of, wds_of in seen)   # never a mix of two attempts
    assert store.done() == {"00002": 3}
    assert store.read_ledger("00002")["error"] == 0 and store.read_ledger("00002", 0)["error"] == 3


@pytest.mark.parametrize("shards", [10, 100])
def test_done_is_one_listing_whatever_the_number_of_shards(s3_bucket, shards):
    store = ShardStore(f"{s3_bucket}/out", {"parquet": "parquet"})
    for i in range(shards):
        storage.write_bytes(store.ledger_path(f"{i:05d}"), b"{}")
    storage.write_bytes(store.ledger_path("00003", 1), b"{}")   # a --retry-errors generation
    storage.REQUESTS.clear()

    done = store.done()

    assert done == {f"{i:05d}": 1 if i == 3 else 0 for i in range(shards)}
    assert storage.REQUESTS == {"list": 1}    # one page of the ledger listing, no per-shard reads


# --- cleanup: C1-C5 -----------------------------------------------------------------------------------

def test_cleanup_removes_what_no_one_can_commit_and_keeps_everything_else(store, tmp_path):
    driver, other = Claims(store.base, "driver", 60), Claims(store.base, "other", 60)
    committed = attempt_of(store, driver, "00000", tmp_path)
    assert committed.commit({}) == "committed"
    loser = attempt_of(store, driver, "00000", tmp_path)          # lost its commit, died before deleting
    driver.release("00000", committed_generation=0)               # C2: the ledger names another attempt
    fenced = attempt_of(store, driver, "00001", tmp_path)         # its driver gave it up (a deadline)
    driver.fence("00001", fenced.attempt_id)
    released = attempt_of(store, driver, "00002", tmp_path)       # died; its driver stopped and released
    driver.release("00002")
    in_flight = attempt_of(store, other, "00003", tmp_path)       # another driver's, still running
    committing = attempt_of(store, other, "00004", tmp_path)      # began its commit, its ledger not yet made
    assert begin_commit(store.base, "00004", committing.attempt_id)

    deleted = store.cleanup(grace_s=3600)

    gone = {a.path(kind) for a in (loser, fenced, released) for kind in store.kinds}
    assert set(deleted) == gone
    kept = {a.path(kind) for a in (committed, in_flight, committing) for kind in store.kinds}
    assert data_files(store) == kept
    assert_committed_intact(store)


def test_superseded_generations_and_older_layouts_go_after_the_grace_period(store, tmp_path):
    with claimed_attempt(store, "00000") as first:
        assert put_files(first, tmp_path).commit({}) == "committed"
    with claimed_attempt(store, "00000", 1) as second:
        assert put_files(second, tmp_path).commit({}) == "committed"
    legacy = storage.join(store.base, "wds", f"00009.{new_attempt_id()}.tar")   # an older layout's leftover
    storage.write_bytes(legacy, b"old")
    assert store.cleanup(grace_s=3600) == [], "readers that resolved generation 0 may still be reading"
    deleted = store.cleanup(grace_s=-10)   # the grace period is over
    assert set(deleted) == {first.path(kind) for kind in store.kinds} | {legacy}
    assert data_files(store) == {second.path(kind) for kind in store.kinds}


def test_temporary_files_of_dead_local_writers_go(tmp_path):
    store = ShardStore(str(tmp_path / "out"), RECAPTION_KINDS)
    stale = tmp_path / "out" / "wds" / ".00000~0.abc.tar.x1y2.tmp"   # a writer killed mid-write
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    assert store.cleanup(grace_s=3600) == [] and stale.exists()
    os.utime(stale, (0, 0))
    assert store.cleanup(grace_s=3600) == [str(stale)] and not stale.exists()


def test_incomplete_multipart_uploads_of_dead_writers_are_aborted(s3_bucket):
    store = ShardStore(f"{s3_bucket}/out", RECAPTION_KINDS)
    bucket, key = storage.bucket_key(storage.join(store.base, "wds", "00000~0.abc.tar"))
    client = storage.s3_client()
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    assert store.cleanup(grace_s=3600) == []
    assert [u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == [upload]
    assert store.cleanup(grace_s=-10) == [f"s3://{bucket}/{key} (upload {upload})"]
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# --- the interleavings that lost committed shards (issue 19, cases 1-4) ----------------------------------------

def test_case1_a_driver_that_ends_does_not_sweep_a_commit_made_between_its_listings(store, tmp_path):
    """Driver A ends and cleans up while driver B commits: A lists the ledgers (the shard has none), B commits
    and releases its claim, A lists the data files (B's are there) and decides. Before: A took B's files for
    leftovers and deleted them under B's ledger."""
    b = Claims(store.base, "driver-b", 60)
    attempt = attempt_of(store, b, "00007", tmp_path)
    listing = store.list_ledgers()                            # A: no ledger of 00007 yet
    assert attempt.commit({"ok": 1}) == "committed"           # B commits ...
    b.release("00007", committed_generation=0)                # ... and releases at once
    store.list_data(listing)                                  # A: B's files are listed
    assert store.cleanup(listing, grace_s=3600) == []         # C1-C2: claim, then a fresh read of the ledger
    assert_committed_intact(store)


def test_case2_a_worker_reported_dead_while_alive_cannot_commit_over_its_retry(store, tmp_path):
    """The driver hears that a worker died (Ray's ActorUnavailableError: it may or may not run on). It fences
    the attempt, retries the shard, and cleanup removes the first attempt's files; the first attempt, alive,
    finishes and tries to commit. Before: the retry shared its claim token, so the zombie's check passed and its
    ledger named deleted files."""
    driver = Claims(store.base, "driver", 60)
    zombie = attempt_of(store, driver, "00008", tmp_path)
    assert driver.fence("00008", zombie.attempt_id) == "fenced"
    retry = attempt_of(store, driver, "00008", tmp_path)
    assert set(store.cleanup(grace_s=3600)) == {zombie.path(kind) for kind in store.kinds}
    assert zombie.commit({}) == "fenced"
    assert retry.commit({}) == "committed"
    assert_committed_intact(store)


@pytest.mark.parametrize("winner", ["stalled", "taker"])
def test_case3_a_writer_stalled_past_the_ttl_loses_rework_never_rows(store, tmp_path, winner):
    """A's attempt begins its commit, then stalls (a GC pause, a ledger PUT inside botocore's retries) past the
    claim's ttl; B takes the claim over, retries, and cleans up. Before: the stalled writer's files could be
    deleted and then its ledger land. Now it is committing: its files stay, and whichever ledger lands first wins."""
    a = Claims(store.base, "driver-a", 0.01)
    stalled = attempt_of(store, a, "00009", tmp_path)
    assert begin_commit(store.base, "00009", stalled.attempt_id)     # A3 done, A4 not yet
    wait_until_stale(store.base, "00009")
    b = Claims(store.base, "driver-b", 60)
    taker = attempt_of(store, b, "00009", tmp_path)                   # the claim is stale: taken over
    assert read_claim(store.base, "00009")["holder"] == "driver-b"
    assert store.cleanup(grace_s=3600) == [], "a committing attempt's files are never deleted"
    first, second = (stalled, taker) if winner == "stalled" else (taker, stalled)
    if first is stalled:
        from dataset import protocol
        assert storage.put_if_absent(store.ledger_path("00009"), protocol.dump(
            {"shard": "00009", "attempt_id": stalled.attempt_id, "generation": 0, "files": dict(stalled.written)}))
        stalled.result = "committed"
    else:
        assert first.commit({}) == "committed"
    assert second.commit({}) == "lost"
    b.release("00009", committed_generation=0)
    store.cleanup(grace_s=3600)
    assert data_files(store) == {first.path(kind) for kind in store.kinds}
    assert_committed_intact(store)


def test_case3_a_writer_stalled_before_its_commit_is_fenced_by_the_takeover(store, tmp_path):
    a = Claims(store.base, "driver-a", 0.01)
    stalled = attempt_of(store, a, "00010", tmp_path)                 # stalls before A3
    wait_until_stale(store.base, "00010")
    b = Claims(store.base, "driver-b", 60)
    taker = attempt_of(store, b, "00010", tmp_path)
    assert set(store.cleanup(grace_s=3600)) == {stalled.path(kind) for kind in store.kinds}
    assert stalled.commit({}) == "fenced"
    assert taker.commit({}) == "committed"
    assert_committed_intact(store)


def test_case4_a_link_that_nfs_reports_as_existing_after_making_it_is_recognised(tmp_path, monkeypatch):
    """NFS answers a retransmitted link() with EEXIST although the first transmission made it. Before: the
    attempt believed it lost and deleted the files its own ledger named."""
    store = ShardStore(str(tmp_path / "out"), RECAPTION_KINDS)
    real_link = os.link

    def link_then_eexist(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)
        if str(dst).endswith(".json") and "_ledger" in str(dst):
            raise FileExistsError(17, "File exists", str(dst))

    with claimed_attempt(store, "00011") as attempt:
        put_files(attempt, tmp_path)
        monkeypatch.setattr(os, "link", link_then_eexist)
        assert attempt.commit({}) == "committed"
        monkeypatch.setattr(os, "link", real_link)
    assert data_files(store) == {attempt.path(kind) for kind in store.kinds}
    assert_committed_intact(store)
    with claimed_attempt(store, "00011") as other:                    # a real EEXIST is still a loss
        assert put_files(other, tmp_path).commit({}) == "lost"


def test_health_from_listings_and_a_broken_mark(store, tmp_path):
    with claimed_attempt(store, "00012") as attempt:
        assert put_files(attempt, tmp_path).commit({}) == "committed"
    assert store.listing().health("00012") == "ok"
    storage.delete(attempt.path("wds"))
    assert store.listing().health("00012") == "unsure", "a kind is missing: planning reads the ledger to decide"
    passed, problems = verify(store, rows=False)
    assert [p.what for p in problems] == [f"wds/{storage.basename(attempt.path('wds'))} is missing"]
    assert store.mark_broken("00012", 0, problems[0].what) and not store.mark_broken("00012", 0, "again")
    assert store.listing().health("00012") == "broken"
    storage.delete(attempt.path("parquet"))
    listing = store.listing()
    listing.broken.clear()
    assert listing.health("00012") == "broken", "no file of the latest generation is left"
