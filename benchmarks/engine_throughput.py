"""Captioning throughput of the vLLM engine against the transformers reference, same process.

Builds the tiny random-weight LLaVA (recaption/tiny.py) in a temporary folder, draws the same
synthetic shape images for both engines and captions them with the same prompt, greedy
decoding, float32 and the same max tokens. Both engines are started first (start-up plus one
warm-up image, timed and reported separately); then each captions all images in one call,
transformers (the baseline) and vLLM alternately for --rounds rounds. Prints images/s and
tokens/s of each, the vLLM/transformers ratio, and whether the greedy tokens agree.

On a shared machine the transformers figure depends strongly on --torch-threads: torch's
OpenMP threads spin-wait, so with every core busy elsewhere 1 thread can beat all of them.
`--candidate null` (the smoke size) swaps vLLM for the null engine: the same code path, no engine start.

    VLLM_LOGGING_LEVEL=WARNING python -m benchmarks.engine_throughput
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch
from PIL import Image

from benchmarks.record import Record, alternate, parse
from dataset.synthetic.shapes import draw_shape, random_sample
from recaption.engines import CaptionEngine, EngineConfig, Generation, SamplingConfig, make_engine
from recaption.prompt import DEFAULT_PROMPT, PromptBuilder
from recaption.tiny import build_tiny_llava

SMOKE = {"images": 4, "max_tokens": 4, "rounds": 2, "candidate": "null"}


class Timed:
    """A started engine and the generations of its last timed call."""

    def __init__(self, config: EngineConfig, sampling: SamplingConfig, images: list[Image.Image]):
        start = time.perf_counter()
        self.engine: CaptionEngine = make_engine(config, sampling)
        self.backend = config.backend
        self.prompt = PromptBuilder(self.engine.processor, DEFAULT_PROMPT).build()
        self.images = images
        self.engine.generate([self.prompt], images[:1])  # warm-up, counted as start-up
        self.startup_s = time.perf_counter() - start
        self.generations: list[Generation] = []
        self.tokens: list[int] = []

    def images_per_s(self) -> float:
        start = time.perf_counter()
        self.generations = self.engine.generate([self.prompt] * len(self.images), self.images)
        seconds = time.perf_counter() - start
        self.tokens.append(sum(g.num_tokens for g in self.generations))
        return len(self.images) / seconds


def shape_images(count: int, seed: int) -> list[Image.Image]:
    rng = random.Random(seed)
    return [draw_shape(random_sample(rng), rng.choice((64, 96, 160, 256)), rng) for _ in range(count)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="synthetic images captioned by each engine (default 64)")
    p.add_argument("--max-tokens", type=int, default=64, help="max new tokens per caption, both engines (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed calls per engine (default 3)")
    p.add_argument("--candidate", choices=["vllm", "null"], default="vllm",
                   help="the engine measured against transformers (default vllm)")
    p.add_argument("--hf-batch-size", type=int, default=EngineConfig.batch_size,
                   help=f"images per transformers generate() call (default {EngineConfig.batch_size}, "
                        "the engine's default)")
    p.add_argument("--torch-threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads for the transformers engine (default {torch.get_num_threads()}, "
                        "torch's default: every core)")
    p.add_argument("--max-model-len", type=int, default=512, help="vLLM context length (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for the images and the tiny model (default 0)")
    a = parse(p, argv, SMOKE)
    record = Record("engine_throughput", a, argv)
    torch.set_num_threads(a.torch_threads)

    images = shape_images(a.images, a.seed)
    sampling = SamplingConfig(max_tokens=a.max_tokens, temperature=0.0, seed=a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_llava(tmp, seed=a.seed))
        common = dict(model=model, dtype="float32", max_model_len=a.max_model_len)
        reference = Timed(EngineConfig(backend="transformers", batch_size=a.hf_batch_size, **common), sampling, images)
        candidate = Timed(EngineConfig(backend=a.candidate, **common), sampling, images)
        rates = alternate(a.rounds, {"transformers": reference.images_per_s, a.candidate: candidate.images_per_s})
        reference.engine.close()
        candidate.engine.close()

    same = sum(x.token_ids == y.token_ids for x, y in zip(candidate.generations, reference.generations, strict=True))
    print(f"tiny LLaVA, {a.images} images, max {a.max_tokens} new tokens, greedy, float32, "
          f"transformers on {a.torch_threads} torch threads in batches of {a.hf_batch_size}")
    for engine in (reference, candidate):
        record.figures[f"{engine.backend} start-up s"] = round(engine.startup_s, 2)
        record.figures[f"{engine.backend} tokens per call"] = engine.tokens[-1]
        print(f"  {engine.backend:<14} start-up {engine.startup_s:6.1f} s, {engine.tokens[-1]} tokens per call")
    record.figures["identical greedy outputs"] = same
    record.figures["images"] = a.images
    record.compare("tiny LLaVA captions", "images/s", ("transformers", rates["transformers"]),
                   (a.candidate, rates[a.candidate]))
    print(f"identical greedy token ids: {same} of {a.images} images")
    record.write()


if __name__ == "__main__":
    main()
