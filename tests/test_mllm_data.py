"""Training data: every sample once per epoch over ranks; unusable samples are skipped, counted by reason
and named, and a run stops once they pass --max-bad-fraction."""
from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from dataset.outputs import WdsSample, write_wds
from dataset.synthetic.training_shards import write_recaptioned_wds
from pipelines import mllm as mllm_cli
from train.mllm.conversation import IGNORE, IMAGE_ID, TEMPLATES
from train.mllm.data import (
    EMPTY_CAPTION,
    MALFORMED,
    NO_IMAGE,
    TOO_LONG,
    DataError,
    ExampleStream,
    LlavaJson,
    SkipTally,
    WdsCaptions,
)
from train.mllm.tiny import build_tiny_lm, build_tiny_tower, build_tokenizer, write_shape_task
from train.mllm.towers import IMAGENET_MEAN, IMAGENET_STD, ImagePrep

PREP = ImagePrep(32, IMAGENET_MEAN, IMAGENET_STD)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def stream(source, tok, template="vicuna_v1", rank=0, world=1, max_length=256) -> ExampleStream:
    return ExampleStream(source, tok, TEMPLATES[template], PREP, image_tokens=4, max_length=max_length, seed=0,
                         rank=rank, world=world)


def test_each_epoch_gives_every_sample_once_over_the_ranks(tmp_path: Path, tok) -> None:
    task = write_shape_task(tmp_path, 6, image_size=32)
    source = LlavaJson(task["conversations"], task["images"])
    epochs = []
    for epoch in range(2):
        names = [name for slot in range(3) for name, _, _ in source.records(epoch, 0, slot, 3)]
        assert sorted(names) == sorted(f"{task['conversations']}[{i}] (id '{i}')" for i in range(6))
        epochs.append(names)
    assert epochs[0] != epochs[1]  # reshuffled
    example = next(iter(stream(source, tok, rank=1, world=3)))
    assert example.image.shape == (3, 32, 32) and example.ids.count(IMAGE_ID) == 1


def test_recaption_shards_give_image_caption_pairs(tmp_path: Path, tok) -> None:
    infos = write_recaptioned_wds(tmp_path, shards=2, per_shard=3, image_size=32)
    source = WdsCaptions(str(tmp_path / "*.tar"))
    assert len(source) == 6
    keys = [name.rsplit(" ", 1)[1] for slot in range(2) for name, _, _ in source.records(0, 0, slot, 2)]
    assert sorted(keys) == sorted(k for info in infos for k in info["labels"])
    example = next(iter(stream(source, tok, template="plain")))
    caption = [t for t, label in zip(example.ids, example.labels, strict=True) if label != IGNORE]
    assert example.ids[:2] == [tok.bos_token_id, IMAGE_ID] and caption == example.ids[2:]
    assert tok.decode(caption).startswith(("The image shows", "A single", "This is a simple"))
    assert tok.decode(caption).endswith(".\n")  # LLaVA's plain template closes the caption with "\n"
    _, turns, _ = next(WdsCaptions(str(tmp_path / "*.tar"), prompt="Describe it.").records(0, 0, 0, 1))
    assert turns[0] == {"from": "human", "value": "<image>\nDescribe it."}


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_caption_field_names_the_member(tmp_path: Path) -> None:
    infos = write_recaptioned_wds(tmp_path, shards=1, per_shard=3, image_size=32)
    web = {s["__key__"]: s["txt"].decode() for s in wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False)}
    source = WdsCaptions(str(tmp_path / "*.tar"), caption_field="txt")
    assert len(source) == 3  # `{key}.txt` only, not `{key}.re_caption.txt` as well
    records = list(source.records(0, 0, 0, 1))
    assert {name.rsplit(" ", 1)[1]: turns[1]["value"] for name, turns, _ in records} == web
    assert set(web) == set(infos[0]["labels"])


def rewrite_with(shard: Path, out: Path, change) -> list[str]:
    """Copy a recaption shard through the job's writer (`write_wds`), `change(i, WdsSample)` deciding each
    sample; returns the keys in order."""
    samples = [WdsSample(s["__key__"], "jpg", s["jpg"], s["txt"].decode(), s["re_caption.txt"].decode(),
                         json.loads(s["json"])) for s in wds.WebDataset(str(shard), shardshuffle=False)]
    write_wds([change(i, s) for i, s in enumerate(samples)], str(out))
    return [s.key for s in samples]


def test_unusable_samples_are_skipped_and_counted_by_reason(tmp_path: Path, tok) -> None:
    write_recaptioned_wds(tmp_path / "ok", shards=1, per_shard=6, image_size=32)

    def spoil(i: int, s: WdsSample) -> WdsSample:
        if i == 1:
            return WdsSample(s.key, s.image_ext, s.image, s.org_caption, "", s.meta)  # a captioner's empty row
        if i == 3:
            return WdsSample(s.key, s.image_ext, b"not a jpeg", s.org_caption, s.re_caption, s.meta)
        return s

    keys = rewrite_with(tmp_path / "ok" / "00000.tar", tmp_path / "00000.tar", spoil)
    source = WdsCaptions(str(tmp_path / "*.tar"), shuffle_buffer=1)  # file order
    examples = stream(source, tok, template="plain")
    it = iter(examples)
    got = [next(it) for _ in range(4)]
    assert [e.name.rsplit(" ", 1)[1] for e in got] == [keys[0], keys[2], keys[4], keys[5]]
    assert [[(s.name.rsplit(" ", 1)[1], s.reason) for s in e.skipped] for e in got] == [
        [], [(keys[1], EMPTY_CAPTION)], [(keys[3], NO_IMAGE)], []]
    # Too long: the image does not fit, or no answer token is left after it.
    short = iter(stream(source, tok, template="plain", max_length=4))
    with pytest.raises(DataError, match=rf"none of 6 samples is usable: {TOO_LONG} 4, e.g. .*00000.tar key {keys[0]}"):
        next(short)


def test_skips_past_the_bound_stop_the_run_with_reasons_and_names() -> None:
    from train.mllm.data import Unusable

    tally = SkipTally.for_run(0.01, trained_samples=250)  # 2 allowed
    tally.add([Unusable("a.tar key 1", EMPTY_CAPTION), Unusable("a.tar key 2", NO_IMAGE, "truncated")])
    assert tally.total == 2 and tally.counts == {EMPTY_CAPTION: 1, NO_IMAGE: 1}
    with pytest.raises(DataError, match=rf"3 unusable samples skipped, more than --max-bad-fraction 0.01 allows "
                                        rf"\(2\): {EMPTY_CAPTION} 2, e.g. a.tar key 1, a.tar key 3; "
                                        rf"{NO_IMAGE} 1, e.g. a.tar key 2 \(truncated\)"):
        tally.add([Unusable("a.tar key 3", EMPTY_CAPTION)])


def test_stage1_runs_on_recaption_output_with_empty_captions(tmp_path: Path, capsys) -> None:
    """A captioner leaves some rows empty: stage 1 skips and counts them within the bound, fails past it."""
    write_recaptioned_wds(tmp_path / "ok", shards=2, per_shard=32, image_size=32)
    empty = []

    def blank(i: int, s: WdsSample) -> WdsSample:
        if i % 16 == 5:  # 2 of 32: 6 %
            empty.append(s.key)
            return WdsSample(s.key, s.image_ext, s.image, s.org_caption, "", s.meta)
        return s

    (tmp_path / "wds").mkdir()
    for shard in ("00000", "00001"):
        rewrite_with(tmp_path / "ok" / f"{shard}.tar", tmp_path / "wds" / f"{shard}.tar", blank)
    lm, tower = build_tiny_lm(tmp_path / "lm"), build_tiny_tower(tmp_path / "tower.pt", depth=1, image_size=32)
    common = ["stage1", "--lm", str(lm), "--tower", str(tower), "--data", str(tmp_path / "wds" / "*.tar"),
              "--batch-size", "16", "--micro-batch-size", "8", "--workers", "0", "--log-every", "1"]
    mllm_cli.main(common + ["--out", str(tmp_path / "run"), "--max-bad-fraction", "0.1"])
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert skipped["by_reason"] == {EMPTY_CAPTION: 4}  # one epoch reads every sample once
    assert {re.search(r"key (\S+)", name)[1] for name in skipped["examples"][EMPTY_CAPTION]} <= set(empty)
    assert f"skipped 4 unusable samples: {EMPTY_CAPTION} 4" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped"] == 4 and len(metrics) == 4  # 64 / 16 steps
    with pytest.raises(SystemExit):  # the default bound, 1 %, allows none of 64 samples
        mllm_cli.main(common + ["--out", str(tmp_path / "strict")])
    err = capsys.readouterr().err
    assert "unusable samples skipped, more than --max-bad-fraction 0.01" in err and "key " in err
    assert any(key in err for key in empty)


def test_bad_json_samples_are_skipped_with_file_index_and_reason(tmp_path: Path, tok) -> None:
    task = write_shape_task(tmp_path, 2, image_size=32)
    data = json.loads(task["conversations"].read_text())
    (task["images"] / data[0]["image"]).unlink()
    skip = first_skip(stream(LlavaJson(task["conversations"], task["images"]), tok))
    assert (skip.reason, skip.name) == (NO_IMAGE, f"{task['conversations']}[0] (id '0')")
    assert "00000.png" in skip.detail
    data[0].pop("image")
    task["conversations"].write_text(json.dumps(data))
    skip = first_skip(stream(LlavaJson(task["conversations"], task["images"]), tok))
    assert (skip.reason, skip.detail) == (MALFORMED, "sample has <image> but no image")


def first_skip(examples: ExampleStream):
    """The first skipped sample the stream reports (the good ones pass by)."""
    return next(e.skipped[0] for e in examples if e.skipped)
