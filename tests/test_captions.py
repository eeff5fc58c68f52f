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


@pytest.mark.slow
def test_a_two_column_output_is_scored_published_and_exported_per_column(tmp_path, tiny_model, vllm_engine):
    from dataset.images import prepare_image
    from dataset.outputs import recaption_kinds
    from dataset.publish import publish
    from dataset.scores import register_scorer, score_store
    from dataset.versions import Output
    from dataset.wds import WdsExportConfig, export_wds
    from scoring.clip import ClipModelSpec, ClipScorer
    from scoring.stage import ScoreTask, score_shard
    from scoring.tiny import build_tiny_clip

    keys = write_shards(tmp_path / "in", shards=1, per_shard=4)[0]["keys"]
    v1 = CaptionColumn("re_caption", DEFAULT_PROMPT, SamplingConfig(max_tokens=12))
    v2 = CaptionColumn(V2, "Web caption: {org_caption}. Describe the image.",
                       SamplingConfig(max_tokens=12, temperature=0.8, top_k=20))
    job = CaptionJob(EngineConfig(tiny_model), captions=(v1, v2)).pinned()
    out = tmp_path / "out"
    output = Output.register(str(out), job.fingerprint, job.caption_config(), False, recaption_kinds(True))
    worker = CaptionWorker(job, str(out), output.base, engine=vllm_engine, on_engine_death=lambda: None)
    try:
        task = committed.registered(ShardTask("00000", path=str(tmp_path / "in" / "00000.tar")), output.base)
        assert worker.process(task).kind == "committed"
    finally:
        worker.close()
    rows = by_key(out)

    spec = ClipModelSpec(f"local-dir:{build_tiny_clip(tmp_path / 'clip')}")
    scorer = ClipScorer(spec, "cpu")
    register_scorer(score_store(output), spec.identity())
    score_task = committed.registered(ScoreTask("00000"), score_store(output).base)
    assert score_shard(output, score_task, scorer, spec.identity()).kind == "committed"
    store = score_store(output)
    scored = {s["key"]: s for s in pq.read_table(store.files(store.read_ledger("00000"))["parquet"]).to_pylist()}
    assert sorted(scored) == sorted(keys)
    tar = committed.files(str(out), "00000")["wds"]
    images = {s["key"]: prepare_image(s["image"]).image for s in iter_samples(tar)}
    for key, s in scored.items():
        want = scorer.scores([images[key]], {c: [rows[key][c]] for c in ("re_caption", V2, "org_caption")})
        assert s["re_clip_score"] == pytest.approx(want["re_caption"][0], abs=1e-5)
        assert s[f"{V2}_clip_score"] == pytest.approx(want[V2][0], abs=1e-5)
        assert s["org_clip_score"] == pytest.approx(want["org_caption"][0], abs=1e-5)

    publish(str(out), str(tmp_path / "published"), log=lambda line: None)
    train = pq.read_table(next((tmp_path / "published").rglob("train-*.parquet"))).to_pylist()
    assert sorted(r["key"] for r in train) == sorted(keys)
    for r in train:
        assert (r["re_caption"], r[V2]) == (rows[r["key"]]["re_caption"], rows[r["key"]][V2])
        assert r[f"{V2}_clip_score"] == scored[r["key"]][f"{V2}_clip_score"]
        assert r[f"{V2}_num_tokens"] == rows[r["key"]][f"{V2}_num_tokens"]

    export_wds(str(out), str(tmp_path / "wds"), WdsExportConfig(text=V2), log=lambda line: None)
    exported = list(iter_samples(str(tmp_path / "wds" / "00000.tar")))
    assert sorted(s["key"] for s in exported) == sorted(keys)
    for s in exported:
        assert s["txt"].decode() == s[f"{V2}.txt"].decode() == rows[s["key"]][V2]
        assert s["re_caption.txt"].decode() == rows[s["key"]]["re_caption"]
        assert json.loads(s["json"])["caption"] == V2
    with pytest.raises(ValueError, match="choose a caption column of this version"):
        export_wds(str(out), str(tmp_path / "wds2"), WdsExportConfig(text="re_caption_v3"), log=lambda line: None)
