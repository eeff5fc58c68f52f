"""The Ray recaption job through its real command line: local Ray, real engines, the tiny LLaVA."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from dataset import outputs, storage
from dataset.synthetic.input_shards import fix_images, write_shards
from recaption.worker import FAULT_ENV

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TINY_FLAGS = ["--max-tokens", "24", "--progress-every", "5"]   # engine flags left at their defaults


def job_command(inp: str, out: str, model: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "pipelines" / "recaption.py"), "--input", inp, "--output", out,
            "--model", model, *TINY_FLAGS, *extra]


def run_job(inp: str, out: str, model: str, *extra: str, env: dict | None = None,
            timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(job_command(inp, out, model, *extra), capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})}, cwd=ROOT)
    print(result.stdout[-3000:], result.stderr[-6000:])
    return result


def output_keys(out: str) -> list[str]:
    """Every key over all output Parquet files, duplicates kept."""
    keys = []
    for path in storage.list_files(storage.join(out, outputs.PARQUET_DIR), ".parquet"):
        keys += pq.read_table(io.BytesIO(storage.read_bytes(path))).column("key").to_pylist()
    return keys


def ledgers(out: str) -> dict[str, dict]:
    return {storage.basename(p)[:-5]: json.loads(storage.read_bytes(p))
            for p in storage.list_files(storage.join(out, outputs.LEDGER_DIR), ".json")}


def input_keys(infos: list[dict]) -> list[str]:
    return sorted(k for info in infos for k in info["keys"])


def test_two_vllm_workers_caption_every_key_exactly_once_and_rerun_is_a_no_op(tmp_path, tiny_model):
    infos = write_shards(tmp_path / "in", shards=4, per_shard=36, bad=True)
    out = str(tmp_path / "out")

    first = run_job(str(tmp_path / "in"), out, tiny_model, "--num-workers", "2")

    assert first.returncode == 0
    assert sorted(output_keys(out)) == input_keys(infos)
    done = ledgers(out)
    assert sorted(done) == ["00000", "00001", "00002", "00003"]
    assert "starting 2 workers" in first.stdout
    run = json.loads(Path(out, "_run.json").read_text())
    assert run["shards"] == {"total": 4, "done": 4, "failed": []}
    assert run["rows"]["ok"] + run["rows"]["error"] == len(input_keys(infos))
    assert run["rows"]["error"] == 4 * 5
    assert "images/s" in first.stdout and "ETA" in first.stdout
    ok_keys = {k for k in output_keys(out)}
    trained = {s["__key__"] for s in wds.WebDataset(f"{out}/wds/{{00000..00003}}.tar", shardshuffle=False)}
    assert trained < ok_keys and len(trained) == run["rows"]["ok"]

    mtimes = {p: p.stat().st_mtime_ns for p in Path(out).rglob("*") if p.is_file() and p.name != "_run.json"}
    started = time.time()
    again = run_job(str(tmp_path / "in"), out, tiny_model, "--num-workers", "2")
    assert again.returncode == 0 and "nothing pending" in again.stdout
    assert time.time() - started < 60
    assert mtimes == {p: p.stat().st_mtime_ns for p in Path(out).rglob("*") if p.is_file() and p.name != "_run.json"}

    other = run_job(str(tmp_path / "in"), out, tiny_model, "--num-workers", "2", "--prompt", "Describe it.")
    assert other.returncode == 2 and "--new-version" in other.stderr


def test_worker_killed_mid_shard_is_retried_elsewhere(tmp_path, tiny_model):
    infos = write_shards(tmp_path / "in", shards=3, per_shard=10)
    out = str(tmp_path / "out")
    marker = tmp_path / "died"

    result = run_job(str(tmp_path / "in"), out, tiny_model, "--backend", "transformers", "--num-workers", "2",
                     env={FAULT_ENV: f"exit:0:{marker}"})   # the process vanishes, as under kill -9

    assert marker.exists(), "the fault hook should have fired"
    assert result.returncode == 0
    assert sorted(output_keys(out)) == input_keys(infos)
    attempts = sorted(ledger["attempt"] for ledger in ledgers(out).values())
    assert set(attempts) <= {1, 2} and 2 in attempts, "the dead worker's shards in flight ran again, once"
    assert "re-queued" in result.stderr


def test_driver_killed_after_first_ledger_then_rerun_completes(tmp_path, tiny_model):
    shards = 12   # one engine batch each (--window 16): the kill lands well before the last commit
    infos = write_shards(tmp_path / "in", shards=shards, per_shard=16)
    out = str(tmp_path / "out")
    cmd = job_command(str(tmp_path / "in"), out, tiny_model, "--backend", "transformers", "--num-workers", "1",
                      "--window", "16", "--claim-ttl", "4")
    driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    ledger_dir = Path(out, outputs.LEDGER_DIR)
    deadline = time.time() + 600
    while not (ledger_dir.exists() and any(ledger_dir.glob("*.json"))) and time.time() < deadline:
        assert driver.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(1)
    os.killpg(driver.pid, signal.SIGKILL)  # and whatever Ray left of that session, like a lost node
    first = {p.name: p.stat().st_mtime_ns for p in ledger_dir.glob("*.json")}
    assert 1 <= len(first) < shards

    rerun = run_job(str(tmp_path / "in"), out, tiny_model, "--backend", "transformers", "--num-workers", "1",
                    "--claim-ttl", "4")

    assert rerun.returncode == 0
    assert f"{len(first)} done, {shards - len(first)} pending" in rerun.stdout
    assert sorted(output_keys(out)) == input_keys(infos)
    assert {name: (ledger_dir / name).stat().st_mtime_ns for name in first} == first


def test_retry_errors_recaptions_only_error_rows(tmp_path, tiny_model):
    info = write_shards(tmp_path / "in", shards=1, per_shard=8, bad=True)[0]
    out = str(tmp_path / "out")
    flags = ["--backend", "transformers", "--num-workers", "1"]
    assert run_job(str(tmp_path / "in"), out, tiny_model, *flags).returncode == 0
    before = {r["key"]: r for r in pq.read_table(f"{out}/parquet/00000.parquet").to_pylist()}
    fixable = {k for k, kind in info["injected"].items() if kind in ("corrupt_jpeg", "truncated_jpeg")}
    fix_images(tmp_path / "in" / "00000.tar", fixable)

    result = run_job(str(tmp_path / "in"), out, tiny_model, *flags, "--retry-errors")

    assert result.returncode == 0
    after = {r["key"]: r for r in pq.read_table(f"{out}/parquet/00000.parquet").to_pylist()}
    assert sorted(after) == sorted(before)
    for key, row in after.items():
        if key in fixable:
            assert before[key]["status"] == "error" and row["status"] == "ok"
        else:
            assert row == before[key]
    ledger = ledgers(out)["00000"]
    assert ledger["error"] == before_errors(before) - len(fixable)
    trained = {s["__key__"] for s in wds.WebDataset(f"{out}/wds/00000.tar", shardshuffle=False)}
    assert trained == {k for k, r in after.items() if r["status"] == "ok"}


def before_errors(rows: dict) -> int:
    return sum(r["status"] == "error" for r in rows.values())


def test_s3_in_and_out_with_two_racing_drivers(tmp_path, tiny_model, s3_bucket):
    infos = write_shards(tmp_path / "in", shards=4, per_shard=10)
    for tar in sorted((tmp_path / "in").glob("*.tar")):
        storage.write_bytes(f"{s3_bucket}/shards/{tar.name}", tar.read_bytes())
    out = f"{s3_bucket}/recap"
    cmd = job_command(f"{s3_bucket}/shards/{{00000..00003}}.tar", out, tiny_model, "--backend", "transformers",
                      "--num-workers", "1")
    drivers = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    results = [d.communicate(timeout=900) for d in drivers]
    for d, (stdout, stderr) in zip(drivers, results):
        print(stdout[-2000:], stderr[-4000:])
        assert d.returncode == 0

    assert sorted(output_keys(out)) == input_keys(infos)
    assert sorted(ledgers(out)) == ["00000", "00001", "00002", "00003"]
    assert not any("another driver wrote it first" in stdout for stdout, _ in results)
    ok_rows = [int(stdout.split("done: ")[1].split(" ok rows")[0]) for stdout, _ in results if "done: " in stdout]
    assert sum(ok_rows) == len(input_keys(infos)), "each shard captioned by exactly one driver"
