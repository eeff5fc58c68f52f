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
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dataset import scores, storage
from dataset.outputs import Output, load_finished
from dataset.synthetic import finished_runs
from pipelines import score as score_cli
from scoring import stage
from scoring.clip import ClipModelSpec
from scoring.stage import ScoreConfig, ScoreTask, ScoreWorker, run_stage
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


def config(out: str, clip_dir: Path, **kw) -> ScoreConfig:
    return ScoreConfig(input=out, clip_model=f"local-dir:{clip_dir}", batch_size=5, **kw)


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
    summary = run_stage(config(out, clip_dir), progress_every=0)
    assert summary["committed"] == SHARDS and summary["failed"] == {}
    assert re.search(rf"\[score\] shards {SHARDS}/{SHARDS} scored, 0 failed \| [0-9.]+ images/s \| ETA 00:00:00\n",
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
    assert run_stage(config(out, clip_dir)) == {"shards": 0, "committed": 0, "failed": {}, "stopped": None}
    after = {p: p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file() and "_claims" not in p.parts}
    assert after == before
    other = build_tiny_clip(tmp_path / "other-clip", seed=1)
    storage.delete(str(Path(out, scores.STAGE, "_ledger", "00001.json")))     # one shard left to score
    with pytest.raises(scores.ScorerMismatch, match="holds scores from"):
        run_stage(config(out, other))


@pytest.mark.slow  # a local Ray and a scoring actor
def test_new_recaption_generation_is_rescored(tmp_path, clip_dir):
    out = finished(tmp_path / "out")
    run_stage(config(out, clip_dir))
    output = Output.open(out)
    ledger = output.store.read_ledger("00001")
    attempt = output.store.new_attempt("00001")        # what --retry-errors commits: a generation 1
    for kind, path in output.store.files(ledger).items():
        local = tmp_path / f"copy.{kind}"
        shutil.copy(path, local)
        attempt.put(kind, str(local), rows=ledger["files"][kind]["rows"])
    assert attempt.commit({k: v for k, v in ledger.items() if k not in ("files", "attempt_id")}, generation=1)
    assert stage.pending(output) == {"00001": 1}
    assert scores.coverage(load_finished(out)).missing == ["00001"]   # stale scores are never joined
    assert run_stage(config(out, clip_dir))["committed"] == 1
    score_ledger = scores.score_store(output).read_ledger("00001")
    assert score_ledger["generation"] == 1 and score_ledger["source"]["generation"] == 1
    assert scores.coverage(load_finished(out)).complete


KILLED_CHILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
from dataset.claims import Claims
from dataset.outputs import Attempt, Output
from scoring.clip import ClipModelSpec
from dataset.scores import score_store
from scoring.stage import ScoreTask, ScoreWorker

def die(self, ledger, generation=0, claim_token=None):  # killed after the file is written, before the ledger exists
    os.kill(os.getpid(), signal.SIGKILL)

output = Output.open({out!r})
held = Claims(score_store(output).base, "a worker about to die", {ttl})
token = held.acquire("00000")
held.start_renewing(on_lost=print)   # live until the process dies
Attempt.commit = die
ScoreWorker({out!r}, output.fingerprint, ClipModelSpec({model!r}), batch_size=5).process(
    ScoreTask("00000", claim_token=token))
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
    leftovers = store.data_files()
    assert sum(len(files) for files in leftovers.values()) == 1 and store.done() == {}   # a file, no commit

    summary = run_stage(config(out, clip_dir, claim_ttl=ttl))  # waits for the dead holder's claim to go stale

    assert summary["committed"] == SHARDS and summary["failed"] == {}
    got, want = committed_scores(out), ok_rows(out)
    for shard in want:
        assert sorted(s["key"] for s in got[shard]) == sorted(r["key"] for r in want[shard])
    files = store.data_files()
    assert all(len(paths) == 1 for paths in files.values())          # the dead attempt's file was swept
    assert not set(leftovers["00000"]) & set(files["00000"])


def test_worker_actor_shape_and_abandon(tmp_path, clip_dir):
    out = finished(tmp_path / "out")
    output = Output.open(out)
    worker = ScoreWorker(out, output.fingerprint, ClipModelSpec(f"local-dir:{clip_dir}"), batch_size=4)
    ready = worker.ready()
    assert ready["worker"].endswith(f":{os.getpid()}") and ready["context_length"] == 16 and ready["device"] == "cpu"
    outcome = worker.process(ScoreTask("00000"))
    assert outcome["outcome"] == "committed" and outcome["ledger"]["scored"] == PER_SHARD - ERRORS
    assert worker.process(ScoreTask("00000"))["already"] is True
    assert set(worker.status()) == {"shards", "busy_share"} and 0 < worker.status()["busy_share"] < 1

    forward = worker.scorer.scores
    seen = []

    def abandoning(images, captions):   # the scheduler abandons the shard while its first batch runs
        seen.append(worker.status()["shards"])
        worker.abandon("00001")
        return forward(images, captions)

    worker.scorer.scores = abandoning
    assert worker.process(ScoreTask("00001")) == {"shard": "00001", "outcome": "abandoned", "ledger": None}
    assert seen[0] == {"00001": "scoring"} and worker.status()["shards"] == {}
    store = scores.score_store(output)
    assert "00001" not in store.done() and "00001" not in store.data_files()
