"""Our WebDataset tars: read the recaption output's `wds/` samples back, and export them for standard CLIP trainers.

The recaption job writes `{key}.{image ext}`, `{key}.txt` (web caption), `{key}.re_caption.txt` and
`{key}.json` per ok sample (`outputs.WdsWriter`); keys hold no dots (dataset/reader.py, 'Key rule').
"""
from __future__ import annotations

import tarfile
from collections.abc import Iterator

from dataset import storage
from dataset.reader import IMAGE_EXTS


def iter_samples(path: str, limit: int | None = None) -> Iterator[dict]:
    """Samples of one output tar, streamed: {"key", "image_ext", "image", then member ext -> bytes}."""
    sample: dict | None = None
    yielded = 0
    with storage.open_read(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            tar.members = []  # stream mode keeps every TarInfo otherwise
            key, _, ext = member.name.partition(".")
            if sample is not None and key != sample["key"]:
                yield sample
                yielded += 1
                sample = None
            if limit is not None and yielded >= limit:
                return
            if sample is None:
                sample = {"key": key, "image_ext": None, "image": b""}
            data = tar.extractfile(member).read() if member.isfile() else b""
            if ext in IMAGE_EXTS:
                sample["image_ext"], sample["image"] = ext, data
            else:
                sample[ext] = data
    if sample is not None and (limit is None or yielded < limit):
        yield sample
