"""One small interface over local folders and object stores for every file the pipeline touches.

Paths are strings: a local path or `SCHEME://bucket/key`. `s3://` reaches S3 and S3-compatible
stores, with the endpoint and credentials of the standard AWS environment variables and config files
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...), read once per process. Each scheme is a
backend (`LocalBackend`, `S3Backend`); `register_backend` adds one (the protocol simulation in the
tests registers an in-memory store).

Guarantees, for every backend:
- Writes are atomic and durable: a reader sees the whole file or nothing. Local: a temporary file in
  the target folder, fsync, then `os.replace` (overwrite) or `os.link` (create-if-absent), then an
  fsync of the folder. S3: one PUT, or a multipart upload that appears only when complete.
- Conditional writes: `create_if_absent` (S3 `If-None-Match: *`) and `put_if_match` (S3 `If-Match` on
  the ETag; locally an `flock` on the folder's lock file, an ETag compare and a replace). A write whose
  answer was lost is recognised as ours when it landed (S3: the stored bytes, which callers make unique
  with a nonce; local: the link's inode, as NFS can report EEXIST for a link it made).
  `probe_conditional_writes` checks that a store really honours them, also under a concurrent burst.
- Transient S3 errors (throttling, 5xx, timeouts, connection resets) are retried with backoff on
  every call (botocore's standard retry mode); a download that breaks off resumes where it stopped.
  What still fails raises an OSError naming the path: a read error never looks like end of data.
- Ages and `now` come from the storage's own clock (S3: the server's Date header; local: the mtime the
  file system gives a freshly touched file), never from this machine's.
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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from braceexpand import braceexpand

if TYPE_CHECKING:
    from botocore.client import BaseClient

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
# Writers racing on one key in the probe: stores whose conditional create is not atomic under
# concurrency (reported for SeaweedFS, seaweedfs issue 8800, and rustfs, issue 1659) let several win.
PROBE_BURST = 16

_GLOB_CHARS = re.compile(r"[*?\[]")

REQUESTS: collections.Counter = collections.Counter()
_requests_lock = threading.Lock()


@dataclass(frozen=True)
class Versioned:
    """A file's bytes with the version they belong to."""
    data: bytes
    etag: str      # changes on every write (S3: the ETag, an MD5 of the body; local: inode, mtime and MD5)
    age: float     # seconds since the last write, by the storage's own clock


@dataclass(frozen=True)
class Entry:
    """One file of a listing."""
    path: str
    size: int
    mtime: float   # seconds since the epoch, by the storage's clock


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


def bucket_key(path: str, need_key: bool = True) -> tuple[str, str]:
    """Split `scheme://bucket/key` into (bucket, key)."""
    _, _, rest = path.partition("://")
    bucket, _, key = rest.partition("/")
    if not bucket or (need_key and not key):
        raise ValueError(f"{path}: expected {path.partition('://')[0]}://bucket/key")
    return bucket, key


# --- backends --------------------------------------------------------------------------------

class Backend(Protocol):
    """What a store must do; paths are full paths of its scheme."""

    def read_bytes(self, path: str) -> bytes: ...
    def read_versioned(self, path: str) -> Versioned | None: ...
    def open_read(self, path: str) -> BinaryIO: ...
    def stat(self, path: str) -> Entry | None: ...
    def write_bytes(self, path: str, data: bytes) -> None: ...
    def put_file(self, local_file: str, path: str) -> None: ...
    def create_if_absent(self, path: str, data: bytes) -> str | None: ...
    def put_if_match(self, path: str, data: bytes, etag: str) -> str | None: ...
    def delete(self, path: str) -> None: ...
    def list_entries(self, folder: str, suffix: str, name_prefix: str, recursive: bool) -> list[Entry]: ...
    def now(self, folder: str) -> float: ...
    def remove_stale_uploads(self, folder: str, older_than: float) -> list[str]: ...
    def where(self, path: str) -> str: ...


# A backend whose requests must all run on the calling thread (the protocol simulation's) says so here.
CONCURRENT = "concurrent"

_BACKENDS: dict[str, Backend] = {}


def register_backend(scheme: str, backend: Backend | None) -> None:
    """Serve `scheme://` paths with `backend` (None removes it)."""
    if backend is None:
        _BACKENDS.pop(scheme, None)
    else:
        _BACKENDS[scheme] = backend


def _backend(path: str) -> Backend:
    if not is_remote(path):
        return LOCAL
    scheme = path.partition("://")[0]
    if scheme == "s3":
        return S3
    if scheme in _BACKENDS:
        return _BACKENDS[scheme]
    raise ValueError(f"{path}: unsupported scheme {scheme!r}, use a local path or s3://")


def parallel_map(where: str, fn: Callable, items: Iterable, threads: int) -> list:
    """`[fn(item) for item in items]` with up to `threads` storage requests in flight at once (on S3 the latency
    of each request dominates); in order. On a backend that is not concurrent, one at a time."""
    items = list(items)
    if len(items) <= 1 or threads <= 1 or not getattr(_backend(where), CONCURRENT, True):
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


# --- files -----------------------------------------------------------------------------------

def read_bytes(path: str) -> bytes:
    return _backend(path).read_bytes(path)


def read_versioned(path: str) -> Versioned | None:
    """The file with its etag and age (by the storage's clock), or None when it does not exist."""
    return _backend(path).read_versioned(path)


def open_read(path: str) -> BinaryIO:
    """A buffered binary stream of the file (S3: read as the response arrives, resumed if it breaks off)."""
    return _backend(path).open_read(path)


def stat(path: str) -> Entry | None:
    """Size and mtime of the file, None when it does not exist."""
    return _backend(path).stat(path)


def exists(path: str) -> bool:
    return stat(path) is not None


def size(path: str) -> int:
    """Size in bytes."""
    return _stat_or_raise(path).size


def mtime(path: str) -> float:
    """Last modification time, seconds since the epoch."""
    return _stat_or_raise(path).mtime


def _stat_or_raise(path: str) -> Entry:
    entry = stat(path)
    if entry is None:
        raise FileNotFoundError(f"stat {path} failed: no such file")
    return entry


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically and durably (replacing what is there): local temp + fsync + rename, or one S3 PUT."""
    _backend(path).write_bytes(path, data)


def put_file(local_file: str, path: str) -> None:
    """Move a finished local file to `path` atomically and durably (the local file is consumed)."""
    _backend(path).put_file(local_file, path)


def create_if_absent(path: str, data: bytes) -> str | None:
    """Create `path` with `data` only if it does not exist yet; its etag if this call created it, else None."""
    return _backend(path).create_if_absent(path, data)


def put_if_absent(path: str, data: bytes) -> bool:
    """Create `path` with `data` only if it does not exist yet; True if this call created it."""
    return create_if_absent(path, data) is not None


def put_if_match(path: str, data: bytes, etag: str) -> str | None:
    """Replace `path` only if its etag is still `etag`; the new etag, or None if it changed or is gone.

    S3 ETags are MD5s of the body: callers put a nonce in what they write, so no two writes share one.
    """
    return _backend(path).put_if_match(path, data, etag)


def delete(path: str) -> None:
    """Remove the file; no error if it is already gone."""
    _backend(path).delete(path)


def list_entries(folder: str, suffix: str = "", name_prefix: str = "", recursive: bool = False) -> list[Entry]:
    """The files directly under `folder` (or anywhere below it, `recursive`) whose names start with
    `name_prefix` and end in `suffix`, sorted by path, with size and mtime (S3: the prefix narrows the listing
    itself; hidden local files are left out)."""
    return _backend(folder).list_entries(folder, suffix, name_prefix, recursive)


def list_files(folder: str, suffix: str = "", name_prefix: str = "") -> list[str]:
    """`list_entries`, paths only."""
    return [entry.path for entry in list_entries(folder, suffix, name_prefix)]


def now(folder: str) -> float:
    """The current time by the storage's clock, seconds since the epoch (for ages of listed files)."""
    return _backend(folder).now(folder)


def remove_stale_uploads(folder: str, older_than: float) -> list[str]:
    """What writers that died mid-upload left under `folder`, started more than `older_than` seconds ago:
    hidden temporary files (local) or incomplete multipart uploads (S3). Removes them; returns their names."""
    return _backend(folder).remove_stale_uploads(folder, older_than)


def endpoint(path: str) -> str:
    """Where `path` lives, for messages: the S3 endpoint (without any credentials) or the local folder."""
    return _backend(path).where(path)


# --- local folders ---------------------------------------------------------------------------

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


def _read_local(target: Path) -> tuple[bytes, os.stat_result] | None:
    """The file's bytes and the status of the very file they came from; None when absent."""
    try:
        with open(target, "rb") as f:
            return f.read(), os.fstat(f.fileno())
    except FileNotFoundError:
        return None


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    _ensure_dir(folder)
    with open(folder / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class LocalBackend:
    """A local (or NFS-mounted) folder."""

    def read_bytes(self, path: str) -> bytes:
        _count("get")
        return Path(path).read_bytes()

    def read_versioned(self, path: str) -> Versioned | None:
        """Age: the mtime the file system gives a freshly touched file - the file's mtime."""
        _count("get")
        found = _read_local(Path(path))
        if found is None:
            return None
        data, st = found
        return Versioned(data, _local_etag(st, data), self.now(parent(path)) - st.st_mtime)

    def open_read(self, path: str) -> BinaryIO:
        _count("get")
        return open(path, "rb")

    def stat(self, path: str) -> Entry | None:
        _count("head")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return Entry(path, st.st_size, st.st_mtime)

    def _replace(self, target: Path, data: bytes) -> str:
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

    def write_bytes(self, path: str, data: bytes) -> None:
        _count("put")
        self._replace(Path(path), data)

    def put_file(self, local_file: str, path: str) -> None:
        _count("put")
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

    def create_if_absent(self, path: str, data: bytes) -> str | None:
        _count("put")
        target = Path(path)
        tmp = _temp_beside(target, data)
        try:
            st = os.stat(tmp)
            try:
                os.link(tmp, target)  # fails if the target exists: the exclusive, atomic step
            except FileExistsError:
                # NFS can answer EEXIST to a retransmitted link that did succeed: then the target
                # is our temporary file's inode.
                try:
                    if os.stat(target).st_ino != st.st_ino:
                        return None
                except FileNotFoundError:
                    return None
            etag = _local_etag(os.stat(target), data)
        finally:
            Path(tmp).unlink(missing_ok=True)
        _fsync_dir(target.parent)
        return etag

    def put_if_match(self, path: str, data: bytes, etag: str) -> str | None:
        _count("put")
        target = Path(path)
        with _folder_lock(target.parent):
            current = _read_local(target)
            if current is None or _local_etag(current[1], current[0]) != etag:
                return None
            return self._replace(target, data)

    def delete(self, path: str) -> None:
        _count("delete")
        Path(path).unlink(missing_ok=True)

    def list_entries(self, folder: str, suffix: str, name_prefix: str, recursive: bool) -> list[Entry]:
        _count("list")
        try:
            entries = os.scandir(folder or ".")
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        with entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                try:
                    if recursive and e.is_dir(follow_symlinks=False):
                        found += self.list_entries(join(folder, e.name), suffix, name_prefix, recursive)
                    elif e.name.startswith(name_prefix) and e.name.endswith(suffix) and e.is_file():
                        st = e.stat()
                        found.append(Entry(join(folder, e.name), st.st_size, st.st_mtime))
                except FileNotFoundError:  # deleted while listed
                    continue
        return sorted(found, key=lambda entry: entry.path)

    def now(self, folder: str) -> float:
        """Now by the file system's clock: the mtime it gives a file we touch (on NFS the server sets it)."""
        clock = Path(folder) / CLOCK_FILE
        try:
            try:
                os.utime(clock)
            except FileNotFoundError:
                _ensure_dir(clock.parent)
                clock.touch()
            return os.stat(clock).st_mtime
        except OSError:  # a read-only folder: this machine's clock is the best there is
            return time.time()

    def remove_stale_uploads(self, folder: str, older_than: float) -> list[str]:
        """Hidden `.NAME.XXXX.tmp` files that a writer killed mid-write left in `folder`."""
        try:
            names = [e.name for e in os.scandir(folder) if e.name.startswith(".") and e.name.endswith(".tmp")]
        except (FileNotFoundError, NotADirectoryError):
            return []
        if not names:
            return []
        cutoff = self.now(folder) - older_than
        removed = []
        for name in names:
            path = os.path.join(folder, name)
            try:
                if os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
                    removed.append(path)
            except FileNotFoundError:
                continue
        return removed

    def where(self, path: str) -> str:
        return f"local folder {os.path.abspath(parent(path) or '.')}"


# --- S3 --------------------------------------------------------------------------------------

_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED = {"403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
# 412: the condition failed. 409: another conditional write of the same key is in flight; it wins.
_CONDITION_FAILED = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}

_client = None
_client_pid = -1
_client_lock = threading.Lock()


def s3_client() -> BaseClient:
    """The process's boto3 S3 client, created on first use (and again after a fork)."""
    import boto3
    from botocore.config import Config

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


def _error_code(error) -> str:
    """The S3 error code of a botocore ClientError ('NoSuchKey', '412', ...)."""
    return str(error.response.get("Error", {}).get("Code", ""))


@contextmanager
def _s3_errors(action: str, path: str) -> Iterator[None]:
    """Re-raise boto errors as FileNotFoundError / PermissionError / OSError naming the path."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

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


class _S3Reader(io.RawIOBase):
    """An S3 object as a raw stream. A download that breaks off resumes at the byte where it stopped
    (a Range GET with `If-Match` on the first response's ETag, so a changed object is an error and
    never a mix); reading past the resumes raises OSError naming the path, never a short read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.bucket, self.key = bucket_key(path)
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
        from botocore.exceptions import BotoCoreError

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
        from botocore.exceptions import BotoCoreError, ClientError

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


def _server_time(response: dict) -> datetime:
    headers = response["ResponseMetadata"].get("HTTPHeaders", {})
    if "date" not in headers:
        raise OSError("the S3 response has no Date header, so the storage's clock is unknown")
    return email.utils.parsedate_to_datetime(headers["date"])


class S3Backend:
    """S3 and S3-compatible stores (`s3://bucket/key`)."""

    def read_bytes(self, path: str) -> bytes:
        with _S3Reader(path) as reader:
            return reader.readall()

    def read_versioned(self, path: str) -> Versioned | None:
        """Age: the response's Date header - the object's LastModified (both the server's clock, whole seconds)."""
        try:
            reader = _S3Reader(path)
        except FileNotFoundError:
            return None
        with reader:
            data = reader.readall()
        try:
            now = _server_time(reader.response)
        except OSError as e:
            raise OSError(f"read {path}: {e}") from None
        return Versioned(data, reader.etag, (now - reader.response["LastModified"]).total_seconds())

    def open_read(self, path: str) -> BinaryIO:
        return io.BufferedReader(_S3Reader(path), buffer_size=STREAM_BUFFER_SIZE)

    def stat(self, path: str) -> Entry | None:
        bucket, key = bucket_key(path)
        _count("head")
        try:
            with _s3_errors("stat", path):
                head = s3_client().head_object(Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        return Entry(path, int(head["ContentLength"]), head["LastModified"].timestamp())

    def write_bytes(self, path: str, data: bytes) -> None:
        _count("put")
        bucket, key = bucket_key(path)
        with _s3_errors("write", path):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)

    def put_file(self, local_file: str, path: str) -> None:
        _count("put")
        bucket, key = bucket_key(path)
        with _s3_errors("upload", path):
            if os.path.getsize(local_file) <= SINGLE_PUT_BYTES:
                with open(local_file, "rb") as f:
                    s3_client().put_object(Bucket=bucket, Key=key, Body=f)
            else:  # multipart: the object appears only when the upload completes
                s3_client().upload_file(local_file, bucket, key)
        os.remove(local_file)

    def _won_after_retry(self, error, path: str, data: bytes) -> str | None:
        """After a refused conditional PUT that botocore had retried: the etag if the first try landed.

        A PUT whose answer was lost can succeed on the server and then be refused on retry; the stored
        bytes tell (callers put a nonce in bodies written with conditions).
        """
        if not error.response.get("ResponseMetadata", {}).get("RetryAttempts"):
            return None
        current = self.read_versioned(path)
        return current.etag if current is not None and current.data == data else None

    def create_if_absent(self, path: str, data: bytes) -> str | None:
        from botocore.exceptions import ClientError

        _count("put")
        bucket, key = bucket_key(path)
        with _s3_errors("create", path):
            try:
                return s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
            except ClientError as e:
                if _error_code(e) in _CONDITION_FAILED:
                    return self._won_after_retry(e, path, data)
                raise

    def put_if_match(self, path: str, data: bytes, etag: str) -> str | None:
        from botocore.exceptions import ClientError

        _count("put")
        bucket, key = bucket_key(path)
        with _s3_errors("compare-and-swap", path):
            try:
                return s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=etag)["ETag"]
            except ClientError as e:
                if _error_code(e) in _CONDITION_FAILED | _NOT_FOUND:
                    return self._won_after_retry(e, path, data)
                raise

    def delete(self, path: str) -> None:
        _count("delete")
        bucket, key = bucket_key(path)
        with _s3_errors("delete", path):
            s3_client().delete_object(Bucket=bucket, Key=key)

    def list_entries(self, folder: str, suffix: str, name_prefix: str, recursive: bool) -> list[Entry]:
        bucket, key = bucket_key(folder, need_key=False)
        directory = key.rstrip("/") + "/" if key.strip("/") else ""
        pages = s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=directory + name_prefix, **({} if recursive else {"Delimiter": "/"}),
            PaginationConfig={"PageSize": LIST_PAGE_SIZE})
        found = []
        with _s3_errors("list", folder):
            for page in pages:
                _count("list")
                found += [Entry(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]), obj["LastModified"].timestamp())
                          for obj in page.get("Contents", [])
                          if obj["Key"].endswith(suffix) and obj["Key"] != directory]
        return sorted(found, key=lambda entry: entry.path)

    def now(self, folder: str) -> float:
        bucket, _ = bucket_key(folder, need_key=False)
        _count("head")
        with _s3_errors("stat", f"s3://{bucket}"):
            return _server_time(s3_client().head_bucket(Bucket=bucket)).timestamp()

    def remove_stale_uploads(self, folder: str, older_than: float) -> list[str]:
        """Abort multipart uploads under `folder` started more than `older_than` seconds ago by the server's
        clock (a writer killed mid-upload leaves them, billed, for ever; a lifecycle rule
        AbortIncompleteMultipartUpload does the same server-side)."""
        bucket, key = bucket_key(folder, need_key=False)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        cutoff = datetime.fromtimestamp(self.now(folder) - older_than, timezone.utc)
        aborted = []
        with _s3_errors("list uploads", folder):
            pages = s3_client().get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                _count("list")
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] < cutoff:
                        s3_client().abort_multipart_upload(Bucket=bucket, Key=upload["Key"],
                                                           UploadId=upload["UploadId"])
                        aborted.append(f"s3://{bucket}/{upload['Key']} (upload {upload['UploadId']})")
        return aborted

    def where(self, path: str) -> str:
        from urllib.parse import urlsplit

        url = urlsplit(s3_client().meta.endpoint_url)
        return f"S3 endpoint {url.scheme}://{url.hostname}{f':{url.port}' if url.port else ''}"


LOCAL = LocalBackend()
S3 = S3Backend()


# --- the conditional-write probe ---------------------------------------------------------------

def probe_conditional_writes(folder: str) -> str | None:
    """Check that the storage under `folder` honours conditional writes; None if it does, else why not.

    A second conditional create of one key must be refused, and so must a compare-and-swap with a
    stale etag; of PROBE_BURST writers creating one new key at once exactly one may win. Storage that
    ignores these conditions turns every "first writer wins" into "last writer wins"; storage that
    fails the requests is refused too. The reason names the endpoint, never credentials.
    """
    probe = join(folder, "_probe")
    path = join(probe, f"{uuid.uuid4().hex}.json")
    try:
        where = endpoint(path)
    except (OSError, ValueError) as e:
        return f"{folder}: {e}"
    created: list[str] = []
    try:
        first = create_if_absent(path, f"first {uuid.uuid4().hex}".encode())
        created.append(path)
        if first is None:
            return f"{where} refused to create the new object {path}"
        if create_if_absent(path, f"second {uuid.uuid4().hex}".encode()) is not None:
            return (f"{where} ignores If-None-Match: a second conditional create of {path} succeeded, "
                    "so two writers could both believe they won")
        if put_if_match(path, f"stale {uuid.uuid4().hex}".encode(), '"' + "0" * 32 + '"') is not None:
            return f"{where} ignores If-Match: a compare-and-swap with a stale ETag on {path} succeeded"
        if put_if_match(path, f"third {uuid.uuid4().hex}".encode(), first) is None:
            return f"{where} refused a compare-and-swap with the current ETag on {path}"
        burst = join(probe, f"{uuid.uuid4().hex}.json")
        created.append(burst)
        start = threading.Barrier(PROBE_BURST)

        def racer(i: int) -> bool:
            start.wait()
            return put_if_absent(burst, f"racer {i} {uuid.uuid4().hex}".encode())

        with ThreadPoolExecutor(PROBE_BURST) as pool:
            winners = sum(pool.map(racer, range(PROBE_BURST)))
        if winners != 1:
            return (f"{where} let {winners} of {PROBE_BURST} concurrent conditional creates of {burst} win "
                    "(exactly one must): its conditional writes are not atomic under concurrency")
    except Exception as e:  # noqa: BLE001 - any failure of the store is a refusal, in one line
        return f"{where} failed a conditional-write check: {type(e).__name__}: {e}"
    finally:
        for created_path in created:
            try:
                delete(created_path)
            except OSError:
                pass
    return None


# --- input specs -----------------------------------------------------------------------------

def has_glob(spec: str) -> bool:
    return bool(_GLOB_CHARS.search(spec))


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
        if not has_glob(pattern) and not pattern.endswith(".tar") and (remote or os.path.isdir(pattern)):
            if pattern not in listings:
                listings[pattern] = set(list_files(pattern))
            found.update(p for p in listings[pattern] if p.endswith(".tar"))
            continue
        folder, name = pattern.rsplit("/", 1) if remote else os.path.split(pattern)
        if has_glob(folder):
            if remote:
                raise ValueError(f"{spec}: wildcards in S3 folder names are not supported, only in file names")
            found.update(p for p in glob.glob(pattern) if os.path.isfile(p))
            continue
        if folder not in listings:
            listings[folder] = set(list_files(folder))
        if has_glob(name):
            found.update(p for p in listings[folder] if fnmatch.fnmatchcase(basename(p), name))
        elif join(folder, name) in listings[folder]:
            found.add(join(folder, name))
    if not found:
        raise ValueError(f"no input shards match {spec!r}")
    return sorted(found), list(listings.values())
