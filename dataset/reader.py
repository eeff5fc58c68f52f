"""Stream img2dataset WebDataset shards into samples, one key group at a time, whatever the web put in them.

Grouping follows webdataset (`tariterators.base_plus_ext` and `group_by_keys`): a member's raw key is
its name up to the first dot of its last path component, its extension the rest, lower-cased;
consecutive members with one raw key form one sample. Only `.jpg/.jpeg/.png/.webp/.gif/.bmp/.tif/.tiff`
(the image), `.txt` (the web caption) and `.json` (img2dataset's metadata) are read.

Key rule: the `key` of a sample (the output's `key` column and its member names) is the raw key with
  1. leading `/` and `./` removed (as `tar` does when it extracts), unless nothing would be left;
  2. every byte of its name outside `A-Z a-z 0-9 _ -` written as `%XX` (upper-case hex), bytes of
     names that are not UTF-8 included: no path separator, no dot, no control or non-ASCII character;
  3. a result longer than 128 characters cut to its first 111 and ended with `~` and 16 hex digits of
     the BLAKE2b-64 hash of the raw name.
img2dataset's keys (digits) pass unchanged. Where the key differs, `source_key` holds the raw key
(bytes that are not UTF-8 as `\\xNN`). A group whose key was seen before (a raw key that comes back
after another started, or a second raw key with the same normalised form, e.g. `/0001` after `0001`)
is a duplicate: dropped and counted, so `stats.samples_in == samples yielded + stats.duplicates`.

Caps (`ReadLimits`): an image member over its cap gives the sample an `image_error`, a web caption
over its cap is cut (`org_caption_truncated`), a json member over its cap is ignored with a note; a
shard over its member or byte cap, or compressed without `allow_compressed`, raises `InputError`. The
byte cap counts the uncompressed tar, so a small compressed input cannot expand without bound.

A tar that ends before its end-of-archive block, a storage error while reading, or a sample count that
differs from img2dataset's `_stats.json` raises `ShardReadError` after the samples read so far: the
shard must never be committed short.
"""
from __future__ import annotations

import argparse
import bz2
import codecs
import gzip
import hashlib
import json
import lzma
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, BinaryIO, Protocol

from dataset import storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# The metadata fields the output rows use, coerced to str or None.
META_FIELDS = ("uid", "url", "sha256")
MAX_KEY_CHARS = 128
# Longest pax / GNU long-name header read: their contents are held in memory whole.
MAX_HEADER_BYTES = 1 << 20
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_MEMBER = re.compile(rb"^((?:.*/|)[^.]+)[.]([^/]*)$", re.DOTALL)  # webdataset's base_plus_ext, on bytes
_COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_DECOMPRESS: dict[str, Callable[[Any], _Readable]] = {
    "gzip": lambda f: gzip.GzipFile(fileobj=f), "bzip2": bz2.BZ2File, "xz": lzma.LZMAFile}


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...
_EXTENDED_HEADERS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                     tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


class InputError(ValueError):
    """A shard that cannot be captioned as it is (compressed, over a cap): retrying cannot help."""


class ShardReadError(OSError):
    """The tar could not be read to its end (cut short, storage error, count mismatch): never commit, retry."""


@dataclass(frozen=True)
class ReadLimits:
    """Caps on what one input shard may hold; each maps 1:1 to a command-line flag (`add_arguments`)."""
    max_image_bytes: int = 32 << 20
    max_text_bytes: int = 64 << 10       # longer web captions are cut (quality flag 'truncated')
    max_json_bytes: int = 1 << 20
    max_members: int = 1_000_000         # per shard
    max_shard_bytes: int = 64 << 30      # uncompressed tar bytes per shard
    allow_compressed: bool = False


_FLAG_HELP = {
    "max_image_bytes": "image members over this many bytes become error rows ('oversize')",
    "max_text_bytes": "web captions (.txt) are cut to this many bytes (quality flag 'truncated')",
    "max_json_bytes": "metadata (.json) members over this many bytes are ignored, with a note in the row",
    "max_members": "tar members per shard; a shard with more is refused",
    "max_shard_bytes": "uncompressed bytes per shard; a shard with more is refused",
}


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The `ReadLimits` flags, defaults from the dataclass: --max-image-bytes ... --allow-compressed-input."""
    for name, text in _FLAG_HELP.items():
        default = getattr(ReadLimits, name)
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default, help=f"{text} ({default})")
    parser.add_argument("--allow-compressed-input", dest="allow_compressed", action="store_true",
                        help="read gzip/bzip2/xz-compressed tars (refused by default: they expand on reading; "
                             "--max-shard-bytes still caps what they expand to)")


def limits_from_args(args: argparse.Namespace) -> ReadLimits:
    return ReadLimits(**{f.name: getattr(args, f.name) for f in fields(ReadLimits)})


@dataclass
class InputSample:
    """The members of one key group: any may be missing, broken or over a cap."""
    key: str                                   # normalised, safe (module docstring)
    source_key: str | None = None              # the raw key where it differs from `key`
    image_ext: str | None = None
    image: bytes | None = None
    org_caption: str | None = None
    org_caption_truncated: bool = False        # the .txt was over `max_text_bytes` and was cut
    meta: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(META_FIELDS))
    notes: list[str] = field(default_factory=list)   # non-fatal problems, e.g. 'json.uid: int coerced to string'
    image_error: str | None = None             # 'reason: detail' when the image cannot even be attempted


@dataclass
class ReadStats:
    samples_in: int = 0                # key groups in the tar, duplicates included
    duplicates: int = 0
    duplicate_keys: list[str] = field(default_factory=list)   # the first 100
    nonregular: Counter = field(default_factory=Counter)      # symlink, hardlink, dir, fifo, chardev, blockdev
    ignored: Counter = field(default_factory=Counter)         # members that are no part of a sample, by why
    members: int = 0
    bytes: int = 0                     # uncompressed tar bytes read

    def as_dict(self) -> dict:
        return {"samples_in": self.samples_in, "duplicates": self.duplicates, "duplicate_keys": self.duplicate_keys,
                "nonregular": dict(self.nonregular), "ignored": dict(self.ignored), "members": self.members,
                "bytes": self.bytes}


def shard_name(path: str) -> str:
    name = storage.basename(path)
    return name[:-4] if name.endswith(".tar") else name


def stats_path(path: str) -> str:
    """img2dataset's `{shard}_stats.json` beside a `{shard}.tar`."""
    return (path[:-4] if path.endswith(".tar") else path) + "_stats.json"


def expected_samples(stats_json: bytes) -> int:
    """Samples img2dataset wrote into the tar: the `successes` of its `_stats.json` (failed downloads
    are only in its Parquet)."""
    try:
        value = json.loads(stats_json)["successes"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"not an img2dataset _stats.json: {type(e).__name__}: {e}") from None
    if type(value) is not int or value < 0:
        raise InputError(f"not an img2dataset _stats.json: successes is {value!r}")
    return value


def display_name(raw: bytes) -> str:
    """A raw tar name as text: UTF-8, with bytes that are not UTF-8 as \\xNN."""
    return raw.decode("utf-8", "backslashreplace")


def normalise_key(raw: bytes) -> str:
    """The safe key of a raw key (module docstring, 'Key rule')."""
    stripped = raw
    while stripped.startswith((b"/", b"./")):
        stripped = stripped[1:] if stripped.startswith(b"/") else stripped[2:]
    key = "".join(chr(b) if b in _SAFE_BYTES else f"%{b:02X}" for b in (stripped or raw))
    if len(key) > MAX_KEY_CHARS:
        key = key[:MAX_KEY_CHARS - 17] + "~" + hashlib.blake2b(raw, digest_size=8).hexdigest()
    return key


def split_member(raw_name: bytes) -> tuple[bytes, str] | None:
    """(raw key, lower-case extension) of a member name, as webdataset groups them; None without an extension."""
    match = _MEMBER.match(raw_name)
    if not match:
        return None
    return match.group(1), match.group(2).decode("utf-8", "replace").lower()


def coerce_meta(meta: object, notes: list[str]) -> dict[str, str | None]:
    """The row's metadata fields as str or None whatever the JSON held; each coercion noted."""
    out: dict[str, str | None] = dict.fromkeys(META_FIELDS)
    if not isinstance(meta, dict):
        notes.append(f"json: not an object ({type(meta).__name__}), ignored")
        return out
    for name in META_FIELDS:
        value = meta.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            text = value.encode("utf-8", "replace").decode("utf-8")  # lone surrogates from \ud800 escapes
            if text != value:
                notes.append(f"json.{name}: lone surrogates replaced")
        else:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace").decode()
            notes.append(f"json.{name}: {type(value).__name__} coerced to string")
        out[name] = text
    return out


def _decode_text(data: bytes, cut: bool, notes: list[str]) -> str:
    """UTF-8 text; a cut caption loses its incomplete last character, bytes that are not UTF-8 are replaced."""
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=not cut)
    except UnicodeDecodeError:
        notes.append("txt: not valid UTF-8, bad bytes replaced")
        return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=not cut)


def _nonregular_kind(info: tarfile.TarInfo) -> str | None:
    for kind, test in (("symlink", info.issym), ("hardlink", info.islnk), ("dir", info.isdir),
                       ("fifo", info.isfifo), ("chardev", info.ischr), ("blockdev", info.isblk)):
        if test():
            return kind
    return None if info.isreg() else "other"


class _Header(tarfile.TarInfo):
    """A TarInfo that records why the archive ended and refuses oversized extended headers.

    `tarfile` ends iteration quietly on a missing, partial or invalid header as well as on the zero
    block that ends an archive; only the last is a complete tar. It also reads pax and GNU long-name
    headers into memory whole, whatever size they claim (`_proc_member` dispatches them, CPython 3.10+).
    """

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]  # stubs: _Header
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as e:
            archive.end_error = e  # type: ignore[attr-defined]  # EOFHeaderError: a zero block, the proper end
            raise

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED_HEADERS and self.size > MAX_HEADER_BYTES:
            raise InputError(f"extended tar header of {self.size:,} bytes at byte {self.offset:,} "
                             f"(more than {MAX_HEADER_BYTES:,})")
        return super()._proc_member(archive)  # type: ignore[misc]  # CPython's private dispatcher (3.10+)


class _Head:
    """A source stream with its first bytes (read to sniff the format) put back in front."""

    def __init__(self, source: BinaryIO, head: bytes):
        self.source, self.head = source, head

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.source.read(size)
        if 0 <= size < len(self.head):
            data, self.head = self.head[:size], self.head[size:]
            return data
        data, self.head = self.head, b""
        return data + self.source.read(size - len(data) if size >= 0 else -1)


class _Counted:
    """The uncompressed tar bytes, counted, with the shard's byte cap enforced as they are read."""

    def __init__(self, source: _Readable, cap: int, path: str):
        self.source, self.cap, self.path = source, cap, path
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.bytes += len(data)
        if self.bytes > self.cap:
            raise InputError(f"{self.path}: more than {self.cap:,} uncompressed bytes (--max-shard-bytes)")
        return data


@dataclass
class _Group:
    raw: bytes
    sample: InputSample | None   # None: a duplicate group, counted and skipped


class ShardReader:
    """Iterate the samples of one input tar, streaming (memory holds one key group); `stats` after iteration."""

    def __init__(self, path: str, limits: ReadLimits = ReadLimits(), expected_samples: int | None = None):
        self.path, self.limits, self.expected_samples = path, limits, expected_samples
        self.stats = ReadStats()
        self._seen: set[str] = set()  # normalised keys so far: a repeat is a duplicate

    def __iter__(self) -> Iterator[InputSample]:
        self.stats, self._seen = ReadStats(), set()
        yielded = 0
        try:
            with storage.open_read(self.path) as source:
                stream = self._tar_stream(source)
                try:
                    for sample in self._samples(stream):
                        yielded += 1
                        yield sample
                finally:
                    self.stats.bytes = stream.bytes
        except (InputError, ShardReadError):
            raise
        except (OSError, EOFError, ValueError, tarfile.TarError, zlib.error, lzma.LZMAError) as e:
            # ValueError: tarfile on some corrupt headers (an InputError is one too, re-raised above).
            raise ShardReadError(f"{self.path}: read failed after {yielded} samples and {self.stats.bytes:,} "
                                 f"bytes: {type(e).__name__}: {e}") from e
        if self.expected_samples is not None and self.stats.samples_in != self.expected_samples:
            raise ShardReadError(f"{self.path}: {self.stats.samples_in} samples in the tar, "
                                 f"{self.expected_samples} in its _stats.json")

    def _tar_stream(self, source: BinaryIO) -> _Counted:
        """The uncompressed tar bytes; compression is recognised by its magic bytes, not by the name."""
        head = source.read(6)
        compression = next((name for magic, name in _COMPRESSION_MAGIC.items() if head.startswith(magic)), None)
        if compression is None:
            return _Counted(_Head(source, head), self.limits.max_shard_bytes, self.path)
        if not self.limits.allow_compressed:
            raise InputError(f"{self.path}: {compression}-compressed tar refused (it expands on reading); "
                             "pass --allow-compressed-input to read it")
        if compression not in _DECOMPRESS:
            raise InputError(f"{self.path}: {compression}-compressed tar: no {compression} decoder here, "
                             "decompress it first")
        return _Counted(_DECOMPRESS[compression](_Head(source, head)), self.limits.max_shard_bytes, self.path)

    def _samples(self, stream: _Counted) -> Iterator[InputSample]:
        archive = tarfile.open(fileobj=stream, mode="r|", tarinfo=_Header,  # type: ignore[call-overload]
                               encoding="utf-8", errors="surrogateescape")  # (stream mode takes any reader)
        group: _Group | None = None
        for info in archive:
            archive.members = []  # stream mode keeps every TarInfo otherwise
            self.stats.members += 1
            if self.stats.members > self.limits.max_members:
                raise InputError(f"{self.path}: more than {self.limits.max_members:,} members (--max-members)")
            kind = _nonregular_kind(info)
            if kind:
                self.stats.nonregular[kind] += 1
            split = split_member(info.name.encode("utf-8", "surrogateescape"))
            if split is None:
                self.stats.ignored["no extension"] += 1
                continue
            raw_key, ext = split
            if group is None or raw_key != group.raw:
                if group is not None and group.sample is not None:
                    yield self._finish(group.sample)
                group = self._start(raw_key)
            if group.sample is not None:
                self._add(group.sample, archive, info, ext, kind)
        if group is not None and group.sample is not None:
            yield self._finish(group.sample)
        end = getattr(archive, "end_error", None)
        if not isinstance(end, tarfile.EOFHeaderError):  # type: ignore[attr-defined]  # in CPython, not in the stubs
            raise ShardReadError(f"{self.path}: tar ends early after {self.stats.members} members "
                                 f"({type(end).__name__}: {end})")

    def _start(self, raw_key: bytes) -> _Group:
        self.stats.samples_in += 1
        key = normalise_key(raw_key)
        if key in self._seen:
            self.stats.duplicates += 1
            if len(self.stats.duplicate_keys) < 100:
                self.stats.duplicate_keys.append(key)
            return _Group(raw_key, None)
        self._seen.add(key)
        source = display_name(raw_key)
        return _Group(raw_key, InputSample(key, source_key=None if source == key else source))

    def _add(self, sample: InputSample, archive: tarfile.TarFile, info: tarfile.TarInfo, ext: str,
             nonregular: str | None) -> None:
        """Take one member into its sample: read it within its cap, or record why not."""
        limits = self.limits
        if ext in IMAGE_EXTS:
            if sample.image is not None or sample.image_error is not None:
                sample.notes.append(f"{ext}: another image member ignored")
            elif nonregular:
                sample.image_error = f"nonregular: the image member ({ext}) is a {nonregular}"
            elif info.size > limits.max_image_bytes:
                sample.image_error = (f"oversize: image member of {info.size:,} bytes, over the cap of "
                                      f"{limits.max_image_bytes:,} (--max-image-bytes)")
            else:
                sample.image_ext, sample.image = ("jpg" if ext == "jpeg" else ext), _read(archive, info, info.size)
        elif ext in ("txt", "json") and nonregular:
            sample.notes.append(f"{ext}: the member is a {nonregular}, ignored")
        elif ext == "txt":
            if sample.org_caption is not None:
                sample.notes.append("txt: another caption member ignored")
                return
            cut = info.size > limits.max_text_bytes
            data = _read(archive, info, min(info.size, limits.max_text_bytes))
            sample.org_caption = _decode_text(data, cut, sample.notes)
            if cut:
                sample.org_caption_truncated = True
                sample.notes.append(f"txt: {info.size:,} bytes cut to {limits.max_text_bytes:,} (--max-text-bytes)")
        elif ext == "json":
            if info.size > limits.max_json_bytes:
                sample.notes.append(f"json: {info.size:,} bytes, over the cap of {limits.max_json_bytes:,} "
                                    "(--max-json-bytes), ignored")
                return
            try:
                meta = json.loads(_read(archive, info, info.size))
            except (ValueError, RecursionError) as e:  # RecursionError: deeply nested arrays
                sample.notes.append(f"json: not valid JSON ({type(e).__name__}), ignored")
                return
            sample.meta = coerce_meta(meta, sample.notes)
        else:
            self.stats.ignored["other extension"] += 1

    @staticmethod
    def _finish(sample: InputSample) -> InputSample:
        if sample.image is None and sample.image_error is None:
            sample.image_error = "missing: no image member"
        return sample


def _read(archive: tarfile.TarFile, info: tarfile.TarInfo, size: int) -> bytes:
    """The first `size` bytes of a member (tarfile raises ReadError if the tar ends inside them)."""
    member = archive.extractfile(info)
    if member is None:
        raise tarfile.ReadError(f"member {info.name!r} has no data")
    data = member.read(size)
    if len(data) != size:
        raise tarfile.ReadError(f"unexpected end of data in a member at byte {info.offset_data:,}")
    return data
