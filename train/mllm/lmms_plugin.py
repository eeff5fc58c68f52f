"""lmms-eval model plug-in: `python -m lmms_eval --model openvision_llava --model_args pretrained=RUN ...`.

Registered through the `lmms_eval.models` entry point (pyproject.toml) and `register_model`, so
MME, POPE, GQA, TextVQA, SEED, ScienceQA, ChartQA, OCRBench run against a stage's run folder.
Requests follow lmms-eval's simple-model interface (EvolvingLMMs-Lab/lmms-eval
`lmms_eval/api/model.py`, `models/simple/llava.py`): generate_until gets
(context, gen_kwargs, doc_to_visual, doc_id, task, split), loglikelihood gets
(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split).
Decoding is always greedy (LLaVA-1.5's evaluation setting); one image per request (the first).
Needs the optional extra: `pip install -e .[mllm]`.
"""
from __future__ import annotations

import os
import warnings

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from lmms_eval.models.registry_v2 import ModelManifest

from train.mllm.evaluate import Answerer
from train.mllm.model import load_run

MODEL_ID = "openvision_llava"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@register_model(MODEL_ID)
class OpenVisionLlava(lmms):
    def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 1, max_new_tokens: int = 128, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"{MODEL_ID}: unknown model_args {sorted(kwargs)}")
        if device in (None, "cuda"):  # one GPU per process under `accelerate launch` / torchrun
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        model = load_run(pretrained, DTYPES[dtype]).to(device).eval()
        self.answerer = Answerer(model, int(batch_size), int(max_new_tokens))
        self._device = torch.device(device)
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))

    @property
    def device(self) -> torch.device:
        return self._device

    def first_image(self, doc_to_visual, doc_id, task: str, split: str):
        if doc_to_visual is None:
            return None
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        if len(visuals) > 1:
            warnings.warn(f"{MODEL_ID}: {task} request {doc_id} has {len(visuals)} images; using the first",
                          stacklevel=2)
        return visuals[0].convert("RGB") if visuals else None

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, in request order, each cut at the first `until` string.

        Requests with the same stop strings and length limit are batched, a batch's images opened together.
        """
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            until = r.args[1].get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            groups.setdefault((until, r.args[1].get("max_new_tokens")), []).append(i)
        answers: list[str] = [""] * len(requests)
        size = self.answerer.batch_size
        for (until, max_new_tokens), members in groups.items():
            for start in range(0, len(members), size):
                chunk = members[start:start + size]
                items = [(requests[i].args[0], self.first_image(*requests[i].args[2:])) for i in chunk]
                for i, answer in zip(chunk, self.answerer.generate(items, max_new_tokens, until), strict=True):
                    answers[i] = answer
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether it is the greedy continuation)."""
        items = []
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            items.append((context, continuation, self.first_image(doc_to_visual, doc_id, task, split)))
        return self.answerer.loglikelihood(items)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_ID} answers single-round requests only")


def manifest() -> ModelManifest:
    """Entry point `lmms_eval.models`: makes `--model openvision_llava` resolvable."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.OpenVisionLlava")
