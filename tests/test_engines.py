"""Both caption engines on the tiny LLaVA: vLLM's greedy tokens equal transformers' greedy tokens."""
import random

import pytest

from dataset.synthetic.shapes import draw_shape, random_sample
from recaption.engines import EngineConfig, SamplingConfig, make_engine
from recaption.prompt import DEFAULT_PROMPT, PromptBuilder

pytestmark = pytest.mark.slow


def shape_images(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [draw_shape(random_sample(rng), rng.choice([64, 96, 160]), rng) for _ in range(n)]


def test_vllm_greedy_equals_transformers_greedy(tiny_model, vllm_engine):
    reference = make_engine(EngineConfig(tiny_model, backend="transformers", dtype="float32", batch_size=5),
                            SamplingConfig(max_tokens=48))
    prompts = PromptBuilder(reference.processor, DEFAULT_PROMPT)
    images = shape_images(10)
    texts = [prompts.build()] * len(images)

    ours = vllm_engine.generate(texts, images)
    theirs = reference.generate(texts, images)

    assert len(ours) == len(theirs) == 10
    for a, b in zip(ours, theirs):
        assert a.token_ids == b.token_ids
        assert a.finish_reason == b.finish_reason
        assert a.num_tokens == len(a.token_ids) > 0
    assert len({tuple(g.token_ids) for g in ours}) > 1, "captions should depend on the image"


def test_generation_fields_and_max_tokens(vllm_engine):
    prompts = PromptBuilder(vllm_engine.processor, "Describe {org_caption} in detail.")
    out = vllm_engine.generate([prompts.build("a red circle")], shape_images(1, seed=3))[0]
    assert isinstance(out.text, str)
    assert out.num_tokens <= 48
    assert out.finish_reason in ("stop", "length")
    if out.finish_reason == "length":
        assert out.num_tokens == 48
