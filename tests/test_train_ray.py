"""`pipelines/train.py --ray-workers 2` runs a Ray Train TorchTrainer with two CPU workers.

The run uses the two-stage `tiny` recipe, so it also checks the progressive-resolution stage runner:
stage 2 starts from stage 1's last checkpoint, at its own resolution.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dataset.synthetic.training_shards import write_recaptioned_wds
from train import checkpoint
from train.data import expand_urls, read_captions
from train.tokenizer import CaptionTokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_train_two_workers_run_both_stages(tmp_path: Path) -> None:
    write_recaptioned_wds(tmp_path / "wds", shards=2, per_shard=16, image_size=48)
    CaptionTokenizer.train(read_captions(expand_urls(str(tmp_path / "wds")), 100)).save(tmp_path / "tokenizer")
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "pipelines" / "train.py"), "--data", str(tmp_path / "wds" / "*.tar"),
           "--tokenizer", str(tmp_path / "tokenizer"), "--objective", "openvision2",
           "--out", str(run), "--recipe", "tiny", "--ray-workers", "2", "--workers", "0",
           "--depth", "1", "--context-length", "16", "--vocab-size", "1024", "--caption-length", "12",
           "--shuffle-buffer", "8",
           "--log-every", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    first, second = checkpoint.latest(run / "stage1"), checkpoint.latest(run / "stage2")
    assert first is not None and second is not None
    state = checkpoint.load(second)
    assert state["world"] == 2 and state["step"] == 2 and len(state["data"]) == 2
    assert state["train_config"]["image_size"] == 48
    assert state["train_config"]["init_from"] == str(first)
    assert checkpoint.load(first)["step"] == 2 and state["model_config"]["objective"] == "openvision2"
    assert "2 process(es)" in proc.stdout + proc.stderr
