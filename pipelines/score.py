"""CLIP-score a recaption output: for every ok row, the cosine of the image with `re_caption` and `org_caption`.

  python pipelines/score.py --input OUT --clip-model ViT-L-14 --pretrained datacomp_xl_s13b_b90k
  python pipelines/score.py --input OUT --clip-model hf-hub:apple/DFN5B-CLIP-ViT-H-14
  python pipelines/score.py --input OUT --clip-model local-dir:DIR      # e.g. python -m scoring.tiny DIR

Scores go to OUT/clip_scores/ (one Parquet file per shard, keyed by `key`, committed through its own
ledgers and claims), so a rerun scores only what is missing, and a shard re-captioned with
--retry-errors is scored again. `pipelines/publish.py` joins them as `re_clip_score` and `org_clip_score`.
Texts are cut to the model's context by its own tokenizer.
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse
import sys

from dataset.logs import one_line_errors
from scoring.stage import ScoreConfig, run_stage


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
    p.add_argument("--num-workers", type=int, default=ScoreConfig.num_workers,
                   help="scoring actors, one GPU each on a cluster (default: cluster GPUs, 1 on CPU)")
    p.add_argument("--batch-size", type=int, default=ScoreConfig.batch_size, help="images per forward pass")
    p.add_argument("--device", default=ScoreConfig.device, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--claim-ttl", type=float, default=ScoreConfig.claim_ttl,
                   help="seconds without renewal after which another run may take a claimed shard")
    a = p.parse_args(argv)
    return ScoreConfig(input=a.input, clip_model=a.clip_model, pretrained=a.pretrained, fingerprint=a.fingerprint,
                       num_workers=a.num_workers, batch_size=a.batch_size, device=a.device, claim_ttl=a.claim_ttl)


def run(config: ScoreConfig) -> int:
    """Run the stage; the exit code (0: every pending shard scored, 1: some failed, 143/130: stopped)."""
    summary = run_stage(config)
    if summary["stopped"]:
        print(f"[score] stopped by {summary['stopped']}: {summary['committed']} shards committed; rerun to "
              "score the rest", file=sys.stderr, flush=True)
        return {"SIGTERM": 143, "SIGINT": 130}[summary["stopped"]]
    for shard, errors in summary["failed"].items():
        print(f"[score] failed {shard}: {errors[-1]}", file=sys.stderr, flush=True)
    print(f"[score] done: {summary['committed']} of {summary['shards']} shards scored, "
          f"{len(summary['failed'])} failed", flush=True)
    return 1 if summary["failed"] else 0


@one_line_errors("score")
def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
