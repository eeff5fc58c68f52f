"""Publish a recaption output folder as a Hugging Face-style dataset (Parquet + preview split + card).

Only shards whose ledger carries the run's fingerprint are published; the ok rows go to `train`
(error rows have no recaption and are only counted in the card). Destinations: a local folder,
s3://bucket/prefix (credentials from the usual AWS environment), or hf://ORG/NAME (token from
HF_TOKEN or `hf auth login`, endpoint from HF_ENDPOINT).
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse

from dataset import publish


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="recaption output folder OUT (local or s3://)")
    p.add_argument("--dest", required=True, help="local folder, s3://bucket/prefix or hf://ORG/NAME")
    p.add_argument("--dry-run", action="store_true", help="print the plan (files, sizes, commits) and write nothing")
    p.add_argument("--target-file-mb", type=float, default=500,
                   help="size of each train Parquet file (default 500 MB: few enough files for the Hub's limits, "
                        "small enough to download one at a time); whole shards are never split")
    p.add_argument("--row-group-mb", type=float, default=100,
                   help="row group size as in-memory Arrow bytes, an upper bound of the stored size "
                        "(default 100 MB: the Hub's dataset viewer fails on row groups above ~286 MiB)")
    p.add_argument("--files-per-folder", type=int, default=9000,
                   help="start sub-folders of data/ beyond this many train files (Hub limit: 10,000 per folder)")
    p.add_argument("--fingerprint", help="publish this run's shards (default: from OUT/_run.json)")
    p.add_argument("--title", help="dataset title in the card (default: the destination's name)")
    p.add_argument("--license", default="cc-by-4.0",
                   help="license in the card (default cc-by-4.0, the license of the DataComp metadata)")
    p.add_argument("--hub-batch-files", type=int, default=20,
                   help="hf:// only: files staged locally per upload (default 20: ~10 GB of disk at 500 MB each)")
    a = p.parse_args(argv)
    publish.publish(
        a.input, a.dest, target_bytes=int(a.target_file_mb * publish.MB),
        row_group_bytes=int(a.row_group_mb * publish.MB), files_per_folder=a.files_per_folder,
        dry_run=a.dry_run, fingerprint=a.fingerprint, title=a.title, license_id=a.license,
        hub_batch_files=a.hub_batch_files,
    )


if __name__ == "__main__":
    main()
