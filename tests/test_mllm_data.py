"""Training data: every sample once per epoch over ranks, and unusable samples stop with their name."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from dataset.synthetic.training_shards import write_recaptioned_wds
from train.mllm.conversation import IGNORE, IMAGE_ID, TEMPLATES
from train.mllm.data import DataError, ExampleStream, LlavaJson, WdsCaptions
from train.mllm.tiny import build_tokenizer, write_shape_task
from train.mllm.towers import IMAGENET_MEAN, IMAGENET_STD, ImagePrep

PREP = ImagePrep(32, IMAGENET_MEAN, IMAGENET_STD)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def stream(source, tok, template="vicuna_v1", rank=0, world=1) -> ExampleStream:
    return ExampleStream(source, tok, TEMPLATES[template], PREP, image_tokens=4, max_length=256, seed=0,
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
    caption = [t for t, label in zip(example.ids, example.labels) if label != IGNORE]
    assert example.ids[:2] == [tok.bos_token_id, IMAGE_ID] and caption[-1] == tok.eos_token_id
    assert tok.decode(caption[:-1]).startswith(("The image shows", "A single", "This is a simple"))
    _, turns, _ = next(WdsCaptions(str(tmp_path / "*.tar"), prompt="Describe it.").records(0, 0, 0, 1))
    assert turns[0] == {"from": "human", "value": "<image>\nDescribe it."}


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("members, reason", [
    ({"k1.jpg": b"not a jpeg", "k1.re_caption.txt": b"a red circle"}, "no image that decodes"),
    ({"k1.re_caption.txt": b"a red circle"}, "no image that decodes"),
])
def test_bad_shard_samples_stop_with_file_and_key(tmp_path: Path, tok, members, reason) -> None:
    write_tar(tmp_path / "00000.tar", members)
    with pytest.raises(DataError, match=rf"00000.tar key k1: {reason}"):
        next(iter(stream(WdsCaptions(str(tmp_path / "*.tar")), tok, template="plain")))


def test_empty_caption_is_an_error(tmp_path: Path, tok) -> None:
    write_recaptioned_wds(tmp_path / "ok", shards=1, per_shard=1, image_size=32)
    with tarfile.open(tmp_path / "ok" / "00000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    members = {n: (b" " if n.endswith(".re_caption.txt") else data) for n, data in members.items()}
    write_tar(tmp_path / "00000.tar", members)
    with pytest.raises(DataError, match="00000.tar key 000000000: empty re_caption"):
        next(iter(stream(WdsCaptions(str(tmp_path / "*.tar")), tok, template="plain")))


def test_bad_json_samples_stop_with_file_index_and_reason(tmp_path: Path, tok) -> None:
    task = write_shape_task(tmp_path, 1, image_size=32)
    data = json.loads(task["conversations"].read_text())
    (task["images"] / data[0]["image"]).unlink()
    with pytest.raises(DataError, match=r"train.json\[0\] \(id '0'\): image .*00000.png"):
        next(iter(stream(LlavaJson(task["conversations"], task["images"]), tok)))
    data[0].pop("image")
    task["conversations"].write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"train.json\[0\] \(id '0'\): sample has <image> but no image"):
        next(iter(stream(LlavaJson(task["conversations"], task["images"]), tok)))
