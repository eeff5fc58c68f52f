"""The caption engines on the tiny LLaVA with default flags: pinned settings, streaming, and vLLM == transformers."""
import json
import random
from pathlib import Path

import pytest

from dataset.synthetic.shapes import draw_shape, random_sample
from recaption.engines import EngineConfig, RequestRejected, SamplingConfig, make_engine, vllm_engine_args
from recaption.job import CaptionJob
from recaption.prompt import DEFAULT_PROMPT, PromptBuilder

pytestmark = pytest.mark.slow


def shape_images(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [draw_shape(random_sample(rng), rng.choice([64, 96, 160]), rng) for _ in range(n)]


def test_default_flags_pin_the_checkpoint_dtype_and_context(tiny_model):
    pinned = EngineConfig(tiny_model).pinned()
    config = json.loads(Path(tiny_model, "config.json").read_text())
    assert pinned.dtype == config["dtype"] == "float32"
    assert pinned.max_model_len == config["text_config"]["max_position_embeddings"]
    assert pinned.model_version.startswith("sha256:")
    with pytest.raises(ValueError, match="above the 2048 positions"):
        EngineConfig(tiny_model, max_model_len=4096).pinned()
    with pytest.raises(ValueError, match="too short"):
        CaptionJob(EngineConfig(tiny_model, max_model_len=64), SamplingConfig(max_tokens=48)).pinned()


def test_default_flags_vllm_greedy_equals_transformers_greedy(tiny_model, vllm_engine):
    reference = make_engine(EngineConfig(tiny_model, backend="transformers"), SamplingConfig(max_tokens=48))
    prompts = PromptBuilder(reference.processor, DEFAULT_PROMPT)
    images = shape_images(10)
    texts = [prompts.build()] * len(images)

    ours = vllm_engine.generate(texts, images)
    theirs = reference.generate(texts, images)

    assert len(ours) == len(theirs) == 10
    for a, b in zip(ours, theirs, strict=True):
        assert a.token_ids == b.token_ids
        assert a.finish_reason == b.finish_reason
        assert a.num_tokens == len(a.token_ids) > 0
    assert len({tuple(g.token_ids) for g in ours}) > 1, "captions should depend on the image"


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_streaming_rejects_one_request_and_aborts_another(tiny_model, vllm_engine, backend):
    engine = vllm_engine if backend == "vllm" else make_engine(
        EngineConfig(tiny_model, backend="transformers", batch_size=2), SamplingConfig(max_tokens=48))
    prompt = PromptBuilder(engine.processor, DEFAULT_PROMPT).build()
    images = shape_images(4, seed=5)
    for i, image in enumerate(images):
        engine.add(f"ok-{i}", prompt, image)
    with pytest.raises(RequestRejected, match="2048"):
        engine.add("too-long", prompt + " 雨" * 2048, images[0])   # byte tokens: 3 per character
    engine.abort(["ok-3"])
    finished = {}
    while engine.num_unfinished():
        finished.update(engine.step())
    assert sorted(finished) == ["ok-0", "ok-1", "ok-2"]
    assert all(g.num_tokens <= 48 and g.finish_reason in ("stop", "length") for g in finished.values())


def test_vllm_args_pin_the_pil_backend_and_carry_batch_invariance(tiny_model):
    """vLLM loads the folder's processor with `mm_processor_kwargs`: the PIL backend is pinned there (user keys
    kept); batch invariance is an environment variable of the engine process, asked for as an engine option
    so that it enters the fingerprint (tests/test_convert.py checks the pixels vLLM then computes)."""
    from vllm import EngineArgs

    config = EngineConfig(tiny_model, engine_kwargs={"batch_invariant": True, "mm_processor_kwargs": {"do_pad": True}})
    assert config.output_options()["batch_invariant"] is True
    kwargs, env = vllm_engine_args(config.pinned(), seed=0)
    assert env == {"VLLM_BATCH_INVARIANT": "1"} and "batch_invariant" not in kwargs
    assert kwargs["mm_processor_kwargs"] == {"backend": "pil", "do_pad": True}
    EngineArgs(**kwargs)  # every key is an EngineArgs option
    assert vllm_engine_args(EngineConfig(tiny_model).pinned(), seed=0)[1] == {}


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_each_request_samples_under_its_own_config_and_seed(tiny_model, vllm_engine, backend):
    engine = vllm_engine if backend == "vllm" else make_engine(
        EngineConfig(tiny_model, backend="transformers", batch_size=4), SamplingConfig(max_tokens=48))
    prompt = PromptBuilder(engine.processor, DEFAULT_PROMPT).build()
    images = shape_images(3, seed=9) * 2
    greedy = SamplingConfig(max_tokens=12)
    sampled = [SamplingConfig(max_tokens=12, temperature=1.5, top_k=50, seed=seed) for seed in (1, 2, 3)]

    alone = engine.generate([prompt] * 3, images[:3], [greedy] * 3)
    mixed = engine.generate([prompt] * 6, images, [greedy, greedy, greedy, *sampled])
    again = engine.generate([prompt] * 3, images[3:], sampled)

    assert [g.token_ids for g in mixed[:3]] == [g.token_ids for g in alone], "greedy, whatever shares the batch"
    assert [g.token_ids for g in mixed[3:]] == [g.token_ids for g in again], "a seeded request draws the same"
    assert [g.token_ids for g in mixed[3:]] != [g.token_ids for g in alone], "the sampled ones do sample"
    assert all(g.num_tokens <= 12 for g in mixed)
