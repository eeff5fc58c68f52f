"""Data-loader throughput: images/s of the training stream, and per loader core.

  python -m benchmarks.train_dataloader --image-size 160 --batch-size 64 --workers 0 1 2

Writes synthetic recaptioned shards (JPEGs of --source-size px) to a temporary folder, then
reads them through `ShardStream` + `DataLoader` exactly as training does (decode, inception crop,
colour jitter, grayscale, tokenising both text views and the recaption). `--workers 0` decodes
in the main process, so it also measures one core.
"""
from __future__ import annotations

import argparse
import tempfile
import time

from dataset.synthetic.training_shards import write_recaptioned_wds
from train.data import ShardStream, expand_urls, make_loader, read_captions
from train.tokenizer import CaptionTokenizer


def images_per_second(stream: ShardStream, workers: int, batches: int) -> float:
    it = iter(make_loader(stream, workers, pin_memory=False))
    next(it)  # worker start-up and the first shuffle-buffer fill are not steady state
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * stream.batch_size / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=160, help="training resolution")
    p.add_argument("--source-size", type=int, default=256, help="side of the stored JPEGs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_recaptioned_wds(tmp, shards=4, per_shard=512, image_size=a.source_size)
        urls = expand_urls(f"{tmp}/*.tar")
        tokenizer = CaptionTokenizer.train(read_captions(urls, 2000))
        print(f"{a.source_size}px JPEGs -> {a.image_size}px, batch {a.batch_size}, {a.batches} batches")
        for workers in a.workers:
            stream = ShardStream(urls, tokenizer, image_size=a.image_size, batch_size=a.batch_size, context_length=80,
                                 caption_length=128, seed=0, shuffle_buffer=500)
            rate = images_per_second(stream, workers, a.batches)
            print(f"  workers {workers}: {rate:8.1f} images/s  ({rate / max(workers, 1):.1f} per loader core)")


if __name__ == "__main__":
    main()
