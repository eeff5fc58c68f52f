"""The HTML report: self-contained, every section, an example for every error reason, notes by kind, non-regular
members, and CLIP score distributions with the extreme samples (on a real, scored run)."""
from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import pytest
from PIL import Image
from real_run import real_run

from dataset.report import build_report
from dataset.synthetic import finished_runs
from pipelines import report as report_cli
from scoring.stage import ScoreConfig, score
from scoring.tiny import build_tiny_clip

SECTIONS = ["summary", "samples", "caption-lengths", "errors", "notes", "clip-scores", "throughput"]


class Page(HTMLParser):
    """Section ids, image sources, sample cards, and each table's rows as cell texts, by section."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.cards = 0
        self.tables: dict[str, list[list[list[str]]]] = {}
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a["id"])
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "div" and a.get("class") == "card":
            self.cards += 1
        elif tag == "table":
            self.tables.setdefault(self.sections[-1], []).append([])
        elif tag == "tr":
            self.tables[self.sections[-1]][-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.tables[self.sections[-1]][-1][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)

    def rows(self, section: str, index: int = 0) -> list[dict[str, str]]:
        """A table's rows as {header: cell text}."""
        header, *body = self.tables[section][index]
        return [dict(zip(header, row, strict=True)) for row in body]


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def test_report_has_every_section_inline(tmp_path, capsys):
    out, html_path = tmp_path / "out", tmp_path / "report.html"
    finished_runs.write_recaption_outputs(str(out), 3, 40, errors_per_shard=4)
    report_cli.main(["--input", str(out), "--out", str(html_path), "--samples", "10"])
    assert f"wrote {html_path}" in capsys.readouterr().out

    text = html_path.read_text()
    page = parse(text)
    assert page.sections == SECTIONS
    assert page.cards == 10
    assert all(src.startswith("data:image/") for src in page.images)    # nothing fetched from elsewhere
    assert not re.search(r"""(href|src)=["']?(https?:|file:|//)""", text)
    thumbnails = [src for src in page.images if src.startswith("data:image/jpeg")]
    plots = [src for src in page.images if src.startswith("data:image/png")]
    assert len(thumbnails) == 10 and len(plots) == 3                    # lengths, errors, throughput
    for src in thumbnails[:2] + plots:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert {row["reason"] for row in page.rows("errors")} == {"decode", "truncated", "empty", "bomb"}
    assert "web caption" in text and "recaption" in text and 'class="flag' in text
    assert "worker-0" in text and "worker-1" in text
    facts = dict(row for row in page.tables["summary"][0])
    assert re.fullmatch(r"length \d+", facts["quality flags"])
    assert facts["decoding"] == "greedy (temperature 0), at most 128 new tokens" and facts["CLIP scores"] == \
        "not computed"
    assert "Not computed" in text.split('id="clip-scores"')[1]


def test_every_error_reason_has_an_example_from_a_shard_whose_ledger_counts_it(tmp_path):
    out = tmp_path / "out"
    finished_runs.write_recaption_outputs(str(out), 4, 20, errors_per_shard=1)   # shard k: one reason of four
    page = parse(build_report(str(out), sample_shards=1, samples=2))            # reads the rows of 00000 only
    rows = {row["reason"]: row for row in page.rows("errors")}
    assert set(rows) == {"decode", "truncated", "empty", "bomb"}
    assert {reason: row["example shard"] for reason, row in rows.items()} == {
        "decode": "00000", "truncated": "00001", "empty": "00002", "bomb": "00003"}
    for reason, row in rows.items():
        assert row["error"].startswith(f"{reason}: ") and row["key"].startswith(row["example shard"])
        assert {"source_key", "notes"} <= row.keys()


@pytest.mark.slow
def test_real_run_notes_nonregular_members_and_clip_scores(tmp_path_factory, tiny_model, tmp_path):
    out = str(real_run(tmp_path_factory.mktemp("real-run"), tiny_model))
    score(ScoreConfig(out, f"local-dir:{build_tiny_clip(tmp_path / 'clip')}", batch_size=4))
    page = parse(build_report(out, sample_shards=1, samples=4))    # the clean shard 00000 only
    assert page.sections == SECTIONS
    facts = dict(row for row in page.tables["summary"][0])
    assert facts["non-regular input members"].startswith("hardlink 1, symlink 1")
    assert facts["CLIP scores"].startswith("2 of 2 shards scored with local-dir:")

    errors = {row["reason"]: row for row in page.rows("errors")}   # the bad shard's reasons, from its ledger
    assert {"decode", "truncated", "empty", "bomb", "missing", "oversize", "nonregular", "small", "aspect"} <= \
        set(errors)
    assert all(row["example shard"] == "00001" and row["error"].startswith(f"{reason}: ")
               for reason, row in errors.items())

    page = parse(build_report(out, sample_shards=2, samples=4))    # both shards: the notes of the bad one
    notes = page.rows("notes")
    kinds = [row["kind"] for row in notes]
    assert len(kinds) == len(set(kinds)) >= 4                      # one example per kind
    assert "txt: N bytes cut to N (--max-text-bytes)" in kinds and "json.uid: int coerced to string" in kinds
    assert all(row["note"] and row["key"] and "source_key" in row for row in notes)

    stats = {row["score"]: row for row in page.rows("clip-scores", 0)}
    assert set(stats) == {"re_clip_score", "org_clip_score"} and all(-1 <= float(r["mean"]) <= 1
                                                                     for r in stats.values())
    lowest, highest = page.rows("clip-scores", 1), page.rows("clip-scores", 2)
    assert len(lowest) == len(highest) == 6
    assert max(float(r["re_clip_score"]) for r in lowest) <= min(float(r["re_clip_score"]) for r in highest)
    plots = [src for src in page.images if src.startswith("data:image/png")]
    assert len(plots) == 4                                        # lengths, errors, scores, throughput
