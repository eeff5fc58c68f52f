"""What a finished recaption run leaves in its output folder, written without a model."""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

from dataset.synthetic.shapes import (
    RECAPTION_TEMPLATES,
    ShapeSample,
    draw_shape,
    jpeg_bytes,
    random_sample,
    web_caption,
)

RECAPTION_ERRORS = (
    ("decode", "cannot identify image file"),
    ("truncated", "image file is truncated (17 bytes not processed)"),
    ("empty", "zero-byte image"),
    ("bomb", "30000x30000 exceeds 89478485 pixels"),
)
SYNTHETIC_CAPTION_CONFIG = {
    "model": "synthetic/tiny-llava", "revision": "0" * 40, "backend": "synthetic",
    "prompt": "Please generate a detailed caption of this image. Please be as descriptive as possible.",
    "max_tokens": 128, "temperature": 0.0, "top_k": -1, "top_p": 1.0, "seed": 0, "image_size": 336,
}


def recaption_row(shard: str, i: int, sample: ShapeSample, rng: random.Random, fingerprint: str,
                  error: tuple[str, str] | None) -> dict:
    """One ROW_SCHEMA row as the recaption job writes it; `error` is (reason, detail) or None."""
    org = web_caption(sample, rng)
    key = f"{shard}{i:04d}"
    row = {
        "key": key, "uid": hashlib.md5(f"{fingerprint}-{key}".encode()).hexdigest(),
        "url": f"http://127.0.0.1:8000/images/{key}.jpg", "org_caption": org, "re_caption": None,
        "status": "error", "error": f"{error[0]}: {error[1]}" if error else None, "finish_reason": None,
        "num_tokens": None, "quality": None, "width": None, "height": None,
        "sha256": hashlib.sha256(key.encode()).hexdigest(), "org_length": len(org.split()), "re_length": None,
        "fingerprint": fingerprint, "shard": shard,
    }
    if error:
        return row
    fields = dict(color=sample.color, shape=sample.shape, bg=sample.background)
    re_caption = " ".join(rng.choice(RECAPTION_TEMPLATES).format(**fields) for _ in range(rng.randint(1, 3)))
    finish = "length" if rng.random() < 0.1 else "stop"
    size = rng.choice((128, 256, 512))
    row.update(status="ok", re_caption=re_caption, finish_reason=finish, num_tokens=len(re_caption.split()) * 4 // 3,
               quality="length" if finish == "length" else "", width=size, height=size,
               re_length=len(re_caption.split()))
    return row


def write_recaption_outputs(out: str, shards: int, per_shard: int, *, errors_per_shard: int = 3,
                            fingerprint: str = "f" * 16, seed: int = 0, image_size: int = 96,
                            start: float = 1_700_000_000.0) -> dict:
    """Write what a finished recaption run leaves in OUT (parquet, wds, ledgers, _run.json) without a model.

    For publish/report tests and demos: two simulated workers take shards in turn; error rows
    cycle through RECAPTION_ERRORS. Returns the `_run.json` summary.
    """
    from dataset import storage
    from dataset.outputs import WdsSample, parquet_path, wds_path, write_ledger, write_parquet, write_wds

    config = {**SYNTHETIC_CAPTION_CONFIG, "seed": seed}
    worker_clock = [start, start + 1.5]
    totals = {"ok": 0, "error": 0, "tokens": 0}
    for shard_id in range(shards):
        shard = f"{shard_id:05d}"
        rng = random.Random(seed * 1_000_003 + shard_id)
        n_errors = min(errors_per_shard, per_shard)
        error_at = {i * per_shard // n_errors: RECAPTION_ERRORS[(shard_id + i) % len(RECAPTION_ERRORS)]
                    for i in range(n_errors)}
        rows, samples = [], []
        for i in range(per_shard):
            sample = random_sample(rng)
            row = recaption_row(shard, i, sample, rng, fingerprint, error_at.get(i))
            rows.append(row)
            if row["status"] == "ok":
                image = jpeg_bytes(draw_shape(sample, image_size, rng))
                samples.append(WdsSample(row["key"], "jpg", image, row["org_caption"], row["re_caption"],
                                         {"key": row["key"], "uid": row["uid"], "url": row["url"]}))
        paths = {"parquet": parquet_path(out, shard), "wds": wds_path(out, shard)}
        files = {"parquet": {"path": paths["parquet"], "bytes": write_parquet(rows, paths["parquet"])},
                 "wds": {"path": paths["wds"], "bytes": write_wds(samples, paths["wds"])}}
        reasons = Counter(reason for reason, _ in error_at.values())
        worker = shard_id % 2
        seconds = 20.0 + 10.0 * rng.random()
        tokens = sum(r["num_tokens"] or 0 for r in rows)
        write_ledger(out, shard, {
            "shard": shard, "input": f"shards/{shard}.tar", "fingerprint": fingerprint, "caption_config": config,
            "samples_in": per_shard, "rows_out": per_shard, "ok": len(samples), "error": per_shard - len(samples),
            "duplicates": 0, "errors_by_reason": dict(reasons),
            "quality": dict(Counter(f for r in rows if r["quality"] for f in r["quality"].split(","))),
            "started_at": worker_clock[worker],
            "finished_at": worker_clock[worker] + seconds, "seconds": seconds, "images_per_s": per_shard / seconds,
            "tokens": tokens, "tokens_per_s": tokens / seconds, "worker": f"worker-{worker}", "attempt": 1,
            "files": files,
        }, replace=True)
        worker_clock[worker] += seconds + 0.5
        totals["ok"] += len(samples)
        totals["error"] += per_shard - len(samples)
        totals["tokens"] += tokens
    elapsed = max(worker_clock) - start
    run = {"fingerprint": fingerprint, "caption_config": config,
           "shards": {"total": shards, "done": shards, "failed": []},
           "rows": {"ok": totals["ok"], "error": totals["error"]},
           "images_per_s": shards * per_shard / elapsed, "tokens_per_s": totals["tokens"] / elapsed,
           "started_at": start, "finished_at": start + elapsed}
    storage.write_bytes(storage.join(out, "_run.json"), json.dumps(run, indent=1).encode())
    return run
