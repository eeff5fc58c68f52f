"""Throughput of the whole recaption job against ONE bare `LLM.generate` over the same images, one session.

Builds a random-weight LLaVA (recaption/tiny.py, with a language model large enough that one caption
costs at least 10x decoding its image, as on a GPU where decoding is nearly free next to the model)
and synthetic img2dataset shards, then:

- bare: `vllm.LLM` in this process with the job's pinned engine settings; every image decoded and
        prompted beforehand (the job's prepare_image and prompts; the decode time per image is
        printed), a warm-up on one image, then ONE timed `generate` over all images.
- job:  the Ray job as `pipelines/recaption.py` runs it (local Ray, one CaptionWorker actor on all
        cores with its own engine; the actor reads and decodes on the same cores). Throughput =
        rows / (last shard finished - first shard started): engine start-up is excluded and
        reported apart, reading, decoding, generating and writing are in.

The bare call runs before and after the job and their mean is the baseline (the machine's load
may drift). Also printed: the engine's busy share (any request in it) and full share (more
requests than it runs at once) from the job's _run.json, and each shard's span.

    python -m benchmarks.job_overhead
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from dataset.images import prepare_image
from dataset.synthetic.input_shards import write_shards
from pipelines.recaption import config_from_args, parse_args
from recaption import driver
from recaption.contract_adapter import ShardReader
from recaption.engines import CPU_KV_CACHE_BYTES, cpu_backend_reserves_ram, load_processor
from recaption.prompt import PromptBuilder
from recaption.tiny import build_tiny_llava


@dataclass
class JobResult:
    startup_s: float
    images: int
    span_s: float
    run: dict
    shards: list[dict]


class Bare:
    """`vllm.LLM` in this process and the job's requests, decoded in memory before any timing."""

    def __init__(self, cfg: driver.RunConfig, shard_paths: list[Path]):
        from vllm import LLM, SamplingParams

        e, s = cfg.job.engine, cfg.job.sampling
        start = time.perf_counter()
        extra = {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES} if cpu_backend_reserves_ram(e.engine_kwargs) else {}
        self.llm = LLM(model=e.model, dtype=e.dtype, max_model_len=e.max_model_len, seed=s.seed,
                       limit_mm_per_prompt={"image": 1}, **extra, **e.engine_kwargs)
        self.params = SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, seed=s.seed)
        prompts = PromptBuilder(load_processor(e), cfg.job.prompt)
        samples = [sample for path in shard_paths for sample in ShardReader(str(path)) if sample.image]
        decode_start = time.perf_counter()
        images = [prepare_image(sample.image, cfg.job.image).image for sample in samples]
        self.decode_s = (time.perf_counter() - decode_start) / len(images)
        self.requests = [{"prompt": prompts.build(sample.org_caption or ""), "multi_modal_data": {"image": image}}
                         for sample, image in zip(samples, images)]
        self.generate(self.requests[:1])  # warm-up
        self.startup_s = time.perf_counter() - start

    def generate(self, requests: list[dict]) -> float:
        start = time.perf_counter()
        self.llm.generate(requests, self.params, use_tqdm=False)
        return time.perf_counter() - start

    def one_call(self) -> float:
        return self.generate(self.requests)


def run_job(cfg: driver.RunConfig) -> JobResult:
    start = time.time()
    if driver.run(cfg) != 0:
        raise SystemExit("the recaption job failed; see its output above")
    ledgers = sorted((json.loads(p.read_text()) for p in Path(cfg.output, "_ledger").glob("*.json")),
                     key=lambda ledger: ledger["started_at"])
    first = ledgers[0]["started_at"]
    return JobResult(startup_s=first - start, images=sum(ledger["rows_out"] for ledger in ledgers),
                     span_s=max(ledger["finished_at"] for ledger in ledgers) - first,
                     run=json.loads(Path(cfg.output, "_run.json").read_text()),
                     shards=[{k: ledger[k] for k in ("shard", "started_at", "first_request_at", "finished_at")}
                             for ledger in ledgers])


def report(a: argparse.Namespace, job: JobResult, bare: Bare, before_s: float, after_s: float) -> None:
    one_call_s = (before_s + after_s) / 2
    images = len(bare.requests)
    caption_s = one_call_s / images
    job_ips, bare_ips = job.images / job.span_s, images / one_call_s
    print(f"\nrandom LLaVA (language model {a.text_layers} x {a.text_hidden}), {a.shards} shards x {a.per_shard} "
          f"JPEGs of {a.image_size} px, max {a.max_tokens} tokens, greedy, {os.cpu_count()} cores (shared machine)")
    print(f"one bare caption {caption_s * 1000:.1f} ms (amortised in the one call) vs decoding its image "
          f"{bare.decode_s * 1000:.1f} ms: {caption_s / bare.decode_s:.1f}x (wanted >= 10x)")
    print(f"{'path':<24}{'start-up s':>11}{'images':>8}{'seconds':>9}{'images/s':>10}   bare before / after s")
    print(f"{'job (Ray, 1 worker)':<24}{job.startup_s:>11.1f}{job.images:>8}{job.span_s:>9.2f}{job_ips:>10.1f}")
    print(f"{'bare, one call':<24}{bare.startup_s:>11.1f}{images:>8}{one_call_s:>9.2f}{bare_ips:>10.1f}"
          f"   {before_s:.2f} / {after_s:.2f}")
    print(f"job / bare one call: {job_ips / bare_ips:.2f}    (goal >= 0.95)")
    print(f"engine busy (any request in it) {job.run['engine_busy_share']:.0%} of its span; requests queued beyond "
          f"what it runs at once {job.run['engine_queued_share']:.0%}")
    first = job.shards[0]["started_at"]
    print("job shards, s from the first start (first request .. committed): " + "; ".join(
        f"{s['shard']} {s['first_request_at'] - first:.2f}..{s['finished_at'] - first:.2f}" for s in job.shards))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=4, help="input shards (default 4)")
    p.add_argument("--per-shard", type=int, default=128, help="images per shard (default 128)")
    p.add_argument("--image-size", type=int, default=512,
                   help="side of the synthetic JPEGs; img2dataset stores DataComp at <= 512 px (default 512)")
    p.add_argument("--max-tokens", type=int, default=64, help="max new tokens per caption (default 64)")
    p.add_argument("--text-hidden", type=int, default=512, help="language model width (default 512)")
    p.add_argument("--text-layers", type=int, default=8, help="language model layers (default 8)")
    a = p.parse_args()
    cores = str(len(os.sched_getaffinity(0)))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_llava(root / "model", text_hidden=a.text_hidden, text_layers=a.text_layers)
        write_shards(root / "shards", a.shards, a.per_shard, image_size=a.image_size)
        cfg = config_from_args(parse_args([
            "--input", str(root / "shards"), "--output", str(root / "out"), "--model", str(model),
            "--max-tokens", str(a.max_tokens), "--num-workers", "1", "--cpus-per-worker", cores,
            "--progress-every", "3600"]))
        cfg = replace(cfg, job=cfg.job.pinned())
        bare = Bare(cfg, sorted((root / "shards").glob("*.tar")))
        before = bare.one_call()
        job = run_job(cfg)
        import ray

        ray.shutdown()  # stops the actor and its engine before the second bare timing
        after = bare.one_call()
    report(a, job, bare, before, after)


if __name__ == "__main__":
    main()
