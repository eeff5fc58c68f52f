"""One self-contained HTML page about a recaption run: samples, caption lengths, errors, notes, CLIP scores,
throughput.

Everything is inlined (thumbnails as base64 JPEG, plots as base64 PNG), so the file can be mailed or
attached to an issue. Ledgers are read for every committed shard; rows (lengths, samples, notes,
scores) come from `sample_shards` evenly spaced committed shards, which keeps the cost flat for
billion-row runs. Every error reason the ledgers count gets an example row: from the sampled shards,
else from the first shard whose ledger lists it. Plots are drawn on `matplotlib.figure.Figure`
objects (no pyplot state, no global backend switch).
"""
from __future__ import annotations

import base64
import heapq
import html
import io
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from dataset import outputs, storage
from dataset.card import describe_config
from dataset.scores import SCORE_COLUMNS, ScoreCoverage, ScoreLookup, coverage, describe_scorer, score_store
from dataset.stats import LengthStats
from dataset.wds import iter_samples

THUMB_PX = 192
SCORE_EXTREMES = 6     # lowest and highest re_clip_score rows shown
LENGTH_BINS = 100      # a web caption of 10,000 words must not make 10,000 bars
LENGTH_SHOWN = 0.99    # the plot's x axis ends at this quantile of caption lengths
ROW_COLUMNS = ["key", "source_key", "status", "error", "notes", "finish_reason", "num_tokens", "quality",
               "org_length", "re_length"]
ROW_SCHEMA_SUBSET = pa.schema([outputs.ROW_SCHEMA.field(name) for name in ROW_COLUMNS])
NUMBER = re.compile(r"\d[\d,.]*")

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1240px; }
.card, td { overflow-wrap: anywhere; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
.facts td:first-child { color: #666; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 12px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; font-size: 12px; }
.card img { display: block; margin: 0 auto 6px; max-width: 100%; }
.label { color: #888; font-size: 11px; text-transform: uppercase; }
.flag { display: inline-block; border-radius: 3px; padding: 0 5px; margin-right: 4px; font-size: 11px; }
.flag.clean { background: #e3f4e3; } .flag.bad { background: #fde2cf; }
.plot { max-width: 100%; }
"""


def _escape(value) -> str:
    return html.escape("" if value is None else str(value))


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return f'<img class="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _thumbnail(data: bytes) -> str:
    try:
        image = Image.open(io.BytesIO(data))
        image.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=80)
    except Exception as e:  # a thumbnail must never break the report
        return f"<p>(image not shown: {_escape(e)})</p>"
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def spaced(items: list, n: int) -> list:
    """`n` items evenly spaced over the list, first and last included."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else items[:1]


def section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{anchor}"><h2>{_escape(title)}</h2>{"".join(parts)}</section>'


def table(header: list[str], rows: list[list], raw: frozenset[int] | set[int] = frozenset()) -> str:
    """An HTML table; cells are escaped text except the columns in `raw` (HTML we built, e.g. thumbnails)."""
    head = "".join(f"<th>{_escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{v if i in raw else _escape(v)}</td>" for i, v in enumerate(row))
                   + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _counts(counter: Counter) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in counter.most_common()) or "none"


def reason(error: str) -> str:
    """The reason of an error row ('reason: detail'), as the ledgers count it."""
    return error.split(":", 1)[0]


def note_kind(note: str) -> str:
    """A note with its numbers replaced by N: notes of one kind differ only in sizes and counts."""
    return NUMBER.sub("N", note)


# --- reading the sampled rows ----------------------------------------------------------------------

@dataclass
class Sampled:
    """What the report gathers from the rows of the sampled shards (and the shards read for examples)."""
    shards: list[str]
    org: LengthStats = field(default_factory=LengthStats)
    re: LengthStats = field(default_factory=LengthStats)
    rows: dict[str, dict] = field(default_factory=dict)           # ok rows of the sample-grid shards, by key
    errors: dict[str, dict] = field(default_factory=dict)         # reason -> first example row
    notes: dict[str, dict] = field(default_factory=dict)          # note kind -> first example row
    note_counts: Counter = field(default_factory=Counter)         # note kind -> rows (sampled shards)
    error_shards_read: list[str] = field(default_factory=list)    # shards read only for error examples


def shard_rows(run: outputs.FinishedRun, shard: str) -> pa.Table:
    return pa.Table.from_batches(list(outputs.iter_batches(run.parquet(shard), ROW_COLUMNS)), schema=ROW_SCHEMA_SUBSET)


def _collect_errors(sampled: Sampled, shard: str, rows: pa.Table) -> None:
    for row in rows.filter(pc.equal(rows["status"], "error")).to_pylist():
        sampled.errors.setdefault(reason(row["error"]), {**row, "shard": shard})


def read_sampled(run: outputs.FinishedRun, sample_shards: int, grid_shards: int = 4) -> Sampled:
    """Lengths, notes and error examples from the sampled shards; then examples of every other counted reason."""
    sampled = Sampled(spaced([ledger["shard"] for ledger in run.ledgers], sample_shards))
    for shard in sampled.shards:
        rows = shard_rows(run, shard)
        ok = rows.filter(pc.equal(rows["status"], "ok"))
        sampled.org.add(ok["org_length"])
        sampled.re.add(ok["re_length"])
        if shard in sampled.shards[:grid_shards]:
            sampled.rows.update({r["key"]: r for r in ok.select(["key", "finish_reason", "num_tokens", "quality"])
                                 .to_pylist()})
        _collect_errors(sampled, shard, rows)
        for row in rows.filter(pc.is_valid(rows["notes"])).to_pylist():
            for note in row["notes"].split("; "):
                kind = note_kind(note)
                sampled.note_counts[kind] += 1
                sampled.notes.setdefault(kind, {**row, "note": note, "shard": shard})
    for ledger in run.ledgers:   # reasons the sampled shards lack: the first shard whose ledger counts them
        missing = set(ledger.get("errors_by_reason") or {}) - sampled.errors.keys()
        if missing and ledger["shard"] not in sampled.shards:
            _collect_errors(sampled, ledger["shard"], shard_rows(run, ledger["shard"]))
            sampled.error_shards_read.append(ledger["shard"])
    return sampled


# --- sections ----------------------------------------------------------------------------------------

def summary_section(run: outputs.FinishedRun, scores: ScoreCoverage) -> str:
    info = run.run or {}
    start = min((ledger["started_at"] for ledger in run.ledgers), default=None)
    end = max((ledger["finished_at"] for ledger in run.ledgers), default=None)
    rows = [["output", run.out], ["fingerprint", run.fingerprint], *describe_config(run.caption_config)]
    rows += [
        ["shards", f"{len(run.ledgers):,} committed, {len(run.skipped):,} not committed or from another version"],
        ["rows", f"{run.total('ok'):,} ok, {run.total('error'):,} error, {run.total('duplicates'):,} duplicate keys"],
        ["quality flags", _counts(run.quality_flags())],
        ["non-regular input members", _counts(run.summed("nonregular")) +
         " (links, folders and devices in the input tars; never read as data)"],
        ["CLIP scores", f"{len(scores.current):,} of {len(run.ledgers):,} shards scored with "
                        f"{describe_scorer(scores.scorer)}" if scores.current else "not computed"],
        ["time", f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(start))} UTC, {(end - start) / 60:,.1f} min"
         if start is not None and end is not None else "n/a"],
        ["throughput", f"{info.get('images_per_s') or 0:,.1f} images/s, {info.get('tokens_per_s') or 0:,.0f} tokens/s "
                       "(whole run)" if info else "n/a (no _run.json)"],
    ]
    return section("summary", "Run", '<table class="facts">' + "".join(
        f"<tr><td>{_escape(k)}</td><td>{_escape(v)}</td></tr>" for k, v in rows) + "</table>")


def _flags(row: dict) -> str:
    flags = [f for f in (row.get("quality") or "").split(",") if f]
    if not flags:
        return '<span class="flag clean">clean</span>'
    return "".join(f'<span class="flag bad">{_escape(f)}</span>' for f in flags)


def _text(sample: dict, member: str) -> str:
    return _escape(sample.get(member, b"").decode("utf-8", errors="replace"))


def _sample_card(shard: str, sample: dict, row: dict) -> str:
    """Thumbnail, where it came from, quality flags and both captions."""
    origin = f"{shard} / {sample['key']} · {row.get('num_tokens')} tokens · {row.get('finish_reason')}"
    return (f'<div class="card">{_thumbnail(sample.get("image", b""))}'
            f'<div class="label">{_escape(origin)}</div><div>{_flags(row)}</div>'
            f'<div class="label">web caption</div><div>{_text(sample, "txt")}</div>'
            f'<div class="label">recaption</div><div>{_text(sample, "re_caption.txt")}</div></div>')


def samples_section(run: outputs.FinishedRun, rows: dict[str, dict], shards: list[str], count: int) -> str:
    shards = [shard for shard in shards if outputs.WDS_DIR in run.by_shard[shard]["files"]]
    if not shards:
        return section("samples", "Samples", "<p>No WDS output in the sampled shards (the job ran without it).</p>")
    per_shard = max(1, -(-count // len(shards)))
    cards: list[str] = []
    for shard in shards:
        for sample in iter_samples(run.wds(shard), min(per_shard, count - len(cards))):
            cards.append(_sample_card(shard, sample, rows.get(sample["key"], {})))
        if len(cards) >= count:
            break
    return section("samples", f"Samples ({len(cards)})", f'<div class="grid">{"".join(cards)}</div>')


def _quantile(counts: Counter, q: float) -> int:
    """The smallest length at or below which a share `q` of the rows lie."""
    total, seen = sum(counts.values()), 0
    for length in sorted(counts):
        seen += counts[length]
        if seen >= q * total:
            return length
    return 0


def lengths_section(org: LengthStats, re: LengthStats, shards: int) -> str:
    fig = Figure(figsize=(9, 3.2))
    ax = fig.subplots()
    both = org.counts + re.counts
    top = max(_quantile(both, LENGTH_SHOWN), 1)   # a few 10,000-word web captions must not flatten the plot
    hidden = sum(n for length, n in both.items() if length > top)
    bins = np.linspace(0, top + 1, min(top + 2, LENGTH_BINS + 1)).tolist()  # one bar per length up to LENGTH_BINS
    for stats, label, color in ((org, "web caption", "#4c78a8"), (re, "recaption", "#f58518")):
        shown = {length: n for length, n in stats.counts.items() if length <= top}
        ax.hist(list(shown), bins=bins, weights=list(shown.values()), alpha=0.6, label=label, color=color)
    ax.set_xlabel("words")
    ax.set_ylabel("rows")
    ax.legend(loc="upper right")
    stats_table = table(["caption", "rows", "mean words", "median words", "longest"], [
        ["web (org_caption)", f"{org.n:,}", f"{org.mean:.1f}", f"{org.median:g}", f"{max(org.counts, default=0):,}"],
        ["recaption (re_caption)", f"{re.n:,}", f"{re.mean:.1f}", f"{re.median:g}", f"{max(re.counts, default=0):,}"]])
    note = f" {hidden:,} captions longer than {top:,} words are left out of the plot." if hidden else ""
    return section("caption-lengths", "Caption length, web vs recaption", _png(fig), stats_table,
                   f"<p>ok rows of {shards:,} sampled shards.{note}</p>")


def errors_section(run: outputs.FinishedRun, sampled: Sampled) -> str:
    reasons = run.errors_by_reason().most_common()
    parts = []
    if reasons:
        fig = Figure(figsize=(7, 0.4 * len(reasons) + 1))
        ax = fig.subplots()
        ax.barh([r for r, _ in reasons][::-1], [n for _, n in reasons][::-1], color="#e45756")
        ax.set_xlabel("rows")
        parts.append(_png(fig))
    rows = []
    for name, n in reasons:
        e = sampled.errors.get(name)
        rows.append([name, f"{n:,}", *([e["shard"], e["key"], e["source_key"], e["error"], e["notes"]] if e else
                                       ["", "", "", "(no row with this reason found in the shards read)", ""])])
    parts.append(table(["reason", "rows", "example shard", "key", "source_key", "error", "notes"], rows)
                 if rows else "<p>No error rows.</p>")
    if sampled.error_shards_read:
        parts.append(f"<p>Examples of reasons the sampled shards lack come from {len(sampled.error_shards_read)} "
                     f"other shards whose ledgers count them.</p>")
    return section("errors", f"Errors ({run.total('error'):,} rows)", *parts)


def notes_section(sampled: Sampled) -> str:
    """One example row per kind of note (notes of one kind differ only in numbers)."""
    if not sampled.notes:
        return section("notes", "Input notes", "<p>No notes in the sampled shards.</p>")
    rows = [[kind, f"{sampled.note_counts[kind]:,}", e["shard"], e["key"], e["source_key"], e["note"]]
            for kind, e in sorted(sampled.notes.items(), key=lambda item: -sampled.note_counts[item[0]])]
    return section("notes", "Input notes (non-fatal problems)",
                   table(["kind", "rows (sampled shards)", "example shard", "key", "source_key", "note"], rows))


@dataclass
class ScoreSample:
    """CLIP scores of the sampled shards, and their extreme rows."""
    values: dict[str, list[np.ndarray]] = field(default_factory=lambda: {name: [] for name in SCORE_COLUMNS})
    errors: int = 0
    lowest: list[tuple[float, str, str]] = field(default_factory=list)    # (score, shard, key)
    highest: list[tuple[float, str, str]] = field(default_factory=list)


def read_scores(run: outputs.FinishedRun, found: ScoreCoverage, shards: list[str]) -> ScoreSample:
    sample = ScoreSample()
    store = score_store(run.output)
    for shard in shards:
        if shard not in found.current:
            continue
        scores = ScoreLookup(store, found.current[shard]).by_key()
        sample.errors += found.current[shard].get("error", 0)
        for name in SCORE_COLUMNS:
            sample.values[name].append(np.array([s[name] for s in scores.values() if s[name] is not None]))
        scored = [(s["re_clip_score"], shard, key) for key, s in scores.items() if s["re_clip_score"] is not None]
        sample.lowest = heapq.nsmallest(SCORE_EXTREMES, sample.lowest + scored)
        sample.highest = heapq.nlargest(SCORE_EXTREMES, sample.highest + scored)
    return sample


def _extreme_rows(run: outputs.FinishedRun, picks: list[tuple[float, str, str]]) -> dict[str, dict]:
    """Key -> {image, captions, scores} of the picked rows, read from their shards' WDS tars."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for _, shard, key in picks:
        wanted[shard].add(key)
    found: dict[str, dict] = {}
    for shard, keys in wanted.items():
        if outputs.WDS_DIR not in run.by_shard[shard]["files"]:
            continue
        for sample in iter_samples(run.wds(shard)):
            if sample["key"] in keys:
                found[sample["key"]] = sample
                if keys <= found.keys():
                    break
    return found


def scores_section(run: outputs.FinishedRun, found: ScoreCoverage, shards: list[str]) -> str:
    if not found.current:
        return section("clip-scores", "CLIP scores", "<p>Not computed: run <code>pipelines/score.py --input "
                       f"{_escape(run.out)} --clip-model SPEC</code>.</p>")
    sample = read_scores(run, found, shards)
    values = {name: np.concatenate(arrays) if arrays else np.array([]) for name, arrays in sample.values.items()}
    fig = Figure(figsize=(9, 3.2))
    ax = fig.subplots()
    every = np.concatenate(list(values.values()))
    bins = np.linspace(every.min(), every.max(), 50).tolist() if every.size else 10
    styles = (("recaption", "#f58518"), ("web caption", "#4c78a8"))
    for (name, data), (label, color) in zip(values.items(), styles, strict=True):
        ax.hist(data, bins=bins, alpha=0.6, label=f"{label} ({name})", color=color)
    ax.set_xlabel("cosine(image, caption)")
    ax.set_ylabel("rows")
    ax.legend(loc="upper right")
    stats = table(["score", "rows", "mean", "median", "5th pct", "95th pct"], [
        [name, f"{len(data):,}", *(f"{v:.4f}" for v in (data.mean(), np.median(data), *np.percentile(data, [5, 95])))]
        if len(data) else [name, "0", "", "", "", ""] for name, data in values.items()])
    rows = _extreme_rows(run, sample.lowest + sample.highest)
    parts = [_png(fig), stats, f"<p>{describe_scorer(found.scorer)}; ok rows of the sampled shards that are scored "
                               f"({len(found.current):,} of {len(run.ledgers):,} shards scored); "
                               f"{sample.errors:,} rows whose image could not be scored.</p>"]
    for title, picks in (("Lowest re_clip_score", sample.lowest), ("Highest re_clip_score", sample.highest)):
        table_rows = []
        for score, shard, key in picks:
            row = rows.get(key, {})
            table_rows.append([_thumbnail(row["image"]) if row else "(no WDS)", shard, key, f"{score:.4f}",
                               row.get("re_caption.txt", b"").decode("utf-8", "replace"),
                               row.get("txt", b"").decode("utf-8", "replace")])
        parts.append(f"<h3>{_escape(title)}</h3>" + table(
            ["image", "shard", "key", "re_clip_score", "re_caption", "org_caption"], table_rows, raw={0}))
    return section("clip-scores", "CLIP scores", *parts)


def throughput_section(run: outputs.FinishedRun) -> str:
    ledgers = run.ledgers
    t0 = min(ledger["started_at"] for ledger in ledgers)
    workers = sorted({str(ledger.get("worker")) for ledger in ledgers})
    cmap = colormaps["tab10"]
    colors = {w: cmap(i % 10) for i, w in enumerate(workers)}
    fig = Figure(figsize=(9, 5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    for rate, ax, label in ((lambda ledger: ledger["images_per_s"], top, "images/s"),
                            (lambda ledger: ledger["tokens_per_s"], bottom, "tokens/s")):
        for worker in workers:
            mine = [ledger for ledger in ledgers if str(ledger.get("worker")) == worker]
            ax.hlines([rate(ledger) for ledger in mine], [(ledger["started_at"] - t0) / 60 for ledger in mine],
                      [(ledger["finished_at"] - t0) / 60 for ledger in mine], colors=[colors[worker]], lw=3,
                      label=worker)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    bottom.set_xlabel("minutes since the first shard started (one bar per shard)")
    if len(workers) <= 12:
        top.legend(fontsize=8, ncol=min(len(workers), 6), loc="lower right")
    per_worker: defaultdict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0])
    for ledger in ledgers:
        acc = per_worker[str(ledger.get("worker"))]
        acc[0] += 1
        acc[1] += ledger.get("rows_out") or 0
        acc[2] += ledger.get("seconds") or 0.0
        acc[3] += ledger.get("tokens") or 0
    rows = [[w, n, f"{r:,}", f"{s:,.0f}", f"{r / s:,.1f}" if s else "", f"{t / s:,.0f}" if s else ""]
            for w, (n, r, s, t) in sorted(per_worker.items())]
    return section("throughput", "Throughput per shard over time", _png(fig),
                   table(["worker", "shards", "rows", "busy s", "images/s", "tokens/s"], rows))


@dataclass(frozen=True)
class ReportConfig:
    samples: int = 24             # images in the sample grid
    sample_shards: int = 200      # evenly spaced committed shards whose rows are read (millions of rows, seconds)
    fingerprint: str | None = None  # the output version (default: the current one)


def build_report(out: str, config: ReportConfig | None = None, **overrides) -> str:
    """The report's HTML for the committed shards of OUT; `overrides` replace fields of `config`."""
    config = replace(config or ReportConfig(), **overrides)
    run = outputs.load_finished(out, config.fingerprint)
    if not run.ledgers:
        raise ValueError(f"{out}: no committed shards to report on")
    sampled = read_sampled(run, config.sample_shards)
    samples = config.samples
    scores = coverage(run)
    body = "".join([
        f"<h1>Recaption report: {_escape(out)}</h1>",
        summary_section(run, scores),
        samples_section(run, sampled.rows, sampled.shards[:4], samples),
        lengths_section(sampled.org, sampled.re, len(sampled.shards)),
        errors_section(run, sampled),
        notes_section(sampled),
        scores_section(run, scores, sampled.shards),
        throughput_section(run),
    ])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Recaption report</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def write_report(out: str, html_path: str, config: ReportConfig | None = None, **overrides) -> int:
    """Build the report and write it to `html_path` (local or s3://); returns its size in bytes."""
    data = build_report(out, config, **overrides).encode()
    storage.write_bytes(html_path, data)
    return len(data)
