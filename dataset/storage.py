"""One small interface over local folders and object stores for every file the pipeline touches.

Paths are strings: a local path or `s3://bucket/key`. Writes are atomic: a reader sees the
whole file or nothing (local: temporary name + rename; S3: a single PUT / completed multipart).
S3 endpoint and credentials come from the standard AWS environment variables and config files
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...), read once per process.
"""
from __future__ import annotations

import fnmatch
import glob
import io
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import boto3
from boto3.exceptions import Boto3Error
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.response import StreamingBody

# Keys per ListObjectsV2 request (S3's maximum); tests lower it to exercise pagination.
LIST_PAGE_SIZE = 1000
# Bytes per read from an S3 response body: tar readers ask for 512-byte blocks.
STREAM_BUFFER_SIZE = 1 << 20

_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED = {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
# 412: the key exists. 409: another conditional write of the same key is in flight; it wins.
_ALREADY_CLAIMED = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}
_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")

_client = None
_client_pid = -1
_client_lock = threading.Lock()


def is_remote(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


# --- S3 plumbing -----------------------------------------------------------------------------

def s3_client() -> BaseClient:
    """The process's boto3 S3 client, created on first use (and again after a fork)."""
    global _client, _client_pid
    with _client_lock:
        if _client is None or _client_pid != os.getpid():
            # A new session rereads the environment (the default one caches credentials); a
            # bigger connection pool than the default 10, as prefetch and upload threads share it.
            session = boto3.session.Session()
            _client = session.client("s3", config=Config(max_pool_connections=32))
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
    with _s3_errors("stat", path):
        return s3_client().head_object(Bucket=bucket, Key=key)


# --- files -----------------------------------------------------------------------------------

def read_bytes(path: str) -> bytes:
    if is_remote(path):
        bucket, key = _bucket_key(path)
        with _s3_errors("read", path):
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(path).read_bytes()


class _S3Body(io.RawIOBase):
    """An S3 response body as a raw stream whose read errors are OSErrors naming the path."""

    def __init__(self, path: str, body: StreamingBody) -> None:
        self.path, self.body = path, body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        with _s3_errors("read", self.path):
            data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()


def open_read(path: str) -> BinaryIO:
    """A buffered binary stream of the file (S3: read as the response arrives)."""
    if is_remote(path):
        bucket, key = _bucket_key(path)
        with _s3_errors("open", path):
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        return io.BufferedReader(_S3Body(path, body), buffer_size=STREAM_BUFFER_SIZE)
    return open(path, "rb")


def exists(path: str) -> bool:
    if is_remote(path):
        try:
            _head(path)
        except FileNotFoundError:
            return False
        return True
    return Path(path).exists()


def size(path: str) -> int:
    """Size in bytes."""
    if is_remote(path):
        return int(_head(path)["ContentLength"])
    return os.path.getsize(path)


def mtime(path: str) -> float:
    """Last modification time, seconds since the epoch."""
    if is_remote(path):
        return _head(path)["LastModified"].timestamp()
    return os.path.getmtime(path)


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically: local temporary file + fsync + rename, or one S3 PUT."""
    if is_remote(path):
        bucket, key = _bucket_key(path)
        with _s3_errors("write", path):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def put_file(local_file: str, path: str) -> None:
    """Move a finished local file to `path` atomically (the local file is consumed)."""
    if is_remote(path):
        bucket, key = _bucket_key(path)
        with _s3_errors("upload", path):
            # Multipart above 8 MiB; the object appears only when the upload completes.
            s3_client().upload_file(local_file, bucket, key)
        os.remove(local_file)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.move(local_file, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def put_if_absent(path: str, data: bytes) -> bool:
    """Create `path` with `data` only if it does not exist yet; True if this call created it."""
    if is_remote(path):
        bucket, key = _bucket_key(path)
        with _s3_errors("create", path):
            try:
                s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except ClientError as e:
                if _error_code(e) in _ALREADY_CLAIMED:
                    return False
                raise
        return True
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def delete(path: str) -> None:
    """Remove the file; no error if it is already gone."""
    if is_remote(path):
        bucket, key = _bucket_key(path)
        with _s3_errors("delete", path):
            s3_client().delete_object(Bucket=bucket, Key=key)
        return
    Path(path).unlink(missing_ok=True)


def list_files(prefix: str, suffix: str = "") -> list[str]:
    """Sorted full paths of the files directly under folder `prefix` ending in `suffix`."""
    if is_remote(prefix):
        bucket, key = _bucket_key(prefix, need_key=False)
        folder = key.rstrip("/") + "/" if key.strip("/") else ""
        pages = s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=folder, Delimiter="/",
            PaginationConfig={"PageSize": LIST_PAGE_SIZE})
        with _s3_errors("list", prefix):
            keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        return sorted(f"s3://{bucket}/{k}" for k in keys if k.endswith(suffix) and k != folder)
    folder = Path(prefix)
    if not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix))


# --- input specs -----------------------------------------------------------------------------

def expand_braces(pattern: str) -> list[str]:
    """Expand numeric ranges like `{00000..00099}` (zero padding kept), as webdataset does."""
    match = _BRACE_RANGE.search(pattern)
    if not match:
        return [pattern]
    first, last = match.groups()
    padded = first.startswith("0") or last.startswith("0")
    width = max(len(first), len(last)) if padded else 0
    low, high = sorted((int(first), int(last)))
    head, tails = pattern[: match.start()], expand_braces(pattern[match.end():])
    return [f"{head}{i:0{width}d}{tail}" for i in range(low, high + 1) for tail in tails]


def expand_inputs(spec: str) -> list[str]:
    """Sorted input shard paths from a folder, glob, brace range or s3:// prefix (all `.tar`)."""
    listings: dict[str, set[str]] = {}
    found: set[str] = set()
    for pattern in expand_braces(spec):
        if is_remote(pattern):
            found.update(_match_remote(pattern, listings))
        elif os.path.isdir(pattern):
            found.update(list_files(pattern, ".tar"))
        else:
            found.update(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not found:
        raise ValueError(f"no input shards match {spec!r}")
    return sorted(found)


def _match_remote(pattern: str, listings: dict[str, set[str]]) -> list[str]:
    """Objects matching an s3:// pattern; a pattern without wildcards or `.tar` is a folder."""
    if not _GLOB_CHARS.search(pattern) and not pattern.endswith(".tar"):
        return list_files(pattern, ".tar")
    parent, name = pattern.rsplit("/", 1)
    if parent not in listings:  # one listing per folder, however many names a range expands to
        listings[parent] = set(list_files(parent))
    if not _GLOB_CHARS.search(name):
        return [pattern] if pattern in listings[parent] else []
    return [p for p in listings[parent] if fnmatch.fnmatchcase(basename(p), name)]
