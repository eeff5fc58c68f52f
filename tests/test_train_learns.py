"""End to end through the command lines: build a tokenizer, train each objective on a shape task, and
show that it learned what a random tower cannot see: k-NN and linear probe against the same evaluation of
its untrained copy (the same run at learning rate 0), caption token accuracy against its own decoder with
every image zeroed.

The task: a ring or a cross (dataset.synthetic.shapes) at a random position, scale, colour and
background per image; the recaption names the shape and nothing else ("a ring on a plain
background."), the web caption names nothing ("clipart"). Colour, which random patch features carry,
is no label here, and the two shapes cover about the same area: a random tower is near chance on
them (k-NN 51-54 %, linear probe 53-69 %, chance 50 %, measured below).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from dataset.outputs import WdsSample, write_wds
from dataset.synthetic.shapes import BACKGROUNDS, COLORS, ShapeSample, draw_shape, jpeg_bytes
from pipelines import evaluate as evaluate_cli
from pipelines import train as train_cli
from train import checkpoint

WEB_CAPTIONS = ("a simple icon", "clipart", "an image on a plain background", "a picture")
IMAGE_SIZE = 64  # stored; trained and evaluated at 32


CLASSES = ("ring", "cross")


def random_shape(rng: random.Random) -> ShapeSample:
    color = rng.choice(list(COLORS))
    return ShapeSample(color, rng.choice(CLASSES), rng.choice([b for b in BACKGROUNDS if b != color]))


def write_shape_shards(out: Path, shards: int, per_shard: int, seed: int) -> None:
    """Shards in the recaption job's `wds/` format (its writer) whose recaption names the shape only."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for shard in range(shards):
        samples = []
        for i in range(per_shard):
            sample = random_shape(rng)
            image = jpeg_bytes(draw_shape(sample, IMAGE_SIZE, rng))
            samples.append(WdsSample(f"{shard:05d}{i:04d}", "jpg", image, rng.choice(WEB_CAPTIONS),
                                     f"a {sample.shape} on a plain background."))
        write_wds(samples, str(out / f"{shard:05d}.tar"))


def write_shape_folder(out: Path, per_class: int, seed: int) -> None:
    """ImageFolder `out/{shape}/NNN.jpg`, colour and background drawn at random."""
    rng = random.Random(seed)
    for shape in CLASSES:
        (out / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            sample = ShapeSample(**{**random_shape(rng).__dict__, "shape": shape})
            (out / shape / f"{i:03d}.jpg").write_bytes(jpeg_bytes(draw_shape(sample, IMAGE_SIZE, rng)))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("learns")
    write_shape_shards(root / "wds", shards=4, per_shard=256, seed=0)
    write_shape_shards(root / "heldout", shards=1, per_shard=240, seed=7)
    write_shape_folder(root / "probe_train", per_class=60, seed=2)
    write_shape_folder(root / "probe_val", per_class=40, seed=1)
    train_cli.main(["--build-tokenizer", "--data", str(root / "wds"), "--out", str(root / "tokenizer")])
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread beside the loader worker, so the two processes do not oversubscribe 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Ti width and heads with one block per tower, 32 px at patch 8, short texts: CPU-sized. OpenVision 2's
# decoder sees every patch here (keep ratio 1: at the paper's 0.35 it learned nothing of the six-shape version
# of this task in 200 steps).
SETTINGS = {"clips": {"steps": 200, "lr": "0.01"}, "openvision2": {"steps": 200, "lr": "0.03", "keep": "1.0"}}


def train_run(root: Path, objective: str, *, seed: int = 0, trained: bool = True) -> Path:
    """The objective's run; `trained` False: the same run (same seed, same initial weights) at learning
    rate 0 for one step, the untrained copy."""
    s = SETTINGS[objective]
    steps, lr = (s["steps"], s["lr"]) if trained else (1, "0")
    run = root / f"{objective}-{seed}-{'trained' if trained else 'untrained'}"
    train_cli.main([
        "--data", str(root / "wds" / "{00000..00003}.tar"), "--tokenizer", str(root / "tokenizer"), "--out", str(run),
        "--objective", objective, "--model", "Ti/8", "--depth", "1", "--image-size", "32", "--batch-size", "32",
        "--samples", str(32 * steps), "--base-lr", lr, "--warmup-samples", str(32 * steps // 10), "--seed", str(seed),
        "--context-length", "12", "--caption-length", "12", "--vocab-size", "1024", "--workers", "1",
        "--shuffle-buffer", "256", "--log-every", "50", "--keep-ratio", s.get("keep", "0.35"),
    ])
    return checkpoint.latest(run)


def evaluate(root: Path, ckpt: Path) -> dict:
    out = ckpt.parent.parent / "eval.json"
    extra = ["--zeroshot", str(root / "probe_val")] if "clips" in ckpt.parent.parent.name else []
    evaluate_cli.main(["--checkpoint", str(ckpt), "--workers", "0", "--out", str(out), "--probe-train",
                       str(root / "probe_train"), "--probe-val", str(root / "probe_val"), "--captioning",
                       str(root / "heldout"), *extra])
    return json.loads(out.read_text())


def figures(results: dict) -> dict[str, float]:
    probe, caption = results["probe"], results["captioning"]
    out = {"knn": probe["knn_top1"], "linear": probe["linear_top1"], "caption": caption["token_acc"],
           "caption_zero_images": caption["zero_images_token_acc"]}
    if "zeroshot" in results:
        out["zeroshot"] = results["zeroshot"]["top1"]
    return out


def learned(root: Path, objective: str, seed: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    trained = figures(evaluate(root, train_run(root, objective, seed=seed)))
    untrained = figures(evaluate(root, train_run(root, objective, seed=seed, trained=False)))
    print(json.dumps({"objective": objective, "seed": seed, "trained": trained, "untrained": untrained}))
    return trained, untrained


# Measured on 2 shared CPU cores with these settings, seeds 0 / 1 / 2, each against its own untrained copy
# (top-1 in %, chance 50; caption: teacher-forced token accuracy on 240 held-out captions, where the
# zeroed-image control can only guess the shape word, 1 of 8 targets). Runs of one seed differ too (the
# loader), by as much as seeds do: a run of seed 0 before the probe's regulariser sweep gave OpenVision 2
# k-NN 78.8 once and 62.5 the next time.
#   OpenVision 1  k-NN      trained 82.5 / 81.3 / 80.0    untrained 51.3 / 52.5 / 52.5
#                 linear    trained 95.0 / 90.0 / 80.0    untrained 63.8 / 66.3 / 52.5
#                 caption   trained 99.4 / 99.1 / 98.3    zeroed images 93.9 / 93.6 / 93.6
#                 zero-shot trained 55.0 / 85.0 / 82.5    untrained 51.3 / 50.0 / 41.3  (not asserted: too wide)
#   OpenVision 2  k-NN      trained 62.5 / 65.0 / 66.3    untrained 52.5 / 53.8 / 53.8
#                 linear    trained 77.5 / 78.8 / 86.3    untrained 63.8 / 61.3 / 68.8
#                 caption   trained 98.7 / 97.3 / 98.7    zeroed images 93.9 (all seeds)
# Each margin sits well below the smallest gain measured (OpenVision 1: k-NN +27.5, linear +23.8, caption
# +4.7 points; OpenVision 2: k-NN +10, linear +13.8, caption +3.5) and above the untrained copies' own
# k-NN spread (51-54). With all six shapes (chance 1/6) the same budget gave gains within the untrained
# spread: no test there.
MARGINS = {
    "clips": {"knn": 0.2, "linear": 0.1, "caption": 0.03},
    "openvision2": {"knn": 0.05, "linear": 0.07, "caption": 0.02},
}


def assert_learned(objective: str, trained: dict[str, float], untrained: dict[str, float]) -> None:
    margin = MARGINS[objective]
    for name in ("knn", "linear"):
        assert trained[name] >= untrained[name] + margin[name], name
    assert trained["caption"] >= trained["caption_zero_images"] + margin["caption"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_openvision1_learns_shapes_a_random_tower_cannot_see(data: Path) -> None:
    assert_learned("clips", *learned(data, "clips"))
    assert (data / "clips-0-trained" / "loss.png").stat().st_size > 0
    assert (data / "clips-0-trained" / "tensorboard").is_dir()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_openvision2_learns_shapes_a_random_tower_cannot_see(data: Path) -> None:
    assert_learned("openvision2", *learned(data, "openvision2"))
