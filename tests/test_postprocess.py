"""Caption clean-up and quality flags."""
from __future__ import annotations

import pytest

from recaption.postprocess import clean_caption, is_repetitive, quality_flags, word_count

# A real, 50-word descriptive caption in the Recap-DataComp-1B style.
GOOD_CAPTION = (
    "The image shows a red brick house with a white front door and two large windows on either side. "
    "A small garden with yellow tulips lines the stone path leading to the entrance, while a tall oak "
    "tree casts a soft shadow across the lawn under a clear blue sky."
)
GOOD_TOKENS = list(range(100, 170))  # a caption's worth of ids with no loop
LOOP_WORDS = ("a red circle on a white background. " * 12).split()
LOOP_TOKENS = [17, 42, 99, 5, 8] * 20


def test_good_caption_is_fifty_words():
    assert word_count(GOOD_CAPTION) == 50


@pytest.mark.parametrize("raw, clean", [
    ("  a  red\tcircle \n\n on white  ", "a red circle on white"),
    ("line one\r\nline two", "line one line two"),
    ("\u00a0non-breaking\u2003spaces\u00a0", "non-breaking spaces"),
    ("   \n\t ", ""),
    ("", ""),
])
def test_clean_caption_collapses_whitespace(raw, clean):
    assert clean_caption(raw) == clean


def test_word_count():
    assert word_count(None) == 0
    assert word_count("") == 0
    assert word_count(" two  words ") == 2


def test_repetition_of_token_ids():
    assert is_repetitive(LOOP_TOKENS)
    assert not is_repetitive(GOOD_TOKENS)


def test_repetition_of_words():
    assert is_repetitive(LOOP_WORDS)
    assert not is_repetitive(GOOD_CAPTION.split())


def test_caption_that_starts_well_then_loops():
    words = GOOD_CAPTION.split()[:20] + LOOP_WORDS * 2
    assert is_repetitive(words)


def test_short_sequences_are_never_repetitive():
    assert not is_repetitive(["very"] * 15)
    assert not is_repetitive([])


@pytest.mark.parametrize("text, tokens, finish, flags", [
    (GOOD_CAPTION, GOOD_TOKENS, "stop", ""),
    (GOOD_CAPTION, GOOD_TOKENS, "length", "length"),
    (" ".join(LOOP_WORDS), GOOD_TOKENS, "stop", "repetition"),           # words loop
    (GOOD_CAPTION, LOOP_TOKENS, "stop", "repetition"),                   # ids loop
    (" ".join(LOOP_WORDS), LOOP_TOKENS, "length", "length,repetition"),  # the usual degenerate case
    ("", [], "stop", "empty"),
    ("", [2], "length", "length,empty"),
    ("", LOOP_TOKENS, "length", "length,repetition,empty"),              # e.g. a loop of special tokens
])
def test_quality_flags(text, tokens, finish, flags):
    assert quality_flags(text, tokens, finish) == flags
