"""Caption engines behind one streaming interface: add requests, step, collect the finished ones.

vLLM (production) runs its engine's own add-request/step loop, so new requests join the running
batch as others finish (continuous batching); transformers (the reference) batches what is
queued at each step; null answers at once (measures the data plane).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Protocol

from PIL import Image

from recaption import resolve
from recaption.prompt import with_chat_template


class RequestRejected(Exception):
    """One request the engine refused or could not finish; str() is the reason. The engine goes on."""


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy, as Recap-DataComp-1B
    top_k: int = 0            # 0 = off
    top_p: float = 1.0
    seed: int = 0


# vLLM options that change speed or memory only: they stay out of the fingerprint. Every other
# `--engine-kwargs` key (quantization, kv_cache_dtype, load_format, hf_overrides, ...) enters it. On a GPU
# even these can change a greedy caption now and then: the batch a request shares decides the kernels'
# reduction order and so the last bits of its logits, unless vLLM runs batch-invariant (BATCH_INVARIANT).
PERFORMANCE_ONLY_OPTIONS = frozenset({
    "max_num_batched_tokens", "max_num_scheduled_tokens", "enable_prefix_caching", "prefix_caching_hash_algo",
    "mm_processor_cache_gb", "mm_processor_cache_type", "mm_shm_cache_max_object_size_mb", "block_size",
    "cpu_offload_gb", "enforce_eager", "enable_chunked_prefill", "long_prefill_token_threshold",
    "disable_chunked_mm_input", "kv_cache_memory_bytes", "num_gpu_blocks_override", "compilation_config",
    "cudagraph_capture_sizes", "max_cudagraph_capture_size", "async_scheduling", "disable_custom_all_reduce",
    "distributed_executor_backend", "pipeline_parallel_size", "mm_encoder_tp_mode", "scheduling_policy",
    "max_parallel_loading_workers", "stream_interval", "disable_log_stats", "download_dir", "swap_space",
    "renderer_num_workers", "safetensors_load_strategy", "use_tqdm_on_load", "optimization_level",
    "step_seconds",  # the null backend's simulated engine time
})
# `--engine-kwargs '{"batch_invariant": true}'`: vLLM's batch-invariant mode (the VLLM_BATCH_INVARIANT=1
# environment of its engine process; NVIDIA GPUs of compute capability 9.0 or more): a request's output no
# longer depends on what else is in its batch, at some speed. It enters the fingerprint (other kernels).
BATCH_INVARIANT = "batch_invariant"
# The original LLaVA code resizes with PIL (bicubic). transformers 5 picks its torchvision image backend
# whenever torchvision is installed, which resamples differently (tests/test_convert.py); both engines load
# the PIL one: transformers through AutoProcessor's `backend`, vLLM through `mm_processor_kwargs`, which it
# passes to the same call when it loads the model folder's processor.
IMAGE_BACKEND = "pil"


@dataclass(frozen=True)
class EngineConfig:
    model: str
    revision: str | None = None
    backend: str = "vllm"           # 'vllm' | 'transformers' | 'null' (no model: data-plane runs)
    dtype: str = "auto"             # auto: the checkpoint's dtype, pinned by pinned() for both backends
    max_model_len: int | None = None    # None: the model's own context length
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_num_seqs: int | None = None     # vLLM's concurrent sequences; None: vLLM's default for the hardware
    batch_size: int = 16            # transformers: requests per generate() call
    engine_kwargs: dict = field(default_factory=dict)  # any other vLLM EngineArgs option
    chat_template: str | None = None    # a recaption.prompt template spec; None: the model folder's own
    model_version: str | None = None    # set by pinned(): a Hub commit or 'sha256:...' of a local folder

    def __post_init__(self):
        clash = sorted(set(self.engine_kwargs) & {f for f in self.__dataclass_fields__ if f != "engine_kwargs"}
                       | set(self.engine_kwargs) & {"limit_mm_per_prompt", "seed"})
        if clash:
            raise ValueError(f"--engine-kwargs sets {clash}: use their own flags (or leave them to the job)")

    @property
    def pinned_ok(self) -> bool:
        return self.model_version is not None and self.dtype != "auto" and self.max_model_len is not None

    def pinned(self) -> EngineConfig:
        """Concrete dtype and context length, and the exact model version (Hub revisions become commits)."""
        if self.pinned_ok:
            return self
        local = resolve.is_local(self.model)
        revision = self.revision if local else resolve.hub_commit(self.model, self.revision)
        config = resolve.model_config(self.model, revision)
        limit = resolve.context_length(config)
        if self.max_model_len is None and limit is None:
            raise ValueError(f"model {self.model!r} states no context length: pass --max-model-len")
        if self.max_model_len is not None and limit is not None and self.max_model_len > limit:
            raise ValueError(f"--max-model-len {self.max_model_len} is above the {limit} positions of {self.model!r}")
        return replace(self, revision=revision, dtype=resolve.resolve_dtype(self.dtype, config),
                       max_model_len=self.max_model_len or limit,
                       model_version=resolve.folder_version(self.model) if local else revision)

    def output_options(self) -> dict:
        """The engine options that can change a caption (they enter the fingerprint)."""
        return {k: v for k, v in sorted(self.engine_kwargs.items()) if k not in PERFORMANCE_ONLY_OPTIONS}


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # 'stop' | 'length'

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


Result = Generation | RequestRejected


class CaptionEngine(Protocol):
    processor: object
    concurrency: int   # requests the engine runs at once; more than this are queued inside it

    def add(self, request_id: str, prompt: str, image: Image.Image, sampling: SamplingConfig | None = None) -> None:
        """Queue one request (`sampling`: its own, else the engine's); raises RequestRejected if the engine refuses
        it. Any other error: engine dead."""

    def step(self) -> list[tuple[str, Result]]:
        """Advance the engine; the requests that finished. Any exception means the engine is dead."""

    def num_unfinished(self) -> int: ...

    def abort(self, request_ids: list[str]) -> None: ...

    def close(self) -> None: ...

    def generate(self, prompts: list[str], images: list[Image.Image],
                 sampling: list[SamplingConfig] | None = None) -> list[Generation]: ...


def load_processor(config: EngineConfig):
    """The model's processor with the PIL image backend, rendering `config.chat_template` if one is named."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(config.model, revision=config.revision, backend=IMAGE_BACKEND)
    return with_chat_template(processor, config.chat_template) if config.chat_template else processor


class StreamingEngine:
    """`generate` over add/step, for tests and benchmarks; the worker streams instead."""

    def generate(self, prompts: list[str], images: list[Image.Image],
                 sampling: list[SamplingConfig] | None = None) -> list[Generation]:
        """One generation per (prompt, image) pair, in order, under the engine's sampling or each pair's own;
        raises the first RequestRejected, if any."""
        results: dict[str, Result] = {}
        ids = [f"generate-{i}" for i in range(len(prompts))]
        each: list[SamplingConfig | None] = list(sampling) if sampling else [None] * len(prompts)
        for request_id, prompt, image, own in zip(ids, prompts, images, each, strict=True):
            try:
                self.add(request_id, prompt, image, own)
            except RequestRejected as e:
                results[request_id] = e
        while self.num_unfinished():
            results.update(self.step())
        rejected = [r for r in results.values() if isinstance(r, RequestRejected)]
        if rejected:
            raise rejected[0]
        return [results[i] for i in ids]


# vLLM's CPU backend reads --gpu-memory-utilization as the share of the machine's RAM to reserve (0.9 by
# default) and refuses to start when that much is not free; a fixed KV cache size replaces the reservation.
CPU_KV_CACHE_BYTES = 1 << 30


def cpu_backend_reserves_ram(engine_kwargs: dict) -> bool:
    """True on vLLM's CPU build when no KV cache size was given (flag or VLLM_CPU_KVCACHE_SPACE)."""
    from vllm.platforms import current_platform

    return (current_platform.is_cpu() and "kv_cache_memory_bytes" not in engine_kwargs
            and "VLLM_CPU_KVCACHE_SPACE" not in os.environ)


def vllm_engine_args(config: EngineConfig, seed: int) -> tuple[dict, dict]:
    """vLLM EngineArgs keywords and the environment its engine process needs, for a pinned config."""
    options = dict(config.engine_kwargs)
    env = {"VLLM_BATCH_INVARIANT": "1"} if options.pop(BATCH_INVARIANT, False) else {}
    optional = {"max_num_seqs": config.max_num_seqs} if config.max_num_seqs else {}
    if cpu_backend_reserves_ram(options):
        optional["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    options["mm_processor_kwargs"] = {"backend": IMAGE_BACKEND, **options.get("mm_processor_kwargs", {})}
    kwargs = dict(
        model=config.model, revision=config.revision, dtype=config.dtype, max_model_len=config.max_model_len,
        gpu_memory_utilization=config.gpu_memory_utilization, tensor_parallel_size=config.tensor_parallel_size,
        limit_mm_per_prompt={"image": 1}, seed=seed, disable_log_stats=True, **optional, **options)
    return kwargs, env


class VllmEngine(StreamingEngine):
    """vLLM's LLMEngine driven directly: add_request as requests arrive, step() returns finished ones."""

    def __init__(self, config: EngineConfig, sampling: SamplingConfig):
        from vllm import EngineArgs, SamplingParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.exceptions import EngineDeadError
        from vllm.v1.engine.llm_engine import LLMEngine

        config = config.pinned()
        self.processor = load_processor(config)
        kwargs, env = vllm_engine_args(config, sampling.seed)
        os.environ.update(env)  # read by the engine-core process vLLM starts below
        args = EngineArgs(**kwargs)
        # The offline (LLM class) defaults for batch sizes, as `vllm.LLM` uses.
        self.engine = LLMEngine.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)
        self.concurrency = self.engine.vllm_config.scheduler_config.max_num_seqs
        self.dead_errors = (EngineDeadError,)
        self.sampling_params, self.final_only = SamplingParams, RequestOutputKind.FINAL_ONLY
        self.params = self._params(sampling)

    def _params(self, sampling: SamplingConfig):
        # FINAL_ONLY: step() reports a request once, when it is done (no per-token outputs to skip).
        return self.sampling_params(
            max_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_k=sampling.top_k if sampling.top_k > 0 else -1, top_p=sampling.top_p, seed=sampling.seed,
            output_kind=self.final_only)

    def add(self, request_id: str, prompt: str, image: Image.Image, sampling: SamplingConfig | None = None) -> None:
        params = self.params if sampling is None else self._params(sampling)
        try:
            self.engine.add_request(request_id, {"prompt": prompt, "multi_modal_data": {"image": image}}, params)
        except self.dead_errors:
            raise
        except Exception as e:  # input validation and processing refuse this one request only
            raise RequestRejected(f"{type(e).__name__}: {e}") from None

    def step(self) -> list[tuple[str, Result]]:
        if not self.engine.has_unfinished_requests():
            return []
        finished = []
        for out in self.engine.step():
            if not out.finished:
                continue
            best = out.outputs[0]
            reason = str(best.finish_reason)
            if reason in ("stop", "length"):
                finished.append((out.request_id, Generation(best.text, list(best.token_ids), reason)))
            else:
                finished.append((out.request_id, RequestRejected(f"finished with reason {reason!r}")))
        return finished

    def num_unfinished(self) -> int:
        return self.engine.get_num_unfinished_requests()

    def abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(request_ids)

    def close(self) -> None:
        """Stop vLLM's engine-core process now; left to interpreter exit it can hang the exit."""
        self.engine.engine_core.shutdown()


class TransformersEngine(StreamingEngine):
    """Batched `generate` with left padding over what is queued; the reference vLLM is checked against."""

    def __init__(self, config: EngineConfig, sampling: SamplingConfig):
        import torch
        from transformers import AutoModelForImageTextToText

        config = config.pinned()
        self.torch = torch
        self.processor = load_processor(config)
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(config.model, revision=config.revision,
                                                                 dtype=getattr(torch, config.dtype))
        self.model.eval()
        self.sampling = sampling
        self.concurrency = config.batch_size
        self.max_model_len = config.max_model_len
        self.eos_ids = self._eos_ids()
        self.queue: list[tuple[str, str, Image.Image, int, SamplingConfig]] = []   # id, prompt, image, tokens, sampling

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.processor.tokenizer.eos_token_id is not None:
            ids.add(self.processor.tokenizer.eos_token_id)
        return ids

    def add(self, request_id: str, prompt: str, image: Image.Image, sampling: SamplingConfig | None = None) -> None:
        """Process the pair alone first, so a bad one is refused here and never fails a batch."""
        try:
            length = self.processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
        except Exception as e:
            raise RequestRejected(f"processor: {type(e).__name__}: {e}") from None
        if length > self.max_model_len:
            raise RequestRejected(f"the prompt has {length} tokens (image included), more than the "
                                  f"context length {self.max_model_len}")
        self.queue.append((request_id, prompt, image, length, sampling or self.sampling))

    def step(self) -> list[tuple[str, Result]]:
        """One batch: the queued requests of the first one's sampling (a sampled request alone, under its seed)."""
        if not self.queue:
            return []
        s = self.queue[0][4]
        size = 1 if s.temperature > 0 else self.concurrency
        batch = [b for b in self.queue if b[4] == s][:size]
        taken = {b[0] for b in batch}
        self.queue = [b for b in self.queue if b[0] not in taken]
        inputs = self.processor(images=[b[2] for b in batch], text=[b[1] for b in batch], padding=True,
                                return_tensors="pt")
        kwargs = dict(max_new_tokens=min(s.max_tokens, self.max_model_len - min(b[3] for b in batch)),
                      do_sample=s.temperature > 0)
        if s.temperature > 0:
            self.torch.manual_seed(s.seed)
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)
        with self.torch.inference_mode():
            sequences = self.model.generate(**inputs, **kwargs)
        new_tokens = sequences[:, inputs["input_ids"].shape[1]:].tolist()
        return [(b[0], self._finish(ids, min(s.max_tokens, self.max_model_len - b[3])))
                for b, ids in zip(batch, new_tokens, strict=True)]

    def _finish(self, ids: list[int], limit: int) -> Generation:
        """Cut at the first end-of-sequence token (kept, as vLLM keeps it) or at this request's limit."""
        for i, token in enumerate(ids[:limit]):
            if token in self.eos_ids:
                ids = ids[:i + 1]
                return Generation(self.processor.tokenizer.decode(ids, skip_special_tokens=True), ids, "stop")
        ids = ids[:limit]
        return Generation(self.processor.tokenizer.decode(ids, skip_special_tokens=True), ids, "length")

    def num_unfinished(self) -> int:
        return len(self.queue)

    def abort(self, request_ids: list[str]) -> None:
        drop = set(request_ids)
        self.queue = [b for b in self.queue if b[0] not in drop]

    def close(self) -> None:
        del self.model


class NullEngine(StreamingEngine):
    """Answers every request with one fixed caption: measures the data plane without a model.

    With `--engine-kwargs '{"step_seconds": S}'` each step takes S seconds and finishes at most
    `--max-num-seqs` requests, like a GPU engine's batches (control-plane benchmarks, tests that
    interrupt a job mid-shard); by default every request is answered at the next step, at once.
    """

    CAPTION = "A fixed caption from the null engine."

    def __init__(self, config: EngineConfig, sampling: SamplingConfig):
        self.processor = load_processor(config)
        self.concurrency = config.max_num_seqs or 1 << 30
        self.step_seconds = float(config.engine_kwargs.get("step_seconds", 0.0))
        self.queue: list[str] = []

    def add(self, request_id: str, prompt: str, image: Image.Image, sampling: SamplingConfig | None = None) -> None:
        self.queue.append(request_id)

    def step(self) -> list[tuple[str, Result]]:
        if self.step_seconds:
            time.sleep(self.step_seconds)
        done, self.queue = self.queue[:self.concurrency], self.queue[self.concurrency:]
        return [(request_id, Generation(self.CAPTION, [1, 2, 3], "stop")) for request_id in done]

    def num_unfinished(self) -> int:
        return len(self.queue)

    def abort(self, request_ids: list[str]) -> None:
        drop = set(request_ids)
        self.queue = [r for r in self.queue if r not in drop]

    def close(self) -> None:
        pass


def make_engine(config: EngineConfig, sampling: SamplingConfig) -> CaptionEngine:
    engines = {"vllm": VllmEngine, "transformers": TransformersEngine, "null": NullEngine}
    if config.backend not in engines:
        raise ValueError(f"unknown backend {config.backend!r}; choose one of {sorted(engines)}")
    return engines[config.backend](config, sampling)
