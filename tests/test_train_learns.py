"""End to end through the command lines: train on synthetic shape shards, then zero-shot and
retrieval on held-out images reach far above chance."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataset.synthetic.shapes import write_imagefolder
from dataset.synthetic.training_shards import write_recaptioned_wds
from pipelines import evaluate as evaluate_cli
from pipelines import train as train_cli
from train import checkpoint

CLASSES = 48  # 8 colours x 6 shapes: zero-shot chance is 1/48 ~ 2.1 %



@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_learns_shapes_and_colours(tmp_path: Path) -> None:
    write_recaptioned_wds(tmp_path / "wds", shards=4, per_shard=256, image_size=64, seed=0)
    write_recaptioned_wds(tmp_path / "retrieval", shards=1, per_shard=64, image_size=64, seed=7)
    write_imagefolder(tmp_path / "heldout", per_class=5, image_size=64, seed=1)
    run = tmp_path / "run"
    # Ti width and heads with one block per tower, 32 px at patch 8, short texts: CPU-sized.
    train_cli.main([
        "--data", str(tmp_path / "wds" / "*.tar"), "--out", str(run), "--model", "Ti/8", "--depth", "1",
        "--image-size", "32", "--batch-size", "64", "--samples", str(64 * 150), "--base-lr", "0.004",
        "--warmup-samples", str(64 * 15), "--context-length", "16", "--caption-length", "8",
        "--workers", "1", "--shuffle-buffer", "256", "--log-every", "25",
    ])
    ckpt = checkpoint.latest(run)
    out = tmp_path / "eval.json"
    evaluate_cli.main(["--checkpoint", str(ckpt), "--zeroshot", str(tmp_path / "heldout"), "--retrieval",
                               str(tmp_path / "retrieval" / "*.tar"), "--workers", "0", "--out", str(out)])
    results = json.loads(out.read_text())
    print(json.dumps(results, indent=1))
    assert results["zeroshot"]["classes"] == CLASSES and results["zeroshot"]["templates"] == 81
    assert results["zeroshot"]["top1"] >= 5 / CLASSES
    assert results["zeroshot"]["top5"] >= 5 * 5 / CLASSES
    assert results["retrieval"]["image_to_text"]["R@10"] >= 3 * 10 / 64
    assert results["retrieval"]["text_to_image"]["R@10"] >= 3 * 10 / 64
    assert (run / "loss.png").stat().st_size > 0 and (run / "tensorboard").is_dir()
