"""Caption columns: each names one caption of an image with its prompt, sampling and token budget.

A run writes every column of its caption set for every image, in one pass: the image is read, decoded and
prepared once, and its requests (one per column) go to the engine together, so the engine's prefix cache
serves the image part of the prompt they share (recaption/worker.py). The default set is Recap-DataComp-1B
v1 alone (`re_caption`: its prompt, greedy decoding); `--captions FILE` gives another set, e.g.
recaption/caption_sets/recap_v1_v2.toml:

    [[caption]]
    name = "re_caption"             # the main caption: Recap-DataComp-1B's row fields (re_caption, re_length...)
    prompt = "Please generate ..."  # may use {org_caption}; default: Recap-DataComp-1B's prompt
    max_tokens = 128
    temperature = 0.0               # 0: greedy; else sampled with top_k / top_p
    top_k = 0
    top_p = 1.0
    seed = 0                        # sampled columns: each request's seed derives from (seed, key, column)

A sampled column seeds every request from the row's key and the column's name, so a rerun (a retry, a
healed shard) draws the same caption for the same image, whatever else shares its batch.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from recaption.engines import SamplingConfig
from recaption.prompt import DEFAULT_PROMPT

MAIN_COLUMN = "re_caption"   # Recap-DataComp-1B's caption column; every set has it
NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
# Names a caption column cannot take: the row's own fields and the WebDataset members of a sample.
RESERVED = frozenset({"key", "source_key", "uid", "url", "org_caption", "status", "error", "finish_reason",
                      "num_tokens", "quality", "notes", "width", "height", "sha256", "org_length", "re_length",
                      "fingerprint", "shard", "caption_errors", "txt", "json", "jpg", "jpeg", "png", "webp"})
SAMPLING_KEYS = {f.name for f in fields(SamplingConfig)}


@dataclass(frozen=True)
class CaptionColumn:
    name: str
    prompt: str = DEFAULT_PROMPT
    sampling: SamplingConfig = SamplingConfig()

    @property
    def sampled(self) -> bool:
        return self.sampling.temperature > 0

    def request_sampling(self, key: str) -> SamplingConfig:
        """The sampling of this column's request for the row `key`: a sampled column's seed derives from the
        column's seed, the key and the column's name (stable across runs and machines); greedy is as given."""
        if not self.sampled:
            return self.sampling
        digest = hashlib.sha256(f"{self.sampling.seed}\x00{key}\x00{self.name}".encode()).digest()
        return replace(self.sampling, seed=int.from_bytes(digest[:4], "big") & 0x7FFFFFFF)

    def as_dict(self) -> dict:
        sampling = {k: getattr(self.sampling, k) for k in sorted(SAMPLING_KEYS)}
        return {"name": self.name, "prompt": self.prompt, **sampling}


def default_set(prompt: str = DEFAULT_PROMPT, sampling: SamplingConfig = SamplingConfig()) -> tuple[CaptionColumn, ...]:
    """One column, `re_caption`: what a run without --captions writes (`--prompt` and the sampling flags)."""
    return (CaptionColumn(MAIN_COLUMN, prompt, sampling),)


def check_set(columns: tuple[CaptionColumn, ...]) -> tuple[CaptionColumn, ...]:
    names = [c.name for c in columns]
    if MAIN_COLUMN not in names:
        raise ValueError(f"a caption set needs a column named {MAIN_COLUMN!r} (columns: {names})")
    for name in names:
        if not NAME.fullmatch(name) or name in RESERVED:
            raise ValueError(f"caption column {name!r}: want lower-case letters, digits and '_' (at most 40, a "
                             f"letter first), none of the row's own fields")
        if names.count(name) > 1:
            raise ValueError(f"caption column {name!r} is named twice")
    for column in columns:
        if not column.prompt.strip():
            raise ValueError(f"caption column {column.name!r}: empty prompt")
        s = column.sampling
        if s.max_tokens < 1 or s.temperature < 0 or s.top_k < 0 or not 0 < s.top_p <= 1:
            raise ValueError(f"caption column {column.name!r}: want max_tokens >= 1, temperature >= 0, top_k >= 0, "
                             f"0 < top_p <= 1 (got {s})")
    return columns


def column_from_dict(entry: dict) -> CaptionColumn:
    unknown = set(entry) - SAMPLING_KEYS - {"name", "prompt"}
    if unknown or "name" not in entry:
        raise ValueError(f"caption column {entry.get('name')!r}: unknown keys {sorted(unknown)}" if unknown
                         else f"a caption column without a name: {entry}")
    sampling = SamplingConfig(**{k: v for k, v in entry.items() if k in SAMPLING_KEYS})
    return CaptionColumn(str(entry["name"]), str(entry.get("prompt", DEFAULT_PROMPT)), sampling)


def load_caption_set(path: str) -> tuple[CaptionColumn, ...]:
    """A `--captions` file: TOML, or JSON when it ends in .json; `[[caption]]` tables (JSON: {"caption": [...]})."""
    text = Path(path).read_text()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:   # Python 3.10
                raise ValueError("TOML needs Python 3.11 (tomllib); give the set as .json") from None
            data = tomllib.loads(text)   # its TOMLDecodeError is a ValueError
    except ValueError as e:
        raise ValueError(f"--captions {path}: {e}") from None
    entries = data.get("caption") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"--captions {path}: want a list of [[caption]] tables")
    try:
        return check_set(tuple(column_from_dict(e) for e in entries))
    except (TypeError, ValueError) as e:
        raise ValueError(f"--captions {path}: {e}") from None
