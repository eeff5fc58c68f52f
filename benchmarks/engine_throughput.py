"""Captioning throughput of the vLLM engine against the transformers reference, same process.

Builds the tiny random-weight LLaVA (recaption/tiny.py) in a temporary folder, draws the same
synthetic shape images for both engines and captions them with the same prompt, greedy
decoding, float32 and the same max tokens. Each engine is started (start-up plus one warm-up
image, timed and reported separately), then captions all images in one timed call. Prints
images/s and tokens/s of each, the vLLM/transformers ratio, and whether the greedy tokens agree.

On a shared machine the transformers figure depends strongly on --torch-threads: torch's
OpenMP threads spin-wait, so with every core busy elsewhere 1 thread can beat all of them.

    VLLM_LOGGING_LEVEL=WARNING python -m benchmarks.engine_throughput
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from dataclasses import dataclass

import torch
from PIL import Image

from dataset.synthetic.shapes import draw_shape, random_sample
from recaption.engines import EngineConfig, Generation, SamplingConfig, make_engine
from recaption.prompt import DEFAULT_PROMPT, PromptBuilder
from recaption.tiny import build_tiny_llava


@dataclass
class Run:
    backend: str
    startup_s: float
    seconds: float
    generations: list[Generation]

    @property
    def tokens(self) -> int:
        return sum(g.num_tokens for g in self.generations)


def shape_images(count: int, seed: int) -> list[Image.Image]:
    rng = random.Random(seed)
    return [draw_shape(random_sample(rng), rng.choice((64, 96, 160, 256)), rng) for _ in range(count)]


def run_engine(config: EngineConfig, sampling: SamplingConfig, images: list[Image.Image]) -> Run:
    start = time.perf_counter()
    engine = make_engine(config, sampling)
    prompt = PromptBuilder(engine.processor, DEFAULT_PROMPT).build()
    engine.generate([prompt], images[:1])  # warm-up, counted as start-up
    startup = time.perf_counter() - start
    start = time.perf_counter()
    generations = engine.generate([prompt] * len(images), images)
    seconds = time.perf_counter() - start
    engine.close()
    return Run(config.backend, startup, seconds, generations)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="synthetic images captioned by each engine (default 64)")
    p.add_argument("--max-tokens", type=int, default=64, help="max new tokens per caption, both engines (default 64)")
    p.add_argument("--hf-batch-size", type=int, default=EngineConfig.batch_size,
                   help=f"images per transformers generate() call (default {EngineConfig.batch_size}, "
                        "the engine's default)")
    p.add_argument("--torch-threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads for the transformers engine (default {torch.get_num_threads()}, "
                        "torch's default: every core)")
    p.add_argument("--max-model-len", type=int, default=512, help="vLLM context length (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for the images and the tiny model (default 0)")
    a = p.parse_args()
    torch.set_num_threads(a.torch_threads)

    images = shape_images(a.images, a.seed)
    sampling = SamplingConfig(max_tokens=a.max_tokens, temperature=0.0, seed=a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_llava(tmp, seed=a.seed))
        common = dict(model=model, dtype="float32", max_model_len=a.max_model_len)
        # The reference first: once done it sits idle in this process while vLLM's workers run.
        reference = run_engine(EngineConfig(backend="transformers", batch_size=a.hf_batch_size, **common),
                               sampling, images)
        vllm = run_engine(EngineConfig(backend="vllm", **common), sampling, images)

    same = sum(x.token_ids == y.token_ids for x, y in zip(vllm.generations, reference.generations))
    print(f"tiny LLaVA, {a.images} images, max {a.max_tokens} new tokens, greedy, float32, "
          f"transformers on {a.torch_threads} torch threads in batches of {a.hf_batch_size}")
    print(f"{'engine':<14}{'start-up s':>11}{'run s':>8}{'images/s':>10}{'tokens':>8}{'tokens/s':>10}")
    for r in (vllm, reference):
        print(f"{r.backend:<14}{r.startup_s:>11.1f}{r.seconds:>8.2f}{a.images / r.seconds:>10.1f}"
              f"{r.tokens:>8}{r.tokens / r.seconds:>10.0f}")
    print(f"vLLM / transformers images/s: {reference.seconds / vllm.seconds:.2f}x")
    print(f"identical greedy token ids: {same} of {a.images} images")


if __name__ == "__main__":
    main()
