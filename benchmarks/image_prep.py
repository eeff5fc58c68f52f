"""Images/s per core of `prepare_image`, with and without JPEG draft-mode downscaling.

Two sets of synthetic photo-like JPEGs (a shape on a coloured background, resized, plus a
lighting gradient and sensor-like noise so file sizes resemble photos): DataComp-sized ones
(img2dataset stores DataComp at <= 512 px on the long side) and large camera-sized ones
(~3000 px). Each set is decoded with ImageConfig(draft=False) (the baseline) and with the default
(draft=True), alternately for --rounds rounds, in one process on one thread, so images/s is per
core. The ratio is the speedup of draft mode over full decoding on the same bytes.

    python -m benchmarks.image_prep                 # 1000 small + 200 large, max side 1024, 3 rounds
    python -m benchmarks.image_prep --max-side 336  # what a 336 px vision tower needs
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np
from PIL import Image

from benchmarks.record import Record, alternate, parse
from dataset.images import DEFAULT_MAX_SIDE, ImageConfig, prepare_image
from dataset.synthetic.shapes import draw_shape, jpeg_bytes, random_sample

SMOKE = {"small": 10, "large": 2, "rounds": 2}
SMALL_SIZES = ((512, 384), (384, 512), (512, 512), (512, 341), (512, 288))
LARGE_SIZES = ((3000, 2000), (2000, 3000), (3000, 2250), (3000, 1688), (2800, 2800))


def photo_like_jpeg(width: int, height: int, rng: random.Random, noise: np.ndarray) -> bytes:
    """A resized shape under a random lighting gradient with noise, as a quality-90 JPEG."""
    content = draw_shape(random_sample(rng), 256, rng).resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(content, dtype=np.int16)
    light = np.linspace(-rng.uniform(0, 40), rng.uniform(0, 40), width, dtype=np.float32).astype(np.int16)
    y, x = rng.randrange(noise.shape[0] - height + 1), rng.randrange(noise.shape[1] - width + 1)
    pixels = pixels + light[None, :, None] + noise[y:y + height, x:x + width, None]
    return jpeg_bytes(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), quality=90)


def make_set(count: int, sizes: tuple[tuple[int, int], ...], seed: int) -> list[bytes]:
    rng = random.Random(seed)
    longest = max(max(size) for size in sizes)
    noise = np.random.default_rng(seed).normal(0, 6, (longest + 64, longest + 64)).astype(np.int16)
    return [photo_like_jpeg(*sizes[i % len(sizes)], rng, noise) for i in range(count)]


def images_per_s(images: list[bytes], config: ImageConfig) -> float:
    start = time.perf_counter()
    for data in images:
        prepare_image(data, config)
    return len(images) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", type=int, default=1000, help="DataComp-sized JPEGs, <= 512 px long side (default 1000)")
    p.add_argument("--large", type=int, default=200, help="camera-sized JPEGs, ~3000 px long side (default 200)")
    p.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                   help=f"ImageConfig.max_side, the longest side handed to the engine (default {DEFAULT_MAX_SIDE})")
    p.add_argument("--rounds", type=int, default=3, help="alternating timings of each decoder per set (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed for the synthetic images (default 0)")
    a = parse(p, argv, SMOKE)
    record = Record("image_prep", a, argv)

    sets = {"datacomp ~512px": make_set(a.small, SMALL_SIZES, a.seed),
            "large ~3000px": make_set(a.large, LARGE_SIZES, a.seed + 1)}
    full, draft = ImageConfig(max_side=a.max_side, draft=False), ImageConfig(max_side=a.max_side)
    prepare_image(sets["datacomp ~512px"][0], draft)  # first-call imports stay out of the timings

    print(f"prepare_image, 1 process x 1 thread, max_side={a.max_side}")
    for name, images in sets.items():
        if not images:
            continue
        rates = alternate(a.rounds, {"full decode": lambda images=images: images_per_s(images, full),
                                     "draft decode": lambda images=images: images_per_s(images, draft)})
        record.figures[f"{name}: images"] = len(images)
        record.figures[f"{name}: mean KB"] = round(sum(map(len, images)) / len(images) / 1024, 1)
        record.compare(name, "images/s per core", ("full decode", rates["full decode"]),
                       ("draft decode", rates["draft decode"]))
    record.write()


if __name__ == "__main__":
    main()
