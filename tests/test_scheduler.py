"""The scheduler's long-tail rules on a real pool (local Ray, null engine with simulated engine time):
a slow shard near the end gets a second attempt on an idle worker and still commits once; a shard
running past its deadline is abandoned, retried, and reported failed with the reason."""
from __future__ import annotations

import committed
import pytest

from dataset.synthetic.input_shards import write_shard, write_shards
from recaption.engines import EngineConfig
from recaption.job import CaptionJob
from recaption.stage import RunConfig, run
from runner.cluster import init_ray
from runner.pool import PoolConfig
from runner.run import RunnerConfig
from runner.scheduler import SchedulerConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray

    init_ray(verbose=False)
    yield
    ray.shutdown()


def slow_and_small_shards(folder, small: int = 6, big_samples: int = 60) -> list[dict]:
    """`small` shards of 4 samples, then shard 00099 of `big_samples` (the long tail), img2dataset-style."""
    return write_shards(folder, shards=small, per_shard=4) + [write_shard(folder, 99, big_samples)]


def config(tmp_path, tiny_model, schedule: SchedulerConfig) -> RunConfig:
    engine = EngineConfig(tiny_model, backend="null", max_num_seqs=2, engine_kwargs={"step_seconds": 0.05})
    return RunConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), job=CaptionJob(engine),
                     runner=RunnerConfig(pool=PoolConfig(num_workers=2), schedule=schedule, progress_every=60))


def test_a_slow_shard_at_the_end_gets_a_second_attempt_and_commits_once(tmp_path, tiny_model, capsys):
    infos = slow_and_small_shards(tmp_path / "in", big_samples=200)   # ~5 s against ~0.5 s
    schedule = SchedulerConfig(speculate_after=1.5, deadline_factor=0)

    assert run(config(tmp_path, tiny_model, schedule)) == 0

    printed = capsys.readouterr().out
    assert "shard 00099: running" in printed and "a second attempt started on an idle worker" in printed
    out = str(tmp_path / "out")
    assert sorted(committed.keys(out)) == sorted(k for info in infos for k in info["keys"])
    files = committed.store(out).listing().data
    assert all(len(attempts) == 1 for attempts in files.values()), "one attempt's files per shard: the loser's are gone"


def test_a_shard_past_its_deadline_is_retried_then_reported_failed(tmp_path, tiny_model, capsys):
    infos = slow_and_small_shards(tmp_path / "in", big_samples=400)  # ~10 s against ~0.5 s
    schedule = SchedulerConfig(deadline_factor=2, min_deadline=0.5, speculate_after=0, max_attempts=2)

    assert run(config(tmp_path, tiny_model, schedule)) == 1

    printed = capsys.readouterr().err
    assert "shard 00099 failed after 2 attempts: ran past the deadline" in printed
    out = str(tmp_path / "out")
    assert sorted(committed.store(out).done()) == sorted(info["shard"] for info in infos[:-1])
    assert "00099" not in committed.store(out).listing().data, "the abandoned attempts' files are gone"
