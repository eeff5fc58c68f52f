"""The dataset card (README.md): Hub YAML metadata, then how the data was made and how to use it."""
from __future__ import annotations

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
    "re_length": "words in `re_caption`",
    "org_length": "words in `org_caption`",
    "uid": "DataComp sample id",
    "width": "decoded image width, px",
    "height": "decoded image height, px",
    "num_tokens": "tokens generated for `re_caption`",
    "finish_reason": "`stop` (the model ended the caption) or `length` (cut at max tokens)",
    "quality": "comma-separated flags: `length`, `repetition`, `empty`; empty when clean",
    "shard": "input shard the row came from",
}
SAMPLING_KEYS = ("max_tokens", "temperature", "top_k", "top_p", "seed")
DESCRIBED_KEYS = ("model", "revision", "backend", "prompt", *SAMPLING_KEYS)
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                   (10_000_000_000, "1B<n<10B"))


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


def size_category(n: int) -> str:
    return next((label for limit, label in SIZE_CATEGORIES if n < limit), "n>10B")


def front_matter(info: CardInfo) -> dict:
    """The YAML header the Hub reads: license, tasks, size, splits -> files, features."""
    return {
        "license": info.license,
        "task_categories": ["image-to-text", "text-to-image", "zero-shot-image-classification"],
        "language": ["en"],
        "size_categories": [size_category(info.ok_rows)],
        "pretty_name": info.title,
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


def _cell(value) -> str:
    """A Markdown table cell: no pipes or newlines, long text shortened."""
    text = "" if value is None else str(value)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= 160 else text[:157] + "..."


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)]


def _how_made(info: CardInfo) -> list[str]:
    c = info.caption_config
    sampling = ", ".join(f"{k}={c[k]}" for k in SAMPLING_KEYS if k in c)
    greedy = " (greedy)" if c.get("temperature") == 0 else ""
    preprocessing = ", ".join(f"{k}={v}" for k, v in c.items() if k not in DESCRIBED_KEYS) or "n/a"
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in sorted(info.errors_by_reason.items())) or "none"
    facts = {
        "captioner": f"`{c.get('model', '?')}` at revision `{c.get('revision', '?')}` ({c.get('backend', '?')})",
        "prompt": f"\"{c.get('prompt', '?')}\"",
        "sampling": sampling + greedy,
        "image preprocessing": preprocessing,
        "fingerprint": f"`{info.fingerprint}` (hash of all of the above)",
        "rows": f"{info.ok_rows:,} captioned rows in `train`; {info.error_rows:,} rows whose image could not be "
                f"used are not published (by reason: {reasons}); {info.duplicates:,} duplicate keys dropped",
        "shards": f"{info.shards:,} finished shards published; {info.skipped_shards:,} unfinished or from "
                  "another run left out",
    }
    return [f"- **{name}**: {text}" for name, text in facts.items()]


def _redownload(info: CardInfo) -> list[str]:
    local = info.title
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
    lines = [
        "---", header.rstrip(), "---", "", f"# {info.title}", "",
        "Web image-text pairs (DataComp) recaptioned by a LLaVA-style captioner with the OpenVision data "
        "engine. Every row keeps the web caption (`org_caption`) next to the new one (`re_caption`) and "
        "the image `url`; the images themselves are not included (see *Getting the images*). The columns "
        "follow Recap-DataComp-1B, so its tools work unchanged.", "",
        f"Splits: {splits}. `preview` holds the first rows of `train`.", "",
        "## How it was made", "", *_how_made(info), "",
        "## Caption length (words)", "",
        *_table(["caption", "mean", "median"], [
            ["web (`org_caption`)", f"{info.org_length.mean:.1f}", f"{info.org_length.median:g}"],
            ["recaption (`re_caption`)", f"{info.re_length.mean:.1f}", f"{info.re_length.median:g}"]]), "",
        "## Columns", "", *(f"- `{f.name}` ({f.type}): {COLUMN_DOCS.get(f.name, '')}" for f in info.schema), "",
        "## Samples", "",
        *_table(["key", "url", "org_caption", "re_caption"],
                [[s["key"], s["url"], s["org_caption"], s["re_caption"]] for s in info.samples]), "",
        "## Getting the images", "",
        "Download the `train` Parquet files, then let img2dataset fetch the images with the new captions:", "",
        *_redownload(info), "",
        "Some URLs will have gone dead since the metadata was collected; `sha256` lets you check that an "
        "image is the one that was captioned.", "",
        "## License", "",
        f"Metadata and captions: {info.license}. The images belong to their owners and are only linked.", "",
    ]
    return "\n".join(lines)
