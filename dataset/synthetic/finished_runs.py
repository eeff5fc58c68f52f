"""What a finished recaption run leaves in its output folder, written without a model through the real contract."""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile

from dataset import storage
from dataset.outputs import RECAPTION_KINDS, WdsWriter, build_row, make_ledger, write_parquet
from dataset.protocol import claimed_attempt
from dataset.reader import InputSample
from dataset.synthetic.shapes import (
    RECAPTION_TEMPLATES,
    ShapeSample,
    draw_shape,
    jpeg_bytes,
    random_sample,
    web_caption,
)
from dataset.versions import Output

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


def recaption_sample(shard: str, i: int, sample: ShapeSample, rng: random.Random, fingerprint: str) -> InputSample:
    """The input sample the job would have read: key, web caption, DataComp-like metadata."""
    key = f"{shard}{i:04d}"
    meta: dict[str, str | None] = {"uid": hashlib.md5(f"{fingerprint}-{key}".encode()).hexdigest(),
            "url": f"http://127.0.0.1:8000/images/{key}.jpg", "sha256": hashlib.sha256(key.encode()).hexdigest()}
    return InputSample(key=key, image_ext="jpg", image=None, org_caption=web_caption(sample, rng), meta=meta)


def recaption_row(shard: str, inp: InputSample, sample: ShapeSample, rng: random.Random, fingerprint: str,
                  error: tuple[str, str] | None) -> dict:
    """The row the job writes for `inp`: an error row with (reason, detail), else a caption of the shape."""
    if error:
        return build_row(inp, shard=shard, fingerprint=fingerprint, error=f"{error[0]}: {error[1]}")
    fields = dict(color=sample.color, shape=sample.shape, bg=sample.background)
    re_caption = " ".join(rng.choice(RECAPTION_TEMPLATES).format(**fields) for _ in range(rng.randint(1, 3)))
    finish = "length" if rng.random() < 0.1 else "stop"
    size = rng.choice((128, 256, 512))
    return build_row(inp, shard=shard, fingerprint=fingerprint, caption=re_caption, finish_reason=finish,
                     num_tokens=len(re_caption.split()) * 4 // 3, quality="length" if finish == "length" else "",
                     width=size, height=size)


def write_recaption_outputs(out: str, shards: int, per_shard: int, *, errors_per_shard: int = 3,
                            fingerprint: str = "f" * 16, seed: int = 0, image_size: int = 96,
                            start: float = 1_700_000_000.0, new_version: bool = False,
                            mark_complete: bool = True) -> dict:
    """Write what a finished recaption run leaves in OUT without a model, through the output contract.

    For publish/report tests and demos: the version is registered, and every shard is an attempt
    that puts its Parquet and WDS files and commits its ledger. Two simulated workers take shards in
    turn; error rows cycle through RECAPTION_ERRORS. Returns the `_run.json` summary.
    """
    config = {**SYNTHETIC_CAPTION_CONFIG, "seed": seed}
    output = Output.register(out, fingerprint, config, new_version=new_version, kinds=RECAPTION_KINDS)
    worker_clock = [start, start + 1.5]
    totals = {"ok": 0, "error": 0, "tokens": 0}
    with tempfile.TemporaryDirectory(prefix="ov-finished-") as tmp:
        for shard_id in range(shards):
            shard = f"{shard_id:05d}"
            rng = random.Random(seed * 1_000_003 + shard_id)
            n_errors = min(errors_per_shard, per_shard)
            error_at = {i * per_shard // n_errors: RECAPTION_ERRORS[(shard_id + i) % len(RECAPTION_ERRORS)]
                        for i in range(n_errors)}
            rows = []
            with WdsWriter(os.path.join(tmp, f"{shard}.tar")) as wds:
                for i in range(per_shard):
                    sample = random_sample(rng)
                    inp = recaption_sample(shard, i, sample, rng, fingerprint)
                    row = recaption_row(shard, inp, sample, rng, fingerprint, error_at.get(i))
                    rows.append(row)
                    if row["status"] == "ok":
                        image = jpeg_bytes(draw_shape(sample, image_size, rng))
                        wds.add(row["key"], "jpg", image, row["org_caption"], row["re_caption"],
                                {"key": row["key"], "uid": row["uid"], "url": row["url"]})
            worker = shard_id % 2
            seconds = 20.0 + 10.0 * rng.random()
            ledger = make_ledger(rows, input=f"shards/{shard}.tar", fingerprint=fingerprint, caption_config=config,
                                 samples_in=per_shard, started_at=worker_clock[worker],
                                 finished_at=worker_clock[worker] + seconds, worker=f"worker-{worker}", attempt=1)
            write_parquet(rows, os.path.join(tmp, f"{shard}.parquet"))
            with claimed_attempt(output.store, shard) as attempt:
                attempt.put("parquet", os.path.join(tmp, f"{shard}.parquet"), rows=len(rows))
                attempt.put("wds", wds.local_file, rows=wds.samples)
                if attempt.commit(ledger) != "committed":
                    raise FileExistsError(f"{out}: shard {shard} is already committed; write a fake run into a new "
                                          "folder")
            worker_clock[worker] += seconds + 0.5
            totals["ok"] += ledger["ok"]
            totals["error"] += ledger["error"]
            totals["tokens"] += ledger["tokens"]
    elapsed = max(worker_clock) - start
    run = {"fingerprint": fingerprint, "caption_config": config,
           "shards": {"total": shards, "done": shards, "failed": []},
           "rows": {"ok": totals["ok"], "error": totals["error"]},
           "images_per_s": shards * per_shard / elapsed, "tokens_per_s": totals["tokens"] / elapsed,
           "started_at": start, "finished_at": start + elapsed}
    storage.write_bytes(output.run_path, json.dumps(run, indent=1).encode())
    if mark_complete:   # every input shard of this fake run is committed: it becomes the current version
        output.mark_complete()
    return run
