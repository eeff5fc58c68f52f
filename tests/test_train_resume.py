"""Stopping at step k and resuming to n gives the weights of an uninterrupted run to n."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dataset.synthetic.training_shards import write_recaptioned_wds
from train import checkpoint
from train.data import expand_urls, read_captions
from train.loop import TrainConfig, train
from train.tokenizer import CaptionTokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("resume")
    write_recaptioned_wds(root / "wds", shards=3, per_shard=24, image_size=48)
    shards = str(root / "wds" / "*.tar")
    # One tokenizer for both runs: tokenizers' WordPiece trainer breaks count ties in hash order
    # (huggingface/tokenizers#1794), so two trainings on the same captions can differ.
    CaptionTokenizer.train(read_captions(expand_urls(shards), 1000)).save(root / "tokenizer")
    return shards, str(root / "tokenizer")


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["clips", "openvision2"])  # openvision2 also draws token masks from the RNG
def test_resume_continues_exactly(objective: str, data: tuple[str, str], tmp_path: Path) -> None:
    shards, tokenizer = data
    common = dict(data=shards, tokenizer=tokenizer, model="Ti/16", depth=1, objective=objective, image_size=32,
                  batch_size=8, samples=8 * 7, base_lr=0.03, warmup_samples=16, context_length=16, vocab_size=1024,
                  caption_length=16, workers=2, shuffle_buffer=16, log_every=1, save_every=4)
    straight = train(TrainConfig(out=str(tmp_path / "a"), **common))
    stopped = train(TrainConfig(out=str(tmp_path / "b"), stop_at_step=3, **common))
    assert checkpoint.load(stopped)["step"] == 3
    resumed = train(TrainConfig(out=str(tmp_path / "b"), resume=True, **common))

    a, b = checkpoint.load(straight), checkpoint.load(resumed)
    assert a["step"] == b["step"] == 7
    assert a["data"] == b["data"]
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))
    assert (tmp_path / "b" / "loss.png").stat().st_size > 0
    assert len(checkpoint.list_checkpoints(tmp_path / "b")) == 2  # keep_checkpoints
