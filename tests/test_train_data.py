"""Tokenizer layout, caption views, augmentation, the input grammar and the resumable shard stream."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import storage
from dataset.synthetic.shapes import jpeg_bytes
from dataset.synthetic.training_shards import write_recaptioned_wds
from train.data import (
    ShardStream,
    augment,
    color_jitter,
    crop_box,
    decode_crop,
    expand_urls,
    read_captions,
    subcaptions,
)
from train.evaluate import ZEROSHOT_TEMPLATES, classnames_from, templates_from
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
    data = jpeg_bytes(Image.new("RGB", (100, 80), (200, 30, 30)))
    a, b = augment(data, random.Random(1), 32), augment(data, random.Random(1), 32)
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, augment(data, random.Random(2), 32))


def test_draft_decoding_matches_a_full_decode() -> None:
    """A 512 px JPEG cropped to 160 px: decoded at 1/2 scale, it must look like the full decode."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 512)
    pixels = np.stack([ramp[None, :].repeat(512, 0), ramp[:, None].repeat(512, 1),
                       rng.uniform(0, 255, (64, 64)).repeat(8, 0).repeat(8, 1)], axis=-1).astype(np.uint8)
    data = jpeg_bytes(Image.fromarray(pixels), quality=95)
    for seed in range(5):
        fast = np.asarray(decode_crop(data, random.Random(seed), 160), dtype=np.float32)
        box = crop_box(512, 512, random.Random(seed))  # the same crop box, from a full-resolution decode
        full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((160, 160), Image.Resampling.BILINEAR,
                                                                              box=box), dtype=np.float32)
        # DCT-domain downscaling is a different low-pass than the bilinear filter: a few grey levels
        assert np.abs(fast - full).mean() < 3.0, seed
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (256, 256))
    assert img.size == (256, 256)  # PIL honours the draft request: 1/2 scale here


def test_colour_jitter_shifts_hue_by_at_most_0_08() -> None:
    """SimCLR jitter at strength 0.4 includes a hue shift of up to 0.2 x 0.4 = 0.08 of the colour
    circle; brightness, contrast and saturation leave a flat colour's hue where it is."""
    img = Image.new("RGB", (8, 8), (200, 60, 30))
    hue = lambda im: np.asarray(im.convert("HSV"), dtype=np.float32)[..., 0].mean() / 255  # noqa: E731
    shifts = []
    for seed in range(60):
        delta = hue(color_jitter(img, random.Random(seed))) - hue(img)
        shifts.append((delta + 0.5) % 1.0 - 0.5)  # around the circle
    shifts = np.abs(shifts)
    assert shifts.max() <= 0.08 + 2 / 255  # uint8 HSV quantisation
    assert shifts.max() > 0.05 and (shifts > 0.01).mean() > 0.5


def test_zeroshot_classnames_and_templates_come_from_open_clip(tmp_path: Path) -> None:
    names = classnames_from("imagenet")
    assert len(names) == 1000 and names[0] == "tench"
    assert len(ZEROSHOT_TEMPLATES) == 81 and ZEROSHOT_TEMPLATES[-1]("cat") == "cat"
    assert ZEROSHOT_TEMPLATES[0]("cat") == "a bad photo of a cat."
    (tmp_path / "t.txt").write_text("a {} here\nitap of {}\n")
    assert [t("dog") for t in templates_from(str(tmp_path / "t.txt"))] == ["a dog here", "itap of dog"]
    assert classnames_from(None) is None


def stream(shards: str, tokenizer: CaptionTokenizer, **kw) -> ShardStream:
    return ShardStream(expand_urls(shards), tokenizer, image_size=32, batch_size=4, context_length=16,
                       caption_length=24, seed=3, shuffle_buffer=8, **kw)


def take(s: ShardStream, n: int) -> list:
    it = iter(s)
    return [next(it) for _ in range(n)]


def test_batches_hold_two_views_and_the_recaption(shards: str, tokenizer: CaptionTokenizer) -> None:
    batch, worker, position = take(stream(shards, tokenizer), 1)[0]
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["texts"].shape == (8, 16) and (batch["texts"][:, -1] == CLS_ID).all()
    assert batch["captions"].shape == (4, 24) and (batch["captions"][:, 0] == BOS_ID).all()
    assert worker == 0 and position[0] == 0 and "keep" not in batch
    web, sub = batch["texts"][:4], batch["texts"][4:]
    assert not torch.equal(web, sub)


def test_openvision2_batches_carry_kept_token_indices(shards: str, tokenizer: CaptionTokenizer) -> None:
    batches = take(stream(shards, tokenizer, text_views=False, keep=(16, 5)), 2)
    keep = torch.cat([b["keep"] for b, _, _ in batches])
    assert "texts" not in batches[0][0] and keep.shape == (8, 5)
    assert all(len(set(row.tolist())) == 5 and row.max() < 16 for row in keep)  # without replacement
    assert not all(torch.equal(row, row.sort().values) for row in keep)  # random order, as the reference
    again = take(stream(shards, tokenizer, text_views=False, keep=(16, 5)), 2)
    assert torch.equal(keep, torch.cat([b["keep"] for b, _, _ in again]))  # part of the seeded stream


def test_data_accepts_the_recaption_input_grammar(shards: str, tmp_path: Path) -> None:
    folder = str(Path(shards).parent)
    assert expand_urls(folder) == expand_urls(shards) == expand_urls(folder + "/{00000..00002}.tar")
    with pytest.raises(ValueError, match="no input shards"):
        expand_urls(str(tmp_path / "*.tar"))


@pytest.mark.slow
def test_stream_reads_shards_from_s3(shards: str, tokenizer: CaptionTokenizer, s3_bucket: str) -> None:
    for path in expand_urls(shards):
        storage.write_bytes(f"{s3_bucket}/wds/{Path(path).name}", Path(path).read_bytes())
    remote = take(stream(f"{s3_bucket}/wds/", tokenizer), 3)
    local = take(stream(shards, tokenizer), 3)
    for (a, _, pa), (b, _, pb) in zip(local, remote, strict=True):
        assert pa == pb and all(torch.equal(a[k], b[k]) for k in a)


def test_stream_resumes_exactly_from_a_position(shards: str, tokenizer: CaptionTokenizer) -> None:
    """60 samples / batch 4: 15 batches an epoch, so 20 batches cross into epoch 1."""
    full = take(stream(shards, tokenizer), 20)
    _, worker, position = full[11]
    resumed = take(stream(shards, tokenizer, start={worker: position}), 8)
    for (a, _, pa), (b, _, pb) in zip(full[12:], resumed, strict=True):
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


def test_knn_in_chunks_equals_the_whole_similarity_matrix() -> None:
    """k-NN's blockwise running top-k gives the votes of the full validation x train matrix."""
    import torch.nn.functional as F

    from train.evaluate import knn_accuracy

    torch.manual_seed(0)
    train_x, val_x = F.normalize(torch.randn(300, 16), dim=1), F.normalize(torch.randn(50, 16), dim=1)
    train_y, val_y = torch.randint(0, 5, (300,)), torch.randint(0, 5, (50,))
    sim, idx = (val_x @ train_x.T).topk(20, dim=1)  # the whole matrix at once, as before chunking
    votes = torch.zeros(50, 5).scatter_add_(1, train_y[idx], (sim / 0.07).exp())
    whole = int((votes.argmax(dim=1) == val_y).sum()) / 50
    assert 0.1 < whole < 0.5  # random labels: a vote that is not all one class
    for chunk in (7, 20, 64, 10_000):  # blocks smaller than k, equal to it, uneven, and one block
        assert knn_accuracy(train_x, train_y, val_x, val_y, 5, 20, 0.07, chunk=chunk) == whole


def test_linear_probe_regulariser_is_chosen_on_held_out_training_features() -> None:
    """The sweep scores each L2 weight on a held-out fifth of the training features (never the validation
    set) and keeps the best: one that smothers the signal loses, whichever order the grid is in."""
    from train.evaluate import choose_weight_decay, linear_probe_accuracy

    def features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """150 dimensions, each weakly informative: many small weights generalise, a crushed probe does not."""
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 2, (n,), generator=g)
        return (y.float() * 2 - 1)[:, None] * 0.2 + torch.randn(n, 150, generator=g), y

    x, y = features(60, 0)
    for grid in ((1e-4, 10.0), (10.0, 1e-4)):
        assert choose_weight_decay(x, y, 2, grid) == 1e-4
    order = torch.randperm(60, generator=torch.Generator().manual_seed(0))  # the documented seeded 80/20 split
    fit, rest = order[:48], order[48:]
    held_out = {wd: linear_probe_accuracy(x[fit], y[fit], x[rest], y[rest], 2, wd) for wd in (1e-4, 10.0)}
    assert held_out[1e-4] > held_out[10.0]
    val_x, val_y = features(400, 1)
    assert linear_probe_accuracy(x, y, val_x, val_y, 2, 1e-4) > linear_probe_accuracy(x, y, val_x, val_y, 2, 10.0) + 0.2


def test_the_caption_field_names_the_member_trained_on(tokenizer: CaptionTokenizer) -> None:
    """A caption set's column C is the member `{key}.C.txt`; `--caption-field C.txt` trains on it."""
    from pipelines.train import parse_args, train_config

    raw = {"jpg": jpeg_bytes(Image.new("RGB", (40, 40), "red")), "txt": b"a web caption",
           "re_caption.txt": b"The first caption. Two sentences.", "v2.txt": b"The second caption."}
    default = train_config(parse_args(["--data", "D", "--out", "O"]))
    chosen = train_config(parse_args(["--data", "D", "--out", "O", "--caption-field", "v2.txt"]))
    for cfg, expected in ((default, "The first caption. Two sentences."), (chosen, "The second caption.")):
        s = ShardStream([], tokenizer, image_size=32, batch_size=1, context_length=16, caption_length=24, seed=0,
                        shuffle_buffer=1, caption_field=cfg.caption_field)
        assert s.prepare(raw, random.Random(0))["caption"] == expected
