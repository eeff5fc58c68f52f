"""Write one self-contained HTML report about a recaption output folder.

Sections: run summary, a sample grid (image, web caption, recaption, quality flags), caption-length
histograms web vs recaption, errors by reason with an example each, input notes with an example per
kind, CLIP score distributions with the lowest- and highest-scoring samples (when scored), and
throughput per shard over time.
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse

from dataset import report
from dataset.logs import one_line_errors
from dataset.report import ReportConfig


@one_line_errors("report")
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="recaption output folder OUT (local or s3://)")
    p.add_argument("--out", required=True, help="HTML file to write (local or s3://)")
    p.add_argument("--samples", type=int, default=ReportConfig.samples, help="images in the sample grid")
    p.add_argument("--sample-shards", type=int, default=ReportConfig.sample_shards,
                   help="evenly spaced committed shards whose rows feed the histograms, notes and scores "
                        "(millions of rows at 10,000 per shard, read in seconds); the ledgers of all committed "
                        "shards are always read")
    p.add_argument("--fingerprint", default=ReportConfig.fingerprint,
                   help="report on this output version (default: the current one)")
    a = p.parse_args(argv)
    size = report.write_report(a.input, a.out, ReportConfig(samples=a.samples, sample_shards=a.sample_shards,
                                                            fingerprint=a.fingerprint))
    print(f"wrote {a.out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
