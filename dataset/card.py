"""The dataset card (README.md): Hub YAML metadata, then how the data was made and how to use it.

Everything that comes from data or settings (captions, URLs, keys, the prompt, the model name) is
rendered as inert text: whitespace collapsed, `&`, `<`, `>` as HTML entities and Markdown punctuation
backslash-escaped (CommonMark allows it before any ASCII punctuation), so a caption cannot open a tag,
a link, an image, emphasis or a table cell. Settings are written as sentences, never as Python values.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa
import yaml

from dataset.stats import LengthStats

COLUMN_DOCS = {
    "url": "image URL (from the DataComp metadata)",
    "re_caption": "the new caption written by the captioner",
    "org_caption": "the original web caption (alt-text)",
    "sha256": "SHA-256 of the downloaded image bytes",
    "key": "img2dataset sample key (shard + index)",
    "re_clip_score": "cosine similarity of the image and `re_caption` under the scoring CLIP model",
    "org_clip_score": "cosine similarity of the image and `org_caption` under the scoring CLIP model",
    "re_length": "words in `re_caption`",
    "org_length": "words in `org_caption`",
    "uid": "DataComp sample id",
    "source_key": "the input's original key where `key` had to be made safe, else empty",
    "width": "decoded image width, px",
    "height": "decoded image height, px",
    "num_tokens": "tokens generated for `re_caption`",
    "finish_reason": "`stop` (the model ended the caption) or `length` (cut at max tokens)",
    "quality": "comma-separated flags: `length`, `repetition`, `truncated`; empty when clean",
    "notes": "non-fatal problems with the input sample, `; `-separated; empty when none",
    "shard": "input shard the row came from",
    "fingerprint": "hash of the captioning settings: one value per published dataset",
}
# The fields of a caption set's other columns (dataset/outputs.py `column_fields`), by suffix.
CAPTION_SET_DOCS = {"_clip_score": "cosine similarity of the image and `{}` under the scoring CLIP model",
                    "_num_tokens": "tokens generated for `{}`", "_finish_reason": "`finish_reason` of `{}`",
                    "_quality": "`quality` flags of `{}`", "_length": "words in `{}`"}


def column_doc(name: str) -> str:
    """The card's line for a published column; a caption set's other columns by their suffix."""
    if name in COLUMN_DOCS:
        return COLUMN_DOCS[name]
    for suffix, doc in CAPTION_SET_DOCS.items():
        if name.endswith(suffix):
            return doc.format(name[:-len(suffix)])
    return "another caption of the image (a column of the run's caption set, `--captions`)"


MARKDOWN_PUNCTUATION = "\\`*_{}[]()#+-.!|~:@$=^"
HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
CELL_CHARS = 160
NUMBER = re.compile(r"-?[\d,]+(\.\d+)?")   # digits, separators and a sign form no Markdown
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                   (10_000_000_000, "1B<n<10B"))


@dataclass
class ScoreInfo:
    """The CLIP scores joined into the published rows."""
    model: str
    re_mean: float
    org_mean: float
    unscored_rows: int   # ok rows whose image the scorer could not use (null scores)


@dataclass
class CardInfo:
    title: str
    repo_id: str | None
    license: str
    fingerprint: str
    caption_config: dict
    shards: int
    skipped_shards: int
    ok_rows: int
    error_rows: int
    errors_by_reason: dict[str, int]
    duplicates: int
    split_rows: dict[str, int]
    split_bytes: dict[str, int]
    download_bytes: int
    data_files: dict[str, str]
    nested: bool
    schema: pa.Schema
    org_length: LengthStats
    re_length: LengthStats
    samples: list[dict]
    scores: ScoreInfo | None = None
    complete: bool = True          # every input shard of the version was committed when it was published


def md_text(value) -> str:
    """Any value as inert one-line Markdown text (see the module docstring)."""
    text = " ".join(("" if value is None else str(value)).split())
    text = "".join("\\" + c if c in MARKDOWN_PUNCTUATION else c for c in text)
    return "".join(HTML_ENTITIES.get(c, c) for c in text)


def _cell(value) -> str:
    """A table cell: numbers as they are, text shortened before escaping (an escape is never cut in half)."""
    if isinstance(value, float):
        return f"{value:.4f}"
    text = " ".join(("" if value is None else str(value)).split())
    if NUMBER.fullmatch(text):
        return text
    return md_text(text if len(text) <= CELL_CHARS else text[:CELL_CHARS - 1] + "…")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)]


def size_category(n: int) -> str:
    return next((label for limit, label in SIZE_CATEGORIES if n < limit), "n>10B")


def front_matter(info: CardInfo) -> dict:
    """The YAML header the Hub reads: license, tasks, size, splits -> files, features."""
    return {
        "license": info.license,
        "task_categories": ["image-to-text", "text-to-image", "zero-shot-image-classification"],
        "language": ["en"],
        "size_categories": [size_category(info.ok_rows)],
        "pretty_name": " ".join(info.title.split()),
        "tags": ["recaptioning", "datacomp", "openvision", "image-text"],
        "configs": [{"config_name": "default", "data_files": [
            {"split": split, "path": pattern} for split, pattern in info.data_files.items()]}],
        "dataset_info": {
            "features": [{"name": f.name, "dtype": str(f.type)} for f in info.schema],
            "splits": [{"name": split, "num_bytes": info.split_bytes[split], "num_examples": info.split_rows[split]}
                       for split in info.data_files],
            "download_size": info.download_bytes,
            "dataset_size": sum(info.split_bytes.values()),
        },
    }


# --- the caption settings as sentences -----------------------------------------------------------

def plain(value) -> str:
    """A setting's value as a reader writes it: no Python reprs (None, True, {...}, [...])."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {plain(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(plain(v) for v in value) or "none"
    return str(value)


def _captioner(c: dict) -> str:
    version = c.get("model_version") or c.get("revision")
    pinned = (f"at {version}" if version
              else "with no pinned revision (the model's files as they were at run time)")
    return f"{c.get('model', 'unknown')} {pinned}, run with the {c.get('backend', 'unknown')} backend"


def _decoding(c: dict) -> str:
    temperature = c.get("temperature")
    if temperature == 0:
        text = "greedy (temperature 0)"
    else:
        parts = [f"temperature {plain(temperature)}"]
        if c.get("top_k") not in (None, 0, -1):
            parts.append(f"top-k {plain(c['top_k'])}")
        if c.get("top_p") not in (None, 1, 1.0):
            parts.append(f"top-p {plain(c['top_p'])}")
        text = "sampling with " + ", ".join(parts) + f", seed {plain(c.get('seed'))}"
    return text + (f", at most {plain(c['max_tokens'])} new tokens" if c.get("max_tokens") is not None else "")


def _images(image: dict) -> str:
    text = "decoded with their EXIF rotation and converted to RGB"
    if "max_side" in image:
        text += f", downscaled to at most {plain(image['max_side'])} px on the longest side"
        if image.get("draft"):
            text += " (JPEGs decoded at a reduced scale where that still covers it)"
    refused = []
    if "max_pixels" in image:
        refused.append(f"over {plain(image['max_pixels'])} pixels")
    if "min_side" in image:
        refused.append(f"with a side under {plain(image['min_side'])} px")
    if "max_aspect_ratio" in image:
        refused.append(f"longer than {plain(image['max_aspect_ratio'])} times their width or height")
    if refused:
        text += "; refused when " + ", ".join(refused)
    return text


CONFIG_SENTENCES = {   # label -> (keys it covers, sentence)
    "captioner": (("model", "revision", "model_version", "backend"), _captioner),
    "prompt": (("prompt",), lambda c: f"“{c.get('prompt', '')}”"),
    "decoding": (("temperature", "top_k", "top_p", "seed", "max_tokens"), _decoding),
}
IMAGE_KEYS = ("max_side", "draft", "max_pixels", "min_side", "max_aspect_ratio")


def describe_config(config: dict) -> list[tuple[str, str]]:
    """(label, sentence) pairs covering every key of the caption config, as plain text (not yet escaped)."""
    lines: list[tuple[str, str]] = []
    covered: set[str] = set()
    for label, (keys, sentence) in CONFIG_SENTENCES.items():
        if any(k in config for k in keys):
            lines.append((label, sentence(config)))
            covered.update(keys)
    image = config.get("image")
    if isinstance(image, dict):
        lines.append(("images", _images(image)))
        if extra := {k: v for k, v in image.items() if k not in IMAGE_KEYS}:
            lines.append(("other image settings", plain(extra)))
        covered.add("image")
    if other := {k: v for k, v in config.items() if k not in covered}:
        lines.append(("other settings", plain(other)))
    return lines


# --- the card ------------------------------------------------------------------------------------

def _how_made(info: CardInfo) -> list[str]:
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in sorted(info.errors_by_reason.items())) or "none"
    facts = [(label, md_text(text)) for label, text in describe_config(info.caption_config)]
    facts += [
        ("fingerprint", f"`{info.fingerprint}` (hash of the settings above; every row of this dataset has it)"),
        ("rows", f"{info.ok_rows:,} captioned rows in `train`; {info.error_rows:,} rows whose image could not be "
                 f"used are not published (by reason: {md_text(reasons)}); {info.duplicates:,} duplicate keys "
                 "dropped"),
        ("shards", f"{info.shards:,} finished shards published; {info.skipped_shards:,} unfinished or from "
                   "another run left out" + ("" if info.complete else "; the recaption run was still going, so "
                                             "this is part of the input")),
    ]
    if info.scores:
        s = info.scores
        facts.append(("CLIP scores", f"{md_text(s.model)}: mean {s.re_mean:.4f} with `re_caption`, "
                                     f"{s.org_mean:.4f} with `org_caption`; texts cut to the model's context; "
                                     f"{s.unscored_rows:,} rows whose image could not be scored have empty scores"))
    else:
        facts.append(("CLIP scores", "not computed for this release (`re_clip_score` and `org_clip_score` are "
                                     "absent)"))
    return [f"- **{name}**: {text}" for name, text in facts]


def _redownload(info: CardInfo) -> list[str]:
    local = "".join(c if c.isalnum() or c in "-_" else "-" for c in info.title) or "dataset"
    pattern = info.data_files["train"]
    url_list = f"{local}/data" + ("/0000  # repeat for each folder under data/" if info.nested else "")
    fetch = (f"hf download {info.repo_id} --repo-type dataset --include '{pattern}' --local-dir {local}"
             if info.repo_id else f"# copy the files matching {pattern} into {local}/data/")
    return ["```bash", fetch,
            f"img2dataset --url_list {url_list} --input_format parquet --url_col url \\",
            "  --caption_col re_caption --save_additional_columns '[\"org_caption\"]' \\",
            "  --output_format webdataset --output_folder images --image_size 512 \\",
            "  --resize_mode keep_ratio_largest --resize_only_if_bigger True", "```"]


def render_card(info: CardInfo) -> str:
    header = yaml.safe_dump(front_matter(info), sort_keys=False, allow_unicode=True)
    splits = ", ".join(f"`{s}` ({info.split_rows[s]:,} rows, `{p}`)" for s, p in info.data_files.items())
    sample_columns = ["key", "url", "org_caption", "re_caption", *(["re_clip_score"] if info.scores else [])]
    lines = [
        "---", header.rstrip(), "---", "", f"# {md_text(info.title)}", "",
        "Web image-text pairs (DataComp) recaptioned by a LLaVA-style captioner with the OpenVision data "
        "engine. Every row keeps the web caption (`org_caption`) next to the new one (`re_caption`) and "
        "the image `url`; the images themselves are not included (see *Getting the images*). The columns "
        "follow Recap-DataComp-1B, so its tools work unchanged.", "",
        f"Splits: {splits}. `preview` holds the first rows of `train`.", "",
        "## How it was made", "", *_how_made(info), "",
        "## Caption length (words)", "",
        *_table(["caption", "mean", "median"], [
            ["web (org_caption)", f"{info.org_length.mean:.1f}", f"{info.org_length.median:g}"],
            ["recaption (re_caption)", f"{info.re_length.mean:.1f}", f"{info.re_length.median:g}"]]), "",
        "## Columns", "", *(f"- `{f.name}` ({f.type}): {column_doc(f.name)}" for f in info.schema), "",
        "## Samples", "",
        *_table(sample_columns, [[s.get(c) for c in sample_columns] for s in info.samples]), "",
        "## Getting the images", "",
        "Download the `train` Parquet files, then let img2dataset fetch the images with the new captions:", "",
        *_redownload(info), "",
        "Some URLs will have gone dead since the metadata was collected; `sha256` lets you check that an "
        "image is the one that was captioned.", "",
        "## License", "",
        f"Metadata and captions: {md_text(info.license)}. The images belong to their owners and are only linked.", "",
    ]
    return "\n".join(lines)
