"""Shards in the recaption job's `wds/` format whose recaptions describe the image (for training tests)."""
from __future__ import annotations

import random
from pathlib import Path

from dataset.synthetic.shapes import RECAPTION_TEMPLATES, draw_shape, jpeg_bytes, random_sample, web_caption


def write_recaptioned_wds(out_dir: str | Path, shards: int, per_shard: int, *, image_size: int = 128,
                          seed: int = 0) -> list[dict]:
    """Write `out_dir/{00000..}.tar` in the recaption job's `wds/` format with descriptive recaptions.

    For training tests and demos that need captions which describe the image (a random-weight
    captioner's output does not). Returns [{"shard", "labels": {key: label}}].
    """
    from dataset.outputs import WdsSample, write_wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    infos = []
    for shard_id in range(shards):
        rng = random.Random(seed * 1_000_003 + shard_id)
        samples, labels = [], {}
        for i in range(per_shard):
            key = f"{shard_id:05d}{i:04d}"
            sample = random_sample(rng)
            img = draw_shape(sample, image_size, rng)
            fields = dict(color=sample.color, shape=sample.shape, bg=sample.background)
            re_caption = rng.choice(RECAPTION_TEMPLATES).format(**fields)
            samples.append(WdsSample(key, "jpg", jpeg_bytes(img), web_caption(sample, rng), re_caption,
                                     {"key": key, "label": sample.label}))
            labels[key] = sample.label
        write_wds(samples, str(out / f"{shard_id:05d}.tar"))
        infos.append({"shard": f"{shard_id:05d}", "labels": labels})
    return infos
