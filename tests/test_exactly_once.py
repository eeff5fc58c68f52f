"""Exactly once under attack: drivers and workers killed at random moments with two drivers on one output,
a paused writer that wakes up after its claim was taken over, and a clean stop on SIGTERM. Each driver
is the users' command in its own process (and its own local Ray); the null engine with a simulated
engine time makes shards last long enough to be interrupted."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import committed
import pytest

from dataset import storage
from dataset.claims import claim_path
from dataset.synthetic.input_shards import write_shards

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CLAIM_TTL = 4.0   # seconds; S3 clocks tick in whole seconds, so well above 2


class Driver:
    """`python pipelines/recaption.py ...` in its own process group (its Ray instance included)."""

    def __init__(self, inp: str, out: str, model: str, logs: Path, *flags: str, step_seconds: float = 0.05):
        self.log = logs / f"driver-{time.time_ns()}.txt"
        command = [sys.executable, "pipelines/recaption.py", "--input", inp, "--output", out, "--model", model,
                   "--backend", "null", "--num-workers", "1", "--max-num-seqs", "4", "--claim-ttl", str(CLAIM_TTL),
                   "--engine-kwargs", json.dumps({"step_seconds": step_seconds}), "--progress-every", "5", *flags]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=dict(os.environ))

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


def assert_exactly_once(out: str, infos: list[dict]) -> None:
    """Every input key once across the committed files; every file a ledger names exists; nothing else left."""
    assert sorted(committed.keys(out)) == input_keys(infos)
    store = committed.store(out)
    named = {path for shard in store.done() for path in committed.files(out, shard).values()}
    assert all(storage.exists(path) for path in named)
    present = {storage.join(out, rel) for rels in store.data_files().values() for rel in rels}
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
    assert_exactly_once(out, infos)
    before = {path: Path(path).read_bytes() for shard in committed.store(out).done()
              for path in committed.files(out, shard).values()}
    ledgers = sorted(p.name for p in Path(out, "_ledger").glob("*.json"))

    paused.signal_group(signal.SIGCONT)               # it wakes up and finishes what it was doing
    assert paused.wait() == 0
    assert "another driver committed it first" in paused.output() or "taken over" in paused.output()
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
