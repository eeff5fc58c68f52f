"""The whole loop on this machine with a tiny random-weight LLaVA: synthesize -> recaption -> show rows."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not pipelines/ (its names shadow packages)

import pyarrow.parquet as pq  # noqa: E402

from dataset import outputs  # noqa: E402
from dataset.synthetic import write_shards  # noqa: E402
from recaption.engines import EngineConfig, SamplingConfig, make_engine  # noqa: E402
from recaption.job import CaptionJob  # noqa: E402
from recaption.prompt import DEFAULT_PROMPT, PromptBuilder  # noqa: E402
from recaption.shard import recaption_shards  # noqa: E402
from recaption.tiny import build_tiny_llava  # noqa: E402


def clip(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 3] + "..."


def show_rows(out: str, shards: list[str], limit: int = 8) -> None:
    rows = [r for s in shards for r in pq.read_table(outputs.parquet_path(out, s)).to_pylist()]
    picked = [r for r in rows if r["status"] == "ok"][: limit - 3] + [r for r in rows if r["status"] == "error"][:3]
    print(f"\n{'key':<10} | {'web caption':<28} | {'recaption':<44} | status")
    print("-" * 100)
    for r in picked:
        recap = r["re_caption"] if r["status"] == "ok" else r["error"]
        print(f"{r['key']:<10} | {clip(r['org_caption'], 28):<28} | {clip(recap, 44):<44} | "
              f"{r['status']} {r['quality'] or ''}")
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"\n{len(rows)} rows: {ok} ok, {len(rows) - ok} error")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    p.add_argument("--per-shard", type=int, default=24)
    a = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    root = Path(a.out)
    model = root / "tiny-llava"
    if not (model / "config.json").exists():
        build_tiny_llava(model)
    shards_dir = root / "shards"
    infos = write_shards(shards_dir, shards=2, per_shard=a.per_shard, bad=True)
    print(f"synthesized {len(infos)} shards in {shards_dir} (with one of each bad sample kind)")
    out = str(root / "recaptioned")
    job = CaptionJob(EngineConfig(str(model), dtype="float32", max_model_len=512), SamplingConfig(max_tokens=64),
                     prompt=DEFAULT_PROMPT)
    engine = make_engine(job.engine, job.sampling)
    paths = [str(shards_dir / f"{i['shard']}.tar") for i in infos]
    ledgers = recaption_shards(paths, out, engine, PromptBuilder(engine.processor, job.prompt), job)
    for ledger in ledgers:
        print(f"shard {ledger['shard']}: {ledger['ok']} ok, {ledger['error']} error, "
              f"{ledger['images_per_s']:.1f} images/s -> {ledger['files']['parquet']['path']}")
    print(f"outputs: {out}/parquet, {out}/wds, {out}/_ledger")
    show_rows(out, [i["shard"] for i in infos])


if __name__ == "__main__":
    main()
