"""The output contract on a local folder and on S3: attempts, exclusive commits, generations, done-listing,
cleanup, versions and the read side."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dataset import outputs, storage
from dataset.claims import Claims
from dataset.outputs import ATTEMPT_ID, FingerprintMismatch, Output, ShardStore
from dataset.reader import InputSample
from dataset.synthetic import finished_runs


def attempt_with_files(store: ShardStore, shard: str, tmp_path: Path) -> outputs.Attempt:
    """An attempt that has put both its files; each file's bytes name the attempt."""
    attempt = store.new_attempt(shard)
    for kind in store.kinds:
        local = tmp_path / f"{attempt.attempt_id}.{kind}"
        local.write_bytes(f"{kind} of {attempt.attempt_id}".encode())
        attempt.put(kind, str(local), rows=1)
    return attempt


def listed(store: ShardStore) -> list[str]:
    """Every data file under the store, relative to its base."""
    return sorted(f"{kind}/{storage.basename(p)}" for kind in store.kinds
                  for p in storage.list_files(storage.join(store.base, kind)))


def test_two_attempts_of_one_shard_leave_one_ledger_and_the_winners_files(root, tmp_path):
    store = Output.register(root, "fp1", {}, new_version=False).store
    first, second = attempt_with_files(store, "00000", tmp_path), attempt_with_files(store, "00000", tmp_path)
    assert ATTEMPT_ID.fullmatch(first.attempt_id) and first.attempt_id != second.attempt_id
    assert first.path("parquet") != second.path("parquet")

    assert first.commit({"ok": 1}) is True
    assert second.commit({"ok": 1}) is False

    ledger = store.read_ledger("00000")
    assert (ledger["attempt_id"], ledger["generation"], ledger["shard"]) == (first.attempt_id, 0, "00000")
    for kind, path in store.files(ledger).items():
        assert storage.read_bytes(path) == f"{kind} of {first.attempt_id}".encode()
        assert ledger["files"][kind]["bytes"] == len(storage.read_bytes(path))
    assert not storage.exists(second.path("parquet")) and not storage.exists(second.path("wds"))
    assert listed(store) == sorted(e["path"] for e in ledger["files"].values())


def test_racing_commits_have_one_winner(root, tmp_path):
    store = ShardStore(root, outputs.RECAPTION_KINDS)
    attempts = [attempt_with_files(store, "00001", tmp_path) for _ in range(4)]
    start = threading.Barrier(len(attempts))
    won = {}

    def commit(attempt: outputs.Attempt) -> None:
        start.wait()
        won[attempt.attempt_id] = attempt.commit({})

    threads = [threading.Thread(target=commit, args=(a,)) for a in attempts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [attempt_id for attempt_id, ok in won.items() if ok]
    assert len(winners) == 1 and store.read_ledger("00001")["attempt_id"] == winners[0]
    assert listed(store) == [f"{kind}/00001.{winners[0]}.{ext}" for kind, ext in sorted(store.kinds.items())]


def test_a_commit_under_a_claim_no_longer_ours_loses_and_removes_its_files(root, tmp_path):
    store = Output.register(root, "fp1", {}, new_version=False).store
    paused = Claims(store.base, "paused", ttl=60)
    old_token = paused.acquire("00000")
    late = attempt_with_files(store, "00000", tmp_path)
    paused.release("00000")                                # the claim moves on while the attempt is not looking
    new_token = Claims(store.base, "other", ttl=60).acquire("00000")
    assert old_token and new_token and new_token != old_token

    assert late.commit({"ok": 1}, claim_token=old_token) is False
    assert not any(storage.exists(late.path(kind)) for kind in store.kinds)
    assert store.read_ledger("00000") is None
    owner = attempt_with_files(store, "00000", tmp_path)
    assert owner.commit({"ok": 1}, claim_token=new_token) is True
    assert store.read_ledger("00000")["attempt_id"] == owner.attempt_id


def test_a_generation_commit_switches_the_whole_view_at_once(root, tmp_path):
    store = ShardStore(root, outputs.RECAPTION_KINDS)
    assert attempt_with_files(store, "00002", tmp_path).commit({"error": 3})
    seen: list[tuple[bytes, ...]] = []
    stop = threading.Event()

    def read() -> None:  # resolves and reads the shard's files over and over while generations commit
        while not stop.is_set():
            files = store.files(store.read_ledger("00002"))
            seen.append(tuple(storage.read_bytes(files[kind]).split(b" of ")[1] for kind in ("parquet", "wds")))

    reader = threading.Thread(target=read)
    reader.start()
    for generation in range(1, 4):
        assert attempt_with_files(store, "00002", tmp_path).commit({"error": 3 - generation}, generation)
    late = attempt_with_files(store, "00002", tmp_path)
    assert late.commit({}, 3) is False and not storage.exists(late.path("wds"))
    stop.set()
    reader.join()

    assert seen and all(parquet_of == wds_of for parquet_of, wds_of in seen)   # never a mix of two attempts
    assert store.done() == {"00002": 3}
    assert store.read_ledger("00002")["error"] == 0 and store.read_ledger("00002", 0)["error"] == 3
    assert storage.exists(store.ledger_path("00002", 2))


@pytest.mark.parametrize("shards", [10, 100])
def test_done_is_one_listing_whatever_the_number_of_shards(s3_bucket, shards):
    store = ShardStore(f"{s3_bucket}/out", outputs.RECAPTION_KINDS)
    for i in range(shards):
        assert store.new_attempt(f"{i:05d}").commit({})
    assert store.new_attempt("00003").commit({}, generation=1)   # a --retry-errors generation
    storage.REQUESTS.clear()

    done = store.done()

    assert done == {f"{i:05d}": 1 if i == 3 else 0 for i in range(shards)}
    assert storage.REQUESTS == {"list": 1}    # one page of the ledger listing, no per-shard reads


def test_sweep_and_clean_leftovers_leave_only_committed_files(root, tmp_path):
    store = ShardStore(root, outputs.RECAPTION_KINDS)
    committed = attempt_with_files(store, "00000", tmp_path)
    assert committed.commit({})
    attempt_with_files(store, "00000", tmp_path)                        # died after its upload
    attempt_with_files(store, "00001", tmp_path)                        # died, never claimed (single writer)
    released = Claims(root, "gone", ttl=60)
    released.acquire("00002")
    attempt_with_files(store, "00002", tmp_path)                        # died, its driver released the claim
    released.release("00002")
    replaced = attempt_with_files(store, "00003", tmp_path)             # generation 0, replaced by 1
    assert replaced.commit({}) and attempt_with_files(store, "00003", tmp_path).commit({}, 1)
    live = Claims(root, "running", ttl=60)
    token = live.acquire("00004")
    in_flight = attempt_with_files(store, "00004", tmp_path)            # another driver's, still running
    ours = attempt_with_files(store, "00005", tmp_path)                 # this driver's, in flight

    deleted = store.sweep(skip={"00005"})

    assert len(deleted) == 8
    expected = {ledger_paths for shard, generation in store.done().items()
                for ledger_paths in store.files(store.read_ledger(shard, generation)).values()}
    for attempt in (in_flight, ours):
        expected |= {attempt.path(kind) for kind in store.kinds}
    assert sorted(storage.join(store.base, rel) for rel in listed(store)) == sorted(expected)

    assert token and store.clean_leftovers("00004") == sorted(in_flight.path(k) for k in store.kinds)
    assert store.clean_leftovers("00000") == []
    assert storage.read_bytes(committed.path("wds")) == f"wds of {committed.attempt_id}".encode()


def test_new_version_keeps_the_old_version_readable(root):
    finished_runs.write_recaption_outputs(root, 2, 5, errors_per_shard=1, fingerprint="a" * 16, image_size=16)
    old = Output.open(root)
    old_files = {path: storage.read_bytes(path) for shard in outputs.load_finished(root).by_shard
                 for path in old.store.files(old.store.read_ledger(shard)).values()}

    with pytest.raises(FingerprintMismatch, match="--new-version"):
        Output.register(root, "b" * 16, {"model": "other"}, new_version=False)
    new = Output.register(root, "b" * 16, {"model": "other"}, new_version=True)
    assert new.base == storage.join(root, "versions", "b" * 16) and Output.open(root) == new
    finished_runs.write_recaption_outputs(root, 3, 5, errors_per_shard=1, fingerprint="b" * 16, image_size=16)

    assert len(outputs.load_finished(root).ledgers) == 3
    before = outputs.load_finished(root, "a" * 16)
    assert before.fingerprint == "a" * 16 and sorted(before.by_shard) == ["00000", "00001"]
    assert {path: storage.read_bytes(path) for path in old_files} == old_files
    assert pq.read_table(before.parquet("00000")).column("fingerprint").to_pylist() == ["a" * 16] * 5
    assert Output.register(root, "a" * 16, {}, new_version=True) == old   # back to the first version
    with pytest.raises(ValueError, match="has no version c"):
        Output.open(root, "c" * 16)


def test_a_ledger_that_does_not_parse_counts_as_absent(tmp_path, caplog):
    out = str(tmp_path / "out")
    finished_runs.write_recaption_outputs(out, 2, 4, image_size=16)
    store = Output.open(out).store
    Path(store.ledger_path("00001", 1)).write_text("{not json")       # a foreign or damaged file
    assert store.read_ledger("00001")["generation"] == 0             # the latest that parses
    assert store.read_ledger("00001", 1) is None and "does not parse" in caplog.text
    run = outputs.load_finished(out)
    assert sorted(run.by_shard) == ["00000"]
    assert run.skipped == [("00001", f"ledger {store.ledger_path('00001', 1)} does not parse")]

    Path(store.ledger_path("00000")).write_text("")          # a shard whose only ledger is damaged:
    attempt_with_files(store, "00000", tmp_path)             # no file of it is deleted on its word
    assert store.sweep(set()) == [] and store.clean_leftovers("00000") == []
    assert len(store.data_files("00000")["00000"]) == 4


def test_rows_follow_the_schema(tmp_path):
    sample = InputSample(key="00000001", image_ext="jpg", image=b"", org_caption="  a   web\ncaption ",
                         meta={"uid": "u1", "url": "http://x/1.jpg"}, source_key="00000001.extra",
                         notes=["json.uid: int coerced to string", "txt: not UTF-8"])
    ok = outputs.build_row(sample, shard="00000", fingerprint="fp", caption=" A  red circle. ", finish_reason="stop",
                           num_tokens=5, quality="", width=64, height=48)
    clean = InputSample(key="00000002", org_caption="x", org_caption_truncated=True)
    error = outputs.build_row(clean, shard="00000", fingerprint="fp", error="decode: cannot identify image file")
    assert (ok["status"], ok["re_caption"], ok["org_caption"], ok["re_length"], ok["org_length"]) == (
        "ok", "A red circle.", "a web caption", 3, 3)
    assert ok["notes"] == "json.uid: int coerced to string; txt: not UTF-8" and ok["source_key"] == "00000001.extra"
    assert (ok["quality"], error["quality"]) == ("", "truncated")  # a web caption cut at its cap, on any row
    assert (error["status"], error["re_caption"], error["num_tokens"], error["notes"], error["source_key"]) == (
        "error", None, 0, None, None)
    with pytest.raises(ValueError, match="00000/00000001: a row needs a caption or an error"):
        outputs.build_row(sample, shard="00000", fingerprint="fp")
    local = str(tmp_path / "rows.parquet")
    assert outputs.write_parquet([ok, error], local) == Path(local).stat().st_size
    assert pq.read_table(local).to_pylist() == [ok, error]
    assert pq.read_schema(local).names == outputs.ROW_SCHEMA.names


def test_names_and_stages(tmp_path):
    output = Output.register(str(tmp_path), "fp", {}, new_version=False)
    scores = output.stage("clip_scores")
    assert scores.base == str(tmp_path / "clip_scores") and scores.kinds == {"parquet": "parquet"}
    with pytest.raises(ValueError, match="'wds' is not a kind"):
        scores.new_attempt("00000").path("wds")
    for bad in ("a~1", "", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="cannot name a shard"):
            output.store.new_attempt(bad)
    assert json.loads((tmp_path / outputs.JOB_FILE).read_text())["versions"]["fp"]["root"] == ""


def test_training_data_from_an_output_folder_is_its_committed_wds_files(tmp_path):
    out = str(tmp_path / "out")
    finished_runs.write_recaption_outputs(out, 3, 4)
    run = outputs.load_finished(out)
    committed = [run.wds(shard) for shard in sorted(run.by_shard)]
    leftover = Path(out, "wds", "00001.deadattempt0.tar")    # a killed attempt's file, not yet swept
    leftover.write_bytes(Path(committed[1]).read_bytes())

    assert outputs.wds_shards(out) == committed
    assert str(leftover) in outputs.wds_shards(f"{out}/wds/*.tar"), "a glob is taken literally"
