"""Read img2dataset WebDataset shards into samples grouped by key, keeping every broken piece visible."""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field

from webdataset.tariterators import base_plus_ext, tar_file_iterator

from dataset import storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


@dataclass
class InputSample:
    """The members of one key: any may be missing or broken."""
    key: str
    image_ext: str | None = None
    image: bytes | None = None
    org_caption: str | None = None
    meta: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # e.g. "json: not valid JSON"

    @property
    def uid(self) -> str | None:
        return self.meta.get("uid")


@dataclass
class InputShard:
    name: str        # the tar's stem, e.g. "00042"
    path: str
    samples: list[InputSample]
    duplicates: list[str] = field(default_factory=list)  # keys whose later sample groups were dropped
    read_error: str | None = None                        # set when the tar ends early or is unreadable

    @property
    def member_groups(self) -> int:
        """Sample groups seen in the tar: kept samples plus dropped duplicate groups."""
        return len(self.samples) + len(self.duplicates)


def shard_name(path: str) -> str:
    name = storage.basename(path)
    return name[:-4] if name.endswith(".tar") else name


def _add_member(sample: InputSample, ext: str, data: bytes) -> None:
    if ext in IMAGE_EXTS:
        if sample.image is not None:
            sample.problems.append(f"{ext}: second image member ignored")
            return
        sample.image_ext, sample.image = ("jpg" if ext == "jpeg" else ext), data
    elif ext == "txt":
        sample.org_caption = data.decode("utf-8", errors="replace")
    elif ext == "json":
        try:
            meta = json.loads(data)
            if not isinstance(meta, dict):
                raise ValueError("not an object")
            sample.meta = meta
        except ValueError as e:
            sample.problems.append(f"json: not valid JSON ({e})")


def read_shard(path: str) -> InputShard:
    """Group the tar's members by key (basename up to the first dot), in tar order.

    A key that comes back after another key started is a duplicate group: the first group wins
    and the key is listed in `duplicates`, so samples in = len(samples) + len(duplicates).
    """
    samples: dict[str, InputSample] = {}
    duplicates: list[str] = []
    current: InputSample | None = None
    read_error = None
    try:
        with storage.open_read(path) as stream:
            for member in tar_file_iterator(stream):
                key, ext = base_plus_ext(member["fname"])
                if key is None:
                    continue
                ext = ext.lower()
                if current is None or key != current.key:
                    if key in samples:
                        duplicates.append(key)
                        current = InputSample(key)  # collected, then dropped
                    else:
                        current = samples[key] = InputSample(key)
                _add_member(current, ext, member["data"])
    except (tarfile.TarError, OSError, EOFError) as e:
        read_error = f"{path}: tar ends early or is unreadable after {len(samples)} samples ({e})"
    return InputShard(shard_name(path), path, list(samples.values()), duplicates, read_error)
