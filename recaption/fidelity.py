"""How close our captions come to published ones, per conversation template and backend.

Protocol. A sample of rows (uniform, without replacement, seeded) is drawn from Parquet files of published
captions with their images, such as UCSC-VLAA/Recap-COCO-30K (COCO images recaptioned by the Recap-DataComp-1B
captioner). Each image is prepared as a recaption job prepares it (dataset/images.py) and captioned greedily
under every candidate: each chat template (recaption/prompt.py) on each backend, one engine per backend.
Both captions are cleaned as the job cleans its output (whitespace collapsed) and compared per image:

- exact match: the two texts are equal;
- shared prefix: the number of the model's tokens both start with (the greedy steps before they part);
- token F1: the harmonic mean of precision and recall of the two captions' token multisets;
- length difference: our caption's tokens minus the published one's.

Per candidate: the mean of each over the sample with a 95% interval, the Wilson score interval for the
exact-match rate (a proportion; a bootstrap interval collapses to a point at 0 or 1) and a percentile
bootstrap over images for the others. Candidates are ranked by mean shared prefix, then exact match, then
F1; the margin of the best over the runner-up is the paired bootstrap interval of their per-image
differences. Rows whose image or caption cannot be used are left out and listed with file, row and reason.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image

from dataset.images import ImageConfig, ImageError, prepare_image
from recaption.engines import EngineConfig, SamplingConfig, make_engine
from recaption.postprocess import clean_caption
from recaption.prompt import CHAT_TEMPLATES, DEFAULT_PROMPT, PromptBuilder, with_chat_template

METRICS = ("prefix_tokens", "exact_match", "token_f1", "length_diff")


@dataclass(frozen=True)
class FidelityConfig:
    inputs: tuple[str, ...]               # Parquet files of published captions and their images
    model: str
    revision: str | None = None
    templates: tuple[str, ...] = tuple(CHAT_TEMPLATES)
    backends: tuple[str, ...] = ("vllm",)
    caption_column: str = "re_caption"
    image_column: str = "image"           # bytes, {'bytes', 'path'} structs (Hugging Face Image) or paths
    image_root: str | None = None         # where relative image paths start; default: the Parquet file's folder
    sample: int = 200
    seed: int = 0
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 128
    dtype: str = "auto"
    max_model_len: int | None = None
    engine_kwargs: dict = field(default_factory=dict)
    batch_size: int = 16                  # transformers: requests per generate() call
    resamples: int = 2000                 # bootstrap resamples
    confidence: float = 0.95


@dataclass(frozen=True)
class Published:
    source: str          # 'FILE:ROW'
    caption: str
    image: Image.Image


# --- reading the published captions ----------------------------------------------------------------

def image_bytes(value, root: Path) -> bytes:
    """The encoded image of one cell: raw bytes, a Hugging Face Image struct, or a path (relative to root)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str) and value:
        return (root / value).read_bytes()
    raise ValueError(f"neither image bytes nor a path ({type(value).__name__})")


def read_sample(cfg: FidelityConfig) -> tuple[list[Published], list[dict]]:
    """The sampled rows that can be used, and {'source', 'reason'} for those that cannot."""
    import pyarrow.parquet as pq

    files = [pq.ParquetFile(path) for path in cfg.inputs]
    for path, f in zip(cfg.inputs, files, strict=True):
        missing = [c for c in (cfg.image_column, cfg.caption_column) if c not in f.schema_arrow.names]
        if missing:
            raise ValueError(f"{path}: no column {missing} (columns: {f.schema_arrow.names}); "
                             "pass --image-column / --caption-column")
    sizes = [f.metadata.num_rows for f in files]
    chosen = np.random.default_rng(cfg.seed).choice(sum(sizes), size=min(cfg.sample, sum(sizes)), replace=False)
    offsets = np.cumsum([0, *sizes])
    rows, skipped = [], []
    for k, (path, f) in enumerate(zip(cfg.inputs, files, strict=True)):
        wanted = sorted(int(i - offsets[k]) for i in chosen if offsets[k] <= i < offsets[k + 1])
        root = Path(cfg.image_root) if cfg.image_root else Path(path).parent
        start = 0
        for group in range(f.num_row_groups):
            count = f.metadata.row_group(group).num_rows
            here = [i for i in wanted if start <= i < start + count]
            if here:
                table = f.read_row_group(group, columns=[cfg.image_column, cfg.caption_column])
                images, captions = table.column(cfg.image_column), table.column(cfg.caption_column)
                for i in here:
                    row = published_row(f"{path}:{i}", images[i - start].as_py(), captions[i - start].as_py(), root)
                    (skipped if isinstance(row, dict) else rows).append(row)
            start += count
    return rows, skipped


def published_row(source: str, image, caption, root: Path) -> Published | dict:
    """One usable row, or {'source', 'reason'} saying why not."""
    caption = clean_caption(caption) if isinstance(caption, str) else ""
    if not caption:
        return {"source": source, "reason": "caption: empty or missing"}
    try:
        return Published(source, caption, prepare_image(image_bytes(image, root), ImageConfig()).image)
    except ImageError as e:
        return {"source": source, "reason": f"image: {e}"}
    except (OSError, ValueError) as e:
        return {"source": source, "reason": f"image: {type(e).__name__}: {e}"}


# --- comparing two captions ---------------------------------------------------------------------

def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):   # up to the shorter one
        if x != y:
            break
        n += 1
    return n


def token_f1(a: list[int], b: list[int]) -> float:
    if not a and not b:
        return 1.0
    overlap = sum((Counter(a) & Counter(b)).values())
    return 2 * overlap / (len(a) + len(b))


def compare(ours: str, published: str, tokenize) -> dict[str, float]:
    """The four per-image measures of our caption against the published one (both already cleaned)."""
    a, b = tokenize(ours), tokenize(published)
    return {"prefix_tokens": shared_prefix(a, b), "exact_match": float(ours == published),
            "token_f1": token_f1(a, b), "length_diff": len(a) - len(b)}


# --- intervals ----------------------------------------------------------------------------------

def wilson(successes: float, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a proportion."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(values: np.ndarray, resamples: int, confidence: float, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, resampling images."""
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def summarize(per_image: list[dict], cfg: FidelityConfig) -> dict[str, dict]:
    rng = np.random.default_rng(cfg.seed)
    summary = {}
    for metric in METRICS:
        values = np.array([row[metric] for row in per_image], dtype=float)
        if metric == "exact_match":
            low, high = wilson(values.sum(), len(values), cfg.confidence)
        else:
            low, high = bootstrap(values, cfg.resamples, cfg.confidence, rng)
        summary[metric] = {"mean": float(values.mean()), "low": low, "high": high}
    return summary


def margin(best: list[dict], runner_up: list[dict], cfg: FidelityConfig) -> dict[str, dict]:
    """Paired per-image differences best minus runner-up, with bootstrap intervals."""
    rng = np.random.default_rng(cfg.seed)
    out = {}
    for metric in ("prefix_tokens", "exact_match", "token_f1"):
        diff = np.array([a[metric] - b[metric] for a, b in zip(best, runner_up, strict=True)], dtype=float)
        low, high = bootstrap(diff, cfg.resamples, cfg.confidence, rng)
        out[metric] = {"mean": float(diff.mean()), "low": low, "high": high}
    return out


# --- the run ------------------------------------------------------------------------------------

def caption_candidates(cfg: FidelityConfig, rows: list[Published]) -> tuple[dict[str, list[str]], object]:
    """{'TEMPLATE@BACKEND': our cleaned captions in row order} and the model's tokenizer."""
    images = [row.image for row in rows]
    captions, tokenizer = {}, None
    for backend in cfg.backends:
        engine = make_engine(EngineConfig(cfg.model, revision=cfg.revision, backend=backend, dtype=cfg.dtype,
                                          max_model_len=cfg.max_model_len, batch_size=cfg.batch_size,
                                          engine_kwargs=dict(cfg.engine_kwargs)),
                             SamplingConfig(max_tokens=cfg.max_tokens))
        try:
            tokenizer = engine.processor.tokenizer
            for spec in cfg.templates:
                builder = PromptBuilder(with_chat_template(engine.processor, spec), cfg.prompt)
                if builder.uses_org_caption:
                    raise ValueError("--prompt uses {org_caption}; published captions are compared with a prompt "
                                     "that has none (Recap's)")
                generated = engine.generate([builder.build("")] * len(images), images)
                captions[f"{spec}@{backend}"] = [clean_caption(g.text) for g in generated]
        finally:
            engine.close()
    return captions, tokenizer


def run_fidelity(cfg: FidelityConfig) -> dict:
    """The report: candidates best first, the margin of the best, left-out rows and every caption."""
    if len(set(cfg.templates)) != len(cfg.templates) or not cfg.templates or not cfg.backends:
        raise ValueError("give one or more distinct --templates and one or more --backends")
    rows, skipped = read_sample(cfg)
    if not rows:
        raise ValueError(f"no usable rows in the sample of {cfg.inputs} ({len(skipped)} left out: "
                         f"{skipped[:3]})")
    captions, tokenizer = caption_candidates(cfg, rows)

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    per_image = {label: [compare(ours, row.caption, tokenize) for ours, row in zip(texts, rows, strict=True)]
                 for label, texts in captions.items()}
    candidates = [{"candidate": label, "template": label.rsplit("@", 1)[0], "backend": label.rsplit("@", 1)[1],
                   **summarize(measures, cfg)} for label, measures in per_image.items()]
    candidates.sort(key=lambda c: tuple(-c[m]["mean"] for m in ("prefix_tokens", "exact_match", "token_f1")))
    report = {
        "inputs": list(cfg.inputs), "model": cfg.model, "images": len(rows), "left_out": skipped,
        "intervals": f"{cfg.confidence:.0%}: exact match by Wilson score; the others by percentile bootstrap over "
                     f"images ({cfg.resamples} resamples)",
        "candidates": candidates,
        "captions": [{"source": row.source, "published": row.caption,
                      **{label: texts[i] for label, texts in captions.items()}} for i, row in enumerate(rows)],
    }
    if len(candidates) > 1:
        best, second = candidates[0]["candidate"], candidates[1]["candidate"]
        report["margin"] = {"best": best, "runner_up": second, **margin(per_image[best], per_image[second], cfg)}
    return report


def format_report(report: dict) -> str:
    """The candidates as a table, best first, then the margin and the left-out rows."""
    def cell(stat: dict, digits: int) -> str:
        return f"{stat['mean']:.{digits}f} [{stat['low']:.{digits}f}, {stat['high']:.{digits}f}]"

    lines = [f"{report['images']} images of {', '.join(report['inputs'])}; intervals {report['intervals']}",
             f"{'candidate':<40} {'exact match':<22} {'shared prefix (tokens)':<24} {'token F1':<22} "
             "length difference (tokens)"]
    for c in report["candidates"]:
        lines.append(f"{c['candidate'][:40]:<40} {cell(c['exact_match'], 3):<22} {cell(c['prefix_tokens'], 1):<24} "
                     f"{cell(c['token_f1'], 3):<22} {cell(c['length_diff'], 1)}")
    if "margin" in report:
        m = report["margin"]
        lines.append(f"best {m['best']} over {m['runner_up']}: shared prefix {cell(m['prefix_tokens'], 1)} tokens, "
                     f"exact match {cell(m['exact_match'], 3)}, token F1 {cell(m['token_f1'], 3)} (paired)")
    for row in report["left_out"]:
        lines.append(f"left out {row['source']}: {row['reason']}")
    return "\n".join(lines)
