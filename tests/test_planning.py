"""Planning a run from listings: its cost in storage requests (not in seconds), duplicate names, unready shards,
committed shards whose files are gone (H1)."""
from __future__ import annotations

import pytest

from dataset import storage
from dataset.outputs import RECAPTION_KINDS, make_ledger
from dataset.protocol import claimed_attempt
from dataset.versions import Output
from recaption.stage import plan_captions as plan

IMG2DATASET_FILES = (".tar", ".parquet", "_stats.json")   # what img2dataset writes for each shard


def write_inputs(folder: str, names: list[str], suffixes: tuple[str, ...] = IMG2DATASET_FILES) -> None:
    """Input files as img2dataset leaves them; planning only lists them, so their bytes do not matter."""
    for name in names:
        for suffix in suffixes:
            storage.write_bytes(storage.join(folder, f"{name}{suffix}"), b"{}")


def commit(output: Output, inputs: str, names: list[str], tmp_path, generation: int = 0, errors: int = 0) -> None:
    """Commit each shard through the protocol (a registered attempt's files, its ledger created exclusively)."""
    for name in names:
        ledger = make_ledger([], input=storage.join(inputs, f"{name}.tar"), fingerprint=output.fingerprint,
                             caption_config={}, samples_in=0, started_at=0.0, finished_at=1.0, worker="test")
        ledger["error"] = errors
        with claimed_attempt(output.store, name, generation) as attempt:
            for kind in output.store.kinds:
                local = tmp_path / f"{name}.{kind}"
                local.write_bytes(b"x")
                attempt.put(kind, str(local), rows=0)
            assert attempt.commit(ledger) == "committed"


def register(out: str) -> Output:
    return Output.register(out, "fp", {}, False, RECAPTION_KINDS)


@pytest.mark.parametrize("shards", [10, 100])
def test_planning_done_shards_costs_one_listing_of_each_folder_whatever_their_number(s3_bucket, shards, tmp_path):
    inputs, names = f"{s3_bucket}/shards", [f"{i:05d}" for i in range(shards)]
    write_inputs(inputs, names)
    output = register(f"{s3_bucket}/out")
    commit(output, inputs, names[: shards // 2], tmp_path)

    storage.REQUESTS.clear()
    half = plan(inputs, output.store)
    assert storage.REQUESTS == {"list": 4}, ("one page each: the inputs (tars and their stats files), the ledgers, "
                                             "the Parquet and the WDS files")
    assert (half.done, len(half.tasks), half.not_ready) == (shards // 2, shards - shards // 2, [])

    commit(output, inputs, names[shards // 2:], tmp_path)
    storage.REQUESTS.clear()
    done = plan(f"{inputs}/{{00000..{shards - 1:05d}}}.tar", output.store)   # a brace range: still one listing
    assert storage.REQUESTS == {"list": 4}
    assert (done.done, done.tasks, done.not_ready) == (shards, [], [])


def test_planning_refuses_inputs_that_share_a_shard_name(root):
    for folder in ("1", "2"):
        write_inputs(storage.join(root, "in", folder), ["00000", "00001"])
    output = register(storage.join(root, "out"))

    with pytest.raises(ValueError, match=r"share output names \['00000', '00001'\]"):
        plan(storage.join(root, "in", "{1..2}", "0000{0..1}.tar"), output.store)


def test_img2dataset_shards_without_their_stats_file_are_not_ready(root):
    img2dataset, plain = storage.join(root, "img2dataset"), storage.join(root, "plain")
    write_inputs(img2dataset, ["00000", "00002"])
    write_inputs(img2dataset, ["00001"], (".tar",))   # its download still runs: the stats file comes last
    write_inputs(plain, ["00003"], (".tar",))         # no stats file in the folder at all: not img2dataset's
    output = register(storage.join(root, "out"))

    ready = plan(storage.join(img2dataset, "0000{0..2}.tar"), output.store)
    assert ready.not_ready == ["00001"]
    assert [(t.shard, t.stats_path) for t in ready.tasks] == [
        (name, storage.join(img2dataset, f"{name}_stats.json")) for name in ("00000", "00002")]
    assert [(t.shard, t.stats_path) for t in plan(plain, output.store).tasks] == [("00003", None)]


def test_committed_shards_whose_files_are_gone_are_planned_again_as_their_next_generation(root, tmp_path):
    """H1: a lost race, a bad cleanup or an operator's rm costs rework, never rows; under --retry-errors too."""
    inputs, names = storage.join(root, "shards"), ["00000", "00001", "00002", "00003"]
    write_inputs(inputs, names)
    output = register(storage.join(root, "out"))
    commit(output, inputs, names, tmp_path, errors=1)
    store = output.store
    files = {name: store.files(store.read_ledger(name)) for name in names}
    for path in files["00001"].values():                 # both files gone: the listing alone shows it
        storage.delete(path)
    storage.delete(files["00002"]["wds"])                 # one gone: the listing shows an incomplete set
    storage.write_bytes(files["00003"]["parquet"], b"rewritten")   # its size differs: verify marks it
    store.mark_broken("00003", 0, "parquet/... has 9 bytes, its ledger says 1")

    storage.REQUESTS.clear()
    work = plan(inputs, store)
    assert [(t.shard, t.generation, t.retry_errors) for t in work.tasks] == [
        ("00001", 1, False), ("00003", 1, False), ("00002", 1, False)]
    assert [shard for shard, _ in work.healed] == ["00001", "00003", "00002"]
    assert "is missing" in dict(work.healed)["00002"] and storage.REQUESTS["get"] == 1, "one ledger read"
    retry = plan(inputs, store, retry_errors=True)
    assert sorted((t.shard, t.generation, t.retry_errors) for t in retry.tasks) == [
        ("00000", 1, True), ("00001", 1, False), ("00002", 1, False), ("00003", 1, False)]
