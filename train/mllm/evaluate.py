"""Benchmark evaluation: greedy answers to LLaVA-format questions, scored three ways.

A question file is jsonl, one object a line, like LLaVA's `llava/eval/model_vqa_loader.py`
input: {"question_id", "image" (relative to the image folder; optional), "text"} plus the truth:
"answer" (a string, or an option letter) or "answers" (a list, VQA-style). "options" (a list)
are appended as "A. ...\nB. ..." as LLaVA does for ScienceQA / MMBench.

Prompts follow LLaVA-1.5's evaluation files: "short" appends "Answer the question using a single
word or phrase." (VQAv2, GQA, TextVQA, POPE, MME), "option" appends "Answer with the option's
letter from the given choices directly." (ScienceQA, SEED, MMBench), "none" keeps the text.
Metrics: "exact" (normalised exact match), "vqa" (VQA accuracy: min(1, matches / 3) averaged over
the leave-one-out subsets of the reference answers, as the VQA / TextVQA evaluators do), "option"
(the letter read as LLaVA's ScienceQA scorer reads it).
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from train.mllm.conversation import IGNORE, encode, stop_id
from train.mllm.data import Example, collate
from train.mllm.model import LlavaModel

PROMPTS = {
    "none": "",
    "short": "Answer the question using a single word or phrase.",
    "option": "Answer with the option's letter from the given choices directly.",
}
METRICS = ("exact", "vqa", "option")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Answerer:
    """Answers (prompt, image) pairs with a trained model: greedy text, or a continuation's log-likelihood."""
    model: LlavaModel
    batch_size: int = 8
    max_new_tokens: int = 128

    @property
    def device(self) -> torch.device:
        return next(self.model.lm.parameters()).device

    def prompt(self, text: str, image: Image.Image | None, answer: str | None = None) -> Example:
        """The generation prompt for one question, ending where the answer starts; with `answer`, the
        prompt and that answer tokenised together (as training does) with only the answer labelled."""
        if image is not None and "<image>" not in text:
            text = "<image>\n" + text
        m = self.model
        turns = [{"from": "human", "value": text}] + ([{"from": "gpt", "value": answer}] if answer is not None else [])
        encoded = encode(turns, m.tokenizer, m.template, has_image=image is not None, close_last=False)
        labels = encoded.labels if answer is not None else [IGNORE] * len(encoded.ids)
        return Example(encoded.ids, labels, m.tower.prep(image) if image is not None else None, text)

    def batch(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        b = collate(examples)
        dtype = next(self.model.tower.parameters()).dtype
        images = b["images"].to(self.device, dtype) if b["images"] is not None else None
        return b["ids"].to(self.device), b["mask"].to(self.device), images, b["labels"].to(self.device)

    def generate(self, items: Sequence[tuple[str, Image.Image | None]], max_new_tokens: int | None = None,
                 until: Sequence[str] = ()) -> list[str]:
        """Greedy answers, each cut before the first of the `until` strings."""
        m = self.model
        stops = {stop_id(m.tokenizer, m.template), m.tokenizer.eos_token_id} - {None}
        answers = []
        for start in range(0, len(items), self.batch_size):
            ids, mask, images, _ = self.batch([self.prompt(t, im) for t, im in items[start:start + self.batch_size]])
            for tokens in m.generate(ids, mask, images, max_new_tokens or self.max_new_tokens, stops):
                text = m.tokenizer.decode(tokens, skip_special_tokens=True)
                for marker in until:
                    text = text.split(marker)[0] if marker else text
                answers.append(text.strip())
        return answers

    def loglikelihood(self, items: Sequence[tuple[str, str, Image.Image | None]]) -> list[tuple[float, bool]]:
        """(summed log-probability of `continuation` as the answer to the prompt, is it the greedy continuation).

        Scored as training tokenises an answer: after "ASSISTANT:", the space before the continuation
        in its first token; a continuation that starts with a space of its own keeps it."""
        results = []
        for start in range(0, len(items), self.batch_size):
            examples = [self.prompt(context, image, continuation)
                        for context, continuation, image in items[start:start + self.batch_size]]
            results += self.model.loglikelihood(*self.batch(examples))
        return results


def question_text(row: dict, prompt: str) -> str:
    """The question, its lettered options, then the instruction on its own line."""
    text = row["text"]
    if row.get("options"):
        text += "\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(row["options"]))
    suffix = PROMPTS[prompt]
    return f"{text}\n{suffix}" if suffix and not text.endswith(suffix) else text


NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBERS["none"] = "0"
ARTICLES = {"a", "an", "the"}
PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!:*#%^&|~$']")
PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a period that is not a decimal point


def normalise(answer: str) -> str:
    """VQA answer normalisation (lower case, punctuation and articles out, number words as digits).

    Follows the VQA / TextVQA evaluators (EvalAIAnswerProcessor) without their contraction table.
    """
    text = answer.lower().replace("\n", " ").replace("\t", " ")
    text = PERIOD.sub("", PUNCTUATION.sub("", text))
    words = [NUMBERS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in ARTICLES)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Mean over leaving each reference out of min(1, matches among the others / 3)."""
    pred, refs = normalise(prediction), [normalise(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = [min(1.0, sum(r == pred for j, r in enumerate(refs) if j != i) / 3) for i in range(len(refs))]
    return sum(scores) / len(scores)


def option_letter(prediction: str, n_options: int) -> str | None:
    """"B", "B. text" or "The answer is B." -> "B" (LLaVA's ScienceQA rules); anything else None."""
    letters = LETTERS[:n_options] if n_options else LETTERS
    text = prediction.strip()
    if text in letters:
        return text
    if len(text) >= 2 and text[0] in letters and text[1] in ".):":
        return text[0]
    found = re.findall(r"The answer is ([A-Z])\.", text)
    return found[0] if len(found) == 1 and found[0] in letters else None


def score(row: dict, prediction: str, metric: str) -> float:
    if metric == "vqa":
        references = row.get("answers") or [row["answer"]]
        return vqa_accuracy(prediction, [str(r) for r in references])
    if metric == "option":
        return float(option_letter(prediction, len(row.get("options") or [])) == str(row["answer"]).strip())
    return float(normalise(prediction) == normalise(str(row["answer"])))


def read_questions(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "text" not in row or "question_id" not in row:
                raise ValueError(f"{path}:{n}: a question needs 'question_id' and 'text'")
            rows.append(row)
    return rows


def open_image(row: dict, image_folder: str | Path | None, source: str) -> Image.Image | None:
    if "image" not in row:
        return None
    if image_folder is None:
        raise ValueError(f"{source}: question {row['question_id']} has an image but no image folder was given")
    with Image.open(Path(image_folder) / row["image"]) as image:
        return image.convert("RGB")


def evaluate(answerer: Answerer, questions: str | Path, image_folder: str | Path | None, answers: str | Path,
             metric: str = "exact", prompt: str = "short") -> dict[str, float]:
    """Answer every question, write one answer line per question to `answers`, return the mean score."""
    if metric not in METRICS or prompt not in PROMPTS:
        raise ValueError(f"metric in {METRICS}, prompt in {tuple(PROMPTS)}")
    rows = read_questions(questions)
    has_truth = all("answer" in r or "answers" in r for r in rows)
    total = 0.0
    Path(answers).parent.mkdir(parents=True, exist_ok=True)
    with open(answers, "w") as f:
        for start in range(0, len(rows), answerer.batch_size):  # images are opened one batch at a time
            chunk = rows[start:start + answerer.batch_size]
            texts = [question_text(r, prompt) for r in chunk]
            images = [open_image(r, image_folder, str(questions)) for r in chunk]
            predictions = answerer.generate(list(zip(texts, images, strict=True)))
            for row, text, prediction in zip(chunk, texts, predictions, strict=True):
                line = {"question_id": row["question_id"], "prompt": text, "text": prediction}
                if has_truth:
                    line["score"] = score(row, prediction, metric)
                    total += line["score"]
                f.write(json.dumps(line) + "\n")
    result = {"questions": len(rows)}
    if has_truth and rows:
        result[metric] = total / len(rows)
    return result


@dataclass
class EvalConfig:
    model: str  # a stage's run folder
    questions: str
    answers: str
    image_folder: str | None = None
    metric: str = "exact"
    prompt: str = "short"
    batch_size: int = 8
    max_new_tokens: int = 128  # LLaVA-1.5's evaluation scripts
    zero_images: bool = False  # control: no visual information reaches the LM
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def run_eval(cfg: EvalConfig) -> dict[str, float]:
    """Load a run, answer `cfg.questions` and score them (bf16 on GPUs)."""
    from train.mllm.model import load_run

    dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
    model = load_run(cfg.model, dtype).to(cfg.device).eval()
    model.zero_images = cfg.zero_images
    answerer = Answerer(model, cfg.batch_size, cfg.max_new_tokens)
    return evaluate(answerer, cfg.questions, cfg.image_folder, cfg.answers, cfg.metric, cfg.prompt)
