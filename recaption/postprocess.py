"""Caption clean-up and quality flags."""
from __future__ import annotations

# Bump when clean_caption or quality_flags change what they produce: the version enters the fingerprint.
CLEANUP_VERSION = 1

# A caption whose distinct n-gram share falls below this is a degenerate repetition loop.
MIN_DISTINCT_NGRAM_SHARE = 0.5
NGRAM = 4
MIN_ITEMS_FOR_REPETITION = 16


def clean_caption(text: str) -> str:
    """Trim and collapse all runs of whitespace to one space."""
    return " ".join(text.split())


def is_repetitive(items: list) -> bool:
    """True when a sequence (token ids or words) is mostly the same n-grams over and over."""
    if len(items) < MIN_ITEMS_FOR_REPETITION:
        return False
    grams = [tuple(items[i:i + NGRAM]) for i in range(len(items) - NGRAM + 1)]
    return len(set(grams)) / len(grams) < MIN_DISTINCT_NGRAM_SHARE


def quality_flags(text: str, token_ids: list[int], finish_reason: str) -> str:
    """Comma-separated flags: 'length' (hit max tokens), 'repetition' (a loop), 'empty'."""
    flags = []
    if finish_reason == "length":
        flags.append("length")
    if is_repetitive(list(token_ids)) or is_repetitive(text.split()):
        flags.append("repetition")
    if not text:
        flags.append("empty")
    return ",".join(flags)


def word_count(text: str | None) -> int:
    return len(text.split()) if text else 0
