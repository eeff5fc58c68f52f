"""The worker feeds one engine across shards: a bounded window, per-request errors, abandon, a dying engine."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import committed
import pytest

from dataset.synthetic.input_shards import rewrite_members, write_shards
from recaption.engines import EngineConfig, SamplingConfig
from recaption.flow import ShardTask
from recaption.job import CaptionJob
from recaption.worker import CaptionWorker, EngineDied, FaultyEngine

pytestmark = pytest.mark.slow


def tasks(folder: Path, count: int, out: Path) -> list[ShardTask]:
    return [committed.registered(ShardTask(f"{i:05d}", path=str(folder / f"{i:05d}.tar")), out) for i in range(count)]


def caption_all(worker: CaptionWorker, shard_tasks: list[ShardTask]) -> list:
    """All shards at once, as the pool sends them (the worker orders them by arrival)."""
    with ThreadPoolExecutor(len(shard_tasks)) as pool:
        futures = []
        for t in shard_tasks:
            futures.append(pool.submit(worker.process, t))
            time.sleep(0.05)   # arrival order = shard order
        return [f.result() for f in futures]


def parquet_keys(out: Path) -> list[str]:
    return committed.keys(str(out))


def test_requests_stream_across_shards_within_the_window(tmp_path, tiny_model, vllm_engine):
    infos = write_shards(tmp_path / "in", shards=3, per_shard=10)
    out = tmp_path / "out"
    worker = CaptionWorker(CaptionJob(EngineConfig(tiny_model), SamplingConfig(max_tokens=48), window=4),
                           str(out), str(out), engine=vllm_engine, on_engine_death=lambda: None)
    try:
        outcomes = caption_all(worker, tasks(tmp_path / "in", 3, tmp_path / "out"))
    finally:
        worker.close()

    assert [o.kind for o in outcomes] == ["committed"] * 3
    assert sorted(parquet_keys(out)) == sorted(k for info in infos for k in info["keys"])  # each key once
    in_engine, most, shard_of = set(), 0, lambda request_id: request_id.split(":")[0]
    overlaps = set()
    for _, event, request_id in worker.request_log:
        if event == "add":
            in_engine.add(request_id)
            overlaps |= {(shard_of(r), shard_of(request_id)) for r in in_engine if shard_of(r) != shard_of(request_id)}
        else:
            in_engine.remove(request_id)
        most = max(most, len(in_engine))
    assert most == 4, "the window bounds the requests in the engine, and fills it"
    assert {("00000", "00001"), ("00001", "00002")} <= overlaps, "the next shard joins before the last one drains"
    stats = outcomes[-1].stats
    assert 0 < stats["busy_s"] <= stats["wall_s"]


def long_caption_shard(folder: Path, bad_index: int) -> list[str]:
    """Shard 00000 with the web caption of one sample made longer than the context can hold."""
    keys = write_shards(folder, shards=1, per_shard=6)[0]["keys"]
    too_long = ("雨" * 1000).encode()   # 3 byte-level tokens a character: ~3000 tokens
    rewrite_members(folder / "00000.tar", lambda name, data: (name, too_long if name == f"{keys[bad_index]}.txt"
                                                                      else data))
    return keys


def test_a_request_the_engine_rejects_is_one_error_row(tmp_path, tiny_model, vllm_engine):
    keys = long_caption_shard(tmp_path / "in", bad_index=2)
    out = tmp_path / "out"
    job = CaptionJob(EngineConfig(tiny_model), SamplingConfig(max_tokens=48), prompt="Describe: {org_caption}")
    worker = CaptionWorker(job, str(out), str(out), engine=vllm_engine, on_engine_death=lambda: None)
    try:
        outcome = worker.process(tasks(tmp_path / "in", 1, tmp_path / "out")[0])
    finally:
        worker.close()

    rows = {r["key"]: r for r in committed.rows(str(out), "00000")}
    assert outcome.ledger["error"] == 1 and outcome.ledger["errors_by_reason"] == {"engine": 1}
    bad = rows[keys[2]]
    assert bad["status"] == "error" and bad["error"].startswith("engine: ") and "2048" in bad["error"]
    assert all(rows[k]["status"] == "ok" and rows[k]["num_tokens"] > 0 for k in keys if k != keys[2])


def abandon_after_first_result(worker: CaptionWorker, shard: str) -> None:
    """Abandon `shard` as soon as one of its requests came back (it then has others in the engine)."""
    while not any(event == "done" and request_id.startswith(shard) for _, event, request_id in worker.request_log):
        time.sleep(0.005)
    worker.abandon(shard)


def test_abandon_drops_a_shard_and_the_others_go_on(tmp_path, tiny_model, vllm_engine):
    write_shards(tmp_path / "in", shards=2, per_shard=30)
    out = tmp_path / "out"
    worker = CaptionWorker(CaptionJob(EngineConfig(tiny_model), SamplingConfig(max_tokens=48), window=3),
                           str(out), str(out), engine=vllm_engine, on_engine_death=lambda: None)
    first, second = tasks(tmp_path / "in", 2, tmp_path / "out")
    threading.Thread(target=abandon_after_first_result, args=(worker, first.shard), daemon=True).start()
    try:
        outcomes = caption_all(worker, [first, second])
    finally:
        worker.close()

    assert [o.kind for o in outcomes] == ["abandoned", "committed"]
    assert sorted(p.name for p in (out / "_ledger").glob("*.json")) == ["00001.json"]
    events = [(event, request_id) for _, event, request_id in worker.request_log if request_id.startswith(first.shard)]
    assert sum(e == "add" for e, _ in events) > sum(e == "done" for e, _ in events), "in-flight requests aborted"
    assert vllm_engine.num_unfinished() == 0


def test_a_dying_engine_answers_every_shard_and_charges_only_those_it_held(tmp_path, tiny_model):
    write_shards(tmp_path / "in", shards=2, per_shard=20)
    out = tmp_path / "out"
    died = threading.Event()
    worker = CaptionWorker(CaptionJob(EngineConfig(tiny_model, backend="null"), window=4), str(out), str(out),
                           on_engine_death=died.set)
    worker.engine = FaultyEngine(worker.engine, f"raise:6:{tmp_path / 'fault-marker'}")

    with ThreadPoolExecutor(2) as pool:
        futures = []
        for t in tasks(tmp_path / "in", 2, tmp_path / "out"):
            futures.append(pool.submit(worker.process, t))
            time.sleep(0.05)   # arrival order = shard order
        errors = []
        for future in futures:
            with pytest.raises(EngineDied) as caught:
                future.result(timeout=60)
            errors.append(caught.value)

    assert died.is_set() and worker.dead == "RuntimeError: injected engine fault"
    assert [(e.shard, e.charged) for e in errors] == [("00000", True), ("00001", False)]
    with pytest.raises(EngineDied, match="not charged"):
        worker.process(tasks(tmp_path / "in", 1, tmp_path / "out")[0])
    assert not (out / "_ledger").exists()
    worker.close()
