"""One shard end to end on the real vLLM engine, with every kind of bad sample."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from dataset import outputs
from dataset.synthetic.bad_inputs import BAD_KINDS
from dataset.synthetic.input_shards import write_shards
from recaption.engines import EngineConfig, SamplingConfig
from recaption.job import CaptionJob
from recaption.prompt import DEFAULT_PROMPT, PromptBuilder
from recaption.shard import recaption_shard, recaption_shards

pytestmark = pytest.mark.slow


@pytest.fixture
def job(tiny_model):
    return CaptionJob(EngineConfig(tiny_model, dtype="float32"), SamplingConfig(max_tokens=48),
                      prompt=DEFAULT_PROMPT, chunk_size=8)


def test_bad_samples_become_error_rows_and_nothing_is_lost(tmp_path, vllm_engine, job):
    info = write_shards(tmp_path / "in", shards=1, per_shard=12, bad=True)[0]
    tar = str(tmp_path / "in" / "00000.tar")
    store = outputs.Output.register(str(tmp_path / "out"), job.fingerprint, job.caption_config(), False).store
    prompts = PromptBuilder(vllm_engine.processor, job.prompt)

    ledger = recaption_shard(tar, store, vllm_engine, prompts, job)

    files = store.files(ledger)
    rows = pq.read_table(files["parquet"]).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(info["keys"])  # every input key exactly once
    duplicates = sum("#" in k for k in info["injected"])
    assert ledger["samples_in"] == len(rows) + ledger["duplicates"] == len(info["keys"]) + duplicates
    by_key = {r["key"]: r for r in rows}
    for key, kind in info["injected"].items():
        if "#" in key:  # a duplicate group, dropped
            continue
        row = by_key[key]
        assert row["status"] == ("ok" if BAD_KINDS[kind] else "error"), (kind, row)
        if row["status"] == "error":
            assert row["error"] and row["re_caption"] is None
    reasons = {info["injected"][k]: by_key[k]["error"].split(":")[0] for k in info["injected"] if "#" not in k
               and by_key[k]["status"] == "error"}
    assert reasons == {"corrupt_jpeg": "decode", "truncated_jpeg": "truncated", "zero_bytes": "empty",
                       "bomb_header": "bomb", "missing_image": "missing", "oversize_image": "oversize",
                       "symlink_image": "nonregular", "hardlink_image": "nonregular", "tiny_image": "small",
                       "thin_image": "aspect"}
    good = [r for r in rows if r["key"] not in info["injected"]]
    assert all(r["status"] == "ok" and r["re_caption"] is not None and r["num_tokens"] > 0 for r in good)
    assert all(r["fingerprint"] == job.fingerprint for r in rows)
    assert by_key[next(k for k, v in info["injected"].items() if v == "missing_txt")]["org_caption"] == ""

    ok_keys = {r["key"] for r in rows if r["status"] == "ok"}
    samples = list(wds.WebDataset(files["wds"], shardshuffle=False))
    assert {s["__key__"] for s in samples} == ok_keys
    assert all(s["re_caption.txt"].decode() == by_key[s["__key__"]]["re_caption"] for s in samples)

    assert ledger == {**json.loads(Path(store.ledger_path("00000")).read_text()), "written": True}
    assert ledger["ok"] + ledger["error"] == len(rows) and ledger["error"] == len(reasons)
    assert not [p for p in Path(store.base).rglob("*") if p.name.endswith(".tmp")]


def test_second_run_skips_done_shards(tmp_path, vllm_engine, job):
    write_shards(tmp_path / "in", shards=2, per_shard=4)
    paths = sorted(str(p) for p in (tmp_path / "in").glob("*.tar"))
    out = str(tmp_path / "out")
    store = outputs.ShardStore(out, outputs.RECAPTION_KINDS)
    prompts = PromptBuilder(vllm_engine.processor, job.prompt)

    first = recaption_shards(paths, store, vllm_engine, prompts, job)
    mtimes = {p: p.stat().st_mtime_ns for p in Path(out).rglob("*.*")}
    second = recaption_shards(paths, store, vllm_engine, prompts, job)

    assert [ledger["shard"] for ledger in first] == ["00000", "00001"] and second == []
    assert mtimes == {p: p.stat().st_mtime_ns for p in Path(out).rglob("*.*")}
