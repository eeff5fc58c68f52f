"""Data-loader throughput: images/s per loader core, the previous data path and the current one side by side.

  python -m benchmarks.train_dataloader --image-size 160 --batch-size 64 --workers 0 1

Writes recaptioned shards of DataComp-size JPEGs (img2dataset's `keep_ratio_largest` at 512 px,
textured like photos rather than flat synthetic shapes, quality 90) to a temporary folder, then
reads them through `ShardStream` + `DataLoader` exactly as training does (tokenising both text
views and the recaption included). Two image paths:

- previous: full-resolution decode, inception crop and resize, colour jitter without hue, float
  normalisation in the worker (the loader before draft decoding);
- current (`train.data.augment`): JPEG draft decoding to the crop's scale, one PIL crop+resize,
  SimCLR jitter with hue, uint8 batches normalised on the device.

`--workers 0` decodes in the main process, so it also measures one core. The two paths alternate
for `--rounds` rounds (previous first) and the median counts, so a busy machine slows both alike.
The goal is >= 2x.
"""
from __future__ import annotations

import argparse
import io
import random
import tempfile
import time

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from benchmarks.record import Record, alternate, parse
from dataset.outputs import WdsSample, write_wds
from train.data import IMAGENET_MEAN, IMAGENET_STD, ShardStream, crop_box, expand_urls, make_loader, read_captions
from train.tokenizer import CaptionTokenizer

SMOKE = {"image_size": 32, "source_size": 64, "batch_size": 4, "batches": 2, "workers": [0], "rounds": 2}


def photo_like(rng: np.random.Generator, width: int, height: int) -> bytes:
    """Smooth colour fields plus fine grain: entropy closer to a photo's than a flat drawing's."""
    coarse = rng.uniform(0, 255, (height // 32 + 1, width // 32 + 1, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    grain = rng.normal(0, 6, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_shards(folder: str, shards: int, per_shard: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for shard in range(shards):
        samples = []
        for i in range(per_shard):
            aspect = rng.uniform(0.6, 1.0)  # the longer side is `size`, as keep_ratio_largest leaves it
            width, height = (size, int(size * aspect)) if rng.random() < 0.5 else (int(size * aspect), size)
            key = f"{shard:05d}{i:04d}"
            recaption = "A textured field of colour. It has fine grain! Nothing else is in the picture."
            samples.append(WdsSample(key, "jpg", photo_like(rng, width, height), "colour field", recaption,
                                     {"key": key}))
        write_wds(samples, f"{folder}/{shard:05d}.tar")


class PreviousStream(ShardStream):
    """The image path before draft decoding (full decode, torchvision crop, float output)."""

    def image(self, data: bytes, rng: random.Random) -> torch.Tensor:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = img.convert("RGB")
        left, top, right, bottom = crop_box(*img.size, rng)
        img = TF.resized_crop(img, top, left, bottom - top, right - left, [self.image_size] * 2, antialias=True)
        if rng.random() < 0.8:
            ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
            rng.shuffle(ops)
            for op in ops:
                img = op(img, rng.uniform(0.6, 1.4))
        if rng.random() < 0.2:
            img = TF.to_grayscale(img, num_output_channels=3)
        return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


def images_per_second(stream: ShardStream, workers: int, batches: int) -> float:
    it = iter(make_loader(stream, workers, pin_memory=False))
    next(it)  # worker start-up and the first shuffle-buffer fill are not steady state
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * stream.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=160, help="training resolution")
    p.add_argument("--source-size", type=int, default=512, help="longer side of the stored JPEGs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=8, help="timed batches per setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rounds", type=int, default=3, help="alternating measurements per path (median reported)")
    a = parse(p, argv, SMOKE)
    record = Record("train_dataloader", a, argv)
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(tmp, shards=2, per_shard=a.batch_size * (a.batches + 2) // 2 + 1, size=a.source_size)
        urls = expand_urls(tmp)
        tokenizer = CaptionTokenizer.train(read_captions(urls, 200))
        print(f"{a.source_size}px JPEGs -> {a.image_size}px crops, batch {a.batch_size}, {a.batches} timed batches, "
              f"{torch.get_num_threads()} torch threads")
        record.figures["torch threads"] = torch.get_num_threads()

        def rate(cls: type[ShardStream], workers: int) -> float:
            stream = cls(urls, tokenizer, image_size=a.image_size, batch_size=a.batch_size,
                         context_length=80, caption_length=128, seed=0, shuffle_buffer=100)
            return images_per_second(stream, workers, a.batches) / max(workers, 1)

        for workers in a.workers:
            rates = alternate(a.rounds, {"previous": lambda workers=workers: rate(PreviousStream, workers),
                                         "current": lambda workers=workers: rate(ShardStream, workers)})
            record.compare(f"--workers {workers}", "images/s per loader core",
                           ("previous (full decode, float output)", rates["previous"]),
                           ("current (draft decode, uint8 output)", rates["current"]))
    record.write()


if __name__ == "__main__":
    main()
