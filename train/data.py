"""Stream the recaption job's `wds/` shards into training batches, resumable to the sample.

Per sample the shards hold `{key}.jpg|png|webp`, `{key}.txt` (web caption),
`{key}.re_caption.txt` and `{key}.json`. A training sample is the augmented image, two text
views (the web caption and one sub-caption of the recaption) and the full recaption as the
decoder target.

The stream is an endless sequence of epochs. In epoch e every (rank, loader worker) slot takes
its share of a fresh shuffle of the shard list (the list is resampled when there are fewer
shards than slots), reads the tars with webdataset and passes the raw samples through a shuffle
buffer. All randomness (shard order, buffer, augmentation, sub-caption choice) is seeded from
(seed, epoch, rank, worker, sample index), so a worker's position is just (epoch, samples taken)
and a resumed run replays the raw stream up to it without decoding and continues exactly.
"""
from __future__ import annotations

import glob
import io
import math
import random
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from train.tokenizer import CaptionTokenizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
Position = tuple[int, int]  # (epoch, raw samples taken from that epoch's shuffled stream)


def expand_urls(pattern: str) -> list[str]:
    """Local globs ('OUT/wds/*.tar') or brace patterns ('s3://b/{00000..00099}.tar'), sorted."""
    if any(c in pattern for c in "*?[") and "://" not in pattern:
        urls = sorted(glob.glob(pattern))
    else:
        urls = list(wds.shardlists.expand_urls(pattern))
    if not urls:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    return urls


def subcaptions(recaption: str) -> list[str]:
    """The non-empty pieces of a recaption split on runs of '.' / '!'."""
    return [s.strip() for s in re.split(r"[.!]+", recaption) if s.strip()]


def inception_crop(img: Image.Image, rng: random.Random, size: int,
                   area: tuple[float, float] = (0.4, 1.0)) -> Image.Image:
    """Random crop of 40-100 % of the area, aspect 3/4..4/3, resized to size x size."""
    w, h = img.size
    for _ in range(10):
        target = w * h * rng.uniform(*area)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
    side = min(w, h)
    return TF.resized_crop(img, (h - side) // 2, (w - side) // 2, side, side, [size, size], antialias=True)


def color_jitter(img: Image.Image, rng: random.Random, strength: float = 0.4) -> Image.Image:
    """Brightness, contrast and saturation factors in [1-s, 1+s], applied in random order."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    rng.shuffle(ops)
    for op in ops:
        img = op(img, rng.uniform(1 - strength, 1 + strength))
    return img


def augment(img: Image.Image, rng: random.Random, size: int) -> torch.Tensor:
    """Inception crop, colour jitter 0.4 (p 0.8), grayscale (p 0.2), no flip, ImageNet norm."""
    img = inception_crop(img, rng, size)
    if rng.random() < 0.8:
        img = color_jitter(img, rng)
    if rng.random() < 0.2:
        img = TF.to_grayscale(img, num_output_channels=3)
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


def eval_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Shorter side to `size` (bilinear), centre crop, ImageNet norm (open_clip 'shortest')."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(size),
                      lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def decode_image(sample: dict[str, Any]) -> Image.Image | None:
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return None
    try:
        img = Image.open(io.BytesIO(sample[ext]))
        img.load()
        return img.convert("RGB")
    except Exception:  # a broken image is skipped, the stream goes on
        return None


def text_field(sample: dict[str, Any], name: str) -> str:
    data = sample.get(name)
    return data.decode("utf-8", errors="replace") if data else ""


def buffer_shuffle(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Fill a buffer of `size`, then emit a random element for each new one; drain at the end."""
    buf: list[dict] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


def read_captions(urls: list[str], limit: int) -> Iterator[str]:
    """Web captions and recaptions of the first `limit` samples (images are not read)."""
    pairs = wds.tariterators.tarfile_samples(({"url": u} for u in urls), handler=wds.warn_and_continue,
                                             select_files=lambda name: name.endswith(".txt"))
    for n, sample in enumerate(pairs):
        if n >= limit:
            return
        yield text_field(sample, "txt")
        yield text_field(sample, "re_caption.txt")


class ShardStream(IterableDataset):
    """Endless stream of collated batches, each yielded with (worker, position after it)."""

    def __init__(self, urls: list[str], tokenizer: CaptionTokenizer, *, image_size: int, batch_size: int,
                 context_length: int, caption_length: int, seed: int, shuffle_buffer: int,
                 rank: int = 0, world: int = 1, start: dict[int, Position] | None = None, first_worker: int = 0):
        self.urls, self.tokenizer = urls, tokenizer
        self.image_size, self.batch_size = image_size, batch_size
        self.context_length, self.caption_length = context_length, caption_length
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.rank, self.world = rank, world
        self.start = start or {}
        self.first_worker = first_worker  # the loader's worker 0 plays this logical worker after a resume

    def epoch_shards(self, epoch: int, worker: int, workers: int) -> list[str]:
        order: list[str] = []
        slots = self.world * workers
        while len(order) < slots or not order:
            shuffled = list(self.urls)
            random.Random(f"{self.seed}/shards/{epoch}/{len(order)}").shuffle(shuffled)
            order += shuffled
        order = order[:max(len(self.urls), slots)]  # fewer shards than slots: one (resampled) shard each
        return order[self.rank * workers + worker::slots]

    def raw_epoch(self, epoch: int, worker: int, workers: int) -> Iterator[dict]:
        shards = ({"url": u} for u in self.epoch_shards(epoch, worker, workers))
        samples = wds.tariterators.tarfile_samples(shards, handler=wds.warn_and_continue)
        rng = random.Random(f"{self.seed}/buffer/{epoch}/{self.rank}/{worker}")
        return buffer_shuffle(samples, self.shuffle_buffer, rng)

    def prepare(self, raw: dict, rng: random.Random) -> tuple[torch.Tensor, str, str, str] | None:
        img = decode_image(raw)
        if img is None:
            return None
        web, recaption = text_field(raw, "txt"), text_field(raw, "re_caption.txt")
        sub = rng.choice(subcaptions(recaption) or [web])
        return augment(img, rng, self.image_size), web, sub, recaption

    def collate(self, samples: list[tuple[torch.Tensor, str, str, str]]) -> dict[str, torch.Tensor]:
        images, webs, subs, recaptions = zip(*samples)
        return {
            "images": torch.stack(images),
            "texts": self.tokenizer.encode(list(webs) + list(subs), self.context_length),
            "captions": self.tokenizer.encode(list(recaptions), self.caption_length + 1, append_cls=False),
        }

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], int, Position]]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.first_worker) % workers
        epoch, taken = self.start.get(worker, (0, 0))
        pending: list = []
        while True:
            seen = False
            for i, raw in enumerate(self.raw_epoch(epoch, worker, workers)):
                seen = True
                if i < taken:
                    continue
                taken = i + 1
                sample = self.prepare(raw, random.Random(f"{self.seed}/sample/{epoch}/{self.rank}/{worker}/{i}"))
                if sample is not None:
                    pending.append(sample)
                if len(pending) == self.batch_size:
                    yield self.collate(pending), worker, (epoch, taken)
                    pending = []
            if not seen:
                raise RuntimeError(f"rank {self.rank} worker {worker}: epoch {epoch} has no samples")
            epoch, taken = epoch + 1, 0


def make_loader(stream: ShardStream, workers: int, pin_memory: bool) -> DataLoader:
    """A loader over `stream`; its own generator keeps worker seeding off the global torch RNG,
    so starting a loader on resume does not shift the model's random draws."""
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=2 if workers else None, generator=torch.Generator())
