"""Exactly once under attack, with real processes: drivers and workers killed at random moments with two drivers
on one output, drivers on other input subsets that end (and clean up) while another commits, a worker that
stalls at its commit while its driver gives up on it, a paused writer that wakes up after its claim was taken
over, and a clean stop on SIGTERM. Each driver is the users' command in its own process (and its own local
Ray) unless the test needs scheduler settings the command does not have; the null engine with a simulated
engine time makes shards last long enough to be interrupted. The deterministic simulation
(tests/test_simulation.py) covers the same protocol over thousands of schedules."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import committed
import pytest

from dataset.claims import claim_path, may_commit, read_claim
from dataset.logs import local_log_dir
from dataset.protocol import verify
from dataset.synthetic.input_shards import write_shards
from recaption.engines import EngineConfig
from recaption.job import CaptionJob
from recaption.stage import RunConfig, run
from recaption.worker import FAULT_ENV
from runner.cluster import init_ray
from runner.pool import PoolConfig
from runner.run import MIN_REMOTE_CLAIM_TTL, RunnerConfig
from runner.scheduler import SchedulerConfig

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CLAIM_TTL = MIN_REMOTE_CLAIM_TTL   # seconds; S3 clocks tick in whole seconds


class Driver:
    """`python pipelines/recaption.py ...` in its own process group (its Ray instance included)."""

    def __init__(self, inp: str, out: str, model: str, logs: Path, *flags: str, step_seconds: float = 0.05,
                 env: dict[str, str] | None = None):
        self.log = logs / f"driver-{time.time_ns()}.txt"
        command = [sys.executable, "pipelines/recaption.py", "--input", inp, "--output", out, "--model", model,
                   "--backend", "null", "--num-workers", "1", "--max-num-seqs", "4", "--claim-ttl", str(CLAIM_TTL),
                   "--engine-kwargs", json.dumps({"step_seconds": step_seconds}), "--progress-every", "5", *flags]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env={**os.environ, **(env or {})})

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the driver and its Ray: a lost node, an OOM kill, a preempted machine."""
        self.signal_group(signal.SIGKILL)
        self.process.wait()

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            print(self.log.read_text()[-3000:])

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, folder: Path, timeout: float = 120) -> None:
        """Until this driver has written a file into `folder` (a claim taken, a shard committed)."""
        deadline = time.time() + timeout
        while not (folder.exists() and any(folder.glob("*.json"))):
            assert time.time() < deadline and self.process.poll() is None, self.output()
            time.sleep(0.1)


def worker_pids() -> list[int]:
    """Caption worker processes of every local Ray on this machine."""
    found = subprocess.run(["pgrep", "-f", "ray::CaptionWorker"], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


def input_keys(infos: list[dict]) -> list[str]:
    return sorted(k for info in infos for k in info["keys"])


def assert_exactly_once(out: str, infos: list[dict], settled: bool = True) -> None:
    """Every input key once across the committed files; every file a ledger names exists with its recorded bytes
    and rows; with `settled` (no writer is still alive), nothing else left."""
    assert sorted(committed.keys(out)) == input_keys(infos)
    store = committed.store(out)
    passed, problems = verify(store)
    assert problems == [], [p.line() for p in problems]
    if not settled:
        return
    named = {path for shard in store.done() for path in committed.files(out, shard).values()}
    present = {entry.path for attempts in store.listing().data.values() for files in attempts.values()
               for entry in files.values()}
    assert present == named, f"uncommitted files left: {sorted(present - named)}"


def ledgers(out: str) -> int:
    return len(committed.store(out).done())


def test_random_kills_of_drivers_and_workers_with_two_drivers_lose_and_repeat_nothing(s3_bucket, tmp_path, tiny_model):
    """On S3 (conditional writes over HTTP, whole-second clocks); the local folder's protocol is the same code
    with the same tests below (a paused writer, a stop) and in tests/test_outputs.py and test_claims.py."""
    where = f"{s3_bucket}/out"
    rng = random.Random(7)
    shards = 12
    infos = write_shards(tmp_path / "in", shards=shards, per_shard=12)
    inp = str(tmp_path / "in")
    for last in (5, 11):                              # each round brings new shards: the first half, then all
        drivers = [Driver(f"{inp}/{{00000..{last:05d}}}.tar", where, tiny_model, tmp_path, step_seconds=0.2)
                   for _ in range(2)]
        start, deadline = ledgers(where), time.time() + 120
        while ledgers(where) == start:                # wait until shards are being committed ...
            assert time.time() < deadline, drivers[0].output()
            time.sleep(0.1)
        time.sleep(rng.uniform(0, 1))                 # ... then strike at a random moment
        pids = worker_pids()
        if pids:
            os.kill(rng.choice(pids), signal.SIGKILL)  # a worker dies: its driver replaces it
        victim = rng.choice(drivers)
        victim.kill()                                 # a driver dies with its Ray, its claims left behind
        assert ledgers(where) <= last, "the kills must land while work is left"
        survivor = drivers[1 - drivers.index(victim)]
        assert survivor.wait() == 0, survivor.output()

    final = Driver(inp, where, tiny_model, tmp_path)
    assert final.wait() == 0
    assert_exactly_once(where, infos)


def test_a_paused_writer_cannot_change_what_another_driver_committed(tmp_path, tiny_model):
    infos = write_shards(tmp_path / "in", shards=3, per_shard=6)
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    paused = Driver(inp, out, tiny_model, tmp_path, step_seconds=0.5)   # about 1.5 s per shard
    paused.wait_for(Path(out, "_claims"))
    paused.signal_group(signal.SIGSTOP)               # driver, Ray and worker frozen mid-shard
    time.sleep(CLAIM_TTL + 1)                         # its claims go stale by the storage's clock

    other = Driver(inp, out, tiny_model, tmp_path, step_seconds=0.0)
    assert other.wait() == 0
    assert_exactly_once(out, infos, settled=False)   # a frozen attempt that began its commit keeps its files
    before = {path: Path(path).read_bytes() for shard in committed.store(out).done()
              for path in committed.files(out, shard).values()}
    ledgers = sorted(p.name for p in Path(out, "_ledger").glob("*.json"))

    paused.signal_group(signal.SIGCONT)               # it wakes up and finishes what it was doing
    assert paused.wait() == 0
    assert "another attempt committed it first" in paused.output() or "taken over" in paused.output()
    assert sorted(p.name for p in Path(out, "_ledger").glob("*.json")) == ledgers
    assert {path: Path(path).read_bytes() for path in before} == before
    assert_exactly_once(out, infos)


def test_sigterm_stops_cleanly_and_a_rerun_finishes_the_rest(tmp_path, tiny_model):
    infos = write_shards(tmp_path / "in", shards=6, per_shard=8)
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    driver = Driver(inp, out, tiny_model, tmp_path, step_seconds=0.5)   # about 1 s per shard
    driver.wait_for(Path(out, "_ledger"))

    driver.process.send_signal(signal.SIGTERM)        # `ray job stop`, a spot instance's notice
    assert driver.wait(timeout=60) == 143
    run = json.loads(Path(out, "_run.json").read_text())
    assert run["stopped"] == "SIGTERM" and 0 < run["shards"]["done"] < 6
    claims = [json.loads(Path(claim_path(out, shard)).read_text()) for shard in
              (p.stem for p in Path(out, "_claims").glob("*.json"))]
    assert claims and all(claim["state"] == "released" for claim in claims), "claims released, not left to expire"
    assert "stopped by SIGTERM" in driver.output()

    rerun = Driver(inp, out, tiny_model, tmp_path, step_seconds=0.0)
    assert rerun.wait() == 0
    assert f"{run['shards']['done']} done" in rerun.output()
    assert_exactly_once(out, infos)


def test_drivers_that_end_while_another_commits_remove_none_of_its_commits(tmp_path, tiny_model, s3_bucket):
    """Issue 19, case 1, with processes: a long driver commits shard after shard (one of its shards held back
    at its commit until the end, so that it is still running) while short drivers on other input subsets of the
    same output start, finish and clean up (their end-of-run cleanup lists, reads claims, deletes). On S3, where
    the window between listings is widest; the same interleaving on a local folder is scripted in
    tests/test_protocol.py (case 1) and simulated in tests/test_simulation.py."""
    infos = write_shards(tmp_path / "in", shards=14, per_shard=8)
    inp, out = str(tmp_path / "in"), s3_bucket + "/out"
    marker = tmp_path / "held"
    long = Driver(f"{inp}/{{00000..00011}}.tar", out, tiny_model, tmp_path, "--shard-deadline", "0",
                  "--speculate-after", "0", step_seconds=0.2, env={FAULT_ENV: f"stall:0:{marker}"})
    deadline = time.time() + 300
    while ledgers(out) < 3:
        assert time.time() < deadline and long.process.poll() is None, long.output()
        time.sleep(0.1)
    shorts = [Driver(f"{inp}/{shard:05d}.tar", out, tiny_model, tmp_path, step_seconds=0.0) for shard in (12, 13)]
    for short in shorts:
        assert short.wait() == 0, short.output()
    assert long.process.poll() is None, "the short drivers ended and cleaned up while the long one ran"
    Path(f"{marker}.resume").touch()
    assert long.wait() == 0
    assert_exactly_once(out, infos)


@pytest.fixture
def local_ray():
    import ray

    init_ray(verbose=False)
    yield
    ray.shutdown()


def resume_once_fenced_and_retried(marker: Path, out: str, timeout: float = 240) -> None:
    """The test's view of the stalled worker: once the driver fenced its attempt and the retry committed the
    shard, let the stalled commit go on."""
    deadline = time.time() + timeout
    who = Path(f"{marker}.who")
    while not who.exists() and time.time() < deadline:
        time.sleep(0.05)
    shard, attempt_id = who.read_text().split()
    store = committed.store(out)
    while time.time() < deadline:
        claim = read_claim(store.base, shard)
        if claim and not may_commit(claim, attempt_id) and shard in store.done():
            break
        time.sleep(0.05)
    Path(f"{marker}.resume").touch()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_worker_that_stalls_at_its_commit_while_its_driver_gives_up_on_it_cannot_commit(
        tmp_path, tiny_model, where, request, monkeypatch):
    """Issue 19, case 2, with processes: a shard's worker stalls right before its commit (a GC pause, a
    partition), alive; the driver's deadline gives up on the attempt, fences it, and retries the shard on the
    other worker, which commits. The stalled worker then wakes up and tries to commit: it is refused, and its
    files are deleted."""
    out = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_bucket") + "/out"
    infos = write_shards(tmp_path / "in", shards=24, per_shard=6)   # work left after the retry commits
    marker = tmp_path / "stall"
    monkeypatch.setenv(FAULT_ENV, f"stall:0:{marker}")
    request.getfixturevalue("local_ray")
    engine = EngineConfig(tiny_model, backend="null", max_num_seqs=2, engine_kwargs={"step_seconds": 0.1})
    schedule = SchedulerConfig(deadline_factor=2, min_deadline=1.0, speculate_after=0, claim_ttl=CLAIM_TTL)
    config = RunConfig(input=str(tmp_path / "in"), output=out, job=CaptionJob(engine),
                       runner=RunnerConfig(pool=PoolConfig(num_workers=2), schedule=schedule, progress_every=60))
    waker = threading.Thread(target=resume_once_fenced_and_retried, args=(marker, out), daemon=True)
    waker.start()

    assert run(config) == 0

    waker.join(timeout=10)
    assert Path(f"{marker}.resume").exists(), "the stalled commit was resumed while the run went on"
    assert_exactly_once(out, infos)
    shard, attempt_id = Path(f"{marker}.who").read_text().split()
    logs = "".join(p.read_text() for p in local_log_dir(out).glob("recaption-worker-*.log"))
    assert f"attempt {attempt_id} of shard {shard} was fenced at its commit: its files are deleted" in logs
