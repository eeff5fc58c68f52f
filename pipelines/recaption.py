"""Recaption img2dataset shards with a LLaVA model on vLLM in Ray actors: resumable, exactly once.

  ray job submit --working-dir . -- python pipelines/recaption.py --input 's3://b/shards/{00000..00099}.tar' \\
      --output s3://b/recap --model ORG/llava-llama-3-8b-hqedit-hf    # Recap-DataComp-1B's captioner, converted
  python pipelines/recaption.py --input shards/ --output out/ --model MODEL   # local Ray instance
  python pipelines/recaption.py ... --plan --gpu-hour-price 2.5               # sample run + cost, writes nothing
  python pipelines/recaption.py ... --captions recaption/caption_sets/recap_v1_v2.toml   # v1 and v2, one pass
"""
from __future__ import annotations

import _bootstrap  # noqa: F401  (first: the repository's packages, not pipelines/, on sys.path)

import argparse
import json
import sys

from dataset import reader
from dataset.images import ImageConfig
from dataset.logs import one_line_errors
from recaption.captions import load_caption_set
from recaption.engines import EngineConfig, SamplingConfig
from recaption.job import CaptionJob
from recaption.prompt import load_prompt
from recaption.stage import RunConfig, run
from runner import cli


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("want a JSON object, e.g. '{\"enable_prefix_caching\": true}'")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("data")
    io.add_argument("--input", required=True,
                    help="input shards: a folder, a glob, a brace range 'data/{00000..00099}.tar' or s3://bucket/prefix")
    io.add_argument("--output", required=True, help="output folder or s3://bucket/prefix (parquet/, wds/, _ledger/)")
    io.add_argument("--no-wds", action="store_true", help="write only Parquet, not the WebDataset copy for training")
    io.add_argument("--max-shards", type=int, help="caption at most this many pending shards (smoke runs)")
    reader.add_arguments(io)
    m = p.add_argument_group("model and decoding")
    m.add_argument("--model", required=True, help="Hugging Face id or local folder of a LLaVA-style model")
    m.add_argument("--revision", help="model revision; resolved to a commit at start and recorded in the fingerprint")
    m.add_argument("--backend", choices=["vllm", "transformers", "null"], default=EngineConfig.backend,
                   help="vllm for production; transformers is the slow reference; null answers a fixed caption "
                        "instantly (measures the data plane)")
    m.add_argument("--prompt", help="instruction text or a file holding it; may use {org_caption}. "
                                    "Default: Recap-DataComp-1B's detailed-caption prompt")
    m.add_argument("--captions", metavar="FILE",
                   help="a caption set (TOML, or JSON): several caption columns per image in one pass, each with "
                        "its prompt, sampling and max tokens (recaption/captions.py), e.g. "
                        "recaption/caption_sets/recap_v1_v2.toml. Default: re_caption alone, from --prompt and the "
                        "sampling flags, which a set replaces")
    m.add_argument("--chat-template", default=EngineConfig.chat_template,
                   help="the captioner's conversation format: conv_llama3, llava_llama_3, none or 'system:TEXT' "
                        "(recaption/prompt.py; LLaMA-3 tokenizers only). Default: the model folder's own")
    m.add_argument("--max-tokens", type=int, default=SamplingConfig.max_tokens,
                   help="new tokens per caption (Recap-DataComp-1B: 128)")
    m.add_argument("--temperature", type=float, default=SamplingConfig.temperature,
                   help="0 = greedy decoding (Recap-DataComp-1B)")
    m.add_argument("--top-k", type=int, default=SamplingConfig.top_k, help="0 = off")
    m.add_argument("--top-p", type=float, default=SamplingConfig.top_p)
    m.add_argument("--seed", type=int, default=SamplingConfig.seed)
    m.add_argument("--dtype", default=EngineConfig.dtype,
                   help="auto: the checkpoint's own dtype, used by both backends and recorded; "
                        "or bfloat16, float16, float32")
    m.add_argument("--max-model-len", type=int, default=EngineConfig.max_model_len,
                   help="context per sequence (default: the model's; checked against image + prompt + max tokens)")
    m.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs,
                   help="sequences one vLLM engine runs at once (default: vLLM's for the hardware)")
    m.add_argument("--gpu-memory-utilization", type=float, default=EngineConfig.gpu_memory_utilization)
    m.add_argument("--engine-kwargs", type=json_object, default={},
                   help="other vLLM engine options as JSON, e.g. '{\"max_num_batched_tokens\": 16384, "
                        "\"enable_prefix_caching\": true}'; options that can change captions enter the fingerprint")
    m.add_argument("--max-side", type=int, default=ImageConfig.max_side,
                   help="downscale images so their longest side is at most this before the engine")
    m.add_argument("--max-pixels", type=int, default=ImageConfig.max_pixels,
                   help="refuse images whose header claims more pixels (decompression bombs)")
    m.add_argument("--min-image-side", type=int, default=ImageConfig.min_side,
                   help="refuse images with a side below this many px (error 'small')")
    m.add_argument("--max-aspect-ratio", type=float, default=ImageConfig.max_aspect_ratio,
                   help="refuse images more elongated than this (error 'aspect')")
    r = p.add_argument_group("workers and cluster")
    r.add_argument("--tensor-parallel-size", type=int, default=EngineConfig.tensor_parallel_size,
                   help="GPUs one engine spans (an 8B model in 16 bits: 1 on 40 GB+ cards, 2 on 24 GB cards)")
    r.add_argument("--window", type=int, default=CaptionJob.window,
                   help="requests in one engine at once, across shard boundaries "
                        "(default: twice what the engine runs at once)")
    cli.add_runner_arguments(r, RunConfig.runner)
    c = p.add_argument_group("cost")
    c.add_argument("--plan", action="store_true",
                   help="caption a sample on one worker, print images/s, tokens/s and the GPU-hours for the whole "
                        "input; writes no outputs")
    c.add_argument("--gpu-hour-price", type=float, default=RunConfig.runner.gpu_hour_price,
                   help="price of one GPU-hour: the projection then shows the cost")
    v = p.add_argument_group("reruns and output")
    v.add_argument("--retry-errors", action="store_true", help="re-caption only status='error' rows of done shards")
    v.add_argument("--new-version", action="store_true",
                   help="allow a run whose fingerprint differs from the output's: every shard is captioned again")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> RunConfig:
    engine = EngineConfig(model=a.model, revision=a.revision, backend=a.backend, dtype=a.dtype,
                          max_model_len=a.max_model_len, gpu_memory_utilization=a.gpu_memory_utilization,
                          tensor_parallel_size=a.tensor_parallel_size, max_num_seqs=a.max_num_seqs,
                          engine_kwargs=a.engine_kwargs, chat_template=a.chat_template)
    sampling = SamplingConfig(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                              seed=a.seed)
    captions = load_caption_set(a.captions) if a.captions else ()
    if captions and (a.prompt or sampling != SamplingConfig()):
        raise ValueError("--captions names each column's prompt and sampling: drop --prompt, --max-tokens, "
                         "--temperature, --top-k, --top-p and --seed")
    job = CaptionJob(engine, sampling, prompt=load_prompt(a.prompt), captions=captions,
                     image=ImageConfig(max_side=a.max_side, max_pixels=a.max_pixels, min_side=a.min_image_side,
                                       max_aspect_ratio=a.max_aspect_ratio),
                     limits=reader.limits_from_args(a), write_wds=not a.no_wds, window=a.window)
    return RunConfig(input=a.input, output=a.output, job=job, runner=cli.runner_config(a, RunConfig.runner),
                     retry_errors=a.retry_errors, new_version=a.new_version, max_shards=a.max_shards, plan=a.plan)


@one_line_errors("recaption")
def main(argv: list[str] | None = None) -> int:
    return run(config_from_args(parse_args(argv)))  # a config that cannot work ends in one line, exit 2


if __name__ == "__main__":
    sys.exit(main())
