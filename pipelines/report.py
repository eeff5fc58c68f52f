"""Write one self-contained HTML report about a recaption output folder.

Sections: run summary, a sample grid (image, web caption, recaption, quality flags), caption-length
histograms web vs recaption, errors by reason with examples, and throughput per shard over time.
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse

from dataset import report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="recaption output folder OUT (local or s3://)")
    p.add_argument("--out", required=True, help="HTML file to write (local or s3://)")
    p.add_argument("--samples", type=int, default=24, help="images in the sample grid")
    p.add_argument("--sample-shards", type=int, default=200,
                   help="evenly spaced done shards whose rows feed the length histograms and error examples "
                        "(default 200: millions of rows at 10,000 per shard, read in seconds); "
                        "the ledgers of all done shards are always read")
    p.add_argument("--fingerprint", help="report on this run's shards (default: from OUT/_run.json)")
    a = p.parse_args(argv)
    size = report.write_report(a.input, a.out, samples=a.samples, sample_shards=a.sample_shards,
                               fingerprint=a.fingerprint)
    print(f"wrote {a.out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
