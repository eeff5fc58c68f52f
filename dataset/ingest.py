"""Download DataComp-style metadata into img2dataset WebDataset shards, and summarise the result.

The defaults are the ones DataComp's own downloader passes to img2dataset, so shards made here
match the ones researchers already have. img2dataset's incremental mode makes reruns resume:
a shard whose `{shard}_stats.json` exists is skipped.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dataset import storage
from dataset.logs import output_to

DATACOMP_SETTINGS: dict = {
    "image_size": 512,
    "resize_mode": "keep_ratio_largest",
    "resize_only_if_bigger": True,
    "output_format": "webdataset",
    "input_format": "parquet",
    "url_col": "url",
    "caption_col": "text",
    "save_additional_columns": ["uid"],
    "number_sample_per_shard": 10000,
}
DISTRIBUTORS = ("multiprocessing", "ray")


@dataclass(frozen=True)
class Throughput:
    """How img2dataset spreads the work; the defaults are img2dataset's own, threads for a network-bound job."""
    processes: int = os.cpu_count() or 1   # decoding and resizing use the CPU
    threads: int = 64                      # downloads wait on the network, not the CPU
    timeout: int = 10                      # seconds per download
    retries: int = 0                       # extra attempts per failed url
    distributor: str = "multiprocessing"


@dataclass
class DownloadSummary:
    """Totals over the `_stats.json` files img2dataset wrote, one per finished shard."""
    shards: int = 0
    count: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    reasons: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        out = [f"{self.shards} shards, {self.count} urls: {self.successes} downloaded, "
               f"{self.failed_to_download} failed to download, {self.failed_to_resize} failed to resize"]
        out += [f"  {n:>8}  {reason}" for reason, n in self.reasons.most_common(10)]
        return out


def download(url_list: str, output: str, *, processes: int = 1, threads: int = 64,
             distributor: str = "multiprocessing", log_file: Path | None = None, **overrides) -> DownloadSummary:
    """Run img2dataset with DATACOMP_SETTINGS (any img2dataset argument may be overridden); its own
    progress output goes to `log_file` when one is given."""
    check_url_list(url_list)
    # img2dataset imports albumentations, which otherwise asks PyPI for updates in every worker.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download as img2dataset_download

    if distributor not in DISTRIBUTORS:
        raise ValueError(f"distributor must be one of {DISTRIBUTORS}, got {distributor!r}")
    settings = {**DATACOMP_SETTINGS, "incremental_mode": "incremental", **overrides}
    with output_to(log_file) if log_file else contextlib.nullcontext():
        img2dataset_download(url_list=url_list, output_folder=output, processes_count=processes,
                             thread_count=threads, distributor=distributor, **settings)
    return summarize(output)


def check_url_list(url_list: str) -> None:
    """Refuse, before img2dataset starts, a url list that is neither a metadata file nor a folder of them."""
    if storage.list_files(url_list, ".parquet"):
        return
    is_file = storage.exists(url_list) if storage.is_remote(url_list) else Path(url_list).is_file()
    if not is_file:
        raise FileNotFoundError(f"{url_list}: neither a metadata parquet file nor a folder holding any")


def summarize(output: str) -> DownloadSummary:
    """Add up the `{shard}_stats.json` files in an img2dataset output folder."""
    summary = DownloadSummary()
    for path in storage.list_files(output, "_stats.json"):
        try:
            stats = json.loads(storage.read_bytes(path))
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        summary.shards += 1
        summary.count += stats["count"]
        summary.successes += stats["successes"]
        summary.failed_to_download += stats["failed_to_download"]
        summary.failed_to_resize += stats["failed_to_resize"]
        summary.reasons.update({k: v for k, v in stats.get("status_dict", {}).items() if k != "success"})
    return summary
