"""The recaption job end to end: once through the users' command on vLLM with default flags, then its
bookkeeping in-process on the null backend (the engine does not matter there), on one local Ray."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import committed
import pytest
import webdataset as wds

from dataset import storage
from dataset.outputs import load_finished
from dataset.reader import ReadLimits
from dataset.synthetic.input_shards import cut_shard, fix_images, write_shards
from dataset.versions import Output
from dataset.wds import iter_samples
from pipelines import recaption as recaption_cli
from recaption.worker import FAULT_ENV
from runner.cluster import init_ray

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SMALL = ReadLimits(max_image_bytes=1 << 20)   # bad shards' oversized member at 1 MiB, not 32 MiB
SMALL_FLAGS = ["--max-image-bytes", str(SMALL.max_image_bytes)]
NULL_FLAGS = ["--backend", "null", "--num-workers", "1", "--progress-every", "5", *SMALL_FLAGS]


def input_keys(infos: list[dict]) -> list[str]:
    return sorted(k for info in infos for k in info["keys"])


def files_and_times(out: str) -> dict:
    """Every data, ledger and claim file with its mtime: what a no-op rerun must leave alone."""
    return {p: p.stat().st_mtime_ns for p in Path(out).rglob("*")
            if p.is_file() and "_logs" not in p.parts and p.name != "_run.json" and not p.name.startswith(".")}


def test_the_users_command_with_default_flags_on_vllm_then_a_rerun_is_a_no_op(tmp_path, tiny_model):
    infos = write_shards(tmp_path / "in", shards=2, per_shard=10, bad=True, limits=SMALL)
    out = str(tmp_path / "out")
    command = [sys.executable, "pipelines/recaption.py", "--input", str(tmp_path / "in"), "--output", out,
               "--model", tiny_model, *SMALL_FLAGS]

    first = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)

    print(first.stdout[-3000:], first.stderr[-3000:])
    assert first.returncode == 0
    assert sorted(committed.keys(out)) == input_keys(infos)  # every input key exactly once
    run = json.loads(Path(out, "_run.json").read_text())
    assert run["shards"]["done"] == 2 and run["shards"]["failed"] == []
    assert run["rows"]["ok"] + run["rows"]["error"] == len(input_keys(infos))
    assert run["caption_config"]["backend"] == "vllm" and run["caption_config"]["dtype"] == "float32"
    assert "images/s" in first.stdout and "ETA" in first.stdout and "worker-hours" in first.stdout
    console = first.stdout + first.stderr
    assert "Traceback" not in console and "WARNING" not in console, "library noise goes to OUT/_logs"
    assert (Path(out) / "_logs" / "driver.log").exists()
    finished = load_finished(out)
    samples = list(wds.WebDataset([finished.wds(shard) for shard in sorted(finished.by_shard)], shardshuffle=False))
    assert len(samples) == run["rows"]["ok"] and all(s["re_caption.txt"] for s in samples)

    before = files_and_times(out)
    again = subprocess.run([sys.executable, "-X", "importtime", *command[1:]], capture_output=True, text=True,
                           timeout=900, cwd=ROOT)
    assert again.returncode == 0 and "nothing pending" in again.stdout
    assert files_and_times(out) == before
    imported = {line.rsplit("|", 1)[-1].strip() for line in again.stderr.splitlines() if line.startswith("import time")}
    assert "dataset.outputs" in imported and "torch" not in imported, "the driver loads the processor in a child"

    short = subprocess.run(command + ["--max-model-len", "64"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert short.returncode == 2 and short.stderr.startswith("[recaption] error: --max-model-len 64 is too short")
    assert short.stderr.count("\n") == 1, short.stderr

    other = subprocess.run(command + ["--prompt", "Describe it."], capture_output=True, text=True, timeout=900,
                           cwd=ROOT)
    assert other.returncode == 2 and "--new-version" in other.stderr


STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
_ray_env: dict = {}


@pytest.fixture
def local_ray():
    """A local Ray for the in-process runs, started again only when the storage environment changed (its
    workers see the environment of the moment it started). List it after any fixture that sets that."""
    import ray

    env = {name: os.environ.get(name) for name in STORAGE_ENV}
    if ray.is_initialized() and env != _ray_env:
        ray.shutdown()
    if not ray.is_initialized():
        init_ray(verbose=False)
        _ray_env.update(env)
    yield


def run_job(inp: str, out: str, model: str, *extra: str) -> int:
    return recaption_cli.main(["--input", inp, "--output", out, "--model", model, *NULL_FLAGS, *extra])


def test_new_version_writes_beside_the_old_one_and_keeps_it_readable(tmp_path, tiny_model, local_ray, capsys):
    infos = write_shards(tmp_path / "in", shards=2, per_shard=6)
    out = str(tmp_path / "out")
    assert run_job(str(tmp_path / "in"), out, tiny_model) == 0
    old = Output.open(out)
    old_files = files_and_times(out)

    assert run_job(str(tmp_path / "in"), out, tiny_model, "--prompt", "Describe it.") == 2
    assert run_job(str(tmp_path / "in"), out, tiny_model, "--prompt", "Describe it.", "--new-version") == 0

    new = Output.open(out)
    assert new.fingerprint != old.fingerprint and new.base == storage.join(out, "versions", new.fingerprint)
    old_files.pop(Path(out, "_job.json"))   # it records the new version; nothing else of the old one changes
    assert {p: t for p, t in files_and_times(out).items() if p in old_files} == old_files, "old version untouched"
    for fingerprint, base in ((old.fingerprint, old.base), (new.fingerprint, new.base)):
        assert sorted(committed.keys(base)) == input_keys(infos)
        assert load_finished(out, fingerprint).fingerprint == fingerprint
    assert {r["fingerprint"] for r in committed.rows(new.base, "00000")} == {new.fingerprint}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_retry_errors_recaptions_only_error_rows_as_a_new_generation(tmp_path, tiny_model, where, request):
    """Also on S3 (issue 19, case 6: the previous generation's Parquet was read through a stream that cannot seek)."""
    info = write_shards(tmp_path / "in", shards=1, per_shard=8, bad=True, limits=SMALL)[0]
    out = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_bucket") + "/out"
    request.getfixturevalue("local_ray")
    assert run_job(str(tmp_path / "in"), out, tiny_model) == 0
    before = {r["key"]: r for r in committed.rows(out, "00000")}
    first = committed.files(out, "00000")
    fixable = {k for k, kind in info["injected"].items() if kind in ("corrupt_jpeg", "truncated_jpeg")}
    fix_images(tmp_path / "in" / "00000.tar", fixable)

    assert run_job(str(tmp_path / "in"), out, tiny_model, "--retry-errors") == 0

    after = {r["key"]: r for r in committed.rows(out, "00000")}
    committed.assert_only_fixed_rows_changed(before, after, fixable)
    store = committed.store(out)
    assert store.done() == {"00000": 1}
    assert store.read_ledger("00000")["error"] == sum(r["status"] == "error" for r in before.values()) - len(fixable)
    trained = {s["key"] for s in iter_samples(committed.files(out, "00000")["wds"])}
    assert trained == {k for k, r in after.items() if r["status"] == "ok"}
    assert all(storage.exists(path) for path in first.values()), "C3: readers of generation 0 get the grace period"
    assert run_job(str(tmp_path / "in"), out, tiny_model, "--cleanup-grace", "0") == 0   # nothing pending
    assert not any(storage.exists(path) for path in first.values()), "then the replaced generation's files go"
    assert all(storage.exists(path) for path in committed.files(out, "00000").values())


def test_a_worker_that_vanishes_mid_shard_is_replaced_and_its_shards_rerun_once(tmp_path, tiny_model, local_ray,
                                                                              monkeypatch, capsys):
    infos = write_shards(tmp_path / "in", shards=3, per_shard=10)
    out = str(tmp_path / "out")
    marker = tmp_path / "died"
    monkeypatch.setenv(FAULT_ENV, f"exit:0:{marker}")   # the process ends abruptly, as under kill -9

    assert run_job(str(tmp_path / "in"), out, tiny_model, "--engine-kwargs", '{"step_seconds": 0.02}',
                   "--max-num-seqs", "4") == 0

    assert marker.exists(), "the fault hook fired"
    assert sorted(committed.keys(out)) == input_keys(infos)
    attempts = {shard: committed.store(out).read_ledger(shard)["attempt"] for shard in ("00000", "00001", "00002")}
    assert set(attempts.values()) <= {1, 2} and 2 in attempts.values()
    assert "re-queued" in capsys.readouterr().err


def test_a_shard_cut_short_or_unready_is_never_committed_and_a_rerun_completes(tmp_path, tiny_model, local_ray,
                                                                               capsys):
    infos = write_shards(tmp_path / "in", shards=3, per_shard=10)
    out = str(tmp_path / "out")
    full = (tmp_path / "in" / "00001.tar").read_bytes()
    cut_shard(tmp_path / "in" / "00001.tar", int(len(full) * 0.6))   # a download still running
    stats = tmp_path / "in" / "00002_stats.json"
    stats_text = stats.read_text()
    stats.unlink()                                                   # img2dataset has not finished 00002

    assert run_job(str(tmp_path / "in"), out, tiny_model, "--max-attempts", "2") == 1

    printed = capsys.readouterr()
    assert "shard 00001 failed after 2 attempts" in printed.err and "00001.tar" in printed.err
    assert "00002" in printed.err and "_stats.json" in printed.err
    assert committed.store(out).done() == {"00000": 0}, "neither the cut nor the unready shard is committed"
    assert sorted(committed.keys(out)) == sorted(infos[0]["keys"])

    (tmp_path / "in" / "00001.tar").write_bytes(full)
    stats.write_text(stats_text)
    assert run_job(str(tmp_path / "in"), out, tiny_model) == 0
    assert sorted(committed.keys(out)) == input_keys(infos)


def test_s3_in_and_out(tmp_path, tiny_model, s3_bucket, local_ray):
    infos = write_shards(tmp_path / "in", shards=2, per_shard=6)
    for path in sorted((tmp_path / "in").iterdir()):
        storage.write_bytes(f"{s3_bucket}/shards/{path.name}", path.read_bytes())
    out = f"{s3_bucket}/recap"

    assert run_job(f"{s3_bucket}/shards/{{00000..00001}}.tar", out, tiny_model) == 0

    assert sorted(committed.keys(out)) == input_keys(infos)
    assert run_job(f"{s3_bucket}/shards/", out, tiny_model) == 0   # a prefix: nothing pending
    assert storage.exists(f"{out}/_logs/driver.log"), "a remote output gets the logs too"


def test_storage_that_ignores_conditional_writes_is_refused(tmp_path, tiny_model, gateway_bucket, local_ray, capsys):
    write_shards(tmp_path / "in", shards=1, per_shard=4)
    out = f"{gateway_bucket}/recap"

    assert run_job(str(tmp_path / "in"), out, tiny_model) == 2
    printed = capsys.readouterr().err
    assert "--single-writer" in printed and os.environ["AWS_ENDPOINT_URL"] in printed
    assert not storage.exists(f"{out}/_job.json")

    assert run_job(str(tmp_path / "in"), out, tiny_model, "--single-writer") == 0


def test_a_caption_set_writes_every_column_once_per_row_and_another_set_is_another_version(tmp_path, tiny_model,
                                                                                           local_ray):
    infos = write_shards(tmp_path / "in", shards=2, per_shard=6)
    out = str(tmp_path / "out")
    ready = str(ROOT / "recaption" / "caption_sets" / "recap_v1_v2.toml")

    assert run_job(str(tmp_path / "in"), out, tiny_model, "--captions", ready) == 0

    assert sorted(committed.keys(out)) == input_keys(infos)
    rows = [r for shard in ("00000", "00001") for r in committed.rows(out, shard)]
    assert all(r["status"] == "ok" and r["re_caption"] and r["re_caption_v2"] and r["caption_errors"] is None
               for r in rows)
    run = json.loads(Path(out, "_run.json").read_text())
    assert [c["name"] for c in run["caption_config"]["captions"]] == ["re_caption", "re_caption_v2"]
    assert run["rows"]["ok"] == len(rows)
    samples = list(iter_samples(committed.files(out, "00000")["wds"]))
    assert len(samples) == 6 and all(s["re_caption_v2.txt"] and s["re_caption.txt"] for s in samples)

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"caption": [{"name": "re_caption"},
                                             {"name": "re_caption_v2", "prompt": "Caption: {org_caption}"}]}))
    assert run_job(str(tmp_path / "in"), out, tiny_model, "--captions", str(other)) == 2, "another set"
    assert run_job(str(tmp_path / "in"), out, tiny_model) == 2, "the default set is another set too"
    assert run_job(str(tmp_path / "in"), out, tiny_model, "--captions", str(other), "--new-version") == 0
    assert Output.open(out).caption_config["captions"][1]["prompt"] == "Caption: {org_caption}"
