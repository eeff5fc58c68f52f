"""Throughput of the whole recaption job against ONE bare `LLM.generate` over the same images, one session.

Builds a random-weight LLaVA (recaption/tiny.py, with a language model large enough that one caption
costs at least 10x decoding its image, as on a GPU where decoding is nearly free next to the model)
and synthetic img2dataset shards, then alternates for --rounds rounds:

- bare: `vllm.LLM` in this process with the job's pinned engine settings; every image decoded and
        prompted beforehand (the job's prepare_image and prompts; the decode time per image is
        printed), a warm-up on one image, then ONE timed `generate` over all images.
- job:  the job as users run it (`pipelines/recaption.py`'s main, local Ray, one caption worker on all
        cores with its own engine, reading and decoding on the same cores) into a fresh output.
        Throughput = rows / (last shard committed - first shard started), from the ledgers: engine
        start-up is excluded and reported apart; reading, decoding, generating and writing are in.

Also printed: the engine's busy share (any request in it) and full share (more requests than it runs
at once) from the job's _run.json, and each shard's span. `--backend null` (the smoke size) runs
both sides on the null engine (its own one-call `generate` as the bare side): the same code path,
no engine start.

    python -m benchmarks.job_overhead
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.record import Record, alternate, parse
from dataset.images import prepare_image
from dataset.outputs import load_finished
from dataset.reader import ShardReader
from dataset.synthetic.input_shards import write_shards
from pipelines import recaption as recaption_cli
from recaption.engines import CPU_KV_CACHE_BYTES, cpu_backend_reserves_ram, load_processor, make_engine
from recaption.job import CaptionJob
from recaption.prompt import PromptBuilder
from recaption.tiny import build_tiny_llava

SMOKE = {"backend": "null", "shards": 2, "per_shard": 4, "image_size": 64, "max_tokens": 4, "text_hidden": 64,
         "text_layers": 1, "rounds": 1}


class Bare:
    """The job's requests, decoded in memory before any timing, and one engine to caption them in one call:
    `vllm.LLM` for the vllm backend (vLLM's own offline loop), else the engine's own `generate`."""

    def __init__(self, job: CaptionJob, shard_paths: list[Path]):
        e, s = job.engine, job.sampling
        start = time.perf_counter()
        prompts = PromptBuilder(load_processor(e), job.prompt)
        samples = [sample for path in shard_paths for sample in ShardReader(str(path)) if sample.image]
        decode_start = time.perf_counter()
        images = [prepare_image(sample.image, job.image).image for sample in samples]
        self.decode_s = (time.perf_counter() - decode_start) / len(images)
        self.prompts = [prompts.build(sample.org_caption or "") for sample in samples]
        self.images = images
        if e.backend == "vllm":
            from vllm import LLM, SamplingParams

            extra = {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES} if cpu_backend_reserves_ram(e.engine_kwargs) else {}
            llm = LLM(model=e.model, dtype=e.dtype, max_model_len=e.max_model_len, seed=s.seed,
                      limit_mm_per_prompt={"image": 1}, **extra, **e.engine_kwargs)
            params = SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, seed=s.seed)
            requests = [{"prompt": prompt, "multi_modal_data": {"image": image}}
                        for prompt, image in zip(self.prompts, images, strict=True)]
            self.generate = lambda n: llm.generate(requests[:n], params, use_tqdm=False)
        else:
            engine = make_engine(e, s)
            self.generate = lambda n: engine.generate(self.prompts[:n], self.images[:n])
        self.generate(1)  # warm-up
        self.startup_s = time.perf_counter() - start

    def images_per_s(self) -> float:
        start = time.perf_counter()
        self.generate(len(self.images))
        return len(self.images) / (time.perf_counter() - start)


class Job:
    """The users' command, run in-process into a fresh output each round."""

    def __init__(self, argv: list[str], root: Path):
        self.argv, self.root = argv, root
        self.runs: list[dict] = []

    def images_per_s(self) -> float:
        out = str(self.root / f"out-{len(self.runs)}")
        start = time.time()
        if recaption_cli.main(self.argv + ["--output", out]) != 0:
            raise SystemExit("the recaption job failed; see its output above")
        finished = load_finished(out)
        ledgers = sorted(finished.ledgers, key=lambda ledger: ledger["started_at"])
        first = ledgers[0]["started_at"]
        span = max(ledger["finished_at"] for ledger in ledgers) - first
        self.runs.append({"startup_s": first - start, "images": sum(ledger["rows_out"] for ledger in ledgers),
                          "span_s": span, "engine_busy_share": finished.run["engine_busy_share"],
                          "engine_queued_share": finished.run["engine_queued_share"],
                          "shards": [(ledger["shard"], ledger["first_request_at"] - first,
                                      ledger["finished_at"] - first) for ledger in ledgers]})
        return self.runs[-1]["images"] / span


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["vllm", "null"], default="vllm",
                   help="the engine of both sides (default vllm)")
    p.add_argument("--shards", type=int, default=4, help="input shards (default 4)")
    p.add_argument("--per-shard", type=int, default=128, help="images per shard (default 128)")
    p.add_argument("--image-size", type=int, default=512,
                   help="side of the synthetic JPEGs; img2dataset stores DataComp at <= 512 px (default 512)")
    p.add_argument("--max-tokens", type=int, default=64, help="max new tokens per caption (default 64)")
    p.add_argument("--text-hidden", type=int, default=512, help="language model width (default 512)")
    p.add_argument("--text-layers", type=int, default=8, help="language model layers (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="alternating bare / job runs (default 3)")
    a = parse(p, argv, SMOKE)
    record = Record("job_overhead", a, argv)
    cores = str(len(os.sched_getaffinity(0)))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_tiny_llava(root / "model", text_hidden=a.text_hidden, text_layers=a.text_layers)
        write_shards(root / "shards", a.shards, a.per_shard, image_size=a.image_size)
        job_argv = ["--input", str(root / "shards"), "--model", str(model), "--backend", a.backend,
                    "--max-tokens", str(a.max_tokens), "--num-workers", "1", "--cpus-per-worker", cores,
                    "--progress-every", "3600"]
        pinned = recaption_cli.config_from_args(recaption_cli.parse_args(job_argv + ["--output", tmp])).job.pinned()
        bare = Bare(pinned, sorted((root / "shards").glob("*.tar")))
        job = Job(job_argv, root)
        rates = alternate(a.rounds, {"bare": bare.images_per_s, "job": job.images_per_s})
        import ray

        ray.shutdown()

    caption_s = 1 / statistics.median(rates["bare"])
    print(f"\nrandom LLaVA (language model {a.text_layers} x {a.text_hidden}), {a.backend} backend, {a.shards} shards "
          f"x {a.per_shard} JPEGs of {a.image_size} px, max {a.max_tokens} tokens, greedy, {os.cpu_count()} cores")
    print(f"one bare caption {caption_s * 1000:.1f} ms (amortised in the one call) vs decoding its image "
          f"{bare.decode_s * 1000:.1f} ms: {caption_s / bare.decode_s:.1f}x (wanted >= 10x)")
    record.figures.update({
        "images": len(bare.images), "bare start-up s": round(bare.startup_s, 2),
        "decode ms per image": round(bare.decode_s * 1000, 3), "caption / decode": round(caption_s / bare.decode_s, 2),
        "job start-up s": [round(run["startup_s"], 2) for run in job.runs],
        "engine busy share": [round(run["engine_busy_share"], 4) for run in job.runs],
        "engine full share": [round(run["engine_queued_share"], 4) for run in job.runs]})
    for run in job.runs:
        print(f"job: start-up {run['startup_s']:.1f} s; engine busy {run['engine_busy_share']:.0%} of its span, "
              f"full {run['engine_queued_share']:.0%}; shards (first request .. committed, s from the first start): "
              + "; ".join(f"{shard} {begin:.2f}..{end:.2f}" for shard, begin, end in run["shards"]))
    record.compare("whole job vs one bare generate", "images/s", ("bare, one call", rates["bare"]),
                   ("job (Ray, 1 worker)", rates["job"]))
    record.write()


if __name__ == "__main__":
    main()
