"""The lmms-eval plug-in answers hand-built requests through generate_until and loglikelihood.

Skipped as a module when the optional extra (`pip install -e .[mllm]`) is not installed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

lmms_eval = pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402

from pipelines import mllm as mllm_cli  # noqa: E402
from train.mllm.conversation import tokenize_piece  # noqa: E402
from train.mllm.evaluate import Answerer  # noqa: E402
from train.mllm.lmms_plugin import MODEL_ID, OpenVisionLlava  # noqa: E402
from train.mllm.tiny import build_tiny_lm, build_tiny_tower, write_shape_task  # noqa: E402

TASK, SPLIT = "shapes", "test"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> OpenVisionLlava:
    """A one-step stage-2 run (through the CLI) loaded by the plug-in, with a three-document task."""
    root = tmp_path_factory.mktemp("lmms")
    task = write_shape_task(root / "task", 4, image_size=32)
    mllm_cli.main(["stage2", "--lm", str(build_tiny_lm(root / "lm")), "--data", str(task["conversations"]),
                   "--tower", str(build_tiny_tower(root / "tower.pt", depth=1, image_size=32)),
                   "--image-folder", str(task["images"]), "--out", str(root / "run"), "--batch-size", "4",
                   "--micro-batch-size", "4", "--workers", "0"])
    model = OpenVisionLlava(pretrained=str(root / "run"), device="cpu", batch_size="2", max_new_tokens="6")
    rows = json.loads(task["conversations"].read_text())
    model.task_dict = {TASK: {SPLIT: [{"image": Image.open(task["images"] / r["image"]).convert("RGB"),
                                       "answer": r["conversations"][1]["value"]} for r in rows]}}
    return model


def visual(doc: dict) -> list[Image.Image]:
    return [doc["image"]]


def request(kind: str, args: tuple, doc_id: int) -> Instance:
    return Instance(request_type=kind, arguments=(*args, visual, doc_id, TASK, SPLIT), idx=0,
                    metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def test_the_entry_point_resolves_to_the_plugin() -> None:
    assert get_model(MODEL_ID) is OpenVisionLlava


def test_generate_until_answers_in_request_order(plugin) -> None:
    """Two generation settings interleaved: each answer matches a direct greedy call."""
    questions = ["What color is the shape?", "What shape is it?", "Describe it."]
    settings = [{"until": ["\n"], "max_new_tokens": 3}, {"until": "zz", "max_new_tokens": 5}]
    requests = [request("generate_until", (q, settings[i % 2]), i % 3) for i, q in enumerate(questions * 2)]
    answers = plugin.generate_until(requests)
    docs = plugin.task_dict[TASK][SPLIT]
    direct = Answerer(plugin.answerer.model, batch_size=1)
    for r, answer in zip(requests, answers, strict=True):
        context, kwargs, _, doc_id, _, _ = r.args
        until = [kwargs["until"]] if isinstance(kwargs["until"], str) else kwargs["until"]
        assert answer == direct.generate([(context, docs[doc_id]["image"])], kwargs["max_new_tokens"], until)[0]
        assert isinstance(answer, str) and not any(u in answer for u in until)


def test_loglikelihood_is_the_summed_logprob_of_the_continuation(plugin) -> None:
    docs = plugin.task_dict[TASK][SPLIT]
    requests = [request("loglikelihood", ("What color is the shape?", " red"), 0),
                request("loglikelihood", ("What shape is it?", lambda doc: doc["answer"]), 1)]
    results = plugin.loglikelihood(requests)
    model = plugin.answerer.model
    for r, (logprob, greedy) in zip(requests, results, strict=True):
        context, target, _, doc_id, _, _ = r.args
        continuation = target if isinstance(target, str) else target(docs[doc_id])
        prompt = plugin.answerer.prompt(context, docs[doc_id]["image"])
        tokens = tokenize_piece(model.tokenizer, continuation)
        # Independently: one unpadded forward, log-softmax at the positions before each continuation token.
        ids = torch.tensor([prompt.ids + tokens])
        with torch.no_grad():
            embeds = model.splice(ids, torch.ones_like(ids, dtype=torch.bool), prompt.image[None]).embeds
            logits = model.lm(inputs_embeds=embeds).logits[0, -len(tokens) - 1:-1]
        expected = F.log_softmax(logits.float(), dim=-1)[torch.arange(len(tokens)), tokens]
        # fp32, a handful of terms; batching pads differently from this single row: kernel-order noise only.
        assert logprob == pytest.approx(expected.sum().item(), abs=1e-4)
        assert greedy == bool((logits.argmax(dim=-1) == torch.tensor(tokens)).all())


def test_unknown_model_args_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model_args"):
        OpenVisionLlava(pretrained=str(tmp_path), conv_template="vicuna_v1")


TASK_YAML = """task: openvision_shapes
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_visual: !function shapes_task.doc_to_visual
doc_to_text: !function shapes_task.doc_to_text
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_new_tokens: 4
process_results: !function shapes_task.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TASK_FUNCTIONS = '''from PIL import Image

IMAGES = {images!r}


def doc_to_visual(doc):
    return [Image.open(IMAGES + "/" + doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["text"]


def process_results(doc, results):
    return {{"exact_match": float(results[0].strip() == doc["answer"])}}
'''


def test_lmms_evaluator_runs_the_plugin_on_a_local_task(plugin, tmp_path: Path) -> None:
    """lmms-eval's own evaluator, with a task defined like its benchmarks (a yaml and its functions)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    task = write_shape_task(tmp_path / "task", 3, image_size=32, seed=5)
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "shapes.yaml").write_text(
        TASK_YAML.format(questions=task["questions"], cache=tmp_path / "hf-cache"))
    (tmp_path / "include" / "shapes_task.py").write_text(TASK_FUNCTIONS.format(images=str(task["images"])))
    manager = TaskManager(include_path=str(tmp_path / "include"), include_defaults=False)
    out = simple_evaluate(model=plugin, tasks=["openvision_shapes"], task_manager=manager, log_samples=True)
    samples = out["samples"]["openvision_shapes"]
    assert len(samples) == 6  # two questions per image
    assert 0.0 <= out["results"]["openvision_shapes"]["exact_match,none"] <= 1.0
    first = samples[0]
    image = Image.open(task["images"] / first["doc"]["image"]).convert("RGB")
    assert first["resps"][0][0] == plugin.answerer.generate([(first["doc"]["text"], image)], 4, ["\n"])[0]
