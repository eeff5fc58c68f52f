"""Download DataComp-style metadata (uid, url, text, ...) into img2dataset WebDataset shards.

Runs img2dataset with DataComp's own settings (512 px, keep_ratio_largest, resize only if
bigger, 10,000 samples per shard, uid kept). Rerunning the same command resumes: shards whose
`_stats.json` exists are skipped.
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse
from pathlib import Path

from dataset import ingest
from dataset.logs import one_line_errors

D, T = ingest.DATACOMP_SETTINGS, ingest.Throughput


@one_line_errors("download")
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url-list", required=True,
                   help="metadata parquet file, or folder of parquet files (local or s3://)")
    p.add_argument("--output", required=True, help="output folder for {00000..}.tar shards (local or s3://)")
    p.add_argument("--processes", type=int, default=T.processes,
                   help="download processes (default: one per CPU core; decoding and resizing use the CPU)")
    p.add_argument("--threads", type=int, default=T.threads,
                   help="download threads per process (default 64: downloads wait on the network, not the CPU)")
    p.add_argument("--distributor", choices=ingest.DISTRIBUTORS, default=T.distributor,
                   help="multiprocessing on this machine, or ray (one task per shard on the connected cluster)")
    p.add_argument("--image-size", type=int, default=D["image_size"], help="longest side after resizing, px")
    p.add_argument("--resize-mode", default=D["resize_mode"],
                   help="img2dataset resize mode (default keep_ratio_largest: the longest side becomes --image-size)")
    p.add_argument("--resize-always", action="store_true", help="also upscale images smaller than --image-size")
    p.add_argument("--samples-per-shard", type=int, default=D["number_sample_per_shard"],
                   help="urls per shard (default 10,000, as DataComp)")
    p.add_argument("--caption-col", default=D["caption_col"], help="metadata column holding the web caption")
    p.add_argument("--timeout", type=int, default=T.timeout, help="seconds per download (img2dataset's default)")
    p.add_argument("--retries", type=int, default=T.retries, help="extra attempts per failed url")
    p.add_argument("--log-file", type=Path, default=None,
                   help="send img2dataset's own progress output to this file (default: the console)")
    a = p.parse_args(argv)
    summary = ingest.download(
        a.url_list, a.output, processes=a.processes, threads=a.threads, distributor=a.distributor,
        image_size=a.image_size, resize_mode=a.resize_mode, resize_only_if_bigger=not a.resize_always,
        number_sample_per_shard=a.samples_per_shard, caption_col=a.caption_col, timeout=a.timeout,
        retries=a.retries, log_file=a.log_file,
    )
    print("\n".join(summary.lines()))


if __name__ == "__main__":
    main()
