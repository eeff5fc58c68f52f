"""The README's cluster flow as users run it, against a Ray head on this machine.

1. A token made as the README says (`ray get-auth-token --generate`, here in a HOME of its own: the
   submitting machine's `~/.ray/auth_token`), then `ray start --head` with `RAY_AUTH_MODE=token` and that
   token as a file (`RAY_AUTH_TOKEN_PATH`, as infra/cluster.yaml gives it to every node), free ports for
   everything the head listens on, `python` on its PATH from this environment.
2. The Jobs API refuses a client that sends no token (RAY_AUTH_MODE unset): authentication is on.
3. The README's command, `ray job submit --address ... --runtime-env infra/runtime_env.yaml --working-dir .
   -- python pipelines/recaption.py ...`, with CPU flags (the null backend taking 0.05 s per step, one
   request at a time, a worker of 0 GPUs and 1 CPU); once a shard is committed, `ray job stop`.
4. The same command again, to the end; then every input key exactly once across the committed Parquet files
   (read through the ledgers).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from committed import keys, store

from dataset.synthetic.input_shards import write_shards

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent   # this environment's `ray` and `python`
# 288 requests, one per 0.05 s step: about 14 s of simulated engine time, so `ray job stop` (a CLI that takes
# seconds to start on a busy machine) lands well before the last shard.
SHARDS, PER_SHARD = 12, 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def jobs_api(address: str, token: str, path: str) -> dict:
    """The Jobs REST API (what `ray job status` / `ray job logs` read), with the token as Ray's clients send it."""
    request = urllib.request.Request(f"{address}/api/jobs/{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def job_status(address: str, token: str, job_id: str) -> str:
    return jobs_api(address, token, job_id)["status"]


def job_logs(address: str, token: str, job_id: str) -> str:
    return jobs_api(address, token, f"{job_id}/logs")["logs"]


def wait_for(condition, what: str, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"gave up waiting for {what} after {timeout:.0f} s")


@pytest.fixture
def head(tmp_path):
    """A Ray head with token authentication, as infra/cluster.yaml starts one; yields (address, client env, token)."""
    home = tmp_path / "laptop-home"
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base["PATH"] = f"{BIN}{os.pathsep}{base['PATH']}"
    laptop = {**base, "HOME": str(home), "RAY_AUTH_MODE": "token"}
    made = ray_cli("get-auth-token", "--generate", env=laptop)   # the README's first step, in a HOME of its own
    assert made.returncode == 0, made.stderr
    token_file = home / ".ray" / "auth_token"
    token = token_file.read_text().strip()
    assert token and token not in made.stderr   # the token goes to stdout only (README: redirect it)
    secret = tmp_path / "secret" / "auth_token"      # the node's copy, as a mounted secret
    secret.parent.mkdir()
    shutil.copy(token_file, secret)
    secret.chmod(0o600)
    temp_dir = tempfile.mkdtemp(prefix="ovray", dir="/tmp")   # Ray's socket paths must stay short
    dashboard = free_port()
    node_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(secret)}
    log = open(tmp_path / "head.log", "w")
    process = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port", str(free_port()), "--dashboard-port", str(dashboard),
         "--dashboard-host", "127.0.0.1", "--dashboard-agent-listen-port", str(free_port()),
         "--ray-client-server-port", str(free_port()), "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", temp_dir,
         "--disable-usage-stats"],
        cwd=tmp_path, env=node_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        def jobs_api_up() -> bool:
            assert process.poll() is None, (tmp_path / "head.log").read_text()[-4000:]
            try:
                jobs_api(address, token, "none")
            except urllib.error.HTTPError as e:
                return e.code == 404   # the API answers (the job does not exist); 401 would mean a bad token
            except OSError:
                return False
            return True
        wait_for(jobs_api_up, "the head's Jobs API", timeout=180, every=1.0)
        yield address, laptop, token
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(3)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)   # TERM can leave gcs_server up a while
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_readme_cluster_flow_with_token_stop_and_resubmit(head, tmp_path, tiny_model):
    address, laptop, token = head
    shards = write_shards(tmp_path / "shards", SHARDS, PER_SHARD, image_size=64)
    expected = sorted(k for shard in shards for k in shard["keys"])
    out = tmp_path / "out"

    no_token = {k: v for k, v in laptop.items() if k != "RAY_AUTH_MODE"}   # ~/.ray/auth_token exists, unsent
    refused = ray_cli("job", "list", "--address", address, env=no_token)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower(), refused

    readme = (ROOT / "README.md").read_text()   # the commands below are the README's
    assert "RAY_AUTH_MODE=token ray get-auth-token --generate > /dev/null" in readme
    assert "ray job submit --address http://HEAD:8265 --runtime-env infra/runtime_env.yaml --working-dir . --" in readme

    def submit(job_id: str, *wait: str) -> subprocess.CompletedProcess:
        return ray_cli("job", "submit", "--address", address, "--runtime-env", "infra/runtime_env.yaml",
                       "--working-dir", ".", "--submission-id", job_id, *wait, "--",
                       "python", "pipelines/recaption.py", "--input", str(tmp_path / "shards"), "--output", str(out),
                       "--model", tiny_model, "--num-workers", "1", "--backend", "null", "--gpus-per-worker", "0",
                       "--cpus-per-worker", "1", "--max-num-seqs", "1", "--engine-kwargs", '{"step_seconds": 0.05}',
                       "--progress-every", "2", env=laptop)

    first = submit("recaption-1", "--no-wait")
    assert first.returncode == 0, first.stdout + first.stderr

    def one_committed() -> bool:
        status = job_status(address, token, "recaption-1")
        assert status in ("PENDING", "RUNNING"), job_logs(address, token, "recaption-1")[-4000:]
        return out.exists() and (out / "_job.json").exists() and len(store(str(out)).done()) >= 1
    wait_for(one_committed, "the first committed shard", timeout=300)

    stopped = ray_cli("job", "stop", "--address", address, "recaption-1", env=laptop)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert job_status(address, token, "recaption-1") == "STOPPED"
    after_stop = len(store(str(out)).done())
    assert 1 <= after_stop < SHARDS, f"{after_stop} of {SHARDS} shards committed when stopped"
    logs = job_logs(address, token, "recaption-1")
    assert "stopped by SIGTERM" in logs and "claims released" in logs, logs[-4000:]   # a clean stop, not a kill

    second = submit("recaption-2")
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert job_status(address, token, "recaption-2") == "SUCCEEDED", second.stdout[-4000:]
    resumed = re.search(rf"{SHARDS} input shards: (\d+) done", second.stdout)
    assert resumed and int(resumed.group(1)) >= after_stop, second.stdout[-4000:]   # the rerun skipped them
    found = keys(str(out))
    assert len(found) == len(set(found)) and sorted(found) == expected
    assert token not in first.stdout + second.stdout + logs
