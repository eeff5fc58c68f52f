"""The whole loop on this machine with a tiny random-weight LLaVA (nothing downloaded):

synthesize DataComp-like metadata -> serve the images on loopback -> download with img2dataset
-> recaption on vLLM in a Ray actor (default engine flags) -> CLIP-score with a tiny open_clip model
-> publish a Hub-ready folder with Recap-DataComp-1B's columns -> write the HTML report.
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from dataset import outputs
from dataset.ingest import download
from dataset.logs import one_line_errors
from dataset.publish import publish
from dataset.report import write_report
from dataset.synthetic.web import serving, write_metadata
from recaption.engines import EngineConfig
from recaption.job import CaptionJob
from recaption.stage import RunConfig, run
from recaption.tiny import build_tiny_llava
from runner.pool import PoolConfig
from runner.run import RunnerConfig
from scoring.stage import SCORE_RUNNER, ScoreConfig, score
from scoring.tiny import build_tiny_clip


def clip(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 3] + "..."


def show_rows(out: str, limit: int = 8) -> None:
    run = outputs.load_finished(out)
    rows = [r for shard in run.by_shard for r in outputs.read_rows(run.parquet(shard))]
    picked = [r for r in rows if r["status"] == "ok"][:limit]
    print(f"\n{'key':<10} | {'web caption':<28} | {'recaption (random-weight model)':<44} | status")
    print("-" * 100)
    for r in picked:
        print(f"{r['key']:<10} | {clip(r['org_caption'], 28):<28} | {clip(r['re_caption'], 44):<44} | "
              f"{r['status']} {r['quality'] or ''}")
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{len(rows)} rows: {ok} ok, {len(rows) - ok} error")


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


@one_line_errors("demo")
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes (rebuilt each run)")
    p.add_argument("--images", type=int, default=48, help="good image urls to synthesize")
    a = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    root = Path(a.out).resolve()
    model = root / "tiny-llava"
    if not (model / "config.json").exists():
        build_tiny_llava(model)

    with serving(root / "web", hang_seconds=8) as server:
        step(f"1. DataComp-like metadata whose urls point at {server.url} (some answer 404, hang or serve garbage)")
        meta = write_metadata(root / "web", files=1, per_file=a.images, url_base=server.url, bad=True)
        print(f"{meta['good']} good urls, injected failures: {sorted(set(meta['injected'].values()))}")
        step("2. download with img2dataset (DataComp settings, 24 samples per shard)")
        summary = download(meta["files"][0], str(root / "shards"), processes=1, threads=8,
                           number_sample_per_shard=24, timeout=3, log_file=root / "img2dataset.log")
        print("\n".join(summary.lines()) + f"\nimg2dataset's own log: {root / 'img2dataset.log'}")

    step("3. recaption on vLLM (CPU) in a Ray actor, default engine flags")
    out = str(root / "recaptioned")
    code = run(RunConfig(input=str(root / "shards"), output=out, job=CaptionJob(EngineConfig(str(model))),
                         runner=RunnerConfig(pool=PoolConfig(num_workers=1), progress_every=10)))
    if code != 0:
        sys.exit(code)
    show_rows(out)

    step("4. CLIP scores (re_clip_score, org_clip_score) with a tiny random open_clip model")
    clip_model = root / "tiny-clip"
    if not (clip_model / "open_clip_config.json").exists():
        build_tiny_clip(clip_model)
    scored = score(ScoreConfig(out, f"local-dir:{clip_model}", runner=replace(SCORE_RUNNER, progress_every=10)))
    if scored.exit_code:
        sys.exit(scored.exit_code)

    step("5. publish a Hub-ready folder (train + preview splits, dataset card, Recap-DataComp-1B's columns)")
    publish(out, str(root / "published"), target_bytes=1 << 20)
    step("6. report")
    write_report(out, str(root / "report.html"))
    print(f"\noutputs:\n  shards      {root / 'shards'}\n  recaptioned {out}/{{parquet,wds,_ledger}}\n"
          f"  published   {root / 'published'} (README.md is the dataset card)\n  report      {root / 'report.html'}")


if __name__ == "__main__":
    main()
