"""The HTML report: produced from a finished run, self-contained, with every section."""
from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

from PIL import Image

from dataset.synthetic import finished_runs
from pipelines import report as report_cli

SECTIONS = ["summary", "samples", "caption-lengths", "errors", "throughput"]


class Page(HTMLParser):
    """Collects section ids, image sources and the classes of divs."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.cards = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a["id"])
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "div" and a.get("class") == "card":
            self.cards += 1


def test_report_has_every_section_inline(tmp_path, capsys, monkeypatch):
    out, html_path = tmp_path / "out", tmp_path / "report.html"
    finished_runs.write_recaption_outputs(str(out), 3, 40, errors_per_shard=4)
    report_cli.main(["--input", str(out), "--out", str(html_path), "--samples", "10"])
    assert f"wrote {html_path}" in capsys.readouterr().out

    text = html_path.read_text()
    page = Page()
    page.feed(text)
    assert page.sections == SECTIONS
    assert page.cards == 10
    assert all(src.startswith("data:image/") for src in page.images)    # nothing fetched from elsewhere
    assert not re.search(r"""(href|src)=["']?(https?:|file:|//)""", text)
    thumbnails = [src for src in page.images if src.startswith("data:image/jpeg")]
    plots = [src for src in page.images if src.startswith("data:image/png")]
    assert len(thumbnails) == 10 and len(plots) == 3                    # lengths, errors, throughput
    for src in thumbnails[:2] + plots:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    for reason in ("decode", "truncated", "empty", "bomb"):
        assert f"<td>{reason}</td>" in text
    assert "web caption" in text and "recaption" in text and 'class="flag' in text
    assert "worker-0" in text and "worker-1" in text
    assert re.search(r"<td>quality flags</td><td>length \d+</td>", text)
