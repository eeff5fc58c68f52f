"""Caption engines behind one small interface: vLLM (production) and transformers (reference)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Protocol

from PIL import Image


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy, as Recap-DataComp-1B
    top_k: int = 0            # 0 = off
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class EngineConfig:
    model: str
    revision: str | None = None
    backend: str = "vllm"           # 'vllm' | 'transformers' | 'null' (no model: data-plane runs)
    dtype: str = "auto"
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256         # vLLM's concurrent sequences per engine step
    batch_size: int = 16            # transformers: images per generate() call


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # 'stop' | 'length'

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class CaptionEngine(Protocol):
    processor: object

    def generate(self, prompts: list[str], images: list[Image.Image]) -> list[Generation]:
        """One generation per (prompt, image) pair, in order."""

    def close(self) -> None:
        """Release the engine's processes and memory."""


def fingerprint(engine: EngineConfig, sampling: SamplingConfig, prompt: str, image_config: dict) -> str:
    """Hash of everything that changes a caption: model + revision, prompt, sampling, preprocessing."""
    basis = {"model": engine.model, "revision": engine.revision, "prompt": prompt,
             "sampling": asdict(sampling), "image": image_config}
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]


def load_processor(config: EngineConfig):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(config.model, revision=config.revision)


class VllmEngine:
    """`LLM.generate` with one image per prompt."""

    def __init__(self, config: EngineConfig, sampling: SamplingConfig):
        from vllm import LLM, SamplingParams

        self.processor = load_processor(config)
        self.llm = LLM(
            model=config.model, revision=config.revision, dtype=config.dtype,
            max_model_len=config.max_model_len, gpu_memory_utilization=config.gpu_memory_utilization,
            tensor_parallel_size=config.tensor_parallel_size, max_num_seqs=config.max_num_seqs,
            limit_mm_per_prompt={"image": 1}, seed=sampling.seed,
        )
        self.params = SamplingParams(
            max_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_k=sampling.top_k if sampling.top_k > 0 else -1, top_p=sampling.top_p, seed=sampling.seed,
        )

    def close(self) -> None:
        """Stop vLLM's engine-core process now; left to interpreter exit it can hang the exit."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(self, prompts: list[str], images: list[Image.Image]) -> list[Generation]:
        requests = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)]
        outputs = self.llm.generate(requests, self.params, use_tqdm=False)
        results = []
        for out in outputs:
            best = out.outputs[0]
            results.append(Generation(best.text, list(best.token_ids), "length" if best.finish_reason == "length" else "stop"))
        return results


class TransformersEngine:
    """Batched `generate` with left padding; the reference the vLLM engine is checked against."""

    def __init__(self, config: EngineConfig, sampling: SamplingConfig):
        import torch
        from transformers import AutoModelForImageTextToText

        self.torch = torch
        self.processor = load_processor(config)
        self.processor.tokenizer.padding_side = "left"
        dtype = "auto" if config.dtype == "auto" else getattr(torch, config.dtype)
        self.model = AutoModelForImageTextToText.from_pretrained(config.model, revision=config.revision, dtype=dtype)
        self.model.eval()
        self.sampling = sampling
        self.batch_size = config.batch_size
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.processor.tokenizer.eos_token_id is not None:
            ids.add(self.processor.tokenizer.eos_token_id)
        return ids

    def close(self) -> None:
        del self.model

    def generate(self, prompts: list[str], images: list[Image.Image]) -> list[Generation]:
        results: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            results += self._generate_batch(prompts[start:start + self.batch_size], images[start:start + self.batch_size])
        return results

    def _generate_batch(self, prompts: list[str], images: list[Image.Image]) -> list[Generation]:
        s = self.sampling
        inputs = self.processor(images=images, text=prompts, padding=True, return_tensors="pt")
        if s.temperature > 0:
            self.torch.manual_seed(s.seed)
        kwargs = dict(max_new_tokens=s.max_tokens, do_sample=s.temperature > 0)
        if s.temperature > 0:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)
        with self.torch.inference_mode():
            sequences = self.model.generate(**inputs, **kwargs)
        new_tokens = sequences[:, inputs["input_ids"].shape[1]:].tolist()
        return [self._finish(ids) for ids in new_tokens]

    def _finish(self, ids: list[int]) -> Generation:
        """Cut at the first end-of-sequence token (kept, as vLLM keeps it) and decode."""
        for i, token in enumerate(ids):
            if token in self.eos_ids:
                ids = ids[:i + 1]
                text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
                return Generation(text, ids, "stop")
        return Generation(self.processor.tokenizer.decode(ids, skip_special_tokens=True), ids, "length")


class NullEngine:
    """Answers every image with one fixed caption at once: measures the data plane without a model."""

    CAPTION = "A fixed caption from the null engine."

    def __init__(self, config: EngineConfig, sampling: SamplingConfig):
        self.processor = load_processor(config)

    def close(self) -> None:
        pass

    def generate(self, prompts: list[str], images: list[Image.Image]) -> list[Generation]:
        return [Generation(self.CAPTION, [1, 2, 3], "stop") for _ in prompts]


def make_engine(config: EngineConfig, sampling: SamplingConfig) -> CaptionEngine:
    engines = {"vllm": VllmEngine, "transformers": TransformersEngine, "null": NullEngine}
    if config.backend not in engines:
        raise ValueError(f"unknown backend {config.backend!r}; choose one of {sorted(engines)}")
    return engines[config.backend](config, sampling)
