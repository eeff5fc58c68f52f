"""One shard's flow through an in-process worker (null engine: the engine does not matter here)."""
import json
from pathlib import Path

import committed
import pytest
import webdataset as wds

from dataset.protocol import LEDGER_DIR
from dataset.reader import ShardReadError
from dataset.synthetic.bad_inputs import BAD_KINDS
from dataset.synthetic.input_shards import fix_images, write_shards
from recaption.engines import EngineConfig, NullEngine
from recaption.flow import ShardTask
from recaption.job import CaptionJob
from recaption.worker import CaptionWorker


@pytest.fixture
def worker(tiny_model, tmp_path):
    """A worker on the null engine writing to tmp_path/out; stopped after the test."""
    out = str(tmp_path / "out")
    w = CaptionWorker(CaptionJob(EngineConfig(tiny_model, backend="null"), window=4), out, out,
                      on_engine_death=lambda: None)
    yield w
    w.close()


def task(tmp_path: Path, shard: str = "00000", **kwargs) -> ShardTask:
    shard_task = ShardTask(shard, path=str(tmp_path / "in" / f"{shard}.tar"), **kwargs)
    return committed.registered(shard_task, tmp_path / "out")


def rows(out: Path, shard: str = "00000") -> dict[str, dict]:
    return {r["key"]: r for r in committed.rows(str(out), shard)}


def test_bad_samples_become_error_rows_and_nothing_is_lost(tmp_path, worker):
    info = write_shards(tmp_path / "in", shards=1, per_shard=12, bad=True)[0]
    out = tmp_path / "out"

    outcome = worker.process(task(tmp_path))

    ledger = outcome.ledger
    assert outcome.kind == "committed"
    by_key = rows(out)
    assert sorted(by_key) == sorted(info["keys"])  # every input key exactly once
    duplicates = sum("#" in key for key in info["injected"])   # duplicate groups are listed as KEY#kind
    assert ledger["samples_in"] == len(by_key) + ledger["duplicates"] == len(info["keys"]) + duplicates
    singles = {key: kind for key, kind in info["injected"].items() if "#" not in key}
    for key, kind in singles.items():
        assert by_key[key]["status"] == ("ok" if BAD_KINDS[kind] else "error"), (kind, by_key[key])
    reasons = {kind: by_key[key]["error"].split(":")[0] for key, kind in singles.items()
               if by_key[key]["status"] == "error"}
    assert reasons == {"corrupt_jpeg": "decode", "truncated_jpeg": "truncated", "zero_bytes": "empty",
                       "bomb_header": "bomb", "missing_image": "missing", "oversize_image": "oversize",
                       "symlink_image": "nonregular", "hardlink_image": "nonregular", "tiny_image": "small",
                       "thin_image": "aspect"}
    good = [r for key, r in by_key.items() if key not in info["injected"]]
    assert all(r["status"] == "ok" and r["re_caption"] == NullEngine.CAPTION and r["num_tokens"] == 3 for r in good)
    assert list(by_key) == info["keys"]  # in input order

    ok_keys = {k for k, r in by_key.items() if r["status"] == "ok"}
    files = committed.files(str(out), "00000")
    samples = list(wds.WebDataset(files["wds"], shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(ok_keys)
    assert all(s["re_caption.txt"].decode() == by_key[s["__key__"]]["re_caption"] for s in samples)
    on_disk = json.loads((out / LEDGER_DIR / "00000.json").read_text())
    assert on_disk["files"]["parquet"]["path"] == str(Path(files["parquet"]).relative_to(out))
    assert on_disk["ok"] + on_disk["error"] == len(by_key) and on_disk["error"] == len(reasons)
    assert on_disk["files"]["parquet"]["bytes"] == Path(files["parquet"]).stat().st_size


def test_truncated_tar_fails_the_attempt_and_commits_nothing(tmp_path, worker):
    write_shards(tmp_path / "in", shards=1, per_shard=6)
    data = (tmp_path / "in" / "00000.tar").read_bytes()
    (tmp_path / "in" / "00000.tar").write_bytes(data[: len(data) // 2])

    with pytest.raises(ShardReadError, match="00000.tar"):
        worker.process(task(tmp_path))
    assert not (tmp_path / "out" / LEDGER_DIR).exists()

    write_shards(tmp_path / "in", shards=1, per_shard=6)
    with pytest.raises(ShardReadError, match="6 samples in the tar, 7 in its _stats.json"):
        stats = tmp_path / "in" / "00000_stats.json"
        stats.write_text(json.dumps({**json.loads(stats.read_text()), "successes": 7}))
        worker.process(task(tmp_path, stats_path=str(stats)))
    assert not (tmp_path / "out" / LEDGER_DIR).exists()
    assert worker.status()["shards"] == {}, "failed shards leave the worker"


def test_retry_errors_recaptions_only_error_rows_as_the_next_generation(tmp_path, worker):
    info = write_shards(tmp_path / "in", shards=1, per_shard=8, bad=True)[0]
    out = tmp_path / "out"
    worker.process(task(tmp_path))
    before = rows(out)
    fixable = {k for k, kind in info["injected"].items() if kind in ("corrupt_jpeg", "truncated_jpeg")}
    fix_images(tmp_path / "in" / "00000.tar", fixable)

    outcome = worker.process(task(tmp_path, generation=1, retry_errors=True))

    after = rows(out)
    assert outcome.kind == "committed" and outcome.ledger["rows_out"] == len(before)
    committed.assert_only_fixed_rows_changed(before, after, fixable)
    ledger = json.loads((out / LEDGER_DIR / "00000~1.json").read_text())
    assert ledger["generation"] == 1
    assert ledger["error"] == sum(r["status"] == "error" for r in before.values()) - len(fixable)
    trained = [s["__key__"] for s in wds.WebDataset(committed.files(str(out), "00000")["wds"], shardshuffle=False)]
    assert sorted(trained) == sorted(k for k, r in after.items() if r["status"] == "ok")
