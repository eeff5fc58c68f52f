"""Stream the recaption job's `wds/` shards into training batches, resumable to the sample.

Per sample the shards hold `{key}.jpg|png|webp`, `{key}.txt` (web caption),
`{key}.re_caption.txt` and `{key}.json`. A training sample is the augmented image (uint8; the
training loop normalises it on the device), the decoder target (the full recaption) and, for
the contrastive objective, two text views: the web caption and one sub-caption of the
recaption (UCSC-VLAA/OpenVision `bert_ops.py`, `my_bert_tokenize`). For OpenVision 2 the sample
also carries the indices of the patch tokens its decoder keeps, drawn here like BEiT's masks
(arXiv:2106.08254) so that they are part of the resumable, world-size independent stream.

The stream is an endless sequence of epochs. In epoch e every (rank, loader worker) slot takes
its share of a fresh shuffle of the shard list (the list is resampled when there are fewer
shards than slots), reads the tars and passes the raw samples through a shuffle buffer. All
randomness (shard order, buffer, augmentation, sub-caption, kept tokens) is seeded from
(seed, epoch, rank, worker, sample index), so a worker's position is just (epoch, samples taken)
and a resumed run replays the raw stream up to it without decoding and continues exactly.
Shards are named with the recaption job's input grammar and read through `dataset.storage`.
"""
from __future__ import annotations

import io
import math
import os
import random
import re
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dataset import outputs, storage
from train.tokenizer import CaptionTokenizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
Position = tuple[int, int]  # (epoch, raw samples taken from that epoch's shuffled stream)
cv2.setNumThreads(1)  # one image per call is small work; the loader's worker processes are the parallelism
Box = tuple[int, int, int, int]  # left, top, right, bottom


def expand_urls(spec: str) -> list[str]:
    """Shard paths from a recaption output folder (its committed `wds/` files), or a folder, glob, brace range,
    or s3:// prefix or glob (the recaption job's --input)."""
    return outputs.wds_shards(spec)


def read_shards(urls: list[str], select_files: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """Samples ({"__key__", ext: bytes}) of each shard in turn. A read error raises: it is never data."""
    for url in urls:
        with storage.open_read(url) as stream:
            files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], select_files=select_files)
            yield from wds.tariterators.group_by_keys(files)


def subcaptions(recaption: str) -> list[str]:
    """The non-empty pieces of a recaption split on runs of '.' / '!'."""
    return [s.strip() for s in re.split(r"[.!]+", recaption) if s.strip()]


def crop_box(width: int, height: int, rng: random.Random, area: tuple[float, float] = (0.4, 1.0)) -> Box:
    """Inception crop: 40-100 % of the area, aspect 3/4..4/3 (100 tries, else the whole image),
    as big_vision's `inception_crop(area_min=40)` in the reference configs."""
    for _ in range(100):
        target = width * height * rng.uniform(*area)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
        if 0 < cw <= width and 0 < ch <= height:
            left, top = rng.randint(0, width - cw), rng.randint(0, height - ch)
            return left, top, left + cw, top + ch
    return 0, 0, width, height


def decode_crop(data: bytes, rng: random.Random, size: int) -> Image.Image:
    """Decode only as much as the crop needs and resize it to size x size (bilinear, antialiased).

    JPEGs decode at the smallest 1/2, 1/4 or 1/8 DCT scale (PIL's draft mode) that still gives
    the crop at least `size` pixels each way: a 40-100 % crop of a 512 px DataComp image to
    160 px decodes at 256 px, a quarter of the pixels.
    """
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    box = crop_box(width, height, rng)
    shrink = min(box[2] - box[0], box[3] - box[1]) / size
    if img.format == "JPEG" and shrink >= 2:
        img.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
    sx, sy = img.size[0] / width, img.size[1] / height
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return rgb.resize((size, size), Image.Resampling.BILINEAR, box=scaled, reducing_gap=3.0)


def adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate hue by `shift` of the colour circle in 8-bit HSV, as torchvision does for PIL images,
    through OpenCV's conversion (about 6x faster than PIL's HSV round trip)."""
    hsv = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(round(shift * 255) % 256)  # uint8 wraps around the circle
    return Image.fromarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL))


def color_jitter(img: Image.Image, rng: random.Random, strength: float = 0.4) -> Image.Image:
    """SimCLR v2 colour jitter (arXiv:2006.10029, as the reference's `simclr_jitter_gray`):
    brightness, contrast, saturation factors in [1 - 0.8 s, 1 + 0.8 s] and a hue shift in
    [-0.2 s, 0.2 s] of the colour circle, in random order; uint8 images clip after each."""
    ops = [(TF.adjust_brightness, 1.0), (TF.adjust_contrast, 1.0), (TF.adjust_saturation, 1.0), (adjust_hue, 0.0)]
    rng.shuffle(ops)
    for op, centre in ops:
        spread = (0.2 if op is adjust_hue else 0.8) * strength
        img = op(img, rng.uniform(centre - spread, centre + spread))
    return img


def augment(data: bytes, rng: random.Random, size: int) -> torch.Tensor:
    """Inception crop, colour jitter 0.4 (p 0.8), grayscale (p 0.2), no flip -> uint8 (3, size, size)."""
    img = decode_crop(data, rng, size)
    if rng.random() < 0.8:
        img = color_jitter(img, rng)
    if rng.random() < 0.2:
        img = TF.to_grayscale(img, num_output_channels=3)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, ImageNet mean/std (on whatever device the batch is)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


def eval_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Shorter side to `size` (bilinear), centre crop, ImageNet norm (open_clip 'shortest')."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(size),
                      lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def image_bytes(sample: dict[str, Any]) -> bytes | None:
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


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
    for n, sample in enumerate(read_shards(urls, select_files=lambda name: name.endswith(".txt"))):
        if n >= limit:
            return
        yield text_field(sample, "txt")
        yield text_field(sample, "re_caption.txt")


class ShardStream(IterableDataset):
    """Endless stream of collated batches, each yielded with (worker, position after it).

    `keep` = (patch tokens, kept tokens) adds OpenVision 2's kept-token indices to each sample;
    `text_views` adds the two tokenised contrastive views (web caption, sub-caption).
    """

    def __init__(self, urls: list[str], tokenizer: CaptionTokenizer, *, image_size: int, batch_size: int,
                 context_length: int, caption_length: int, seed: int, shuffle_buffer: int,
                 caption_field: str = "re_caption.txt", text_views: bool = True, keep: tuple[int, int] | None = None,
                 rank: int = 0, world: int = 1, start: dict[int, Position] | None = None, first_worker: int = 0):
        self.urls, self.tokenizer = urls, tokenizer
        self.image_size, self.batch_size = image_size, batch_size
        self.context_length, self.caption_length = context_length, caption_length
        self.seed, self.shuffle_buffer, self.caption_field = seed, shuffle_buffer, caption_field
        self.text_views, self.keep = text_views, keep
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
        rng = random.Random(f"{self.seed}/buffer/{epoch}/{self.rank}/{worker}")
        return buffer_shuffle(read_shards(self.epoch_shards(epoch, worker, workers)), self.shuffle_buffer, rng)

    def image(self, data: bytes, rng: random.Random) -> torch.Tensor:
        return augment(data, rng, self.image_size)

    def prepare(self, raw: dict, rng: random.Random) -> dict[str, Any] | None:
        """One training sample, or None for an image that does not decode (the stream goes on)."""
        data = image_bytes(raw)
        if data is None:
            return None
        try:
            image = self.image(data, rng)
        except (OSError, ValueError, Image.DecompressionBombError):  # a broken image is bad data, not an error
            return None
        web, recaption = text_field(raw, "txt"), text_field(raw, self.caption_field)
        pieces = subcaptions(recaption)
        sample = {"image": image, "caption": recaption if pieces else web}  # no sentence: the web caption
        if self.text_views:
            sample.update(web=web, sub=rng.choice(pieces or [web]))
        if self.keep:
            sample["keep"] = torch.tensor(rng.sample(range(self.keep[0]), self.keep[1]))
        return sample

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        column = {k: [s[k] for s in samples] for k in samples[0]}
        batch = {"images": torch.stack(column["image"]),
                 "captions": self.tokenizer.encode(column["caption"], self.caption_length, append_cls=False)}
        if self.text_views:
            batch["texts"] = self.tokenizer.encode(column["web"] + column["sub"], self.context_length)
        if self.keep:
            batch["keep"] = torch.stack(column["keep"])
        return batch

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


def default_workers(processes_per_node: int) -> int:
    """Loader processes per training process: this node's usable cores, less one per training process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, processes_per_node) - 1)


def make_loader(stream: ShardStream, workers: int, pin_memory: bool) -> DataLoader:
    """A loader over `stream`; its own generator keeps worker seeding off the global torch RNG,
    so starting a loader on resume does not shift the model's random draws."""
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None,
                      generator=torch.Generator())
