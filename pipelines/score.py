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

from scoring.stage import ScoreConfig, run_sequential


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
                   help="scoring actors (default: cluster GPUs, 1 on CPU)")
    p.add_argument("--batch-size", type=int, default=ScoreConfig.batch_size, help="images per forward pass")
    p.add_argument("--device", default=ScoreConfig.device, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--claim-ttl", type=float, default=ScoreConfig.claim_ttl,
                   help="seconds without renewal after which another run may take a claimed shard")
    a = p.parse_args(argv)
    return ScoreConfig(input=a.input, clip_model=a.clip_model, pretrained=a.pretrained, fingerprint=a.fingerprint,
                       num_workers=a.num_workers, batch_size=a.batch_size, device=a.device, claim_ttl=a.claim_ttl)


def run_stage(config: ScoreConfig) -> int:
    """Run the score stage; the exit code. For now every shard in this process, one after another:
    this is the one call to replace with the shared scheduler (claims, actor pool, retries) that
    drives `scoring.stage.ScoreWorker` across `--num-workers` actors."""
    if config.num_workers not in (None, 1):
        print(f"[score] --num-workers {config.num_workers}: this version scores in one process", flush=True)
    summary = run_sequential(config, log=lambda line: print(line, flush=True))
    print(f"[score] done: {summary['committed']} shards committed, {summary['lost']} lost to another run, "
          f"{len(summary['skipped'])} held by another run (rerun to score them), {len(summary['failed'])} failed"
          + "".join(f"\n  failed {shard}: {error}" for shard, error in summary["failed"].items()))
    return 0 if not (summary["skipped"] or summary["abandoned"] or summary["failed"]) else 1


def main(argv: list[str] | None = None) -> int:
    return run_stage(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
