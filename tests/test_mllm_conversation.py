"""Conversations -> ids and labels: the loss mask covers the answers and their stop tokens only."""
from __future__ import annotations

import pytest

from train.mllm.conversation import (
    IGNORE,
    IMAGE,
    IMAGE_ID,
    TEMPLATES,
    ConversationError,
    Encoded,
    encode,
    fit,
)
from train.mllm.tiny import build_tokenizer

VICUNA = TEMPLATES["vicuna_v1"]
TWO_ROUNDS = [
    {"from": "human", "value": "What color is the shape?\n<image>"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "What shape is it?"},
    {"from": "gpt", "value": "a red circle"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def supervised_spans(sample: Encoded) -> list[list[int]]:
    """Runs of consecutive supervised positions, as the label values."""
    spans, current = [], []
    for label in sample.labels:
        if label == IGNORE:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def test_labels_are_the_answers_and_their_eos_over_two_rounds(tok) -> None:
    sample = encode(TWO_ROUNDS, tok, VICUNA, has_image=True)
    assert len(sample.ids) == len(sample.labels)
    spans = supervised_spans(sample)
    assert [tok.decode(s[:-1]) for s in spans] == ["red", "a red circle"]
    assert all(s[-1] == tok.eos_token_id for s in spans)
    # Supervised positions carry exactly the token that is there; all else is ignored.
    for token, label in zip(sample.ids, sample.labels):
        assert label in (IGNORE, token)
    # The ids spell LLaVA-1.5's vicuna_v1 prompt with the image moved to the front.
    before, after = sample.ids[1:sample.ids.index(IMAGE_ID)], sample.ids[sample.ids.index(IMAGE_ID) + 1:]
    assert sample.ids[0] == tok.bos_token_id and sample.ids.count(IMAGE_ID) == 1
    assert tok.decode(before) == VICUNA.system + "USER: "
    assert tok.decode(after, skip_special_tokens=False) == (
        "\nWhat color is the shape? ASSISTANT: red</s>USER: What shape is it? ASSISTANT: a red circle</s>")


def test_generation_prompt_is_the_training_prefix(tok) -> None:
    """Evaluation continues exactly the tokens training saw before the first answer."""
    sample = encode(TWO_ROUNDS, tok, VICUNA, has_image=True)
    prompt = encode(TWO_ROUNDS[:1], tok, VICUNA, has_image=True)
    first_answer = sample.labels.index(next(label for label in sample.labels if label != IGNORE))
    assert prompt.ids == sample.ids[:first_answer]
    assert all(label == IGNORE for label in prompt.labels)


def test_plain_template_keeps_only_image_and_caption(tok) -> None:
    turns = [{"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "a blue ring"}]
    sample = encode(turns, tok, TEMPLATES["plain"], has_image=True)
    assert sample.ids[:2] == [tok.bos_token_id, IMAGE_ID]
    assert tok.decode(sample.ids[2:], skip_special_tokens=False) == "a blue ring</s>"
    assert sample.labels[:2] == [IGNORE, IGNORE] and sample.labels[2:] == sample.ids[2:]


@pytest.mark.parametrize("turns, has_image, reason", [
    (TWO_ROUNDS, False, "has <image> but no image"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}], True, "no <image> placeholder"),
    ([{"from": "human", "value": IMAGE + IMAGE}, {"from": "gpt", "value": "red"}], True, "2 <image>"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": IMAGE}], True, "first human turn"),
    ([{"from": "human", "value": IMAGE}, {"from": "human", "value": "x"}], True, "expected from='gpt'"),
    ([], False, "empty conversation"),
])
def test_malformed_conversations_are_errors(tok, turns, has_image, reason) -> None:
    with pytest.raises(ConversationError, match=reason):
        encode(turns, tok, VICUNA, has_image=has_image)


def test_fit_cuts_to_max_length_counting_image_tokens(tok) -> None:
    sample = encode(TWO_ROUNDS, tok, VICUNA, has_image=True)
    image_tokens = 16
    assert fit(sample, sample.expanded_length(image_tokens), image_tokens) is sample
    cut = fit(sample, sample.expanded_length(image_tokens) - 3, image_tokens)
    assert cut.expanded_length(image_tokens) == sample.expanded_length(image_tokens) - 3
    assert cut.ids == sample.ids[:len(cut.ids)] and cut.labels == sample.labels[:len(cut.labels)]
    first_answer = next(i for i, label in enumerate(sample.labels) if label != IGNORE)
    with pytest.raises(ConversationError, match="no answer token left"):
        fit(sample, first_answer + image_tokens - 1, image_tokens)
    with pytest.raises(ConversationError, match="image does not fit"):
        fit(sample, sample.ids.index(IMAGE_ID) + image_tokens - 1, image_tokens)
