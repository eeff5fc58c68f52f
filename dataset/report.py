"""One self-contained HTML page about a recaption run: samples, caption lengths, errors, throughput.

Everything is inlined (thumbnails as base64 JPEG, plots as base64 PNG), so the file can be mailed or
attached to an issue. Ledgers are read for every done shard; rows (lengths, samples, error examples)
come from `sample_shards` evenly spaced done shards, which keeps the cost flat for billion-row runs.
"""
from __future__ import annotations

import base64
import html
import io
import tarfile
import time
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the headless backend)
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from PIL import Image  # noqa: E402

from dataset import outputs, storage  # noqa: E402
from dataset.card import SAMPLING_KEYS  # noqa: E402
from dataset.stats import LengthStats  # noqa: E402

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp"}
THUMB_PX = 192
ERROR_EXAMPLES = 12
ROW_COLUMNS = ["key", "status", "error", "finish_reason", "num_tokens", "quality", "org_length", "re_length"]

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1240px; }
.card, td { overflow-wrap: anywhere; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
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


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
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


def read_wds_samples(path: str, limit: int) -> list[dict]:
    """The first `limit` samples of an output tar: {key, image, txt, re_caption.txt}."""
    samples: dict[str, dict] = {}
    with storage.open_read(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if key not in samples and len(samples) == limit:
                break
            data = tar.extractfile(member).read() if member.isfile() else b""
            samples.setdefault(key, {"key": key})["image" if ext in IMAGE_EXTS else ext] = data
    return list(samples.values())


def section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{anchor}"><h2>{_escape(title)}</h2>{"".join(parts)}</section>'


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def summary_section(run: outputs.FinishedRun) -> str:
    c = run.caption_config
    info = run.run or {}
    start = min((ledger["started_at"] for ledger in run.ledgers), default=None)
    end = max((ledger["finished_at"] for ledger in run.ledgers), default=None)
    rows = [
        ["output", run.out], ["fingerprint", run.fingerprint],
        ["captioner", f"{c.get('model')} @ {c.get('revision')} ({c.get('backend')})"],
        ["sampling", ", ".join(f"{k}={c[k]}" for k in SAMPLING_KEYS if k in c)],
        ["shards", f"{len(run.ledgers):,} done, {len(run.skipped):,} not done or from another run"],
        ["rows", f"{run.total('ok'):,} ok, {run.total('error'):,} error, {run.total('duplicates'):,} duplicate keys"],
        ["quality flags", ", ".join(f"{flag} {n:,}" for flag, n in run.quality_flags().most_common()) or "none"],
        ["time", f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(start))} UTC, {(end - start) / 60:,.1f} min"
         if start is not None else "n/a"],
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
    shards = [shard for shard in shards if "wds" in run.by_shard[shard]["files"]]
    if not shards:
        return section("samples", "Samples", "<p>No WDS output in the sampled shards (the job ran without it).</p>")
    per_shard = max(1, -(-count // len(shards)))
    cards: list[str] = []
    for shard in shards:
        for sample in read_wds_samples(run.wds(shard), min(per_shard, count - len(cards))):
            cards.append(_sample_card(shard, sample, rows.get(sample["key"], {})))
        if len(cards) >= count:
            break
    return section("samples", f"Samples ({len(cards)})", f'<div class="grid">{"".join(cards)}</div>')


def lengths_section(org: LengthStats, re: LengthStats, shards: int) -> str:
    fig, ax = plt.subplots(figsize=(9, 3.2))
    top = max([*org.counts, *re.counts, 1])
    bins = range(0, top + 2)
    for stats, label, color in ((org, "web caption", "#4c78a8"), (re, "recaption", "#f58518")):
        ax.hist(list(stats.counts), bins=bins, weights=list(stats.counts.values()), alpha=0.6, label=label, color=color)
    ax.set_xlabel("words")
    ax.set_ylabel("rows")
    ax.legend()
    stats_table = table(["caption", "rows", "mean words", "median words"], [
        ["web (org_caption)", f"{org.n:,}", f"{org.mean:.1f}", f"{org.median:g}"],
        ["recaption (re_caption)", f"{re.n:,}", f"{re.mean:.1f}", f"{re.median:g}"]])
    return section("caption-lengths", "Caption length, web vs recaption", _png(fig), stats_table,
                   f"<p>ok rows of {shards:,} sampled shards.</p>")


def errors_section(run: outputs.FinishedRun, examples: list[dict]) -> str:
    reasons = run.errors_by_reason().most_common()
    parts = []
    if reasons:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(reasons) + 1))
        ax.barh([r for r, _ in reasons][::-1], [n for _, n in reasons][::-1], color="#e45756")
        ax.set_xlabel("rows")
        parts.append(_png(fig))
    parts.append(table(["reason", "rows"], [[r, f"{n:,}"] for r, n in reasons] or [["none", 0]]))
    if examples:
        rows = [[e["shard"], e["key"], e["error"]] for e in examples]
        parts.append("<h3>Examples</h3>" + table(["shard", "key", "error"], rows))
    return section("errors", f"Errors ({run.total('error'):,} rows)", *parts)


def throughput_section(run: outputs.FinishedRun) -> str:
    ledgers = run.ledgers
    t0 = min(ledger["started_at"] for ledger in ledgers)
    workers = sorted({str(ledger.get("worker")) for ledger in ledgers})
    colors = {w: plt.get_cmap("tab10")(i % 10) for i, w in enumerate(workers)}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    for metric, ax, label in (("images_per_s", top, "images/s"), ("tokens_per_s", bottom, "tokens/s")):
        for worker in workers:
            mine = [ledger for ledger in ledgers if str(ledger.get("worker")) == worker]
            ax.hlines([ledger[metric] for ledger in mine], [(ledger["started_at"] - t0) / 60 for ledger in mine],
                      [(ledger["finished_at"] - t0) / 60 for ledger in mine], colors=[colors[worker]], lw=3,
                      label=worker)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    bottom.set_xlabel("minutes since the first shard started (one bar per shard)")
    if len(workers) <= 12:
        top.legend(fontsize=8, ncol=min(len(workers), 6), loc="lower right")
    per_worker = defaultdict(lambda: [0, 0, 0.0, 0])
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


ROW_SCHEMA_SUBSET = pa.schema([outputs.ROW_SCHEMA.field(name) for name in ROW_COLUMNS])


def build_report(out: str, *, samples: int = 24, sample_shards: int = 200, fingerprint: str | None = None) -> str:
    """The report's HTML for the done shards of OUT."""
    run = outputs.load_finished(out, fingerprint)
    if not run.ledgers:
        raise ValueError(f"{out}: no done shards to report on")
    shards = spaced([ledger["shard"] for ledger in run.ledgers], sample_shards)
    org, re = LengthStats(), LengthStats()
    rows: dict[str, dict] = {}
    examples: list[dict] = []
    for shard in shards:
        shard_rows = pa.Table.from_batches(list(outputs.iter_batches(run.parquet(shard), ROW_COLUMNS)),
                                           schema=ROW_SCHEMA_SUBSET)
        ok = shard_rows.filter(pc.equal(shard_rows["status"], "ok"))
        org.add(ok["org_length"])
        re.add(ok["re_length"])
        if shard in shards[:4]:
            rows.update({r["key"]: r for r in ok.select(["key", "finish_reason", "num_tokens", "quality"]).to_pylist()})
        for row in shard_rows.filter(pc.equal(shard_rows["status"], "error")).to_pylist():
            if len(examples) < ERROR_EXAMPLES:
                examples.append({**row, "shard": shard})
    body = "".join([
        f"<h1>Recaption report: {_escape(out)}</h1>",
        summary_section(run),
        samples_section(run, rows, shards[:4], samples),
        lengths_section(org, re, len(shards)),
        errors_section(run, examples),
        throughput_section(run),
    ])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Recaption report</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>")


def write_report(out: str, html_path: str, **options) -> int:
    """Build the report and write it to `html_path` (local or s3://); returns its size in bytes."""
    data = build_report(out, **options).encode()
    storage.write_bytes(html_path, data)
    return len(data)
