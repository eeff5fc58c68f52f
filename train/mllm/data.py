"""Training samples for the two stages, streamed endlessly, sharded over ranks and loader workers.

Sources:
- LLaVA-format JSON (LLaVA-Pretrain `blip_laion_cc_sbu_558k.json`, `llava_v1_5_mix665k.json`):
  a list of {"id", "image" (relative to the image folder, optional), "conversations"};
- our recaption job's `wds/` shards: the image and its recaption (`{key}.re_caption.txt`) as the
  caption, which closes the loop recaptioning -> MLLM (stage 1, or a caption stage with the LM
  learning as in OpenVision's SmolLM ablation).

A sample that cannot be used (missing or broken image, malformed conversation, nothing left to
learn after truncation) stops training with an error naming the file, the sample and the reason;
no sample is dropped or trains on an empty mask.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from train.data import buffer_shuffle, expand_urls, image_bytes, read_shards, text_field
from train.mllm.conversation import IGNORE, IMAGE, ConversationError, Template, encode, fit
from train.mllm.towers import ImagePrep

Record = tuple[str, list[dict], Image.Image | None]  # (name for errors, LLaVA turns, image)


class DataError(ValueError):
    """A training sample that cannot be used; the message names its file, key and the reason."""


@dataclass
class Example:
    ids: list[int]
    labels: list[int]
    image: Tensor | None
    name: str


class LlavaJson:
    """A LLaVA-format JSON list, images read from `image_folder`."""

    def __init__(self, path: str | Path, image_folder: str | Path | None):
        self.path, self.image_folder = str(path), Path(image_folder) if image_folder else None
        with open(path) as f:
            self.items = json.load(f)
        if not isinstance(self.items, list):
            raise DataError(f"{path}: expected a JSON list of samples")

    def __len__(self) -> int:
        return len(self.items)

    def open_image(self, item: dict, name: str) -> Image.Image:
        if self.image_folder is None:
            raise DataError(f"{name}: has an image but no image folder was given")
        path = self.image_folder / item["image"]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as e:
            raise DataError(f"{name}: image {path}: {e}") from None

    def records(self, epoch: int, seed: int, slot: int, slots: int) -> Iterator[Record]:
        order = list(range(len(self.items)))
        random.Random(f"{seed}/{epoch}").shuffle(order)
        for i in order[slot::slots]:
            item = self.items[i]
            name = f"{self.path}[{i}] (id {item.get('id')!r})"
            image = self.open_image(item, name) if "image" in item else None
            yield name, item.get("conversations", []), image


class WdsCaptions:
    """Image-caption pairs from recaption `wds/` shards (`{key}.jpg` + `{key}.{field}.txt`)."""

    def __init__(self, pattern: str, caption_field: str = "re_caption", samples: int | None = None,
                 prompt: str = "", shuffle_buffer: int = 1000):
        self.urls, self.field, self.shuffle_buffer = expand_urls(pattern), caption_field, shuffle_buffer
        self.user = f"{IMAGE}\n{prompt}" if prompt else IMAGE
        self.size = samples if samples is not None else count_local_samples(self.urls, f".{caption_field}.txt")

    def __len__(self) -> int:
        return self.size

    def records(self, epoch: int, seed: int, slot: int, slots: int) -> Iterator[Record]:
        shards = list(self.urls)
        random.Random(f"{seed}/shards/{epoch}").shuffle(shards)
        # Enough shards: each slot reads its own; otherwise every slot reads all and keeps its stride.
        mine, stride = (shards[slot::slots], 1) if len(shards) >= slots else (shards, slots)
        raw = read_shards(mine)
        picked = (s for i, s in enumerate(raw) if stride == 1 or i % stride == slot)
        for sample in buffer_shuffle(picked, self.shuffle_buffer, random.Random(f"{seed}/buffer/{epoch}/{slot}")):
            name = f"{sample.get('__url__')} key {sample.get('__key__')}"
            image = decode_rgb(image_bytes(sample))
            if image is None:
                raise DataError(f"{name}: no image that decodes")
            caption = text_field(sample, f"{self.field}.txt").strip()
            if not caption:
                raise DataError(f"{name}: empty {self.field}")
            yield name, [{"from": "human", "value": self.user}, {"from": "gpt", "value": caption}], image


def decode_rgb(data: bytes | None) -> Image.Image | None:
    """An image member decoded to RGB, or None when there is none or it does not decode."""
    if data is None:
        return None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def count_local_samples(urls: list[str], suffix: str) -> int:
    """Samples in local tar shards (members ending in `suffix`); remote shards need an explicit count."""
    total = 0
    for url in urls:
        if "://" in url:
            raise DataError(f"{url}: cannot count samples of remote shards; pass the sample count")
        with tarfile.open(url) as tar:
            total += sum(1 for m in tar if m.name.endswith(suffix))
    return total


class ExampleStream(IterableDataset):
    """Endless stream of encoded samples: epoch after epoch, this rank's and worker's share of each."""

    def __init__(self, source: LlavaJson | WdsCaptions, tokenizer, template: Template, prep: ImagePrep, *,
                 image_tokens: int, max_length: int, seed: int, rank: int = 0, world: int = 1):
        self.source, self.tokenizer, self.template, self.prep = source, tokenizer, template, prep
        self.image_tokens, self.max_length = image_tokens, max_length
        self.seed, self.rank, self.world = seed, rank, world

    def example(self, record: Record) -> Example:
        name, turns, image = record
        try:
            encoded = encode(turns, self.tokenizer, self.template, has_image=image is not None)
            encoded = fit(encoded, self.max_length, self.image_tokens)
        except ConversationError as e:
            raise DataError(f"{name}: {e}") from None
        return Example(encoded.ids, encoded.labels, self.prep(image) if image is not None else None, name)

    def __iter__(self) -> Iterator[Example]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slot, slots = self.rank * workers + worker, self.world * workers
        for epoch in count():
            n = 0
            for record in self.source.records(epoch, self.seed, slot, slots):
                n += 1
                yield self.example(record)
            if n == 0:
                raise DataError(f"rank {self.rank} worker {worker}: no samples (fewer samples than loader slots?)")


def collate(examples: list[Example]) -> dict[str, Tensor | None]:
    """Right-padded ids and labels, the attention mask, and the images of the rows that have one."""
    longest = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(examples), longest, dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        mask[i, :len(e.ids)] = True
    images = [e.image for e in examples if e.image is not None]
    return {"ids": ids, "labels": labels, "mask": mask, "images": torch.stack(images) if images else None}


def make_loader(stream: ExampleStream, micro_batch: int, workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(stream, batch_size=micro_batch, collate_fn=collate, num_workers=workers,
                      pin_memory=pin_memory, prefetch_factor=4 if workers else None, generator=torch.Generator())
