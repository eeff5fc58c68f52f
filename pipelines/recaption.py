"""Recaption img2dataset shards with a LLaVA model on vLLM in Ray actors: resumable, exactly once.

  ray job submit --working-dir . -- python pipelines/recaption.py --input 's3://b/shards/{00000..00099}.tar' \\
      --output s3://b/recap --model llava-hf/llama3-llava-next-8b-hf
  python pipelines/recaption.py --input shards/ --output out/ --model MODEL   # local Ray instance
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse
import sys

from recaption.driver import RunConfig, run
from recaption.engines import EngineConfig, SamplingConfig
from recaption.images import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, ImageConfig
from recaption.job import CaptionJob
from recaption.prompt import load_prompt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("data")
    io.add_argument("--input", required=True,
                    help="input shards: a folder, a glob, a brace range 'data/{00000..00099}.tar' or s3://bucket/prefix")
    io.add_argument("--output", required=True, help="output folder or s3://bucket/prefix (parquet/, wds/, _ledger/)")
    io.add_argument("--no-wds", action="store_true", help="write only Parquet, not the WebDataset copy for training")
    io.add_argument("--max-shards", type=int, help="caption at most this many pending shards (smoke runs)")
    m = p.add_argument_group("model and decoding")
    m.add_argument("--model", required=True, help="Hugging Face id or local folder of a LLaVA-style model")
    m.add_argument("--revision", help="model revision (commit) to pin; recorded in the fingerprint")
    m.add_argument("--backend", choices=["vllm", "transformers", "null"], default="vllm",
                   help="vllm for production; transformers is the slow reference; null answers a fixed caption "
                        "instantly (measures the data plane)")
    m.add_argument("--prompt", help="instruction text or a file holding it; may use {org_caption}. "
                                    "Default: Recap-DataComp-1B's detailed-caption prompt")
    m.add_argument("--max-tokens", type=int, default=128, help="new tokens per caption (Recap-DataComp-1B: 128)")
    m.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding (Recap-DataComp-1B)")
    m.add_argument("--top-k", type=int, default=0, help="0 = off")
    m.add_argument("--top-p", type=float, default=1.0)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default="auto", help="model dtype: auto (from the config), bfloat16, float16, float32")
    m.add_argument("--max-model-len", type=int, default=4096, help="context length vLLM reserves per sequence")
    m.add_argument("--max-num-seqs", type=int, default=256, help="sequences vLLM decodes at once per worker")
    m.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    m.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                   help="downscale images so their longest side is at most this before the engine")
    m.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse images whose header claims more pixels (decompression bombs)")
    m.add_argument("--chunk-size", type=int, default=256,
                   help="images decoded and handed to the engine per generate call")
    r = p.add_argument_group("cluster")
    r.add_argument("--num-workers", type=int, help="caption actors (default: cluster GPUs / GPUs per worker, 1 on CPU)")
    r.add_argument("--gpus-per-worker", type=float, help="GPUs per actor (default: --tensor-parallel-size; 0 on CPU)")
    r.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs one engine spans (8B fits on one GPU)")
    r.add_argument("--max-attempts", type=int, default=3, help="tries per shard before it is reported failed")
    r.add_argument("--claim-ttl", type=float, default=120.0,
                   help="seconds without a heartbeat after which another driver may take a claimed shard")
    r.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    v = p.add_argument_group("reruns")
    v.add_argument("--retry-errors", action="store_true", help="re-caption only status='error' rows of done shards")
    v.add_argument("--new-version", action="store_true",
                   help="allow a run whose fingerprint differs from the output's: every shard is captioned again")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> RunConfig:
    engine = EngineConfig(model=a.model, revision=a.revision, backend=a.backend, dtype=a.dtype,
                          max_model_len=a.max_model_len, gpu_memory_utilization=a.gpu_memory_utilization,
                          tensor_parallel_size=a.tensor_parallel_size, max_num_seqs=a.max_num_seqs)
    sampling = SamplingConfig(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                              seed=a.seed)
    job = CaptionJob(engine, sampling, prompt=load_prompt(a.prompt),
                     image=ImageConfig(max_side=a.max_side, max_pixels=a.max_pixels),
                     write_wds=not a.no_wds, chunk_size=a.chunk_size)
    return RunConfig(input=a.input, output=a.output, job=job, num_workers=a.num_workers,
                     gpus_per_worker=a.gpus_per_worker, retry_errors=a.retry_errors, new_version=a.new_version,
                     max_shards=a.max_shards, max_attempts=a.max_attempts, claim_ttl=a.claim_ttl,
                     progress_every=a.progress_every)


def main(argv: list[str] | None = None) -> int:
    return run(config_from_args(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
