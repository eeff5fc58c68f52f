"""Worker sizing (pure, then on a local Ray with declared GPUs) and the pool's recovery, through the job's CLI.

Ray starts once for the module with 4 declared GPUs and 8 declared CPUs (resources Ray hands out; the
null backend needs no real GPU). The CLI runs in-process and attaches to it, as under `ray job submit`.
"""
import json
import re
import time
from pathlib import Path

import committed
import pytest

from dataset.synthetic.input_shards import write_shards
from pipelines import recaption as recaption_cli
from recaption.engines import EngineConfig
from recaption.job import CaptionJob
from recaption.worker import FAULT_ENV, CaptionWorker
from runner.pool import ClusterView, Pool, PoolConfig, Sizing, size_workers

ROOT = Path(__file__).resolve().parents[1]


def test_tensor_parallel_2_on_4_gpus_sizes_2_workers_of_2_gpus():
    sizing = size_workers(ClusterView(gpus=4, started_here=False), PoolConfig(), tensor_parallel_size=2,
                          pending_shards=100)
    assert sizing == Sizing(2, 2, 4, [{"CPU": 4, "GPU": 2}] * 2)


def test_an_autoscaling_cluster_without_gpus_yet_is_still_asked_for_gpu_workers():
    view = ClusterView(gpus=0, started_here=False)
    assert size_workers(view, PoolConfig(), 1, 100).bundles == [{"CPU": 4, "GPU": 1}]
    asked = size_workers(view, PoolConfig(num_workers=16), 2, 100)
    assert (asked.workers, asked.gpus) == (16, 2) and asked.bundles == [{"CPU": 4, "GPU": 2}] * 16


def test_local_cpu_box_and_explicit_flags():
    local = ClusterView(gpus=0, started_here=True)
    assert size_workers(local, PoolConfig(), 1, 100) == Sizing(1, 0, 1, None)
    assert size_workers(local, PoolConfig(num_workers=2), 1, 100) == Sizing(2, 0, 1, None)
    local_gpus = ClusterView(gpus=8, started_here=True)
    assert size_workers(local_gpus, PoolConfig(), 1, 3) == Sizing(3, 1, 4, None), "never more workers than shards"
    flags = PoolConfig(gpus_per_worker=0.5, cpus_per_worker=2)
    assert size_workers(local_gpus, flags, 1, 100) == Sizing(16, 0.5, 2, None)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=8, num_gpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_declared_gpus_start_2_workers_holding_2_gpus_each(ray_cluster, tiny_model, tmp_path):
    sizing = size_workers(ClusterView(ray_cluster.cluster_resources()["GPU"], started_here=False), PoolConfig(),
                          tensor_parallel_size=2, pending_shards=10)
    job = CaptionJob(EngineConfig(tiny_model, backend="null", tensor_parallel_size=2)).pinned()
    pool = Pool(CaptionWorker, (job, str(tmp_path), str(tmp_path)), str(tmp_path), sizing, PoolConfig(),
                name="recaption")
    pool.start()
    try:
        deadline = time.time() + 120
        while pool.ready_workers < 2 and time.time() < deadline:
            pool.wait(1.0)
        gpus = [info["gpus"] for info in pool.info()]
    finally:
        pool.close()
    assert len(gpus) == 2 and all(len(ids) == 2 for ids in gpus)
    assert len({i for ids in gpus for i in ids}) == 4, "each worker holds its own 2 GPUs"


def run_cli(*args: str) -> int:
    return recaption_cli.main(list(args))


def output_keys(out: Path) -> list[str]:
    return committed.keys(str(out))


def ledgers(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "_ledger").glob("*.json")}


NULL_ONE_WORKER = ("--backend", "null", "--num-workers", "1", "--gpus-per-worker", "0", "--cpus-per-worker", "1",
                   "--progress-every", "60")


@pytest.mark.slow
def test_engine_killed_inside_the_actor_reruns_its_shard_once_and_spares_the_prefetched_one(
        ray_cluster, tiny_model, tmp_path, monkeypatch, capsys):
    infos = write_shards(tmp_path / "in", shards=3, per_shard=30)
    out = tmp_path / "out"
    monkeypatch.setenv(FAULT_ENV, f"raise:10:{tmp_path / 'fault-marker'}")

    code = run_cli("--input", str(tmp_path / "in"), "--output", str(out), "--model", tiny_model, *NULL_ONE_WORKER,
                   "--window", "4")

    printed = capsys.readouterr()
    assert code == 0 and (tmp_path / "fault-marker").exists()
    assert sorted(output_keys(out)) == sorted(k for info in infos for k in info["keys"])
    attempts = {shard: ledger["attempt"] for shard, ledger in ledgers(out).items()}
    charged = [shard for shard, attempt in attempts.items() if attempt == 2]
    assert sorted(attempts.values()) == [1, 1, 2], "only the shard generating in the dead engine is charged"
    spared = [shard for shard in attempts if f"shard {shard} re-queued, not charged" in printed.err]
    assert spared and charged[0] not in spared, "the shard waiting in that worker is re-queued uncharged"
    assert "worker 0 died: RuntimeError: injected engine fault" in printed.err
    assert "worker 1 ready" in printed.out
    log = (out / "_logs" / "recaption-worker-000.log").read_text()
    assert "injected engine fault" in log, "the traceback is logged"
    assert "Traceback" not in printed.out + printed.err, "quiet by default"


@pytest.mark.slow
def test_a_worker_that_fails_to_start_is_replaced(ray_cluster, tiny_model, tmp_path, monkeypatch, capsys):
    write_shards(tmp_path / "in", shards=2, per_shard=5)
    monkeypatch.setenv(FAULT_ENV, f"start:0:{tmp_path / 'fault-marker'}")

    code = run_cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", tiny_model,
                   *NULL_ONE_WORKER)

    assert code == 0
    assert "worker 0 died: failed to start" in capsys.readouterr().err
    assert sorted(ledgers(tmp_path / "out")) == ["00000", "00001"]


@pytest.mark.slow
def test_default_flags_run_the_transformers_backend(ray_cluster, tiny_model, tmp_path):
    infos = write_shards(tmp_path / "in", shards=1, per_shard=4)

    code = run_cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", tiny_model,
                   "--backend", "transformers")

    assert code == 0
    rows = committed.rows(str(tmp_path / "out"), "00000")
    assert [r["key"] for r in rows] == infos[0]["keys"] and all(r["status"] == "ok" for r in rows)
    run = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert run["caption_config"]["dtype"] == "float32" and run["caption_config"]["max_model_len"] == 2048


@pytest.mark.slow
def test_plan_measures_a_sample_and_projects_the_cost_without_writing_outputs(ray_cluster, tiny_model, tmp_path,
                                                                               capsys):
    write_shards(tmp_path / "in", shards=5, per_shard=20)
    out = tmp_path / "out"

    code = run_cli("--input", str(tmp_path / "in"), "--output", str(out), "--model", tiny_model, *NULL_ONE_WORKER,
                   "--window", "4", "--plan", "--gpu-hour-price", "2.5")

    printed = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert "plan: 16 images of shard 00000 on one worker" in printed
    assert "5 shards x ~20 images" in printed and "~100 images" in printed and "at the given price" in printed


@pytest.mark.slow
def test_workers_that_cannot_start_are_waited_for_visibly_then_the_run_stops_naming_the_resource(
        ray_cluster, tiny_model, tmp_path, capsys):
    """The cluster has 4 GPUs; a worker asking for 8 cannot start. The job says what it waits for, and stops."""
    write_shards(tmp_path / "in", shards=1, per_shard=2)

    code = run_cli("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", tiny_model,
                   "--backend", "null", "--gpus-per-worker", "8", "--progress-every", "1", "--start-timeout", "4")

    printed = capsys.readouterr()
    assert code == 1
    assert re.search(r"waiting \d+ s for 1 worker x \(8 GPU, 4 CPU\) to start: the cluster has 4 of 4 GPUs and "
                     r"\d+ of 8 CPUs free \(stops after 4 s: --start-timeout\)", printed.out), printed.out
    assert ("no recaption worker started in 4 s: each needs 8 GPU per worker but the cluster has 4 GPUs (on CPUs: "
            "--gpus-per-worker 0 --cpus-per-worker 1)") in printed.err
    assert "--start-timeout" in printed.err
