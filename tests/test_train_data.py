"""Tokenizer layout, caption views, augmentation and the resumable shard stream."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from dataset.synthetic.training_shards import write_recaptioned_wds
from train.data import ShardStream, augment, expand_urls, read_captions, subcaptions
from train.templates import CLIP_TEMPLATES, ZEROSHOT_TEMPLATES
from train.tokenizer import BOS_ID, CLS_ID, EOS_ID, PAD_ID, CaptionTokenizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("wds")
    write_recaptioned_wds(out, shards=3, per_shard=20, image_size=48)
    return str(out / "*.tar")


@pytest.fixture(scope="module")
def tokenizer(shards) -> CaptionTokenizer:
    return CaptionTokenizer.train(read_captions(expand_urls(shards), 1000))


def test_trained_tokenizer_has_the_clips_layout(tokenizer: CaptionTokenizer) -> None:
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.cls_id) == (PAD_ID, BOS_ID, EOS_ID, CLS_ID)
    assert 104 < tokenizer.vocab_size < 32000
    ids = tokenizer.encode(["A RED Circle", "a red circle"], 10)
    assert torch.equal(ids[0], ids[1])  # uncased
    row = ids[0].tolist()
    assert row[0] == BOS_ID and row[-1] == CLS_ID and EOS_ID in row
    assert row[row.index(EOS_ID) + 1:-1] == [PAD_ID] * (8 - row.index(EOS_ID))


def test_truncation_forces_eos_before_cls(tokenizer: CaptionTokenizer) -> None:
    long = " ".join(["red circle"] * 100)
    row = tokenizer.encode([long], 80)[0].tolist()
    assert row[0] == BOS_ID and row[78] == EOS_ID and row[79] == CLS_ID and PAD_ID not in row
    target = tokenizer.encode([long], 129, append_cls=False)[0].tolist()
    assert target[-1] == EOS_ID and CLS_ID not in target


def test_any_hf_folder_works_and_gets_bert_special_ids(tokenizer: CaptionTokenizer, tmp_path: Path) -> None:
    # a folder shaped like a bert-base-uncased download: vocab.txt, no bos/eos tokens named
    vocab = [tokenizer.backend.id_to_token(i) for i in range(tokenizer.vocab_size)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    bert = CaptionTokenizer.load(tmp_path)
    assert (bert.bos_id, bert.eos_id, bert.cls_id, bert.pad_id) == (BOS_ID, EOS_ID, CLS_ID, PAD_ID)
    assert torch.equal(bert.encode(["a blue ring"], 16), tokenizer.encode(["a blue ring"], 16))
    restored = CaptionTokenizer.from_files(bert.to_files())
    assert restored.eos_id == EOS_ID


def test_subcaptions_split_on_runs_of_stops() -> None:
    assert subcaptions("A red ring.. It is big! !Nothing else.") == ["A red ring", "It is big", "Nothing else"]
    assert subcaptions(" ..! ") == []


def test_augment_is_a_function_of_the_rng() -> None:
    img = Image.new("RGB", (100, 80), (200, 30, 30))
    a, b = augment(img, random.Random(1), 32), augment(img, random.Random(1), 32)
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, augment(img, random.Random(2), 32))


def test_templates_are_clips_80_plus_bare_name() -> None:
    assert len(CLIP_TEMPLATES) == 80 == len(set(CLIP_TEMPLATES))
    assert ZEROSHOT_TEMPLATES[-1] == "{}" and all("{}" in t for t in ZEROSHOT_TEMPLATES)


def stream(shards: str, tokenizer: CaptionTokenizer, **kw) -> ShardStream:
    return ShardStream(expand_urls(shards), tokenizer, image_size=32, batch_size=4, context_length=16,
                       caption_length=24, seed=3, shuffle_buffer=8, **kw)


def take(s: ShardStream, n: int) -> list:
    it = iter(s)
    return [next(it) for _ in range(n)]


def test_batches_hold_two_views_and_the_recaption(shards: str, tokenizer: CaptionTokenizer) -> None:
    batch, worker, position = take(stream(shards, tokenizer), 1)[0]
    assert batch["images"].shape == (4, 3, 32, 32)
    assert batch["texts"].shape == (8, 16) and (batch["texts"][:, -1] == CLS_ID).all()
    assert batch["captions"].shape == (4, 25) and (batch["captions"][:, 0] == BOS_ID).all()
    assert worker == 0 and position[0] == 0
    web, sub = batch["texts"][:4], batch["texts"][4:]
    assert not torch.equal(web, sub)


def test_stream_resumes_exactly_from_a_position(shards: str, tokenizer: CaptionTokenizer) -> None:
    """60 samples / batch 4: 15 batches an epoch, so 20 batches cross into epoch 1."""
    full = take(stream(shards, tokenizer), 20)
    _, worker, position = full[11]
    resumed = take(stream(shards, tokenizer, start={worker: position}), 8)
    for (a, _, pa), (b, _, pb) in zip(full[12:], resumed):
        assert pa == pb and all(torch.equal(a[k], b[k]) for k in a)
    assert full[-1][2][0] == 1  # second epoch, reshuffled
    first_keys = [tuple(b["captions"][0].tolist()) for b, _, _ in full[:15]]
    second_keys = [tuple(b["captions"][0].tolist()) for b, _, _ in full[15:]]
    assert first_keys[:5] != second_keys


def test_ranks_and_workers_split_the_shards(shards: str, tokenizer: CaptionTokenizer) -> None:
    s0, s1 = stream(shards, tokenizer, rank=0, world=2), stream(shards, tokenizer, rank=1, world=2)
    for epoch in range(3):
        mine = s0.epoch_shards(epoch, 0, 2) + s1.epoch_shards(epoch, 0, 2) + \
            s0.epoch_shards(epoch, 1, 2) + s1.epoch_shards(epoch, 1, 2)
        # 4 slots, 3 shards: every shard is read, one twice (resampled), every slot gets one
        assert set(mine) == set(expand_urls(shards)) and len(mine) == 4


def test_karpathy_json_retrieval_set(tmp_path: Path) -> None:
    from train.evaluate import load_retrieval_set

    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    entries = [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "one"}, {"raw": "two"}]},
               {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "three"}]},
               {"filename": "c.jpg", "split": "test", "sentences": [{"raw": "four"}]}]
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": entries}))
    images, captions, owner = load_retrieval_set(str(tmp_path / "karpathy.json"))
    assert [p.name for p in images] == ["a.jpg", "c.jpg"]
    assert captions == ["one", "two", "four"] and owner == [0, 0, 1]
