"""Real img2dataset against the loopback image server, with injected 404s, hangs and corrupt bytes."""
from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataset import ingest
from dataset.reader import META_FIELDS, ShardReader, expected_samples, stats_path
from dataset.synthetic import input_shards, web
from pipelines import download as download_cli

FILES, PER_FILE, TIMEOUT_S = 2, 8, 2

pytestmark = pytest.mark.slow


def test_download_counts_layout_and_resume(tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "shards"
    with web.serving(src, hang_seconds=60) as server:
        info = web.write_metadata(src, FILES, PER_FILE, url_base=server.url, bad=True)
        summary = ingest.download(str(src / "metadata"), str(out), processes=1, threads=16,
                                  number_sample_per_shard=11, timeout=TIMEOUT_S)

        injected = list(info["injected"].values())
        assert summary.shards == 2
        assert summary.count == FILES * PER_FILE + len(injected)
        assert summary.successes == info["good"] == FILES * PER_FILE
        assert summary.failed_to_download == injected.count("missing") + injected.count("hang") == 2 * FILES
        assert summary.failed_to_resize == injected.count("corrupt") == FILES
        assert summary.reasons["HTTP Error 404: Not Found"] == FILES
        assert summary.reasons["timed out"] == FILES

        # The layout synthetic.write_shards produces, read by the recaption job's reader.
        input_shards.write_shards(tmp_path / "synthetic", 1, 2)
        reference = next(iter(ShardReader(str(tmp_path / "synthetic" / "00000.tar"))))
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith("_")) == sorted(
            f"{s:05d}{suffix}" for s in range(2) for suffix in (".tar", ".parquet", "_stats.json"))

        by_uid = {row["uid"]: row for row in pq.read_table(src / "metadata").to_pylist()}
        seen = set()
        for tar in sorted(out.glob("*.tar")):
            # img2dataset's own _stats.json counts what it wrote into the tar (failed downloads are not).
            reader = ShardReader(str(tar), expected_samples=expected_samples(Path(stats_path(str(tar))).read_bytes()))
            for sample in reader:
                where = (tar.name, sample.key)
                assert sample.image_ext == reference.image_ext and sample.image_error is None, where
                assert not sample.notes and sample.source_key is None, where
                assert all(isinstance(sample.meta[name], str) for name in META_FIELDS), (where, sample.meta)
                row = by_uid[sample.meta["uid"]]
                assert sample.org_caption == row["text"], where
                expected = min(512, row["original_width"])  # square images; only bigger ones shrink
                assert Image.open(io.BytesIO(sample.image)).size == (expected, expected), where
                seen.add(sample.meta["uid"])
            assert reader.stats.duplicates == 0 and not reader.stats.nonregular and not reader.stats.ignored
        assert seen == {uid for uid in by_uid if uid not in info["injected"]}

        # Resume: a finished shard is left alone, a missing one is downloaded again (through the CLI).
        kept = (out / "00000.tar").stat().st_mtime_ns
        for suffix in (".tar", ".parquet", "_stats.json"):
            (out / f"00001{suffix}").unlink()
        download_cli.main(["--url-list", str(src / "metadata"), "--output", str(out),
                                          "--processes", "1", "--threads", "16", "--samples-per-shard", "11",
                                          "--timeout", str(TIMEOUT_S)])
    assert (out / "00000.tar").stat().st_mtime_ns == kept
    assert (out / "00001.tar").exists()
    printed = capsys.readouterr().out
    assert "2 shards, 22 urls: 16 downloaded, 4 failed to download, 2 failed to resize" in printed
