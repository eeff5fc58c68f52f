"""Conversations -> ids and labels as LLaVA's preprocess_v1 / preprocess_plain: the rendered conversation
tokenised whole, the loss mask over the answers and their stop text only. Each test writes the LLaVA
rendering out by hand, tokenises it and derives the mask from the rendered prefixes' token counts."""
from __future__ import annotations

import pytest

from train.mllm.conversation import (
    IGNORE,
    IMAGE,
    IMAGE_ID,
    SYSTEM,
    TEMPLATES,
    ConversationError,
    Encoded,
    Template,
    encode,
    fit,
    stop_id,
)
from train.mllm.tiny import build_tokenizer

VICUNA = TEMPLATES["vicuna_v1"]
TWO_ROUNDS = [
    {"from": "human", "value": "What color is the shape?\n<image>"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "What shape is it?"},
    {"from": "gpt", "value": "a red circle"},
]


# Answers after the assistant tag in the corpus, so that " red" is one token as in real vocabularies.
ANSWERS = (" ".join(f"ASSISTANT: {w}" for w in ("red", "a red circle", "a blue ring")),)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(extra_corpus=ANSWERS)


def without_bos(tokenizer):
    """The same vocabulary, with a tokenizer that adds no BOS (as Qwen's)."""
    tokenizer.backend_tokenizer.post_processor = None
    return tokenizer


@pytest.fixture(scope="module", params=["BOS", "no BOS"])
def any_tok(request):
    """The tiny Llama's tokenizer (adds BOS, as Llama's) and one that adds none."""
    tokenizer = build_tokenizer(extra_corpus=ANSWERS)
    return tokenizer if request.param == "BOS" else without_bos(tokenizer)


def llava_ids(tokenizer, text: str) -> list[int]:
    """LLaVA's tokenizer_image_token on a text with one <image>: both halves tokenised by default, the
    second without the BOS the tokenizer puts in front of it."""
    before, after = text.split("<image>")
    second = tokenizer(after)["input_ids"]
    bos = tokenizer.bos_token_id
    return tokenizer(before)["input_ids"] + [IMAGE_ID] + (second[1:] if second[:1] == [bos] else second)


def expected_labels(tokenizer, text: str, spans: list[tuple[str, str]]) -> list[int]:
    """Labels from rendered prefixes: each (before, answer) pair labels the tokens of `answer` that follow
    the tokens of the text up to `before`'s end."""
    ids = llava_ids(tokenizer, text)
    labels = [IGNORE] * len(ids)
    for before, answer in spans:
        start, end = len(llava_ids(tokenizer, before)), len(llava_ids(tokenizer, before + answer))
        labels[start:end] = ids[start:end]
    return labels


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


def test_vicuna_v1_ids_and_labels_as_llava(any_tok) -> None:
    tok = any_tok
    sample = encode(TWO_ROUNDS, tok, VICUNA, has_image=True)
    # conv_vicuna_v1.get_prompt(): system, sep " ", "USER: " message sep " ", "ASSISTANT: " answer sep2 "</s>".
    first = SYSTEM + " USER: <image>\nWhat color is the shape? ASSISTANT:"
    second = first + " red</s>USER: What shape is it? ASSISTANT:"
    text = second + " a red circle</s>"
    assert sample.ids == llava_ids(tok, text)
    assert sample.labels == expected_labels(tok, text, [(first, " red</s>"), (second, " a red circle</s>")])
    # The answer's space is in its first token (LLaVA's [':', 'Ġred'], not [':', 'Ġ'] + ['red']).
    answer = sample.labels.index(next(label for label in sample.labels if label != IGNORE))
    assert tok.convert_ids_to_tokens(sample.ids[answer - 1:answer + 1]) == [":", "Ġred"]
    assert [s[-1] for s in supervised_spans(sample)] == [tok.eos_token_id] * 2
    # BOS only where the tokenizer adds one, and once.
    assert sample.ids.count(tok.bos_token_id) == (1 if tok("x")["input_ids"][0] == tok.bos_token_id else 0)


def test_generation_prompt_is_the_training_prefix(any_tok) -> None:
    """Evaluation continues exactly the tokens training saw before the first answer."""
    tok = any_tok
    sample = encode(TWO_ROUNDS, tok, VICUNA, has_image=True)
    prompt = encode(TWO_ROUNDS[:1], tok, VICUNA, has_image=True)
    assert prompt.ids == llava_ids(tok, SYSTEM + " USER: <image>\nWhat color is the shape? ASSISTANT:")
    first_answer = sample.labels.index(next(label for label in sample.labels if label != IGNORE))
    assert prompt.ids == sample.ids[:first_answer]
    assert all(label == IGNORE for label in prompt.labels)


def test_plain_template_is_llava_pretraining(any_tok) -> None:
    """conv_llava_plain (sep "\\n") in preprocess_plain: "<image>" + caption + "\\n", the instruction dropped,
    everything after the image labelled, no EOS."""
    tok = any_tok
    turns = [{"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "a blue ring"}]
    sample = encode(turns, tok, TEMPLATES["plain"], has_image=True)
    text = "<image>a blue ring\n"
    assert sample.ids == llava_ids(tok, text)
    assert sample.labels == expected_labels(tok, text, [("<image>", "a blue ring\n")])
    assert tok.eos_token_id not in sample.ids and sample.labels[sample.ids.index(IMAGE_ID)] == IGNORE
    assert stop_id(tok, TEMPLATES["plain"]) == tok.convert_tokens_to_ids("Ċ") == sample.ids[-1]


def test_an_answer_that_does_not_start_on_a_token_boundary_is_an_error(tok) -> None:
    """LLaVA masks such a sample whole ("tokenization mismatch"); here it is an error the stream skips."""
    glued = Template("", "USER: ", " AS")  # "...ASSISTANT" is one token; "AS" alone is two
    with pytest.raises(ConversationError, match="tokenization mismatch"):
        encode([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "SISTANT"}], tok, glued, has_image=False)


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
