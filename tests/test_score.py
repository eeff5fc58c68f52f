"""The CLIP-score stage on a tiny random open_clip model: scores equal open_clip's own cosines, one per ok row,
a rerun does nothing, an attempt killed before its commit leaves nothing a reader sees, stale scores are redone."""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
from dataclasses import replace
from pathlib import Path

import committed
import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dataset import scores, storage
from dataset.outputs import load_finished
from dataset.protocol import claimed_attempt
from dataset.synthetic import finished_runs
from dataset.versions import Output
from pipelines import score as score_cli
from runner.scheduler import SchedulerConfig
from scoring.clip import ClipModelSpec
from scoring.stage import SCORE_RUNNER, ScoreConfig, ScoreTask, ScoreWorker, plan_scores, score
from scoring.tiny import build_tiny_clip

ROOT = Path(__file__).resolve().parent.parent
SHARDS, PER_SHARD, ERRORS = 3, 12, 2
# Both sides compute in float32 on the CPU from the same weights and pixels; only the batch grouping
# differs (the stage scores in batches of 5, the reference all at once), which changes summation order
# inside matrix products. float32 keeps ~7 digits; through the tiny model's dozen ops per embedding the
# difference stays near 1e-6 for cosines of unit vectors, so 1e-5 is a safe bound and still far below the
# spread of the scores themselves (~0.1).
ATOL = 1e-5


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def reference_model(clip_dir):
    """The tiny model loaded by open_clip itself: (model, preprocess, tokenizer)."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    return model, preprocess, open_clip.get_tokenizer(f"local-dir:{clip_dir}")


def finished(path: Path) -> str:
    finished_runs.write_recaption_outputs(str(path), SHARDS, PER_SHARD, errors_per_shard=ERRORS)
    return str(path)


def config(out: str, clip_dir: Path, claim_ttl: float = 120.0, progress_every: float = 30.0) -> ScoreConfig:
    runner = replace(SCORE_RUNNER, progress_every=progress_every, schedule=SchedulerConfig(claim_ttl=claim_ttl))
    return ScoreConfig(input=out, clip_model=f"local-dir:{clip_dir}", batch_size=5, runner=runner)


def committed_scores(out: str) -> dict[str, list[dict]]:
    """Shard -> score rows, read through the score ledgers only."""
    store = scores.score_store(Output.open(out))
    return {shard: pq.read_table(store.files(store.read_ledger(shard))["parquet"]).to_pylist()
            for shard in store.done()}


def ok_rows(out: str) -> dict[str, list[dict]]:
    run = Output.open(out)
    return {shard: [r for r in pq.read_table(run.store.files(run.store.read_ledger(shard))["parquet"]).to_pylist()
                    if r["status"] == "ok"] for shard in run.store.done()}


def reference_cosines(out: str, reference_model, rows: list[dict], shard: str) -> dict[str, tuple[float, float]]:
    """open_clip's own cosines, computed here from the committed WDS tar with tarfile and PIL."""
    output = Output.open(out)
    images = {}
    with tarfile.open(output.store.files(output.store.read_ledger(shard))["wds"]) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            if ext == "jpg":
                images[key] = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
    model, preprocess, tokenizer = reference_model
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(images[r["key"]]) for r in rows]), normalize=True)
        re = model.encode_text(tokenizer([r["re_caption"] for r in rows]), normalize=True)
        org = model.encode_text(tokenizer([r["org_caption"] for r in rows]), normalize=True)
    return {r["key"]: (float(image[i] @ re[i]), float(image[i] @ org[i])) for i, r in enumerate(rows)}


@pytest.mark.slow  # a local Ray and a scoring actor
def test_scores_are_open_clips_cosines_one_per_ok_row(tmp_path, clip_dir, reference_model, capsys):
    out = finished(tmp_path / "out")
    result = score(config(out, clip_dir, progress_every=0))
    assert result.progress.done == SHARDS and result.failed == {} and result.exit_code == 0
    assert re.search(rf"\[score\] shards {SHARDS}/{SHARDS} done, 0 failed \| [0-9.]+ images/s \| ETA 00:00:00",
                     capsys.readouterr().out), "the progress line"
    got, want = committed_scores(out), ok_rows(out)
    assert sorted(got) == sorted(want)
    tokenizer = reference_model[2]
    long_captions = [r for rows in want.values() for r in rows
                     if len(tokenizer.encode(r["re_caption"])) + 2 > tokenizer.context_length]
    assert long_captions, "no caption longer than the 16-token context: the cut is not exercised"
    for shard, rows in want.items():
        assert [s["key"] for s in got[shard]] == [r["key"] for r in rows]          # every ok row once, in order
        assert all(s["error"] is None for s in got[shard])
        reference = reference_cosines(out, reference_model, rows, shard)
        values = np.array([[s["re_clip_score"], s["org_clip_score"]] for s in got[shard]])
        assert np.all(np.abs(values) <= 1.0)
        np.testing.assert_allclose(values, np.array([reference[s["key"]] for s in got[shard]]), atol=ATOL, rtol=0)
    ledger = scores.score_store(Output.open(out)).read_ledger("00000")
    assert ledger["scored"] == PER_SHARD - ERRORS and ledger["source"]["generation"] == 0
    assert ledger["scorer"] == ClipModelSpec(f"local-dir:{clip_dir}").identity()


@pytest.mark.slow  # a local Ray and a scoring actor
def test_rerun_is_a_noop_and_another_model_is_refused(tmp_path, clip_dir, capsys):
    out = finished(tmp_path / "out")
    assert score_cli.main(["--input", out, "--clip-model", f"local-dir:{clip_dir}", "--batch-size", "5"]) == 0
    assert f"[score] done: {SHARDS} of {SHARDS} shards scored, 0 failed" in capsys.readouterr().out
    base = Path(out, scores.STAGE)
    before = {p: p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file() and "_claims" not in p.parts}
    again = score(config(out, clip_dir))
    assert again.plan.tasks == [] and again.progress is None and again.exit_code == 0
    after = {p: p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file() and "_claims" not in p.parts}
    assert after == before
    other = build_tiny_clip(tmp_path / "other-clip", seed=1)
    storage.delete(str(Path(out, scores.STAGE, "_ledger", "00001.json")))     # one shard left to score
    with pytest.raises(scores.ScorerMismatch, match="holds scores from"):
        score(config(out, other))


@pytest.mark.slow  # a local Ray and a scoring actor
def test_new_recaption_generation_is_rescored(tmp_path, clip_dir):
    out = finished(tmp_path / "out")
    score(config(out, clip_dir))
    output = Output.open(out)
    ledger = output.store.read_ledger("00001")
    with claimed_attempt(output.store, "00001", 1) as attempt:   # what --retry-errors commits: a generation 1
        for kind, path in output.store.files(ledger).items():
            local = tmp_path / f"copy.{kind}"
            shutil.copy(path, local)
            attempt.put(kind, str(local), rows=ledger["files"][kind]["rows"])
        assert attempt.commit({k: v for k, v in ledger.items() if k not in ("files", "attempt_id")}) == "committed"
    work = plan_scores(output, scores.score_store(output))
    assert [(t.shard, t.generation) for t in work.tasks] == [("00001", 1)]
    assert scores.coverage(load_finished(out)).missing == ["00001"]   # stale scores are never joined
    assert score(config(out, clip_dir)).progress.done == 1
    score_ledger = scores.score_store(output).read_ledger("00001")
    assert score_ledger["generation"] == 1 and score_ledger["source"]["generation"] == 1
    assert scores.coverage(load_finished(out)).complete


KILLED_CHILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
from dataset.claims import Claims
from dataset.protocol import Attempt, new_attempt_id
from dataset.scores import score_store
from dataset.versions import Output
from scoring.clip import ClipModelSpec
from scoring.stage import ScoreTask, ScoreWorker

def die(self, ledger):  # killed after the file is written, before the ledger exists
    os.kill(os.getpid(), signal.SIGKILL)

output = Output.open({out!r})
attempt_id = new_attempt_id()
Claims(score_store(output).base, "a worker about to die", {ttl}).acquire("00000", attempt_id, 0)
Attempt.commit = die
ScoreWorker({out!r}, output.fingerprint, ClipModelSpec({model!r}), batch_size=5).process(
    ScoreTask("00000", attempt_id=attempt_id))
"""


@pytest.mark.slow
def test_attempt_killed_before_commit_then_rerun_gives_every_key_once(tmp_path, clip_dir):
    out = finished(tmp_path / "out")
    ttl = 2.0
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_CHILD).format(
        root=str(ROOT), out=out, model=f"local-dir:{clip_dir}", ttl=ttl)], capture_output=True, text=True,
        timeout=300)
    assert child.returncode == -9, child.stderr[-2000:]
    store = scores.score_store(Output.open(out))
    leftovers = store.listing().data
    assert sum(len(attempts) for attempts in leftovers.values()) == 1 and store.done() == {}   # a file, no commit

    result = score(config(out, clip_dir, claim_ttl=ttl))  # waits for the dead holder's claim to go stale

    assert result.progress.done == SHARDS and result.failed == {}
    got, want = committed_scores(out), ok_rows(out)
    for shard in want:
        assert sorted(s["key"] for s in got[shard]) == sorted(r["key"] for r in want[shard])
    files = store.listing().data
    assert all(len(attempts) == 1 for attempts in files.values())      # the dead attempt's file was cleaned up
    assert not set(leftovers["00000"]) & set(files["00000"])


def test_worker_actor_shape_and_abandon(tmp_path, clip_dir):
    out = finished(tmp_path / "out")
    output = Output.open(out)
    worker = ScoreWorker(out, output.fingerprint, ClipModelSpec(f"local-dir:{clip_dir}"), batch_size=4)
    ready = worker.ready()
    assert ready["worker"].endswith(f":{os.getpid()}") and ready["context_length"] == 16 and ready["device"] == "cpu"
    stage_base = scores.score_store(output).base
    outcome = worker.process(committed.registered(ScoreTask("00000"), stage_base))
    assert outcome.kind == "committed" and outcome.ledger["scored"] == PER_SHARD - ERRORS
    again = worker.process(committed.registered(ScoreTask("00000"), stage_base))
    assert again.kind == "committed" and again.ledger["attempt_id"] == outcome.attempt_id, "already current"
    assert set(worker.status()) == {"shards", "busy_share"} and 0 < worker.status()["busy_share"] < 1

    forward = worker.scorer.scores
    seen = []

    def abandoning(images, captions):   # the scheduler abandons the shard while its first batch runs
        seen.append(worker.status()["shards"])
        worker.abandon("00001")
        return forward(images, captions)

    worker.scorer.scores = abandoning
    assert worker.process(committed.registered(ScoreTask("00001"), stage_base)).kind == "abandoned"
    assert seen[0] == {"00001": "scoring"} and worker.status()["shards"] == {}
    store = scores.score_store(output)
    assert "00001" not in store.done() and "00001" not in store.listing().data


def test_images_come_from_the_captioned_input_with_its_caps_or_not_at_all(tmp_path):
    """Issue 19, case 11: without WDS files the scores read the input tar again, with the caps it was captioned
    with, and only if it is still the tar that was captioned."""
    from dataset.synthetic.input_shards import write_shards
    from scoring.stage import iter_images

    info = write_shards(tmp_path / "in", shards=1, per_shard=4)[0]
    tar = tmp_path / "in" / "00000.tar"
    output = Output.register(str(tmp_path / "out"), "f" * 16, {}, new_version=False, kinds={"parquet": "parquet"})
    ledger = {"shard": "00000", "files": {}, "input": str(tar), "input_bytes": tar.stat().st_size,
              "caption_config": {"input": {"max_image_bytes": 100, "max_text_bytes": 64, "max_json_bytes": 1 << 20}}}
    images = dict(iter_images(output, ledger))
    assert sorted(images) == sorted(info["keys"]) and set(images.values()) == {b""}, "over the captioned cap: none"
    tar.write_bytes(tar.read_bytes() + b"\0" * 512)   # the tar changed since it was captioned
    with pytest.raises(ValueError, match=r"00000.tar: .* bytes, but it had .* when shard 00000 was captioned"):
        list(iter_images(output, ledger))
