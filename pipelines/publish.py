"""Publish a recaption output: a Hugging Face-style Parquet dataset, or WebDataset shards for CLIP trainers.

  python pipelines/publish.py --input OUT --dest hf://ORG/NAME                 # private repo, one commit
  python pipelines/publish.py --input OUT --dest published/ --no-scores
  python pipelines/publish.py --input OUT --dest wds/ --format wds --text mix --mix-ratio 0.8

parquet (default): the ok rows of one output version with Recap-DataComp-1B's columns (CLIP scores
joined by key when every published shard is scored, see pipelines/score.py), a preview split and a
dataset card. wds: `{00000..}.tar` whose `txt` is the recaption, the web caption, or a per-sample mix,
with `re_caption.txt` and `org_caption.txt` beside it, plus sizes.json for open_clip_train.

Destinations: a local folder, s3://bucket/prefix (credentials from the usual AWS environment), or
hf://ORG/NAME (token from HF_TOKEN or `hf auth login`, endpoint from HF_ENDPOINT): created private
unless --public, and written in one commit.
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse

from dataset import publish, wds
from dataset.logs import one_line_errors
from dataset.publish import MB, PublishConfig
from dataset.wds import TEXT_CHOICES, WdsExportConfig


@one_line_errors("publish")
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="recaption output folder OUT (local or s3://)")
    p.add_argument("--dest", required=True, help="local folder, s3://bucket/prefix or hf://ORG/NAME")
    p.add_argument("--format", choices=["parquet", "wds"], default="parquet",
                   help="parquet: a Hub dataset of rows (default); wds: image+caption tars for CLIP trainers")
    p.add_argument("--dry-run", action="store_true", help="print the plan (files, sizes, scores) and write nothing")
    p.add_argument("--fingerprint", default=PublishConfig.fingerprint,
                   help="publish this output version (default: the current one)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="publish a version that is neither complete nor current (a --new-version still being "
                        "captioned; refused by default, as it would replace a complete dataset with part of a new one)")
    p.add_argument("--public", action="store_true",
                   help="hf:// only: create the repo public (default: private; an existing public repo is refused "
                        "without this flag)")
    p.add_argument("--no-scores", action="store_true",
                   help="leave the CLIP scores out even when they exist (needed when only some shards are scored)")
    t = p.add_argument_group("parquet")
    t.add_argument("--target-file-mb", type=float, default=PublishConfig.target_bytes / MB,
                   help="size of each train Parquet file; whole shards are never split")
    t.add_argument("--row-group-mb", type=float, default=PublishConfig.row_group_bytes / MB,
                   help="row group size as in-memory Arrow bytes (the Hub's dataset viewer fails above ~286 MiB)")
    t.add_argument("--files-per-folder", type=int, default=PublishConfig.files_per_folder,
                   help="start sub-folders of data/ beyond this many train files (Hub limit: 10,000 per folder)")
    t.add_argument("--title", default=PublishConfig.title, help="dataset title in the card (default: the "
                                                                 "destination's name)")
    t.add_argument("--license", default=PublishConfig.license_id, help="license in the card")
    w = p.add_argument_group("wds")
    w.add_argument("--text", default=WdsExportConfig.text, metavar="|".join((*TEXT_CHOICES, "COLUMN")),
                   help="what `txt` holds: the recaption, the web caption, Recap-DataComp-1B's per-sample mix of the "
                        "two, or another caption column of the version's caption set (--captions)")
    w.add_argument("--mix-ratio", type=float, default=WdsExportConfig.mix_ratio,
                   help="--text mix: probability that a sample's txt is its recaption (Recap-CLIP: 0.8)")
    w.add_argument("--seed", type=int, default=WdsExportConfig.seed,
                   help="--text mix: the per-sample choice is a hash of (seed, key), the same on every export")
    a = p.parse_args(argv)
    if a.format == "wds":
        wds.export_wds(a.input, a.dest, WdsExportConfig(
            text=a.text, mix_ratio=a.mix_ratio, seed=a.seed, fingerprint=a.fingerprint, scores=not a.no_scores,
            public=a.public, dry_run=a.dry_run, allow_incomplete=a.allow_incomplete))
        return
    publish.publish(a.input, a.dest, PublishConfig(
        target_bytes=int(a.target_file_mb * MB), row_group_bytes=int(a.row_group_mb * MB),
        files_per_folder=a.files_per_folder, fingerprint=a.fingerprint, title=a.title, license_id=a.license,
        public=a.public, scores=not a.no_scores, dry_run=a.dry_run, allow_incomplete=a.allow_incomplete))


if __name__ == "__main__":
    main()
