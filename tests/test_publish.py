"""Publishing: `datasets` loads what we write with Recap-DataComp-1B's columns, CLIP scores join by key (all or
refuse), the card is readable and inert, a Hub publish is one private commit, the WDS export's `txt` follows --text."""
from __future__ import annotations

import fnmatch
import json
import re
import shutil
import statistics
import tarfile
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import committed
import datasets
import huggingface_hub
import pyarrow.parquet as pq
import pytest
import webdataset
import yaml
from hubstub import HubStub
from markdown_it import MarkdownIt
from real_run import HOSTILE_CAPTIONS, real_run

from dataset import publish, storage
from dataset.destinations import ConcurrentPublish
from dataset.outputs import RECAPTION_KINDS
from dataset.protocol import claimed_attempt
from dataset.scores import ScoresIncomplete, score_store
from dataset.synthetic import finished_runs
from dataset.versions import Output
from dataset.wds import takes_recaption
from pipelines import publish as publish_cli
from scoring.clip import ClipModelSpec
from scoring.stage import ScoreConfig, ScoreTask, ScoreWorker, score
from scoring.tiny import build_tiny_clip

SHARDS, PER_SHARD, ERRORS = 3, 400, 4
KB = 1000
RECAP_COLUMNS = ["url", "re_caption", "org_caption", "sha256", "key", "re_clip_score", "org_clip_score",
                 "re_length", "org_length"]
REPR = re.compile(r"\{'|'\}|\[\]|\bNone\b|\bTrue\b|\bFalse\b|=\{")


def make_out(out: str) -> int:
    """A finished run of SHARDS shards plus one unfinished and one foreign shard; returns the ok rows."""
    run = finished_runs.write_recaption_outputs(out, SHARDS + 2, PER_SHARD, errors_per_shard=ERRORS)
    store = Output.open(out).store
    storage.delete(store.ledger_path("00003"))                 # not finished: data files without a ledger
    foreign = store.read_ledger("00004")                       # a later generation from another fingerprint
    with claimed_attempt(store, "00004", 1) as attempt, tempfile.TemporaryDirectory() as tmp:
        for kind, path in store.files(foreign).items():
            local = Path(tmp, kind)
            local.write_bytes(storage.read_bytes(path))
            attempt.put(kind, str(local), rows=foreign["files"][kind]["rows"])
        assert attempt.commit({**foreign, "fingerprint": "another-run"}) == "committed"
    assert store.listing().data["00003"]
    return run["rows"]["ok"] - 2 * (PER_SHARD - ERRORS)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> tuple[str, int]:
    path = str(tmp_path_factory.mktemp("out"))
    return path, make_out(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture
def hub_env(monkeypatch) -> str:
    """A token in the environment and huggingface_hub on its LFS path (the stub does not speak Xet)."""
    token = "hf_stub_token_not_to_be_printed"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    return token


def read_card(folder: Path) -> tuple[dict, str]:
    _, header, body = (folder / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(header), body


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def how_made(body: str) -> str:
    return body.split("## How it was made", 1)[1].split("\n## ", 1)[0]


def check_published(folder: Path, ok_rows: int, cache: Path, columns: list[str]) -> datasets.DatasetDict:
    """Both splits load with the right counts and columns, and the card matches the files."""
    loaded = datasets.load_dataset(str(folder), cache_dir=str(cache))
    assert set(loaded) == {"train", "preview"}
    assert loaded["train"].num_rows == ok_rows
    assert loaded["preview"].num_rows == min(1000, ok_rows)
    assert loaded["train"].column_names == columns
    assert None not in loaded["train"]["re_caption"]           # error rows are not published
    assert loaded["preview"]["key"] == loaded["train"]["key"][:1000]
    assert len(set(loaded["train"]["fingerprint"])) == 1       # one version per published dataset

    meta, body = read_card(folder)
    parquet = [f for f in files_of(folder) if f.endswith(".parquet")]
    by_split = {}
    for entry in meta["configs"][0]["data_files"]:
        by_split[entry["split"]] = sorted(f for f in parquet if fnmatch.fnmatch(f, entry["path"]))
    assert sorted(by_split["train"] + by_split["preview"]) == sorted(parquet), "only this publish's files"
    assert [Path(f).name for f in by_split["preview"]] == ["preview-00000-of-00001.parquet"]
    n = len(by_split["train"])
    assert [Path(f).name for f in by_split["train"]] == [f"train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    assert [f["name"] for f in meta["dataset_info"]["features"]] == columns
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == {
        "train": ok_rows, "preview": min(1000, ok_rows)}
    assert meta["license"] and meta["task_categories"] and meta["size_categories"]

    re_lengths = loaded["train"]["re_length"]
    mean, median = statistics.mean(re_lengths), statistics.median(re_lengths)
    assert f"| recaption \\(re\\_caption\\) | {mean:.1f} | {median:g} |" in body
    assert "--caption_col re_caption --save_additional_columns '[\"org_caption\"]'" in body
    assert not REPR.search(how_made(body)), how_made(body)
    return loaded


def unscored_columns() -> list[str]:
    return publish.published_schema(with_scores=False).names


def test_local_publish_loads_and_replaces_stale_files(out, tmp_path, capsys):
    src, ok_rows = out
    dest = tmp_path / "dest"
    publish.publish(src, str(dest), target_bytes=20 * KB, row_group_bytes=20 * KB)
    printed = capsys.readouterr().out
    assert "3 committed shards of version ffffffffffffffff (current, complete), 2 skipped" in printed
    assert "skipped 00003: no ledger" in printed and "skipped 00004: ledger fingerprint another-run" in printed
    assert "CLIP scores: none for these shards" in printed
    train = sorted(dest.glob("data/*/train-*.parquet"))
    assert len(train) == SHARDS
    assert pq.ParquetFile(train[0]).metadata.num_row_groups > 1    # rows were cut at ~20 kB row groups
    check_published(dest, ok_rows, tmp_path / "cache1", unscored_columns())
    body = read_card(dest)[1]
    assert f"{SHARDS * ERRORS:,} rows whose image could not be used are not published" in body
    assert "synthetic/tiny\\-llava at 0000" in body and "greedy \\(temperature 0\\)" in body
    assert "Please generate a detailed caption of this image\\." in body and "**CLIP scores**: not computed" in body

    publish.publish(src, str(dest))                               # defaults: one file, one row group
    assert [p.name for p in dest.glob("data/*/train-*.parquet")] == ["train-00000-of-00001.parquet"]
    assert pq.ParquetFile(next(dest.glob("data/*/train-*"))).metadata.num_row_groups == 1
    assert "removed stale" in capsys.readouterr().out
    check_published(dest, ok_rows, tmp_path / "cache2", unscored_columns())


def test_nested_folders_past_files_per_folder(out, tmp_path):
    src, ok_rows = out
    dest = tmp_path / "dest"
    publish.publish(src, str(dest), target_bytes=1, files_per_folder=2)
    assert sorted(str(p.relative_to(dest)).split("/", 2)[2] for p in dest.glob("data/*/*/*.parquet")) == [
        "0000/train-00000-of-00003.parquet", "0000/train-00001-of-00003.parquet",
        "0001/train-00002-of-00003.parquet"]
    check_published(dest, ok_rows, tmp_path / "cache", unscored_columns())


def test_dry_run_prints_plan_and_writes_nothing(out, tmp_path, capsys, monkeypatch):
    src, _ = out
    dest = tmp_path / "dest"
    publish_cli.main(["--input", src, "--dest", str(dest), "--dry-run", "--target-file-mb", "0.02"])
    printed = capsys.readouterr().out
    assert "/train-00002-of-00003.parquet" in printed and "/preview-00000-of-00001.parquet" in printed
    assert not dest.exists()
    monkeypatch.setenv("HF_TOKEN", "hf_do_not_print_me")
    publish.publish(src, "hf://org/recap", dry_run=True)
    printed = capsys.readouterr().out
    assert "upload: 3 files to dataset repo org/recap, each pre-uploaded when written, then one commit" in printed
    assert "token found" in printed and "hf_do_not_print_me" not in printed


def test_hub_publish_is_one_private_commit_that_adds_and_deletes(out, tmp_path, capsys, hub_env):
    src, ok_rows = out
    local = tmp_path / "local"
    publish.publish(src, str(local), target_bytes=20 * KB)
    with HubStub(hub_env) as stub:
        publish.publish(src, "hf://org/recap", target_bytes=20 * KB, hub_endpoint=stub.url)
        assert stub.unhandled == []
        assert stub.private["datasets/org/recap"] is True                      # private unless --public
        [first] = stub.commits_to("org/recap")
        remote = stub.repos["datasets/org/recap"]
        data_files = sorted("data/" + f.split("/", 2)[2] for f in files_of(local) if f.startswith("data/"))
        assert sorted(first["added"]) == sorted(["README.md", *data_files]) and first["deleted"] == []
        # every data file went to LFS storage before the one commit that made them visible
        assert [kind for kind, _ in stub.events[1:]] == ["lfs-upload"] * len(data_files) + ["commit"]
        assert {f: d for f, d in remote.items() if f.startswith("data/")} == {
            "data/" + f.split("/", 2)[2]: d for f, d in files_of(local).items() if f.startswith("data/")}
        mirror = tmp_path / "mirror"
        for path, data in remote.items():
            (mirror / path).parent.mkdir(parents=True, exist_ok=True)
            (mirror / path).write_bytes(data)
        check_published(mirror, ok_rows, tmp_path / "cache", unscored_columns())
        assert "hf download org/recap --repo-type dataset --include 'data/train-*'" in read_card(mirror)[1]

        before, seen = dict(remote), []
        log = lambda line: seen.append(dict(remote)) if line.startswith("wrote") else None  # noqa: E731
        publish.publish(src, "hf://org/recap", hub_endpoint=stub.url, log=log)   # fewer, bigger files
        assert seen and all(state == before for state in seen)     # readers saw the old dataset until the commit
        second = stub.commits_to("org/recap")[1]
        assert second["parent"] == first["oid"]
        assert second["deleted"] == [f"data/train-0000{i}-of-00003.parquet" for i in range(3)]
        assert "data/train-00000-of-00001.parquet" in second["added"]           # added and deleted together
        assert sorted(f for f in remote if f.startswith("data/train")) == ["data/train-00000-of-00001.parquet"]

        def commit_meanwhile(line: str) -> None:   # another writer commits while this publish uploads
            if line.startswith("wrote data/preview"):
                huggingface_hub.HfApi(endpoint=stub.url).upload_file(
                    path_or_fileobj=b"other", path_in_repo="other.txt", repo_id="org/recap", repo_type="dataset")

        state = dict(remote)
        with pytest.raises(huggingface_hub.errors.HfHubHTTPError, match="412"):
            publish.publish(src, "hf://org/recap", target_bytes=20 * KB, hub_endpoint=stub.url, log=commit_meanwhile)
        assert remote == {**state, "other.txt": b"other"}                       # nothing of the failed publish

        huggingface_hub.HfApi(endpoint=stub.url).create_repo("org/open", repo_type="dataset", private=False)
        with pytest.raises(ValueError, match="exists and is public; publish to it with --public"):
            publish.publish(src, "hf://org/open", hub_endpoint=stub.url)
        assert stub.commits_to("org/open") == []
        publish.publish(src, "hf://org/open", hub_endpoint=stub.url, public=True)
        assert len(stub.commits_to("org/open")) == 1 and stub.private["datasets/org/open"] is False
    assert hub_env not in capsys.readouterr().out


def test_s3_to_s3(s3_bucket, tmp_path):
    src, dest = f"{s3_bucket}/out", f"{s3_bucket}/published"
    ok_rows = make_out(src)
    publish.publish(src, dest, target_bytes=20 * KB)
    mirror = tmp_path / "mirror"
    for path in [entry.path for entry in storage.list_entries(dest, recursive=True)]:
        local = mirror / path[len(dest) + 1:]
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(storage.read_bytes(path))
    check_published(mirror, ok_rows, tmp_path / "cache", unscored_columns())
    shutil.rmtree(mirror)


def test_scores_join_by_key_all_or_refused(tmp_path, clip_dir):
    src = str(tmp_path / "out")
    finished_runs.write_recaption_outputs(src, 3, 30, errors_per_shard=2)
    output = Output.open(src)
    worker = ScoreWorker(src, output.fingerprint, ClipModelSpec(f"local-dir:{clip_dir}"))
    stage_base = score_store(output).base
    assert worker.process(committed.registered(ScoreTask("00001"), stage_base)).kind == "committed"
    with pytest.raises(ScoresIncomplete, match=r"1 of 3 shards have current CLIP scores, 2 do not \(first: 00000, "
                                               r"00002\)"):
        publish.publish(src, str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    publish_cli.main(["--input", src, "--dest", str(tmp_path / "unscored"), "--no-scores"])
    check_published(tmp_path / "unscored", 84, tmp_path / "cache1", unscored_columns())

    for shard in ("00000", "00002"):
        worker.process(committed.registered(ScoreTask(shard), stage_base))
    publish.publish(src, str(tmp_path / "scored"))
    columns = publish.published_schema(with_scores=True).names
    assert columns[:9] == RECAP_COLUMNS
    loaded = check_published(tmp_path / "scored", 84, tmp_path / "cache2", columns)["train"]
    store = score_store(Output.open(src))
    expected = {}
    for shard in store.done():
        for row in pq.read_table(store.files(store.read_ledger(shard))["parquet"]).to_pylist():
            expected[row["key"]] = (row["re_clip_score"], row["org_clip_score"])
    columns = (loaded["key"], loaded["re_clip_score"], loaded["org_clip_score"])
    assert {k: (r, o) for k, r, o in zip(*columns, strict=True)} == expected
    assert "mean" in how_made(read_card(tmp_path / "scored")[1]).split("**CLIP scores**", 1)[1]


class Cells(HTMLParser):
    """The rendered card's tables as rows of (text, tags inside the cell), and every tag name used."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[tuple[str, list[str]]]]] = []
        self.tags: list[str] = []
        self.cell: tuple[list[str], list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ([], [])
        elif self.cell is not None:
            self.cell[1].append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append(("".join(self.cell[0]), self.cell[1]))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell[0].append(data)


@pytest.mark.slow
def test_real_run_scored_published_with_nine_columns_and_an_inert_card(tmp_path_factory, tiny_model, clip_dir,
                                                                        tmp_path):
    src = str(real_run(tmp_path_factory.mktemp("real-run"), tiny_model))
    assert score(ScoreConfig(src, f"local-dir:{clip_dir}", batch_size=4)).exit_code == 0
    dest = tmp_path / "published"
    publish_cli.main(["--input", src, "--dest", str(dest)])
    run_rows = sum(json.loads(p.read_text())["ok"] for p in Path(src, "_ledger").glob("*.json"))
    loaded = check_published(dest, run_rows, tmp_path / "cache", publish.published_schema(with_scores=True).names)
    train = loaded["train"]
    assert train.column_names[:9] == RECAP_COLUMNS
    assert all(-1 <= s <= 1 for s in [*train["re_clip_score"], *train["org_clip_score"]])

    meta, body = read_card(dest)
    made = how_made(body)
    assert " at sha256\\:" in made and "at most 1,024 px on the longest side" in made
    assert "run with the null backend" in made and "refused when over 64,000,000 pixels" in made
    rendered = MarkdownIt("commonmark").enable("table").render(body)
    page = Cells()
    page.feed(rendered)
    assert not {"script", "img", "a", "del"} & set(page.tags)          # nothing from the captions or the config
    assert page.tags.count("h1") == 1 and page.tags.count("em") == 1   # the title; "see *Getting the images*"
    samples = next(t for t in page.tables if [text for text, _ in t[0]][:4] == ["key", "url", "org_caption",
                                                                                  "re_caption"])
    shown = {cells[2][0] for cells in samples[1:]}
    assert shown == {" ".join(c.split()) for c in HOSTILE_CAPTIONS[:5]}       # the text itself, not markup
    assert all(not tags for row in samples for _, tags in row)


def read_wds(dest: Path) -> list[tuple[str, str, str, str, dict]]:
    """(key, txt, re_caption.txt, org_caption.txt, json) of every exported sample, read by webdataset."""
    sizes = json.loads((dest / "sizes.json").read_text())
    urls = str(dest / f"{{00000..{len(sizes) - 1:05d}}}.tar")
    samples = webdataset.WebDataset(urls, shardshuffle=False).to_tuple(
        "__key__", "txt", "re_caption.txt", "org_caption.txt", "json")
    rows = [(k, t.decode(), r.decode(), o.decode(), json.loads(j)) for k, t, r, o, j in samples]
    assert len(rows) == sum(sizes.values())
    return rows


def test_wds_export_txt_follows_text_and_mix_ratio(out, tmp_path):
    src, ok_rows = out
    published = {row["key"]: row for shard in ("00000", "00001", "00002")
                 for row in committed.rows(src, shard) if row["status"] == "ok"}
    for text, ratio in (("re_caption", None), ("org_caption", None), ("mix", 0.3), ("mix", 0.0), ("mix", 1.0)):
        dest = tmp_path / f"{text}-{ratio}"
        publish_cli.main(["--input", src, "--dest", str(dest), "--format", "wds", "--text", text,
                          *(["--mix-ratio", str(ratio)] if ratio is not None else [])])
        rows = read_wds(dest)
        assert sorted(k for k, *_ in rows) == sorted(published)       # the version's ok samples, once each
        for key, txt, recap, org, meta in rows:
            assert (recap, org) == (published[key]["re_caption"], published[key]["org_caption"])   # both kept
            choice = "re_caption" if text == "re_caption" or (text == "mix" and takes_recaption(key, ratio)) \
                else "org_caption"
            assert txt == {"re_caption": recap, "org_caption": org}[choice] and meta["caption"] == choice
        if ratio == 0.3:
            # a per-sample draw: the recaption share is Binomial(n, 0.3) / n; 5 standard deviations is far
            # outside chance for a correct draw and far inside a wrong rule (e.g. 0.7 or all-or-nothing)
            n, share = len(rows), sum(meta["caption"] == "re_caption" for *_, meta in rows) / len(rows)
            assert abs(share - 0.3) < 5 * (0.3 * 0.7 / n) ** 0.5
        if ratio in (0.0, 1.0):
            assert {meta["caption"] for *_, meta in rows} == {"org_caption" if ratio == 0.0 else "re_caption"}
    from open_clip_train.data import get_dataset_size
    assert get_dataset_size(str(tmp_path / "mix-0.3" / "{00000..00002}.tar")) == (ok_rows, 3)


def test_a_local_publish_switches_readers_in_one_step_and_a_concurrent_one_fails_whole(out, tmp_path):
    """Issue 19, case 9: readers of a folder see the old dataset until the card is written, never old and new
    files under one glob; of two publishes at once, the one that finishes second fails and removes its files."""
    src, ok_rows = out
    dest = tmp_path / "dest"
    publish.publish(src, str(dest), target_bytes=20 * KB)
    before = files_of(dest)
    seen = []

    def meanwhile(line: str) -> None:
        if line.startswith("wrote") and not seen:
            seen.append(datasets.load_dataset(str(dest), cache_dir=str(tmp_path / "cache-old")))
            publish.publish(src, str(dest))                   # another publish, start to end, in the middle

    with pytest.raises(ConcurrentPublish, match="changed while this publish wrote its files"):
        publish.publish(src, str(dest), target_bytes=10 * KB, log=meanwhile)
    assert seen and seen[0]["train"].num_rows == ok_rows      # the old dataset, whole, while the new one was written
    after = files_of(dest)
    assert not set(before) & set(after) - {"README.md"}, "the first publish's files are gone"
    assert len([f for f in after if "/train-" in f]) == 1, "only the publish that switched first"
    check_published(dest, ok_rows, tmp_path / "cache-new", unscored_columns())


def test_a_new_version_still_being_captioned_is_not_published_by_default(tmp_path, capsys):
    """Issue 19, case 8: a scheduled publish an hour after `--new-version` keeps publishing the complete version;
    publishing the new one while it is being captioned needs --allow-incomplete."""
    src = str(tmp_path / "out")
    finished_runs.write_recaption_outputs(src, 3, 20, errors_per_shard=1)
    Output.register(src, "b" * 16, {"model": "other"}, new_version=True, kinds=RECAPTION_KINDS)
    finished_runs.write_recaption_outputs(src, 1, 20, fingerprint="b" * 16, new_version=True, mark_complete=False)
    publish.publish(src, str(tmp_path / "scheduled"))
    assert read_card(tmp_path / "scheduled")[1].count("ffffffffffffffff") >= 1
    for fmt in ("parquet", "wds"):
        with pytest.raises(SystemExit) as stopped:
            publish_cli.main(["--input", src, "--dest", str(tmp_path / "new"), "--fingerprint", "b" * 16,
                              "--format", fmt])
        assert stopped.value.code == 2
        assert re.search("still being captioned .*--allow-incomplete", capsys.readouterr().err)
    assert not (tmp_path / "new").exists()
    publish_cli.main(["--input", src, "--dest", str(tmp_path / "new"), "--fingerprint", "b" * 16,
                      "--allow-incomplete"])
    assert "this is part of the input" in read_card(tmp_path / "new")[1]


def test_wds_export_names_are_stable_per_source_shard(out, tmp_path):
    src, _ = out
    dest = tmp_path / "wds"
    publish_cli.main(["--input", src, "--dest", str(dest), "--format", "wds"])
    def contents() -> dict[str, list[tuple[str, bytes]]]:
        found = {}
        for path in sorted(dest.glob("*.tar")):
            with tarfile.open(path) as tar:
                found[path.name] = [(m.name, tar.extractfile(m).read()) for m in tar]
        return found

    first = contents()
    assert sorted(first) == ["00000.tar", "00001.tar", "00002.tar"]
    manifest = json.loads((dest / "manifest.json").read_text())
    assert {name: entry["shard"] for name, entry in manifest["tars"].items()} == {
        f"{shard}.tar": shard for shard in ("00000", "00001", "00002")}
    publish_cli.main(["--input", src, "--dest", str(dest), "--format", "wds"])    # again: the same samples per name
    assert contents() == first
