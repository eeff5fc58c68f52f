"""The input reader on hostile shards: every sample kept with a reason, safe keys, caps, no short reads."""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from dataset import storage
from dataset.images import ImageError, prepare_image
from dataset.reader import (
    MAX_KEY_CHARS,
    InputError,
    ReadLimits,
    ShardReader,
    ShardReadError,
    add_arguments,
    coerce_meta,
    display_name,
    expected_samples,
    limits_from_args,
    normalise_key,
    stats_path,
)
from dataset.synthetic.bad_inputs import BAD_KINDS, LLAMA3_INJECTION, huge_16bit_png
from dataset.synthetic.input_shards import compress_shard, cut_shard, write_shards
from dataset.synthetic.shapes import jpeg_bytes

ROOT = Path(__file__).resolve().parents[1]
SAFE_KEY = re.compile(r"^[A-Za-z0-9_%~-]+$")
JPEG = jpeg_bytes(Image.new("RGB", (32, 32), (200, 30, 30)))


def make_tar(path: Path, members: list[tuple[str, bytes | None, bytes]], end: bool = True) -> Path:
    """A tar of (name, data, type) members; data None for links and special files."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, errors="surrogateescape") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "elsewhere.jpg"
            if data is None:
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, caption: str = "a red square", meta: object = None) -> list[tuple[str, bytes, bytes]]:
    meta = {"uid": f"uid-{key}", "url": f"http://x/{key}.jpg", "sha256": "00"} if meta is None else meta
    return [(f"{key}.jpg", JPEG, tarfile.REGTYPE), (f"{key}.txt", caption.encode(), tarfile.REGTYPE),
            (f"{key}.json", json.dumps(meta).encode(), tarfile.REGTYPE)]


def read_all(path: str | Path, **kwargs) -> tuple[list, ShardReader]:
    reader = ShardReader(str(path), **kwargs)
    return list(reader), reader


# --- one shard with every hostile sample kind, read with the default caps ---------------------------

@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    info = write_shards(folder, shards=1, per_shard=3, bad=True)[0]
    samples, reader = read_all(folder / "00000.tar")
    return info, samples, reader, folder


def test_every_group_is_accounted_for(hostile):
    info, samples, reader, _ = hostile
    stats = reader.stats
    duplicates = [k for k in info["injected"] if "#" in k]
    assert [s.key for s in samples] == info["keys"]
    assert stats.samples_in == len(samples) + stats.duplicates == len(info["keys"]) + len(duplicates)
    assert stats.duplicates == 2 and stats.duplicate_keys == [info["keys"][0]] * 2  # raw and normalised repeats
    assert stats.nonregular == {"symlink": 1, "hardlink": 1} and not stats.ignored
    assert stats.bytes == (hostile[3] / "00000.tar").stat().st_size  # read to the end-of-archive


def by_kind(hostile) -> dict:
    info, samples, _, _ = hostile
    kinds = {key: kind for key, kind in info["injected"].items() if "#" not in key}
    return {kinds[s.key]: s for s in samples if s.key in kinds}


def test_keys_are_normalised_with_the_original_kept(hostile):
    kinds = by_kind(hostile)
    expected = {  # kind: (key, source key) as regular expressions; N is the sample's number
        "dotdot_key": (r"%2E%2E%2F(\d{9})", r"\.\./(\d{9})"), "absolute_key": (r"(\d{9})", r"/(\d{9})"),
        "non_utf8_name": (r"(\d{4})%FF%FE(\d{5})", r"(\d{4})\\xff\\xfe(\d{5})"),
        "control_key": (r"(\d{4})%07%0A%1B%5B2J(\d{5})", r"(\d{4})\a\n\x1b\[2J(\d{5})"),
    }
    for kind, (key, source) in expected.items():
        sample = kinds[kind]
        key_match, source_match = re.fullmatch(key, sample.key), re.fullmatch(source, sample.source_key)
        assert key_match and source_match and key_match.groups() == source_match.groups(), (kind, sample)
    assert all(s.source_key is None for kind, s in kinds.items() if kind not in expected)
    for sample in hostile[1]:
        assert SAFE_KEY.match(sample.key) and len(sample.key) <= MAX_KEY_CHARS, sample.key
        assert sample.source_key is None or sample.source_key.encode("utf-8")  # valid UTF-8 for Parquet
        assert all(isinstance(v, str) or v is None for v in sample.meta.values())


def test_metadata_and_caption_problems_are_notes(hostile):
    kinds = by_kind(hostile)
    assert kinds["int_uid"].meta["uid"] == str(int(kinds["int_uid"].meta["url"].rsplit("/", 1)[1][:12], 16))
    assert kinds["int_uid"].notes == ["json.uid: int coerced to string"]
    assert kinds["invalid_json"].meta == {"uid": None, "url": None, "sha256": None}
    assert kinds["invalid_json"].notes == ["json: not valid JSON (JSONDecodeError), ignored"]
    assert kinds["oversize_json"].meta["uid"] is None
    assert kinds["oversize_json"].notes[0].startswith("json: 1,048,9") and "--max-json-bytes" in kinds[
        "oversize_json"].notes[0]
    text = kinds["oversize_text"]
    assert text.org_caption_truncated and len(text.org_caption.encode()) <= ReadLimits().max_text_bytes
    assert "\ufffd" not in text.org_caption  # cut at a character boundary
    assert text.notes == [f"txt: {text.notes[0].split()[1]} bytes cut to 65,536 (--max-text-bytes)"]
    assert kinds["special_tokens_caption"].org_caption.endswith(LLAMA3_INJECTION)  # data kept; prompts clean it
    assert not any(s.org_caption_truncated for kind, s in kinds.items() if kind != "oversize_text")


def outcome(sample) -> str:
    """'ok' or the error reason the row gets: the reader's image_error, else prepare_image's."""
    if sample.image_error:
        return sample.image_error.split(":")[0]
    try:
        prepare_image(sample.image)
    except ImageError as e:
        return e.reason
    return "ok"


def test_each_kind_gets_its_status_and_reason(hostile):
    kinds = by_kind(hostile)
    got = {kind: outcome(sample) for kind, sample in kinds.items()}
    assert {kind for kind, reason in got.items() if reason == "ok"} == {k for k, ok in BAD_KINDS.items() if ok} - {
        "duplicate_key", "normalised_duplicate"}
    assert {kind: reason for kind, reason in got.items() if reason != "ok"} == {
        "corrupt_jpeg": "decode", "truncated_jpeg": "truncated", "zero_bytes": "empty", "bomb_header": "bomb",
        "missing_image": "missing", "oversize_image": "oversize", "symlink_image": "nonregular",
        "hardlink_image": "nonregular", "tiny_image": "small", "thin_image": "aspect"}
    assert kinds["symlink_image"].image_error == "nonregular: the image member (jpg) is a symlink"
    assert all(outcome(s) == "ok" for s in hostile[1] if s.key not in hostile[0]["injected"])


def test_no_key_can_write_outside_the_output(hostile, tmp_path):
    """Every key as a tar member name (extracted with tarfile's 'data' filter) and as a path component."""
    import webdataset as wds  # imports torch (~0.9 GB): only here

    samples = hostile[1]
    out = tmp_path / "out"
    out.mkdir()
    with wds.TarWriter(str(tmp_path / "keys.tar")) as writer:
        for sample in samples:
            writer.write({"__key__": sample.key, "txt": sample.key})
    with tarfile.open(tmp_path / "keys.tar") as tar:
        tar.extractall(out, filter="data")  # raises on absolute, '..' or link names
    for sample in samples:
        path = Path(os.path.realpath(out / f"{sample.key}.re_caption.txt"))
        path.write_text("x")
        assert path.parent == out.resolve()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        name for s in samples for name in (f"{s.key}.txt", f"{s.key}.re_caption.txt"))
    # webdataset groups the written members back into exactly our keys (no dot splits a key).
    assert [s["__key__"] for s in wds.WebDataset(str(tmp_path / "keys.tar"), shardshuffle=False)] == [
        s.key for s in samples]


PEAK_RSS = """
import io, json, re, sys
from PIL import Image
from dataset.reader import ShardReader
from dataset.images import ImageError, prepare_image

def kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

buf = io.BytesIO()
Image.new("RGB", (64, 64)).save(buf, "PNG")
prepare_image(buf.getvalue())  # codecs loaded before the baseline
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: import-time transients are not ours
base = kib("VmRSS")
sizes = []
for sample in ShardReader(sys.argv[1]):
    try:
        sizes.append(prepare_image(sample.image).image.size if sample.image else sample.image_error)
    except ImageError as e:
        sizes.append(str(e))
print(json.dumps({"extra_kib": kib("VmHWM") - base, "sizes": sizes}))
"""


def test_worker_memory_stays_bounded(tmp_path):
    """Peak RSS of reading + preparing a shard with an 8000x8000 16-bit PNG and a 40 MiB image member.

    Bound: the decoded 16-bit frame (8000 * 8000 * 2 B = 122 MiB) plus 64 MiB for the member bytes, the
    downscaled copies and allocator slack. Converting at full size first, as before, adds a float64
    copy (488 MiB) and peaked 1.6 GiB above the baseline; reading the oversized member would add 40 MiB.
    The peak is Linux's VmHWM, reset once the imports are done.
    """
    members = [("0000.png", huge_16bit_png(), tarfile.REGTYPE), ("0000.txt", b"a ramp", tarfile.REGTYPE),
               ("0001.jpg", bytes(40 << 20), tarfile.REGTYPE), *sample_members("0002")]
    shard = make_tar(tmp_path / "big.tar", members)
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(shard)], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["sizes"][0] == [1024, 1024] and measured["sizes"][1].startswith("oversize: ")
    print(f"peak RSS above the baseline: {measured['extra_kib'] / 1024:.0f} MiB")
    assert measured["extra_kib"] < (122 + 64) * 1024, measured


# --- shard-level refusals and short reads ---------------------------------------------------------

@pytest.fixture
def small_shard(tmp_path) -> tuple[Path, list[str]]:
    info = write_shards(tmp_path / "in", shards=1, per_shard=6)[0]
    return tmp_path / "in" / "00000.tar", info["keys"]


@pytest.mark.parametrize("codec", ["gzip", "bzip2", "xz"])
def test_compressed_tars_refused_unless_allowed_and_then_still_capped(small_shard, codec):
    path, keys = small_shard
    size = path.stat().st_size
    compress_shard(path, codec)
    with pytest.raises(InputError, match=f"{codec}-compressed tar refused.*--allow-compressed-input"):
        read_all(path)
    samples, reader = read_all(path, limits=ReadLimits(allow_compressed=True))
    assert [s.key for s in samples] == keys and reader.stats.bytes == size
    with pytest.raises(InputError, match=f"more than {size // 2:,} uncompressed bytes"):
        read_all(path, limits=ReadLimits(allow_compressed=True, max_shard_bytes=size // 2))


def test_a_small_compressed_input_cannot_expand_without_bound(tmp_path):
    """A 64 MiB member of zeros in a gzip of ~64 KB stops at the shard byte cap, never held in memory."""
    path = make_tar(tmp_path / "zeros.tar", [("0000.jpg", bytes(64 << 20), tarfile.REGTYPE)])
    compress_shard(path, "gzip")
    assert path.stat().st_size < 1 << 20
    reader = ShardReader(str(path), ReadLimits(allow_compressed=True, max_shard_bytes=4 << 20))
    with pytest.raises(InputError, match="more than 4,194,304 uncompressed bytes"):
        list(reader)
    assert reader.stats.bytes <= (4 << 20) + (1 << 20)  # stopped within one read of the cap


def test_zstd_is_recognised_by_its_magic(tmp_path):
    path = tmp_path / "00000.tar"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(100))
    with pytest.raises(InputError, match="zstd-compressed tar refused"):
        read_all(path)
    with pytest.raises(InputError, match="no zstd decoder"):
        read_all(path, limits=ReadLimits(allow_compressed=True))


def cut_points(path: Path) -> dict[str, int]:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    third = members[len(members) // 3]
    last = members[-1]
    end_of_data = last.offset_data + -(-last.size // 512) * 512
    return {"inside a member": third.offset_data + 10, "at a member boundary": third.offset,
            "inside a header": third.offset + 100, "before the end-of-archive block": end_of_data}


@pytest.mark.parametrize("where", ["inside a member", "at a member boundary", "inside a header",
                                   "before the end-of-archive block"])
def test_a_tar_cut_short_raises_after_yielding_what_was_read(small_shard, where):
    path, keys = small_shard
    cut_shard(path, cut_points(path)[where])
    reader = ShardReader(str(path))
    seen = []
    with pytest.raises(ShardReadError, match=re.escape(str(path))):
        for sample in reader:
            seen.append(sample.key)
    # Only whole groups are yielded; a cut after the last member's data still loses no sample, but the
    # missing end-of-archive block means the tar may have had more.
    assert seen == keys[:len(seen)]
    assert len(seen) == len(keys) if where == "before the end-of-archive block" else len(seen) < len(keys)


class FlakyStream(io.RawIOBase):
    """A real file whose reads fail with a connection reset after `after` bytes."""

    def __init__(self, path: str, after: int):
        self.file, self.after = open(path, "rb"), after

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.file.tell() >= self.after:
            raise ConnectionResetError("connection reset by peer")
        data = self.file.read(min(len(buffer), self.after - self.file.tell()))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.file.close()
        super().close()


def test_a_storage_error_mid_read_is_not_the_end_of_the_shard(small_shard, monkeypatch):
    path, keys = small_shard
    monkeypatch.setattr(storage, "open_read", lambda p: io.BufferedReader(FlakyStream(p, path.stat().st_size // 2)))
    reader = ShardReader(str(path))
    seen = []
    with pytest.raises(ShardReadError, match="ConnectionResetError: connection reset by peer"):
        for sample in reader:
            seen.append(sample.key)
    assert 0 < len(seen) < len(keys)


def test_s3_full_cut_and_missing_tars(small_shard, s3_bucket):
    path, keys = small_shard
    data = path.read_bytes()
    storage.write_bytes(f"{s3_bucket}/in/00000.tar", data)
    storage.write_bytes(f"{s3_bucket}/in/00001.tar", data[:cut_points(path)["inside a member"]])
    assert [s.key for s in ShardReader(f"{s3_bucket}/in/00000.tar")] == keys
    for name in ("00001.tar", "00002.tar"):  # cut short; absent
        with pytest.raises(ShardReadError, match=re.escape(f"{s3_bucket}/in/{name}")):
            list(ShardReader(f"{s3_bucket}/in/{name}"))


def test_sample_count_checked_against_img2dataset_stats(small_shard, tmp_path):
    path, keys = small_shard
    # The fields img2dataset 1.47's logger.write_stats writes, with 2 failed downloads (not in the tar);
    # tests/test_ingest.py checks a real download's stats against its tars.
    stats = {"count": len(keys) + 2, "successes": len(keys), "failed_to_download": 2, "failed_to_resize": 0,
             "duration": 1.0, "start_time": 0.0, "end_time": 1.0, "status_dict": {"success": len(keys)}}
    expected = expected_samples(json.dumps(stats, indent=4).encode())
    assert expected == len(keys)
    assert len(read_all(path, expected_samples=expected)[0]) == len(keys)
    reader = ShardReader(str(path), expected_samples=len(keys) + 2)
    seen = []
    with pytest.raises(ShardReadError, match=f"{len(keys)} samples in the tar, {len(keys) + 2} in its _stats.json"):
        for sample in reader:
            seen.append(sample.key)
    assert seen == keys  # everything was yielded before the count was known to be wrong
    assert stats_path("s3://b/shards/00042.tar") == "s3://b/shards/00042_stats.json"
    for bad in (b"{}", b"[]", b"not json", b'{"successes": "12"}', b'{"successes": -1}', b'{"successes": true}'):
        with pytest.raises(InputError, match="not an img2dataset _stats.json"):
            expected_samples(bad)


def test_member_and_header_caps(tmp_path):
    members = [m for i in range(4) for m in sample_members(f"{i:04d}")]
    path = make_tar(tmp_path / "00000.tar", members)
    assert len(read_all(path, limits=ReadLimits(max_members=12))[0]) == 4
    with pytest.raises(InputError, match="more than 11 members"):
        read_all(path, limits=ReadLimits(max_members=11))
    huge = tmp_path / "pax.tar"
    with tarfile.open(huge, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("0000.txt")
        info.pax_headers = {"comment": "x" * (2 << 20)}  # tarfile would hold the whole record in memory
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(InputError, match="extended tar header of 2,097,1"):
        read_all(huge)


# --- members, groups and metadata --------------------------------------------------------------------

def test_nonregular_members_are_counted_by_kind(tmp_path):
    members = [("0000.jpg", None, tarfile.SYMTYPE), ("0000.txt", b"linked", tarfile.REGTYPE),
               ("0001.jpg", None, tarfile.LNKTYPE), ("0001.json", None, tarfile.SYMTYPE),
               ("0002.jpg", None, tarfile.FIFOTYPE), ("0003.jpg", None, tarfile.CHRTYPE),
               ("0004.jpg", None, tarfile.BLKTYPE), ("0005.jpg", None, tarfile.DIRTYPE),
               ("subdir", None, tarfile.DIRTYPE),
               *sample_members("0006")]
    samples, reader = read_all(make_tar(tmp_path / "00000.tar", members))
    assert reader.stats.nonregular == {"symlink": 2, "hardlink": 1, "fifo": 1, "chardev": 1, "blockdev": 1, "dir": 2}
    assert reader.stats.ignored == {"no extension": 1}
    errors = {s.key: s.image_error for s in samples}
    assert errors == {"0000": "nonregular: the image member (jpg) is a symlink",
                      "0001": "nonregular: the image member (jpg) is a hardlink",
                      "0002": "nonregular: the image member (jpg) is a fifo",
                      "0003": "nonregular: the image member (jpg) is a chardev",
                      "0004": "nonregular: the image member (jpg) is a blockdev",
                      "0005": "nonregular: the image member (jpg) is a dir", "0006": None}
    assert samples[0].org_caption == "linked"
    assert samples[1].notes == ["json: the member is a symlink, ignored"]


def test_grouping_duplicates_and_extra_members(tmp_path):
    members = [*sample_members("a"), ("a.JPEG", JPEG, tarfile.REGTYPE), ("a.txt", b"again", tarfile.REGTYPE),
               ("a.cls", b"3", tarfile.REGTYPE), *sample_members("b"), *sample_members("a"),
               *sample_members("./b"), ("c.txt", b"no image", tarfile.REGTYPE), (".hidden", b"", tarfile.REGTYPE)]
    samples, reader = read_all(make_tar(tmp_path / "00000.tar", members))
    assert [s.key for s in samples] == ["a", "b", "c"]
    assert samples[0].notes == ["jpeg: another image member ignored", "txt: another caption member ignored"]
    assert samples[0].org_caption == "a red square" and samples[0].image_ext == "jpg"
    assert samples[2].image_error == "missing: no image member"
    assert (reader.stats.samples_in, reader.stats.duplicates, reader.stats.duplicate_keys) == (5, 2, ["a", "b"])
    assert reader.stats.ignored == {"other extension": 1, "no extension": 1}


def test_json_that_cannot_fail_the_shard(tmp_path):
    members = [*sample_members("0000", meta=[1, 2]), *sample_members("0001", meta={"uid": 1.5, "url": ["a", 2]}),
               ("0002.jpg", JPEG, tarfile.REGTYPE), ("0002.json", b"[" * 100_000 + b"]" * 100_000, tarfile.REGTYPE),
               ("0003.jpg", JPEG, tarfile.REGTYPE), ("0003.json", b'{"uid": ' + b"9" * 5000 + b"}", tarfile.REGTYPE),
               ("0004.jpg", JPEG, tarfile.REGTYPE), ("0004.json", b'{"uid": "a\\ud800b", "sha256": true}',
                                                     tarfile.REGTYPE),
               ("0005.jpg", JPEG, tarfile.REGTYPE), ("0005.json", b'{"uid": "\xff"}', tarfile.REGTYPE)]
    samples, _ = read_all(make_tar(tmp_path / "00000.tar", members))
    notes = {s.key: s.notes for s in samples}
    assert notes == {"0000": ["json: not an object (list), ignored"],
                     "0001": ["json.uid: float coerced to string", "json.url: list coerced to string"],
                     "0002": ["json: not valid JSON (RecursionError), ignored"],
                     "0003": ["json: not valid JSON (ValueError), ignored"],
                     "0004": ["json.uid: lone surrogates replaced", "json.sha256: bool coerced to string"],
                     "0005": ["json: not valid JSON (UnicodeDecodeError), ignored"]}
    assert samples[1].meta == {"uid": "1.5", "url": '["a",2]', "sha256": None}
    assert samples[4].meta == {"uid": "a?b", "url": None, "sha256": "true"}
    assert coerce_meta({"uid": None, "url": "u"}, []) == {"uid": None, "url": "u", "sha256": None}


def test_web_caption_cut_and_bad_utf8(tmp_path):
    members = [("0000.jpg", JPEG, tarfile.REGTYPE), ("0000.txt", "é".encode() * 10, tarfile.REGTYPE),
               ("0001.jpg", JPEG, tarfile.REGTYPE), ("0001.txt", b"caf\xe9 au lait", tarfile.REGTYPE)]
    samples, _ = read_all(make_tar(tmp_path / "00000.tar", members), limits=ReadLimits(max_text_bytes=7))
    assert samples[0].org_caption == "ééé" and samples[0].org_caption_truncated  # 7 bytes: 3 whole characters
    assert samples[0].notes == ["txt: 20 bytes cut to 7 (--max-text-bytes)"]
    assert samples[1].org_caption == "caf\ufffd au" and samples[1].notes == [
        "txt: not valid UTF-8, bad bytes replaced", "txt: 12 bytes cut to 7 (--max-text-bytes)"]


def test_an_empty_archive_is_complete_and_an_empty_file_is_not(tmp_path):
    samples, reader = read_all(make_tar(tmp_path / "empty.tar", []))
    assert samples == [] and reader.stats.samples_in == 0
    (tmp_path / "zero.tar").write_bytes(b"")
    with pytest.raises(ShardReadError, match="zero.tar"):
        read_all(tmp_path / "zero.tar")


@pytest.mark.parametrize("raw,key", [
    (b"000010012", "000010012"), (b"a-b_C9", "a-b_C9"), (b"../x", "%2E%2E%2Fx"), (b"/x", "x"), (b"./x", "x"),
    (b"/./x", "x"), (b".//x", "x"), (b"/", "%2F"), (b"a/b", "a%2Fb"), (b"a%2Fb", "a%252Fb"), (b"a b", "a%20b"),
    (b"\xff", "%FF"), ("猫".encode(), "%E7%8C%AB"), (b"x\x00y", "x%00y"),
])
def test_key_rule(raw, key):
    assert normalise_key(raw) == key


def test_long_keys_end_in_a_hash_of_the_raw_name():
    one, two = normalise_key(b"k" * 300), normalise_key(b"k" * 299 + b"j")
    assert len(one) == len(two) == MAX_KEY_CHARS and one != two
    assert one[:MAX_KEY_CHARS - 17] == two[:MAX_KEY_CHARS - 17] and one[-17] == "~"
    assert normalise_key(b"k" * MAX_KEY_CHARS) == "k" * MAX_KEY_CHARS
    assert display_name(b"caf\xe9") == "caf\\xe9"


def test_limits_map_one_to_one_to_flags():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert limits_from_args(parser.parse_args([])) == ReadLimits()
    flags = ["--max-image-bytes", "1", "--max-text-bytes", "2", "--max-json-bytes", "3", "--max-members", "4",
             "--max-shard-bytes", "5", "--allow-compressed-input"]
    assert limits_from_args(parser.parse_args(flags)) == ReadLimits(1, 2, 3, 4, 5, True)
