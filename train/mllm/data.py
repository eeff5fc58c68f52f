"""Training samples for the two stages, streamed endlessly, sharded over ranks and loader workers.

Sources:
- LLaVA-format JSON (LLaVA-Pretrain `blip_laion_cc_sbu_558k.json`, `llava_v1_5_mix665k.json`):
  a list of {"id", "image" (relative to the image folder, optional), "conversations"};
- our recaption job's `wds/` shards: the image and its recaption (`{key}.re_caption.txt`) as the
  caption, which closes the loop recaptioning -> MLLM (stage 1, or a caption stage with the LM
  learning as in OpenVision's SmolLM ablation).

A sample that cannot be used (missing or broken image, empty caption, malformed conversation,
nothing left to learn after truncation) is skipped and counted by reason, never trained on with an
empty mask; `SkipTally` stops the run with the counts and example names once the skipped samples
pass a set share of the samples the run trains on (`--max-bad-fraction`). Real data has such rows:
a captioner leaves some captions empty, a crawl some images that do not decode.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from train.data import buffer_shuffle, expand_urls, image_bytes, read_shards, text_field
from train.mllm.conversation import IGNORE, IMAGE, ConversationError, Template, TooLong, encode, fit
from train.mllm.towers import ImagePrep

Record = tuple[str, list[dict], Image.Image | None]  # (name for errors, LLaVA turns, image)

# Why a sample was skipped.
NO_IMAGE, EMPTY_CAPTION, TOO_LONG, MALFORMED = "image missing or undecodable", "empty caption", "too long", "malformed"
REASONS = (NO_IMAGE, EMPTY_CAPTION, TOO_LONG, MALFORMED)
EXAMPLES_PER_REASON = 3  # sample names kept per reason for messages


class DataError(ValueError):
    """Training data that cannot be used; the message names files, keys and the reason."""


@dataclass(frozen=True)
class Unusable:
    """A sample a source cannot use: its name (file and key or index) and one of REASONS, with detail."""
    name: str
    reason: str
    detail: str = ""


@dataclass
class Example:
    ids: list[int]
    labels: list[int]
    image: Tensor | None
    name: str
    skipped: list[Unusable] = field(default_factory=list)  # this worker's skips since its previous example


class SkipTally:
    """Skipped samples of one process by reason, with the first names of each; `add` raises DataError
    once their number passes `limit`."""

    def __init__(self, limit: int, max_fraction: float):
        self.limit, self.max_fraction = limit, max_fraction
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    @classmethod
    def for_run(cls, max_fraction: float, trained_samples: int) -> SkipTally:
        """At most `max_fraction` of the samples this process trains on may be skipped."""
        return cls(int(max_fraction * trained_samples), max_fraction)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, skipped: list[Unusable]) -> None:
        for s in skipped:
            self.counts[s.reason] += 1
            names = self.examples.setdefault(s.reason, [])
            if len(names) < EXAMPLES_PER_REASON:
                names.append(f"{s.name} ({s.detail})" if s.detail else s.name)
        if self.total > self.limit:
            raise DataError(f"{self.total} unusable samples skipped, more than --max-bad-fraction "
                            f"{self.max_fraction} allows ({self.limit}): {self.describe()}")

    def describe(self) -> str:
        return "; ".join(f"{reason} {n}, e.g. {', '.join(self.examples[reason])}"
                         for reason, n in self.counts.most_common())


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

    def open_image(self, item: dict, name: str) -> Image.Image | Unusable:
        if self.image_folder is None:
            raise DataError(f"{name}: has an image but no image folder was given")
        path = self.image_folder / item["image"]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return Unusable(name, NO_IMAGE, f"image {path}: {e}")

    def records(self, epoch: int, seed: int, slot: int, slots: int) -> Iterator[Record | Unusable]:
        order = list(range(len(self.items)))
        random.Random(f"{seed}/{epoch}").shuffle(order)
        for i in order[slot::slots]:
            item = self.items[i]
            name = f"{self.path}[{i}] (id {item.get('id')!r})"
            image = self.open_image(item, name) if "image" in item else None
            yield image if isinstance(image, Unusable) else (name, item.get("conversations", []), image)


class WdsCaptions:
    """Image-caption pairs from recaption `wds/` shards: `{key}.jpg` and the caption member
    `{key}.{caption_field}` (`re_caption.txt`, the recaption; `txt`, the web caption)."""

    def __init__(self, pattern: str, caption_field: str = "re_caption.txt", samples: int | None = None,
                 prompt: str = "", shuffle_buffer: int = 1000):
        self.urls, self.field, self.shuffle_buffer = expand_urls(pattern), caption_field, shuffle_buffer
        self.user = f"{IMAGE}\n{prompt}" if prompt else IMAGE
        self.size = samples if samples is not None else count_local_samples(self.urls, caption_field)

    def __len__(self) -> int:
        return self.size

    def records(self, epoch: int, seed: int, slot: int, slots: int) -> Iterator[Record | Unusable]:
        shards = list(self.urls)
        random.Random(f"{seed}/shards/{epoch}").shuffle(shards)
        # Enough shards: each slot reads its own; otherwise every slot reads all and keeps its stride.
        mine, stride = (shards[slot::slots], 1) if len(shards) >= slots else (shards, slots)
        raw = read_shards(mine)
        picked = (s for i, s in enumerate(raw) if stride == 1 or i % stride == slot)
        for sample in buffer_shuffle(picked, self.shuffle_buffer, random.Random(f"{seed}/buffer/{epoch}/{slot}")):
            name = f"{sample.get('__url__')} key {sample.get('__key__')}"
            image = decode_rgb(image_bytes(sample))
            caption = text_field(sample, self.field).strip()
            if image is None:
                yield Unusable(name, NO_IMAGE)
            elif not caption:
                yield Unusable(name, EMPTY_CAPTION, f"{self.field} empty or missing")
            else:
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


def count_local_samples(urls: list[str], member: str) -> int:
    """Samples in local tar shards that have `{key}.{member}` (WebDataset's key: the file name up to its
    first dot); remote shards need an explicit count."""
    total = 0
    for url in urls:
        if "://" in url:
            raise DataError(f"{url}: cannot count samples of remote shards; pass the sample count")
        with tarfile.open(url) as tar:
            total += sum(1 for m in tar if m.name.rsplit("/", 1)[-1].partition(".")[2] == member)
    return total


class ExampleStream(IterableDataset):
    """Endless stream of encoded samples: epoch after epoch, this rank's and worker's share of each;
    each example carries the unusable samples skipped just before it."""

    def __init__(self, source: LlavaJson | WdsCaptions, tokenizer, template: Template, prep: ImagePrep, *,
                 image_tokens: int, max_length: int, seed: int, rank: int = 0, world: int = 1):
        self.source, self.tokenizer, self.template, self.prep = source, tokenizer, template, prep
        self.image_tokens, self.max_length = image_tokens, max_length
        self.seed, self.rank, self.world = seed, rank, world

    def example(self, record: Record) -> Example | Unusable:
        name, turns, image = record
        try:
            encoded = encode(turns, self.tokenizer, self.template, has_image=image is not None)
            encoded = fit(encoded, self.max_length, self.image_tokens)
        except TooLong as e:
            return Unusable(name, TOO_LONG, str(e))
        except ConversationError as e:
            return Unusable(name, MALFORMED, str(e))
        return Example(encoded.ids, encoded.labels, self.prep(image) if image is not None else None, name)

    def __iter__(self) -> Iterator[Example]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slot, slots = self.rank * workers + worker, self.world * workers
        skipped: list[Unusable] = []
        for epoch in count():
            read = used = 0
            for record in self.source.records(epoch, self.seed, slot, slots):
                read += 1
                example = record if isinstance(record, Unusable) else self.example(record)
                if isinstance(example, Unusable):
                    skipped.append(example)
                    continue
                used += 1
                example.skipped, skipped = skipped, []
                yield example
            if read == 0:
                raise DataError(f"rank {self.rank} worker {worker}: no samples (fewer samples than loader slots?)")
            if used == 0:
                tally = SkipTally(len(skipped), 1.0)
                tally.add(skipped)
                raise DataError(f"rank {self.rank} worker {worker}: none of {read} samples is usable: "
                                f"{tally.describe()}")


def collate(examples: list[Example]) -> dict[str, Tensor | list[Unusable] | None]:
    """Right-padded ids and labels, the attention mask, the images of the rows that have one, and the
    samples skipped before these (`skipped`)."""
    longest = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(examples), longest, dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        mask[i, :len(e.ids)] = True
    images = [e.image for e in examples if e.image is not None]
    return {"ids": ids, "labels": labels, "mask": mask, "images": torch.stack(images) if images else None,
            "skipped": [s for e in examples for s in e.skipped]}


def make_loader(stream: ExampleStream, micro_batch: int, workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(stream, batch_size=micro_batch, collate_fn=collate, num_workers=workers,
                      pin_memory=pin_memory, prefetch_factor=4 if workers else None, generator=torch.Generator())
