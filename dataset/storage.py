"""One small interface over local folders and object stores for every file the pipeline touches.

Paths are strings: a local path or `s3://bucket/key`. S3 endpoint and credentials come from the
standard AWS environment variables and config files (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_PROFILE`, ...), read once per process.

Guarantees:
- Writes are atomic and durable: a reader sees the whole file or nothing. Local: a temporary file in
  the target folder, fsync, then `os.replace` (overwrite) or `os.link` (create-if-absent), then an
  fsync of the folder. S3: one PUT, or a multipart upload that appears only when complete.
- Conditional writes: `put_if_absent` (S3 `If-None-Match: *`) and `put_if_match` (S3 `If-Match` on
  the ETag; locally an `flock` on the folder's lock file, an ETag compare and a replace).
  `probe_conditional_writes` checks that a store really honours them.
- Transient S3 errors (throttling, 5xx, timeouts, connection resets) are retried with backoff on
  every call (botocore's standard retry mode); a download that breaks off resumes where it stopped.
  What still fails raises an OSError naming the path: a read error never looks like end of data.
- `REQUESTS` counts storage calls by kind ('get', 'head', 'put', 'list' per listing page, 'delete').
"""
from __future__ import annotations

import collections
import email.utils
import fcntl
import fnmatch
import glob
import hashlib
import io
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import Boto3Error
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from braceexpand import braceexpand

# Keys per ListObjectsV2 request (S3's maximum); tests lower it to exercise pagination.
LIST_PAGE_SIZE = 1000
# Files up to this size go up in one PUT: boto3's multipart threshold, without its transfer manager's
# threads (a per-file cost that small files, e.g. a shard's Parquet, would pay for nothing).
SINGLE_PUT_BYTES = 8 << 20
# Bytes per read from an S3 response body: tar readers ask for 512-byte blocks.
STREAM_BUFFER_SIZE = 1 << 20
# Tries per S3 call, retries included (botocore "standard" mode: exponential backoff with jitter).
S3_MAX_ATTEMPTS = 10
# A download that breaks off is resumed this many times, after RESUME_BACKOFF_S * 2**n seconds.
READ_RESUMES = 5
RESUME_BACKOFF_S = 0.2
# Local compare-and-swap serialises on this file in the target's folder.
LOCK_FILE = ".storage-lock"
# Local "now" is the modification time the file system gives this file when touched.
CLOCK_FILE = ".storage-clock"

_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED = {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
# 412: the condition failed. 409: another conditional write of the same key is in flight; it wins.
_CONDITION_FAILED = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}
_GLOB_CHARS = re.compile(r"[*?\[]")

REQUESTS: collections.Counter = collections.Counter()
_requests_lock = threading.Lock()

_client = None
_client_pid = -1
_client_lock = threading.Lock()


@dataclass(frozen=True)
class Versioned:
    """A file's bytes with the version they belong to."""
    data: bytes
    etag: str      # changes on every write (S3: the ETag, an MD5 of the body; local: inode, mtime and MD5)
    age: float     # seconds since the last write, by the storage's own clock


def _count(kind: str) -> None:
    with _requests_lock:
        REQUESTS[kind] += 1


def is_remote(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(path)


# --- S3 plumbing -----------------------------------------------------------------------------

def s3_client() -> BaseClient:
    """The process's boto3 S3 client, created on first use (and again after a fork)."""
    global _client, _client_pid
    with _client_lock:
        if _client is None or _client_pid != os.getpid():
            # A new session rereads the environment (the default one caches credentials); a
            # bigger connection pool than the default 10, as prefetch and upload threads share it.
            session = boto3.session.Session()
            config = Config(max_pool_connections=32, connect_timeout=10, read_timeout=60,
                            retries={"mode": "standard", "total_max_attempts": S3_MAX_ATTEMPTS})
            _client = session.client("s3", config=config)
            _client_pid = os.getpid()
        return _client


def reset_s3_client() -> None:
    """Forget the cached client so the next call rereads the AWS environment."""
    global _client
    with _client_lock:
        _client = None


def _bucket_key(path: str, need_key: bool = True) -> tuple[str, str]:
    """Split `s3://bucket/key` into (bucket, key); reject other schemes."""
    scheme, _, rest = path.partition("://")
    if scheme != "s3":
        raise ValueError(f"{path}: unsupported scheme {scheme!r}, use a local path or s3://")
    bucket, _, key = rest.partition("/")
    if not bucket or (need_key and not key):
        raise ValueError(f"{path}: expected s3://bucket/key")
    return bucket, key


def _error_code(error: ClientError) -> str:
    """The S3 error code of a botocore ClientError ('NoSuchKey', '412', ...)."""
    return str(error.response.get("Error", {}).get("Code", ""))


@contextmanager
def _s3_errors(action: str, path: str) -> Iterator[None]:
    """Re-raise boto errors as FileNotFoundError / PermissionError / OSError naming the path."""
    try:
        yield
    except ClientError as e:
        code = _error_code(e)
        message = e.response.get("Error", {}).get("Message", "")
        reason = f"{action} {path} failed: {code} {message}".strip()
        if code in _NOT_FOUND:
            raise FileNotFoundError(reason) from e
        if code in _DENIED:
            raise PermissionError(reason) from e
        raise OSError(reason) from e
    except (BotoCoreError, Boto3Error) as e:
        raise OSError(f"{action} {path} failed: {e}") from e


def _head(path: str) -> dict:
    bucket, key = _bucket_key(path)
    _count("head")
    with _s3_errors("stat", path):
        return s3_client().head_object(Bucket=bucket, Key=key)


def endpoint(path: str) -> str:
    """Where `path` lives, for messages: the S3 endpoint (without any credentials) or the local folder."""
    if not is_remote(path):
        return f"local folder {os.path.abspath(parent(path) or '.')}"
    url = urlsplit(s3_client().meta.endpoint_url)
    return f"S3 endpoint {url.scheme}://{url.hostname}{f':{url.port}' if url.port else ''}"


class _S3Reader(io.RawIOBase):
    """An S3 object as a raw stream. A download that breaks off resumes at the byte where it stopped
    (a Range GET with `If-Match` on the first response's ETag, so a changed object is an error and
    never a mix); reading past the resumes raises OSError naming the path, never a short read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.bucket, self.key = _bucket_key(path)
        _count("get")
        with _s3_errors("read", path):
            self.response = s3_client().get_object(Bucket=self.bucket, Key=self.key)
        self.body = self.response["Body"]
        self.etag = self.response["ETag"]
        self.length = int(self.response["ContentLength"])
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.pos >= self.length:
            return 0
        want = min(len(buffer), self.length - self.pos)
        for resume in range(READ_RESUMES + 1):
            try:
                data = self.body.read(want)
                if data:
                    break
                raise OSError("the response ended early")
            except (BotoCoreError, OSError) as e:
                if resume == READ_RESUMES:
                    raise OSError(f"read {self.path} failed at byte {self.pos:,} of {self.length:,} "
                                  f"after {READ_RESUMES} resumes: {e}") from e
                time.sleep(RESUME_BACKOFF_S * 2**resume)
                self._resume()
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def _resume(self) -> None:
        """A new body from the current position; a body that cannot be had is retried by readinto."""
        self.body.close()
        _count("get")
        try:
            self.body = s3_client().get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-",
                                               IfMatch=self.etag)["Body"]
        except ClientError as e:
            if _error_code(e) in _CONDITION_FAILED | _NOT_FOUND:
                raise OSError(f"read {self.path} failed: the object changed or went away while being read") from e
            self.body = io.BytesIO()  # nothing: the next read fails and resumes again
        except BotoCoreError:
            self.body = io.BytesIO()

    def readall(self) -> bytes:
        chunks = []
        while chunk := self.read(STREAM_BUFFER_SIZE):
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.body.close()
        super().close()


# --- local plumbing --------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(folder: Path) -> None:
    """Create the folder and its missing parents durably (each new entry fsynced in its parent)."""
    if folder.is_dir():
        return
    _ensure_dir(folder.parent)
    try:
        folder.mkdir()
    except FileExistsError:
        return
    _fsync_dir(folder.parent)


def _temp_beside(target: Path, data: bytes) -> str:
    """A fsynced temporary file holding `data` in the target's folder (hidden, ends in .tmp)."""
    _ensure_dir(target.parent)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _local_etag(st: os.stat_result, data: bytes) -> str:
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{hashlib.md5(data).hexdigest()}"


def _local_replace(target: Path, data: bytes) -> str:
    """Durable overwrite; returns the new etag."""
    tmp = _temp_beside(target, data)
    try:
        etag = _local_etag(os.stat(tmp), data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return etag


def _local_now(folder: Path) -> float:
    """Now by the file system's clock: the mtime it gives a file we touch (on NFS the server sets it)."""
    clock = folder / CLOCK_FILE
    try:
        try:
            os.utime(clock)
        except FileNotFoundError:
            clock.touch()
        return os.stat(clock).st_mtime
    except OSError:  # a read-only folder: this machine's clock is the best there is
        return time.time()


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    _ensure_dir(folder)
    with open(folder / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_local(target: Path) -> tuple[bytes, os.stat_result] | None:
    """The file's bytes and the status of the very file they came from; None when absent."""
    try:
        with open(target, "rb") as f:
            return f.read(), os.fstat(f.fileno())
    except FileNotFoundError:
        return None


# --- files -----------------------------------------------------------------------------------

def read_bytes(path: str) -> bytes:
    if is_remote(path):
        with _S3Reader(path) as reader:
            return reader.readall()
    _count("get")
    return Path(path).read_bytes()


def read_versioned(path: str) -> Versioned | None:
    """The file with its etag and age (by the storage's clock), or None when it does not exist.

    S3: age = the response's Date header - the object's LastModified (both the server's clock, whole
    seconds). Local: the mtime the file system gives a freshly touched file - the file's mtime.
    """
    if not is_remote(path):
        _count("get")
        found = _read_local(Path(path))
        if found is None:
            return None
        data, st = found
        return Versioned(data, _local_etag(st, data), _local_now(Path(path).parent) - st.st_mtime)
    try:
        reader = _S3Reader(path)
    except FileNotFoundError:
        return None
    with reader:
        data = reader.readall()
    headers = reader.response["ResponseMetadata"].get("HTTPHeaders", {})
    if "date" not in headers:
        raise OSError(f"read {path}: the response has no Date header, so the age of the object is unknown")
    now = email.utils.parsedate_to_datetime(headers["date"])
    return Versioned(data, reader.etag, (now - reader.response["LastModified"]).total_seconds())


def open_read(path: str) -> BinaryIO:
    """A buffered binary stream of the file (S3: read as the response arrives, resumed if it breaks off)."""
    if is_remote(path):
        return io.BufferedReader(_S3Reader(path), buffer_size=STREAM_BUFFER_SIZE)
    _count("get")
    return open(path, "rb")


def exists(path: str) -> bool:
    if is_remote(path):
        try:
            _head(path)
        except FileNotFoundError:
            return False
        return True
    _count("head")
    return Path(path).exists()


def size(path: str) -> int:
    """Size in bytes."""
    if is_remote(path):
        return int(_head(path)["ContentLength"])
    _count("head")
    return os.path.getsize(path)


def mtime(path: str) -> float:
    """Last modification time, seconds since the epoch."""
    if is_remote(path):
        return _head(path)["LastModified"].timestamp()
    _count("head")
    return os.path.getmtime(path)


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically and durably (replacing what is there): local temp + fsync + rename, or one S3 PUT."""
    _count("put")
    if is_remote(path):
        bucket, key = _bucket_key(path)
        with _s3_errors("write", path):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    _local_replace(Path(path), data)


def put_file(local_file: str, path: str) -> None:
    """Move a finished local file to `path` atomically and durably (the local file is consumed)."""
    _count("put")
    if is_remote(path):
        bucket, key = _bucket_key(path)
        with _s3_errors("upload", path):
            if os.path.getsize(local_file) <= SINGLE_PUT_BYTES:
                with open(local_file, "rb") as f:
                    s3_client().put_object(Bucket=bucket, Key=key, Body=f)
            else:  # multipart: the object appears only when the upload completes
                s3_client().upload_file(local_file, bucket, key)
        os.remove(local_file)
        return
    target = Path(path)
    _ensure_dir(target.parent)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.move(local_file, tmp)  # a rename on the same file system, else a copy
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _won_after_retry(error: ClientError, path: str, data: bytes) -> str | None:
    """After a refused conditional PUT that botocore had retried: the etag if the first try landed.

    A PUT whose answer was lost can succeed on the server and then be refused on retry; the stored
    bytes tell (callers put a nonce in bodies written with conditions).
    """
    if not error.response.get("ResponseMetadata", {}).get("RetryAttempts"):
        return None
    current = read_versioned(path)
    return current.etag if current is not None and current.data == data else None


def create_if_absent(path: str, data: bytes) -> str | None:
    """Create `path` with `data` only if it does not exist yet; its etag if this call created it, else None."""
    _count("put")
    if is_remote(path):
        bucket, key = _bucket_key(path)
        with _s3_errors("create", path):
            try:
                return s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
            except ClientError as e:
                if _error_code(e) in _CONDITION_FAILED:
                    return _won_after_retry(e, path, data)
                raise
    target = Path(path)
    tmp = _temp_beside(target, data)
    try:
        etag = _local_etag(os.stat(tmp), data)
        os.link(tmp, target)  # fails if the target exists: the exclusive, atomic step
    except FileExistsError:
        return None
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_dir(target.parent)
    return etag


def put_if_absent(path: str, data: bytes) -> bool:
    """Create `path` with `data` only if it does not exist yet; True if this call created it."""
    return create_if_absent(path, data) is not None


def put_if_match(path: str, data: bytes, etag: str) -> str | None:
    """Replace `path` only if its etag is still `etag`; the new etag, or None if it changed or is gone.

    S3 ETags are MD5s of the body: callers put a nonce in what they write, so no two writes share one.
    """
    _count("put")
    if is_remote(path):
        bucket, key = _bucket_key(path)
        with _s3_errors("compare-and-swap", path):
            try:
                return s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=etag)["ETag"]
            except ClientError as e:
                if _error_code(e) in _CONDITION_FAILED | _NOT_FOUND:
                    return _won_after_retry(e, path, data)
                raise
    target = Path(path)
    with _folder_lock(target.parent):
        current = _read_local(target)
        if current is None or _local_etag(current[1], current[0]) != etag:
            return None
        return _local_replace(target, data)


def delete(path: str) -> None:
    """Remove the file; no error if it is already gone."""
    _count("delete")
    if is_remote(path):
        bucket, key = _bucket_key(path)
        with _s3_errors("delete", path):
            s3_client().delete_object(Bucket=bucket, Key=key)
        return
    Path(path).unlink(missing_ok=True)


def list_files(folder: str, suffix: str = "", name_prefix: str = "") -> list[str]:
    """Sorted full paths of the files directly under `folder` whose names start with `name_prefix`
    and end in `suffix` (S3: the prefix narrows the listing itself; hidden local files are left out)."""
    if is_remote(folder):
        bucket, key = _bucket_key(folder, need_key=False)
        directory = key.rstrip("/") + "/" if key.strip("/") else ""
        pages = s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=directory + name_prefix, Delimiter="/",
            PaginationConfig={"PageSize": LIST_PAGE_SIZE})
        paths = []
        with _s3_errors("list", folder):
            for page in pages:
                _count("list")
                paths += [f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", [])
                          if obj["Key"].endswith(suffix) and obj["Key"] != directory]
        paths.sort()
        return paths
    _count("list")
    try:
        entries = os.scandir(folder or ".")
    except (FileNotFoundError, NotADirectoryError):
        return []
    with entries:
        names = [e.name for e in entries if e.name.startswith(name_prefix) and e.name.endswith(suffix)
                 and not e.name.startswith(".") and e.is_file()]
    return sorted(join(folder, name) for name in names)


def probe_conditional_writes(folder: str) -> str | None:
    """Check that the storage under `folder` honours conditional writes; None if it does, else why not.

    A second conditional create of one key must be refused, and so must a compare-and-swap with a
    stale etag. Storage that ignores these conditions turns every "first writer wins" into "last
    writer wins"; the reason names the endpoint.
    """
    path = join(folder, "_probe", f"{uuid.uuid4().hex}.json")
    where = endpoint(path)
    try:
        first = create_if_absent(path, f"first {uuid.uuid4().hex}".encode())
        if first is None:
            return f"{where} refused to create the new object {path}"
        if create_if_absent(path, f"second {uuid.uuid4().hex}".encode()) is not None:
            return (f"{where} ignores If-None-Match: a second conditional create of {path} succeeded, "
                    "so two writers could both believe they won")
        if put_if_match(path, f"stale {uuid.uuid4().hex}".encode(), '"' + "0" * 32 + '"') is not None:
            return f"{where} ignores If-Match: a compare-and-swap with a stale ETag on {path} succeeded"
        if put_if_match(path, f"third {uuid.uuid4().hex}".encode(), first) is None:
            return f"{where} refused a compare-and-swap with the current ETag on {path}"
    finally:
        delete(path)
    return None


# --- input specs -----------------------------------------------------------------------------

def expand_inputs(spec: str) -> list[str]:
    """Sorted input shard paths from a folder, glob, brace range or s3:// prefix (all `.tar`)."""
    return list_inputs(spec)[0]


def list_inputs(spec: str) -> tuple[list[str], list[set[str]]]:
    """`expand_inputs`, and the listings it made, each the full paths of the files in one folder (the files
    img2dataset writes beside each shard, to be looked up without listing the folder again).

    One listing per folder, however many names a brace range expands to: O(folders) requests and
    time linear in the names. Folders in which a local glob matched are not listed.
    """
    listings: dict[str, set[str]] = {}
    found: set[str] = set()
    for pattern in braceexpand(spec):  # '{00000..00099}' and '{a,b}', zero padding kept, as webdataset
        remote = is_remote(pattern)
        if not _GLOB_CHARS.search(pattern) and not pattern.endswith(".tar") and (remote or os.path.isdir(pattern)):
            if pattern not in listings:
                listings[pattern] = set(list_files(pattern))
            found.update(p for p in listings[pattern] if p.endswith(".tar"))
            continue
        folder, name = pattern.rsplit("/", 1) if remote else os.path.split(pattern)
        if _GLOB_CHARS.search(folder):
            if remote:
                raise ValueError(f"{spec}: wildcards in S3 folder names are not supported, only in file names")
            found.update(p for p in glob.glob(pattern) if os.path.isfile(p))
            continue
        if folder not in listings:
            listings[folder] = set(list_files(folder))
        if _GLOB_CHARS.search(name):
            found.update(p for p in listings[folder] if fnmatch.fnmatchcase(basename(p), name))
        elif join(folder, name) in listings[folder]:
            found.add(join(folder, name))
    if not found:
        raise ValueError(f"no input shards match {spec!r}")
    return sorted(found), list(listings.values())
