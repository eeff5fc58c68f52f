"""CLIP-score a recaption output: for every ok row, the cosine of the image with each caption and `org_caption`.

  python pipelines/score.py --input OUT --clip-model ViT-L-14 --pretrained datacomp_xl_s13b_b90k
  python pipelines/score.py --input OUT --clip-model hf-hub:apple/DFN5B-CLIP-ViT-H-14
  python pipelines/score.py --input OUT --clip-model local-dir:DIR      # e.g. python -m scoring.tiny DIR

Scores go to OUT/clip_scores/ (one Parquet file per shard, keyed by `key`, committed through its own
ledgers and claims), so a rerun scores only what is missing, and a shard re-captioned with
--retry-errors is scored again. `pipelines/publish.py` joins them as `re_clip_score` and `org_clip_score`, and
`{column}_clip_score` for each other column of a caption set (--captions).
Texts are cut to the model's context by its own tokenizer. The workers, scheduling and claim flags are the
recaption job's (the same runner).
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse
import sys

from dataset.logs import one_line_errors, say
from runner import cli
from scoring.stage import ScoreConfig, score


def parse_args(argv: list[str] | None = None) -> ScoreConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="recaption output folder OUT (local or s3://)")
    p.add_argument("--clip-model", required=True,
                   help="anything open_clip.create_model_and_transforms takes: local-dir:DIR, hf-hub:ORG/NAME, "
                        "or a built-in name such as ViT-L-14 (with --pretrained)")
    p.add_argument("--pretrained", default=ScoreConfig.pretrained,
                   help="pretrained tag of a built-in model, e.g. datacomp_xl_s13b_b90k")
    p.add_argument("--fingerprint", default=ScoreConfig.fingerprint,
                   help="score this output version (default: the current one)")
    p.add_argument("--batch-size", type=int, default=ScoreConfig.batch_size, help="images per forward pass")
    p.add_argument("--device", default=ScoreConfig.device, help="cuda or cpu (default: cuda when available)")
    cli.add_runner_arguments(p.add_argument_group("workers and cluster"), ScoreConfig.runner)
    a = p.parse_args(argv)
    return ScoreConfig(input=a.input, clip_model=a.clip_model, pretrained=a.pretrained, fingerprint=a.fingerprint,
                       batch_size=a.batch_size, device=a.device, runner=cli.runner_config(a, ScoreConfig.runner))


def run(config: ScoreConfig) -> int:
    """Run the stage; the exit code (0: every pending shard scored, 1: some failed, 143/130: stopped)."""
    result = score(config)
    if result.progress is not None and not result.stopped:
        say("score", f"done: {result.progress.done} of {len(result.plan.tasks)} shards scored, "
                     f"{len(result.failed)} failed")
    return result.exit_code


@one_line_errors("score")
def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
