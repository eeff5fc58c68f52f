"""Throughput of the whole recaption job against a bare `LLM.generate` on the same images, one session.

Builds the tiny random-weight LLaVA (recaption/tiny.py) and synthetic img2dataset shards, then:

- bare: starts vLLM in this process with the job's engine settings, decodes the shards into memory
        beforehand (the job's prepare_image and prompts), warms up on one image (counted as
        start-up), then times only `LLM.generate`: chunked like the job (per shard, --chunk-size
        images a call) and as one call over all images.
- job:  runs the Ray job as `pipelines/recaption.py` would (local Ray, one CaptionWorker actor with
        its own vLLM engine) and reads its ledgers. Throughput = rows of all ledgers / (last
        finished_at - first started_at): engine start-up is excluded and reported apart (start of
        run() to the first shard's start), while reading, decoding, generating and writing are in.

The bare timings run once before and once after the job (the bare engine idles meanwhile) and
their mean is the baseline, so a change in the machine's load during the session shifts both sides.
Prints images/s, the ratios job/bare, and where the job's span went: time inside generate()
(summed `generate_seconds` of the ledgers; the actor's lock serialises them) against the rest,
when the engine had nothing to do (the first shard's read and decode, decoding the next shard,
writing the last one, Ray round trips).

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_LOGGING_LEVEL=WARNING python -m benchmarks.job_overhead
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dataset.reader import ShardReader
from dataset.synthetic.input_shards import write_shards
from pipelines.recaption import config_from_args, parse_args
from recaption import driver
from recaption.engines import VllmEngine
from recaption.prompt import PromptBuilder
from recaption.shard import prepare_sample
from recaption.tiny import build_tiny_llava

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class JobResult:
    startup_s: float
    images: int
    span_s: float
    generate_s: float
    shards: list[dict]


@dataclass
class BareResult:
    images: int
    chunk_s: list[float]
    one_call_s: float

    @property
    def chunked_s(self) -> float:
        return sum(self.chunk_s)


class Bare:
    """A vLLM engine in this process and the job's requests, decoded in memory before any timing."""

    def __init__(self, cfg: driver.RunConfig, shard_paths: list[Path]):
        start = time.perf_counter()
        self.engine = VllmEngine(cfg.job.engine, cfg.job.sampling)
        prompts = PromptBuilder(self.engine.processor, cfg.job.prompt)
        self.chunks = []
        for path in shard_paths:
            prepared = [prepare_sample(s, cfg.job) for s in ShardReader(str(path))]
            requests = [{"prompt": prompts.build(p.sample.org_caption or ""),
                         "multi_modal_data": {"image": p.image.image}} for p in prepared if p.image is not None]
            self.chunks += [requests[i:i + cfg.job.chunk_size] for i in range(0, len(requests), cfg.job.chunk_size)]
        self.generate(self.chunks[0][:1])  # warm-up
        self.startup_s = time.perf_counter() - start

    def generate(self, requests: list[dict]) -> float:
        start = time.perf_counter()
        self.engine.llm.generate(requests, self.engine.params, use_tqdm=False)
        return time.perf_counter() - start

    def measure(self) -> BareResult:
        everything = [r for chunk in self.chunks for r in chunk]
        return BareResult(len(everything), [self.generate(chunk) for chunk in self.chunks], self.generate(everything))


def run_job(cfg: driver.RunConfig) -> JobResult:
    start = time.time()
    if driver.run(cfg) != 0:
        raise SystemExit("the recaption job failed; see its output above")
    ledgers = sorted((json.loads(p.read_text()) for p in Path(cfg.output, "_ledger").glob("*.json")),
                     key=lambda ledger: ledger["started_at"])
    first = ledgers[0]["started_at"]
    return JobResult(startup_s=first - start, images=sum(ledger["rows_out"] for ledger in ledgers),
                     span_s=max(ledger["finished_at"] for ledger in ledgers) - first,
                     generate_s=sum(ledger["generate_seconds"] for ledger in ledgers),
                     shards=[{k: ledger[k] for k in ("shard", "started_at", "finished_at", "generate_seconds")}
                             for ledger in ledgers])


def report(a: argparse.Namespace, job: JobResult, bare_startup_s: float, before: BareResult, after: BareResult) -> None:
    chunked_s = (before.chunked_s + after.chunked_s) / 2
    one_call_s = (before.one_call_s + after.one_call_s) / 2
    job_ips, chunked_ips, one_call_ips = job.images / job.span_s, before.images / chunked_s, before.images / one_call_s
    print(f"\ntiny LLaVA, {a.shards} shards x {a.per_shard} JPEGs of {a.image_size} px, max {a.max_tokens} tokens, "
          f"greedy, float32, chunk {a.chunk_size}")
    print(f"{'path':<28}{'start-up s':>11}{'images':>8}{'seconds':>9}{'images/s':>10}   bare before / after s")
    print(f"{'job (Ray, 1 worker)':<28}{job.startup_s:>11.1f}{job.images:>8}{job.span_s:>9.2f}{job_ips:>10.1f}")
    print(f"{'bare, chunked like the job':<28}{bare_startup_s:>11.1f}{before.images:>8}{chunked_s:>9.2f}"
          f"{chunked_ips:>10.1f}   {before.chunked_s:.2f} / {after.chunked_s:.2f}")
    print(f"{'bare, one call':<28}{'':>11}{before.images:>8}{one_call_s:>9.2f}{one_call_ips:>10.1f}"
          f"   {before.one_call_s:.2f} / {after.one_call_s:.2f}")
    print(f"job / bare chunked: {job_ips / chunked_ips:.2f}    job / bare one call: {job_ips / one_call_ips:.2f}"
          "    (goal >= 0.9)")
    print(f"job span {job.span_s:.2f} s = in generate() {job.generate_s:.2f} s (bare chunked {chunked_s:.2f} s)"
          f" + engine idle {job.span_s - job.generate_s:.2f} s: the engine was busy "
          f"{job.generate_s / job.span_s:.0%} of the span")
    first = job.shards[0]["started_at"]
    print("job shards, s from the first start: " + "; ".join(
        f"{s['shard']} {s['started_at'] - first:.2f}..{s['finished_at'] - first:.2f} "
        f"(generate {s['generate_seconds']:.2f})"
        for s in job.shards))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=4, help="input shards (default 4)")
    p.add_argument("--per-shard", type=int, default=64, help="images per shard (default 64)")
    p.add_argument("--image-size", type=int, default=512,
                   help="side of the synthetic JPEGs; img2dataset stores DataComp at <= 512 px (default 512)")
    p.add_argument("--max-tokens", type=int, default=32, help="max new tokens per caption (default 32)")
    p.add_argument("--chunk-size", type=int, default=64, help="images per generate call in the job (default 64)")
    p.add_argument("--max-model-len", type=int, default=512, help="vLLM context length (default 512)")
    a = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("OPENVISION_RAY_WORKER_LOGS", "0")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_llava(root / "model")
        write_shards(root / "shards", a.shards, a.per_shard, image_size=a.image_size)
        cfg = config_from_args(parse_args([
            "--input", str(root / "shards"), "--output", str(root / "out"), "--model", str(model),
            "--backend", "vllm", "--dtype", "float32", "--max-tokens", str(a.max_tokens),
            "--max-model-len", str(a.max_model_len), "--chunk-size", str(a.chunk_size), "--num-workers", "1",
            "--progress-every", "3600"]))
        bare = Bare(cfg, sorted((root / "shards").glob("*.tar")))
        before = bare.measure()
        job = run_job(cfg)
        import ray

        ray.shutdown()  # stops the actor and its engine before the second bare timing
        after = bare.measure()
    report(a, job, bare.startup_s, before, after)


if __name__ == "__main__":
    main()
