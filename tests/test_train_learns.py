"""End to end through the command lines: build a tokenizer, train both objectives on synthetic
shape shards, then zero-shot, retrieval and k-NN / linear probes on held-out images reach far
above chance."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dataset.synthetic.shapes import write_imagefolder
from dataset.synthetic.training_shards import write_recaptioned_wds
from pipelines import evaluate as evaluate_cli
from pipelines import train as train_cli
from train import checkpoint

CLASSES = 48  # 8 colours x 6 shapes: chance is 1/48 ~ 2.1 %


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("learns")
    write_recaptioned_wds(root / "wds", shards=4, per_shard=256, image_size=64, seed=0)
    write_recaptioned_wds(root / "retrieval", shards=1, per_shard=64, image_size=64, seed=7)
    write_imagefolder(root / "heldout", per_class=5, image_size=64, seed=1)
    write_imagefolder(root / "probe_train", per_class=4, image_size=64, seed=2)
    train_cli.main(["--build-tokenizer", "--data", str(root / "wds"), "--out", str(root / "tokenizer")])
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread beside the loader worker, so the two processes do not oversubscribe 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_run(root: Path, objective: str, steps: int, lr: str, batch: int = 32) -> Path:
    """Ti width and heads with one block per tower, 32 px at patch 8, short texts: CPU-sized."""
    run = root / objective
    train_cli.main([
        "--data", str(root / "wds" / "{00000..00003}.tar"), "--tokenizer", str(root / "tokenizer"), "--out", str(run),
        "--objective", objective, "--model", "Ti/8", "--depth", "1", "--image-size", "32", "--batch-size", str(batch),
        "--samples", str(batch * steps), "--base-lr", lr, "--warmup-samples", str(batch * steps // 10),
        "--context-length", "12", "--caption-length", "8", "--vocab-size", "1024", "--workers", "1",
        "--shuffle-buffer", "256", "--log-every", "25",
    ])
    return checkpoint.latest(run)


def evaluate(root: Path, ckpt: Path, *args: str) -> dict:
    out = root / f"{ckpt.parent.parent.name}.eval.json"
    evaluate_cli.main(["--checkpoint", str(ckpt), "--workers", "0", "--out", str(out), "--probe-train",
                       str(root / "probe_train"), "--probe-val", str(root / "heldout"), *args])
    results = json.loads(out.read_text())
    print(json.dumps(results, indent=1))
    return results


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_openvision1_learns_shapes_and_colours(data: Path) -> None:
    ckpt = train_run(data, "clips", steps=100, lr="0.006", batch=64)
    results = evaluate(data, ckpt, "--zeroshot", str(data / "heldout"), "--retrieval", str(data / "retrieval"))
    assert results["zeroshot"]["classes"] == CLASSES and results["zeroshot"]["templates"] == 81
    assert results["zeroshot"]["top1"] >= 5 / CLASSES
    assert results["zeroshot"]["top5"] >= 5 * 5 / CLASSES
    assert results["retrieval"]["image_to_text"]["R@10"] >= 3 * 10 / 64
    assert results["retrieval"]["text_to_image"]["R@10"] >= 3 * 10 / 64
    assert results["probe"]["knn_top1"] >= 5 / CLASSES and results["probe"]["linear_top1"] >= 5 / CLASSES
    assert (data / "clips" / "loss.png").stat().st_size > 0 and (data / "clips" / "tensorboard").is_dir()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_openvision2_learns_shapes_and_colours(data: Path) -> None:
    ckpt = train_run(data, "openvision2", steps=60, lr="0.016")
    results = evaluate(data, ckpt)
    assert results["probe"]["classes"] == CLASSES
    assert results["probe"]["knn_top1"] >= 5 / CLASSES and results["probe"]["linear_top1"] >= 5 / CLASSES
