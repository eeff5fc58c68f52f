"""The recaption output contract: rows, versions (V1-V3), and reading through ledgers (R1-R2)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dataset import outputs, storage
from dataset.protocol import claimed_attempt
from dataset.reader import InputSample
from dataset.synthetic import finished_runs
from dataset.versions import JOB_FILE, FingerprintMismatch, Output


def test_a_new_version_becomes_current_only_when_complete(root):
    finished_runs.write_recaption_outputs(root, 2, 5, errors_per_shard=1, fingerprint="a" * 16, image_size=16)
    old = Output.open(root)
    old_files = {path: storage.read_bytes(path) for shard in outputs.load_finished(root).by_shard
                 for path in old.store.files(old.store.read_ledger(shard)).values()}

    with pytest.raises(FingerprintMismatch, match="--new-version"):
        Output.register(root, "b" * 16, {"model": "other"}, new_version=False, kinds=outputs.RECAPTION_KINDS)
    new = Output.register(root, "b" * 16, {"model": "other"}, new_version=True, kinds=outputs.RECAPTION_KINDS)
    assert new.base == storage.join(root, "versions", "b" * 16) and not new.current and not new.complete
    assert Output.open(root).fingerprint == "a" * 16, "V2: readers keep the complete version meanwhile"
    with pytest.raises(FingerprintMismatch, match="another version"):   # a rerun without the flag is refused
        Output.register(root, "b" * 16, {"model": "other"}, new_version=False, kinds=outputs.RECAPTION_KINDS)
    assert Output.register(root, "b" * 16, {}, new_version=True, kinds=outputs.RECAPTION_KINDS) == new

    finished_runs.write_recaption_outputs(root, 3, 5, errors_per_shard=1, fingerprint="b" * 16, image_size=16,
                                          new_version=True, mark_complete=False)
    assert outputs.load_finished(root).fingerprint == "a" * 16
    assert len(outputs.load_finished(root, "b" * 16).ledgers) == 3
    made = new.mark_complete()
    assert made.current and made.complete and Output.open(root).fingerprint == "b" * 16
    assert len(outputs.load_finished(root).ledgers) == 3
    before = outputs.load_finished(root, "a" * 16)
    assert before.fingerprint == "a" * 16 and sorted(before.by_shard) == ["00000", "00001"]
    assert {path: storage.read_bytes(path) for path in old_files} == old_files
    assert pq.read_table(before.parquet("00000")).column("fingerprint").to_pylist() == ["a" * 16] * 5
    with pytest.raises(ValueError, match="has no version c"):
        Output.open(root, "c" * 16)


def test_every_run_of_a_version_writes_its_kinds(root):
    """V3 (issue 19, case 5): a version written with WDS refuses a run with --no-wds, and the other way round."""
    Output.register(root, "a" * 16, {}, new_version=False, kinds=outputs.recaption_kinds(write_wds=True))
    with pytest.raises(ValueError, match="committed as parquet \\+ wds; this run would write parquet.*drop --no-wds"):
        Output.register(root, "a" * 16, {}, new_version=False, kinds=outputs.recaption_kinds(write_wds=False))


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


def test_readers_skip_shards_whose_files_are_not_as_committed(tmp_path):
    out = str(tmp_path / "out")
    finished_runs.write_recaption_outputs(out, 3, 4, image_size=16)
    run = outputs.load_finished(out)
    storage.delete(run.wds("00001"))
    Path(run.parquet("00002")).write_bytes(b"short")
    again = outputs.load_finished(out)
    assert sorted(again.by_shard) == ["00000"]
    reasons = dict(again.skipped)
    assert "is missing" in reasons["00001"] and "has 5 bytes, its ledger says" in reasons["00002"]


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
    output = Output.register(str(tmp_path), "fp", {}, new_version=False, kinds=outputs.RECAPTION_KINDS)
    scores = output.stage("clip_scores", {"parquet": "parquet"})
    assert scores.base == str(tmp_path / "clip_scores") and scores.kinds == {"parquet": "parquet"}
    with pytest.raises(ValueError, match="'wds' is not a kind"):
        scores.attempt("00000", 0, "a" * 12).path("wds")
    for bad in ("a~1", "", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="cannot name a shard"):
            output.store.attempt(bad, 0, "a" * 12)
    assert json.loads((tmp_path / JOB_FILE).read_text())["versions"]["fp"]["root"] == ""


def test_training_data_from_an_output_is_its_committed_files_and_listing_inside_it_is_refused(tmp_path):
    """R2 (issue 19, case 7): OUT, OUT/wds and OUT/parquet resolve through the ledgers; a glob or a brace range
    inside an output would also match in-flight, losing and superseded files, and is refused with what works."""
    out = str(tmp_path / "out")
    finished_runs.write_recaption_outputs(out, 3, 4)
    run = outputs.load_finished(out)
    committed = [run.wds(shard) for shard in sorted(run.by_shard)]
    leftover = Path(out, "wds", "00001~0.deadattempt0.tar")    # a killed attempt's file, not yet cleaned up
    leftover.write_bytes(Path(committed[1]).read_bytes())

    assert outputs.wds_shards(out) == committed
    assert outputs.wds_shards(f"{out}/wds") == committed
    assert outputs.committed_files(f"{out}/parquet", "parquet") == [run.parquet(s) for s in sorted(run.by_shard)]
    for spec in (f"{out}/wds/*.tar", f"{out}/wds/{{00000..00002}}~0.*.tar", f"{out}/*"):
        with pytest.raises(ValueError, match=f"inside the recaption output {out}.*pass the output itself"):
            outputs.wds_shards(spec)
    with claimed_attempt(run.store, "00001", 1) as attempt:     # a new generation: readers move with it
        for kind in ("parquet", "wds"):
            local = tmp_path / kind
            local.write_bytes(Path(run.store.files(run.by_shard["00001"])[kind]).read_bytes())
            attempt.put(kind, str(local), rows=4)
        assert attempt.commit(dict(run.by_shard["00001"])) == "committed"
    assert outputs.wds_shards(out)[1] == attempt.path("wds")
    elsewhere = tmp_path / "shards"
    elsewhere.mkdir()
    (elsewhere / "00000.tar").write_bytes(b"")
    assert outputs.wds_shards(f"{elsewhere}/*.tar") == [str(elsewhere / "00000.tar")]
