"""Planning a run from listings: its cost in storage requests (not in seconds), duplicate names, unready shards."""
from __future__ import annotations

import pytest

from dataset import storage
from dataset.outputs import Output, make_ledger
from recaption.planning import plan

IMG2DATASET_FILES = (".tar", ".parquet", "_stats.json")   # what img2dataset writes for each shard


def write_inputs(folder: str, names: list[str], suffixes: tuple[str, ...] = IMG2DATASET_FILES) -> None:
    """Input files as img2dataset leaves them; planning only lists them, so their bytes do not matter."""
    for name in names:
        for suffix in suffixes:
            storage.write_bytes(storage.join(folder, f"{name}{suffix}"), b"{}")


def commit(output: Output, inputs: str, names: list[str]) -> None:
    """Commit each shard through the output contract (an attempt's ledger, created exclusively)."""
    for name in names:
        ledger = make_ledger([], input=storage.join(inputs, f"{name}.tar"), fingerprint=output.fingerprint,
                             caption_config={}, samples_in=0, started_at=0.0, finished_at=1.0, worker="test")
        assert output.store.new_attempt(name).commit(ledger)


@pytest.mark.parametrize("shards", [10, 100])
def test_planning_done_shards_costs_one_listing_of_each_folder_whatever_their_number(s3_bucket, shards):
    inputs, names = f"{s3_bucket}/shards", [f"{i:05d}" for i in range(shards)]
    write_inputs(inputs, names)
    output = Output.register(f"{s3_bucket}/out", "fp", {}, False)
    commit(output, inputs, names[: shards // 2])

    storage.REQUESTS.clear()
    half = plan(inputs, output.store)
    assert storage.REQUESTS == {"list": 2}, "one page of the inputs (tars and their stats files) and one of ledgers"
    assert (half.done, len(half.tasks), half.not_ready) == (shards // 2, shards - shards // 2, [])

    commit(output, inputs, names[shards // 2:])
    storage.REQUESTS.clear()
    done = plan(f"{inputs}/{{00000..{shards - 1:05d}}}.tar", output.store)   # a brace range: still one listing
    assert storage.REQUESTS == {"list": 2}
    assert (done.done, done.tasks, done.not_ready) == (shards, [], [])


def test_planning_refuses_inputs_that_share_a_shard_name(root):
    for folder in ("1", "2"):
        write_inputs(storage.join(root, "in", folder), ["00000", "00001"])
    output = Output.register(storage.join(root, "out"), "fp", {}, False)

    with pytest.raises(ValueError, match=r"share output names \['00000', '00001'\]"):
        plan(storage.join(root, "in", "{1..2}", "0000{0..1}.tar"), output.store)


def test_img2dataset_shards_without_their_stats_file_are_not_ready(root):
    img2dataset, plain = storage.join(root, "img2dataset"), storage.join(root, "plain")
    write_inputs(img2dataset, ["00000", "00002"])
    write_inputs(img2dataset, ["00001"], (".tar",))   # its download still runs: the stats file comes last
    write_inputs(plain, ["00003"], (".tar",))         # no stats file in the folder at all: not img2dataset's
    output = Output.register(storage.join(root, "out"), "fp", {}, False)

    ready = plan(storage.join(img2dataset, "0000{0..2}.tar"), output.store)
    assert ready.not_ready == ["00001"]
    assert [(t.shard, t.stats_path) for t in ready.tasks] == [
        (name, storage.join(img2dataset, f"{name}_stats.json")) for name in ("00000", "00002")]
    assert [(t.shard, t.stats_path) for t in plan(plain, output.store).tasks] == [("00003", None)]
