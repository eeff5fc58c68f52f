"""Check a recaption output against its ledgers, and with --repair mark what is broken for the next run.

  python -m pipelines.verify OUT                 # every committed file: exists, bytes, rows; keys unique
  python -m pipelines.verify OUT --repair        # ... and mark broken shards: the next run captions them again

Exit status 0 when everything checks out, 1 when something does not (each problem is printed).
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse
import sys

from dataset.logs import one_line_errors, say
from dataset.verify import verify_output


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="recaption output folder OUT (local or s3://)")
    p.add_argument("--fingerprint", help="check this version (default: the current one)")
    p.add_argument("--repair", action="store_true",
                   help="mark each broken shard's generation, so that the next recaption (or score) run makes it "
                        "again from its input")
    p.add_argument("--no-rows", action="store_true", help="skip reading files for their row counts")
    p.add_argument("--no-keys", action="store_true", help="skip the check that keys are unique across shards")
    return p.parse_args(argv)


@one_line_errors("verify")
def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    report = verify_output(a.output, a.fingerprint, rows=not a.no_rows, keys=not a.no_keys, repair=a.repair,
                           on_problem=lambda stage, p: say("verify", f"{stage}: {p.line()}", error=True))
    for key, shards in sorted(report.duplicates.items())[:20]:
        say("verify", f"key {key!r} is committed {len(shards)} times, in shards {', '.join(shards)}", error=True)
    for stage in report.stages:
        marked = f", {stage.marked} marked broken: rerun the stage to make them again" if a.repair else ""
        say("verify", f"{stage.name}: {stage.shards} shards, {len(stage.problems)} problems{marked}")
    say("verify", f"{report.output.describe()}: " + ("every committed file matches its ledger" if report.ok else
                                                    f"{len(report.duplicates)} repeated keys" if report.duplicates
                                                    else "problems found"))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
