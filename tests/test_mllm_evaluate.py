"""Scoring rules (LLaVA-1.5's evaluation scripts) and the question-file contract."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.mllm.evaluate import Answerer, evaluate, normalise, option_letter, question_text, vqa_accuracy


def test_normalise_like_the_vqa_evaluators() -> None:
    assert normalise("The Red, circle!") == "red circle"
    assert normalise("Two dogs.") == "2 dogs"
    assert normalise("3.5 m") == "3.5 m"  # a decimal point stays


def test_vqa_accuracy_counts_three_matching_humans_as_full_marks() -> None:
    ten = ["red"] * 3 + ["blue"] * 7
    # Leave one out of 10: 3 of the 10 subsets drop a "red" (2/3 left), 7 keep all three (1).
    assert vqa_accuracy("Red", ten) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("blue", ten) == 1.0
    assert vqa_accuracy("green", ten) == 0.0
    assert vqa_accuracy("a circle", ["circle"]) == 1.0  # one reference: normalised exact match


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("B. a square", "B"), ("C)", "C"), ("The answer is A.", "A"), ("E", None), ("maybe", None),
])
def test_option_letter_reading(text, letter) -> None:
    assert option_letter(text, 4) == letter


def test_question_text_lists_options_then_the_instruction() -> None:
    row = {"question_id": 1, "text": "Which shape?", "options": ["circle", "square"]}
    assert question_text(row, "option") == ("Which shape?\nA. circle\nB. square\n"
                                            "Answer with the option's letter from the given choices directly.")
    already = {"question_id": 2, "text": "Color?\nAnswer the question using a single word or phrase."}
    assert question_text(already, "short") == already["text"]
    assert question_text({"question_id": 3, "text": "Color?"}, "none") == "Color?"


class Scripted(Answerer):
    """Answers from a script instead of a model: the file handling and scoring are under test."""

    def __init__(self, replies: list[str]):
        super().__init__(model=None, batch_size=2)
        self.replies, self.asked = replies, []

    def generate(self, items, max_new_tokens=None, until=()):
        self.asked += [text for text, _ in items]
        return [self.replies[len(self.asked) - len(items) + i] for i in range(len(items))]


def test_evaluate_writes_one_scored_line_per_question(tmp_path: Path) -> None:
    questions = tmp_path / "q.jsonl"
    rows = [{"question_id": "a", "text": "Which?", "options": ["x", "y"], "answer": "B"},
            {"question_id": "b", "text": "Which?", "options": ["x", "y"], "answer": "A"},
            {"question_id": "c", "text": "Which?", "options": ["x", "y", "z"], "answer": "C"}]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answerer = Scripted(["B", "The answer is B.", "C. z"])
    result = evaluate(answerer, questions, None, tmp_path / "out" / "answers.jsonl", metric="option", prompt="option")
    assert result == {"questions": 3, "option": pytest.approx(2 / 3)}
    lines = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert [(r["question_id"], r["text"], r["score"]) for r in lines] == [
        ("a", "B", 1.0), ("b", "The answer is B.", 0.0), ("c", "C. z", 1.0)]
    assert answerer.asked[0].endswith("B. y\nAnswer with the option's letter from the given choices directly.")


def test_question_without_id_or_text_is_named(tmp_path: Path) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "text": "ok"}) + "\n" + json.dumps({"question": "no"}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:2: a question needs"):
        evaluate(Scripted(["x", "y"]), questions, None, tmp_path / "a.jsonl")
