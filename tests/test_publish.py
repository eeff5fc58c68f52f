"""Publishing: `datasets` loads what we write, the card matches the files, Hub (stub) and S3 uploads."""
from __future__ import annotations

import fnmatch
import shutil
import statistics
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml
from hubstub import HubStub

from dataset import publish, storage
from dataset.outputs import Output
from dataset.synthetic import finished_runs
from pipelines import publish as publish_cli

SHARDS, PER_SHARD, ERRORS = 3, 400, 4
KB = 1000


def make_out(out: str) -> int:
    """A finished run of SHARDS shards plus one unfinished and one foreign shard; returns the ok rows."""
    run = finished_runs.write_recaption_outputs(out, SHARDS + 2, PER_SHARD, errors_per_shard=ERRORS)
    store = Output.open(out).store
    storage.delete(store.ledger_path("00003"))                 # not finished: data files without a ledger
    foreign = store.read_ledger("00004")                       # a later generation from another fingerprint
    assert store.new_attempt("00004").commit({**foreign, "fingerprint": "another-run"}, generation=1)
    assert store.data_files("00003")["00003"]
    return run["rows"]["ok"] - 2 * (PER_SHARD - ERRORS)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> tuple[str, int]:
    path = str(tmp_path_factory.mktemp("out"))
    return path, make_out(path)


def read_card(folder: Path) -> tuple[dict, str]:
    _, header, body = (folder / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(header), body


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def check_published(folder: Path, ok_rows: int, cache: Path) -> None:
    """Both splits load with the right counts and columns, and the card matches the files."""
    loaded = datasets.load_dataset(str(folder), cache_dir=str(cache))
    assert set(loaded) == {"train", "preview"}
    assert loaded["train"].num_rows == ok_rows
    assert loaded["preview"].num_rows == min(1000, ok_rows)
    assert loaded["train"].column_names == publish.PUBLISHED_COLUMNS
    assert None not in loaded["train"]["re_caption"]           # error rows are not published
    assert loaded["preview"]["key"] == loaded["train"]["key"][:1000]

    meta, body = read_card(folder)
    parquet = [f for f in files_of(folder) if f.endswith(".parquet")]
    by_split = {}
    for entry in meta["configs"][0]["data_files"]:
        by_split[entry["split"]] = sorted(f for f in parquet if fnmatch.fnmatch(f, entry["path"]))
    assert sorted(by_split["train"] + by_split["preview"]) == sorted(parquet)
    assert by_split["preview"] == ["data/preview-00000-of-00001.parquet"]
    n = len(by_split["train"])
    assert [Path(f).name for f in by_split["train"]] == [f"train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    assert [f["name"] for f in meta["dataset_info"]["features"]] == publish.PUBLISHED_COLUMNS
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == {
        "train": ok_rows, "preview": min(1000, ok_rows)}
    assert meta["license"] and meta["task_categories"] and meta["size_categories"] == ["1K<n<10K"]

    re_lengths = loaded["train"]["re_length"]
    mean, median = statistics.mean(re_lengths), statistics.median(re_lengths)
    assert f"| recaption (`re_caption`) | {mean:.1f} | {median:g} |" in body
    assert "--caption_col re_caption --save_additional_columns '[\"org_caption\"]'" in body
    assert f"{SHARDS * ERRORS:,} rows whose image could not be used are not published" in body
    assert "synthetic/tiny-llava" in body and "Please generate a detailed caption" in body


def test_local_publish_loads_and_replaces_stale_files(out, tmp_path, capsys):
    src, ok_rows = out
    dest = tmp_path / "dest"
    publish.publish(src, str(dest), target_bytes=20 * KB, row_group_bytes=20 * KB)
    printed = capsys.readouterr().out
    assert "3 done shards (fingerprint ffffffffffffffff), 2 skipped" in printed
    assert "skipped 00003: no ledger" in printed and "skipped 00004: ledger fingerprint another-run" in printed
    train = sorted(dest.glob("data/train-*.parquet"))
    assert len(train) == SHARDS
    assert pq.ParquetFile(train[0]).metadata.num_row_groups > 1    # rows were cut at ~20 kB row groups
    check_published(dest, ok_rows, tmp_path / "cache1")

    publish.publish(src, str(dest))                               # defaults: one file, one row group
    assert [p.name for p in dest.glob("data/train-*.parquet")] == ["train-00000-of-00001.parquet"]
    assert pq.ParquetFile(next(dest.glob("data/train-*"))).metadata.num_row_groups == 1
    assert "removed stale" in capsys.readouterr().out
    check_published(dest, ok_rows, tmp_path / "cache2")


def test_nested_folders_past_files_per_folder(out, tmp_path):
    src, ok_rows = out
    dest = tmp_path / "dest"
    publish.publish(src, str(dest), target_bytes=1, files_per_folder=2)
    assert sorted(str(p.relative_to(dest)) for p in dest.glob("data/*/*.parquet")) == [
        "data/0000/train-00000-of-00003.parquet", "data/0000/train-00001-of-00003.parquet",
        "data/0001/train-00002-of-00003.parquet"]
    check_published(dest, ok_rows, tmp_path / "cache")


def test_dry_run_prints_plan_and_writes_nothing(out, tmp_path, capsys, monkeypatch):
    src, _ = out
    dest = tmp_path / "dest"
    publish_cli.main(["--input", src, "--dest", str(dest), "--dry-run",
                                      "--target-file-mb", "0.02"])
    printed = capsys.readouterr().out
    assert "data/train-00002-of-00003.parquet" in printed and "data/preview-00000-of-00001.parquet" in printed
    assert not dest.exists()
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_print_me")
    publish.publish(src, "hf://org/recap", dry_run=True)
    printed = capsys.readouterr().out
    assert "upload: 3 files to dataset repo org/recap" in printed and "token found" in printed
    assert "hf_do_not_print_me" not in printed


def test_hub_upload_commits_the_local_files(out, tmp_path, capsys, monkeypatch):
    src, ok_rows = out
    token = "hf_stub_token_not_to_be_printed"
    monkeypatch.setenv("HF_TOKEN", token)
    local = tmp_path / "local"
    publish.publish(src, str(local), target_bytes=20 * KB)
    with HubStub(token) as stub:
        publish.publish(src, "hf://org/recap", target_bytes=20 * KB, hub_endpoint=stub.url, hub_batch_files=2)
        assert stub.unhandled == []
        remote = stub.repos["datasets/org/recap"]
        assert len(stub.commits) == 3                              # 3 train + preview + card, 2 per upload
        expected = files_of(local)
        assert {f: d for f, d in remote.items() if f != "README.md"} == {
            f: d for f, d in expected.items() if f != "README.md"}
        mirror = tmp_path / "mirror"
        for path, data in remote.items():
            (mirror / path).parent.mkdir(parents=True, exist_ok=True)
            (mirror / path).write_bytes(data)
        check_published(mirror, ok_rows, tmp_path / "cache")
        assert "hf download org/recap --repo-type dataset --include 'data/train-*'" in read_card(mirror)[1]

        publish.publish(src, "hf://org/recap", hub_endpoint=stub.url)   # fewer, bigger files
        assert stub.commits[-1]["deleted"] == [f"data/train-0000{i}-of-00003.parquet" for i in range(3)]
        assert sorted(f for f in remote if f.startswith("data/train")) == ["data/train-00000-of-00001.parquet"]
    assert token not in capsys.readouterr().out


def test_s3_to_s3(s3_bucket, tmp_path):
    src, dest = f"{s3_bucket}/out", f"{s3_bucket}/published"
    ok_rows = make_out(src)
    publish.publish(src, dest, target_bytes=20 * KB)
    mirror = tmp_path / "mirror"
    for path in [*storage.list_files(dest), *storage.list_files(f"{dest}/data")]:
        local = mirror / path[len(dest) + 1:]
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(storage.read_bytes(path))
    check_published(mirror, ok_rows, tmp_path / "cache")
    shutil.rmtree(mirror)
