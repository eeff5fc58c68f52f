"""Caption sets: several caption columns per image in one pass, each with its prompt, sampling and budget."""
import itertools
import json
from dataclasses import replace
from pathlib import Path

import committed
import pyarrow.parquet as pq
import pytest

from dataset.outputs import ROW_SCHEMA, row_schema
from dataset.synthetic.input_shards import rewrite_members, write_shards
from dataset.wds import iter_samples
from pipelines import recaption as recaption_cli
from recaption.captions import CaptionColumn, default_set, load_caption_set
from recaption.engines import EngineConfig, SamplingConfig
from recaption.flow import ShardTask
from recaption.job import CaptionJob
from recaption.prompt import DEFAULT_PROMPT
from recaption.worker import CaptionWorker

READY_SET = Path(__file__).resolve().parents[1] / "recaption" / "caption_sets" / "recap_v1_v2.toml"
V2 = "re_caption_v2"


def test_the_ready_set_is_recap_v1_and_a_sampled_v2_conditioned_on_the_web_caption(tmp_path):
    v1, v2 = load_caption_set(str(READY_SET))
    assert (v1.name, v1.prompt, v1.sampling) == ("re_caption", DEFAULT_PROMPT, SamplingConfig(max_tokens=128))
    assert v1 == default_set()[0], "its re_caption is today's default column"
    assert v2.name == V2 and "{org_caption}" in v2.prompt and v2.sampled and v2.sampling.top_k > 0
    as_json = tmp_path / "set.json"
    as_json.write_text(json.dumps({"caption": [c.as_dict() for c in (v1, v2)]}))
    assert load_caption_set(str(as_json)) == (v1, v2)


@pytest.mark.parametrize("entries, problem", [
    ([{"name": "v2", "prompt": "x"}], "needs a column named 're_caption'"),
    ([{"name": "re_caption"}, {"name": "re_caption"}], "named twice"),
    ([{"name": "re_caption"}, {"name": "status"}], "row's own fields"),
    ([{"name": "re_caption"}, {"name": "Bad.Name"}], "lower-case"),
    ([{"name": "re_caption", "topk": 5}], "unknown keys \\['topk'\\]"),
    ([{"name": "re_caption", "top_p": 0}], "top_p"),
])
def test_a_set_that_cannot_work_is_refused_in_one_line(tmp_path, entries, problem):
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"caption": entries}))
    with pytest.raises(ValueError, match=problem):
        load_caption_set(str(path))


def test_a_sampled_column_seeds_each_row_from_its_key_and_name():
    sampled = CaptionColumn("v2", "p", SamplingConfig(temperature=0.7, top_k=50, seed=3))
    seeds = {(key, column.name): column.request_sampling(key).seed
             for key in ("a", "b") for column in (sampled, replace(sampled, name="v3"))}
    assert len(set(seeds.values())) == 4, "another key or column: another seed"
    assert sampled.request_sampling("a") == sampled.request_sampling("a")
    assert replace(sampled, sampling=replace(sampled.sampling, seed=4)).request_sampling("a").seed != seeds["a", "v2"]
    greedy = default_set()[0]
    assert greedy.request_sampling("a") is greedy.sampling


def test_every_column_enters_the_fingerprint_and_one_column_keeps_todays(tiny_model):
    engine = EngineConfig(tiny_model, backend="null")
    today = CaptionJob(engine).pinned()
    v1, v2 = load_caption_set(str(READY_SET))
    assert CaptionJob(engine, captions=(v1,)).pinned().fingerprint == today.fingerprint
    assert CaptionJob(engine, captions=(v1,)).pinned().caption_config() == today.caption_config()
    both = CaptionJob(engine, captions=(v1, v2)).pinned()
    prints = {today.fingerprint, both.fingerprint}
    for changed in (replace(v2, name="re_caption_v3"), replace(v2, prompt=v2.prompt + " Briefly."),
                    replace(v2, sampling=replace(v2.sampling, top_k=40)),
                    replace(v2, sampling=replace(v2.sampling, max_tokens=64)),
                    replace(v2, sampling=replace(v2.sampling, seed=1))):
        prints.add(CaptionJob(engine, captions=(v1, changed)).pinned().fingerprint)
    assert len(prints) == 7
    assert [c["name"] for c in both.caption_config()["captions"]] == ["re_caption", V2]


def test_captions_replaces_the_prompt_and_sampling_flags(tmp_path):
    base = ["--input", "in", "--output", "out", "--model", "m", "--captions", str(READY_SET)]
    assert recaption_cli.config_from_args(recaption_cli.parse_args(base)).job.column_names == ("re_caption", V2)
    for extra in (["--prompt", "Describe."], ["--max-tokens", "64"], ["--temperature", "0.5"]):
        with pytest.raises(ValueError, match="--captions names each column"):
            recaption_cli.config_from_args(recaption_cli.parse_args(base + extra))


# ----- one pass on the tiny model in vLLM

def caption_shard(tmp_path: Path, job: CaptionJob, engine, out: Path, **task_fields) -> CaptionWorker:
    worker = CaptionWorker(job, str(out), str(out), engine=engine, on_engine_death=lambda: None)
    try:
        task = committed.registered(ShardTask("00000", path=str(tmp_path / "in" / "00000.tar"), **task_fields), out)
        assert worker.process(task).kind == "committed"
    finally:
        worker.close()
    return worker


def by_key(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in committed.rows(str(out), "00000")}


@pytest.mark.slow
def test_one_column_set_writes_todays_columns_and_captions(tmp_path, tiny_model, vllm_engine):
    write_shards(tmp_path / "in", shards=1, per_shard=4)
    engine = EngineConfig(tiny_model)
    today, with_set = tmp_path / "today", tmp_path / "set"
    caption_shard(tmp_path, CaptionJob(engine, SamplingConfig(max_tokens=48)), vllm_engine, today)
    one = CaptionColumn("re_caption", DEFAULT_PROMPT, SamplingConfig(max_tokens=48))
    caption_shard(tmp_path, CaptionJob(engine, captions=(one,)), vllm_engine, with_set)

    assert pq.read_schema(committed.files(str(with_set), "00000")["parquet"]).names == ROW_SCHEMA.names
    assert by_key(with_set) == by_key(today)
    samples = list(iter_samples(committed.files(str(with_set), "00000")["wds"]))
    assert all(set(s) == {"key", "image_ext", "image", "txt", "re_caption.txt", "json"} for s in samples)


@pytest.mark.slow
def test_two_columns_in_one_pass_each_once_per_row_errors_per_column_and_retry_reruns_only_those(
        tmp_path, tiny_model, vllm_engine):
    keys = write_shards(tmp_path / "in", shards=1, per_shard=6)[0]["keys"]
    tar = tmp_path / "in" / "00000.tar"
    original = tar.read_bytes()
    too_long = ("雨" * 1000).encode()   # ~3000 tokens: the v2 prompt, which holds the web caption, cannot fit
    rewrite_members(tar, lambda name, data: (name, too_long if name == f"{keys[2]}.txt" else data))
    v1 = CaptionColumn("re_caption", DEFAULT_PROMPT, SamplingConfig(max_tokens=24))
    v2 = CaptionColumn(V2, "Web caption: {org_caption}. Describe the image.",
                       SamplingConfig(max_tokens=24, temperature=0.8, top_k=20, seed=7))
    job = CaptionJob(EngineConfig(tiny_model), captions=(v1, v2), window=4)
    out = tmp_path / "out"

    worker = caption_shard(tmp_path, job, vllm_engine, out)

    rows = by_key(out)
    assert list(rows) == keys, "every key exactly once"
    bad = rows[keys[2]]
    assert bad["status"] == "error" and bad[V2] is None and bad["re_caption"], "only the v2 column failed"
    assert list(dict(bad["caption_errors"])) == [V2] and "2048" in dict(bad["caption_errors"])[V2]
    assert bad["error"] == dict(bad["caption_errors"])[V2]
    good = [rows[k] for k in keys if k != keys[2]]
    assert all(r["status"] == "ok" and r["re_caption"] and r[V2] and r[f"{V2}_num_tokens"] > 0 for r in good)
    assert pq.read_schema(committed.files(str(out), "00000")["parquet"]).names == row_schema(("re_caption", V2)).names
    ledger = committed.store(str(out)).read_ledger("00000")
    assert ledger["columns"] == {"re_caption": {"ok": 6, "error": 0}, V2: {"ok": 5, "error": 1}}
    assert ledger["tokens"] == sum(r["num_tokens"] + r[f"{V2}_num_tokens"] for r in rows.values())
    samples = {s["key"]: s for s in iter_samples(committed.files(str(out), "00000")["wds"])}
    assert sorted(samples) == sorted(k for k in keys if k != keys[2])
    assert all(s[f"{V2}.txt"].decode() == rows[k][V2] and s["re_caption.txt"].decode() == rows[k]["re_caption"]
               for k, s in samples.items())
    adds = [request_id for _, event, request_id in worker.request_log if event == "add"]
    assert len(adds) == 2 * len(keys) - 1 == len(set(adds)), "one request per column and row (one refused)"
    runs = [image for image, _ in itertools.groupby(request_id.rsplit(":", 1)[0] for request_id in adds)]
    assert len(runs) == len(set(runs)) == len(keys), "an image's requests enter the engine one right after the other"

    again = tmp_path / "again"   # the sampled column is seeded per row: a rerun draws the same captions
    caption_shard(tmp_path, job, vllm_engine, again)
    assert by_key(again) == rows

    tar.write_bytes(original)
    retry = caption_shard(tmp_path, job, vllm_engine, out, generation=1, retry_errors=True)
    fixed = by_key(out)
    assert [r.split(":")[2:] for _, event, r in retry.request_log if event == "add"] == [["2", V2]], \
        "--retry-errors asks only for the failed column of the failed row"
    assert fixed[keys[2]]["status"] == "ok" and fixed[keys[2]]["caption_errors"] is None
    assert fixed[keys[2]]["re_caption"] == bad["re_caption"], "the column that had its caption is kept"
    assert all(fixed[k] == rows[k] for k in keys if k != keys[2])
    assert keys[2] in {s["key"] for s in iter_samples(committed.files(str(out), "00000")["wds"])}
