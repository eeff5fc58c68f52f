"""Quiet consoles: our commands print their own lines; library output, warnings and worker tracebacks go
to log files.

Logs live in OUT/_logs/ for a local output. For a remote one (s3://) each process writes a local
file and copies it to OUT/_logs/ when it syncs (after each shard, and before a worker exits).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from dataset import storage

LOG_FOLDER = "_logs"
LIBRARIES = ("ray", "vllm", "transformers", "torch", "huggingface_hub", "datasets", "urllib3", "botocore", "PIL")
# Environment that keeps libraries from writing to the console before our handlers exist.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0",
             "TQDM_DISABLE": "1"}


TRACEBACK_ENV = "OPENVISION_TRACEBACK"   # set to 1: a command's error shows its traceback too


def say(command: str, text: str, error: bool = False) -> None:
    """One line of a command's own output: `[command] text`, on stderr for problems."""
    print(f"[{command}] {text}", file=sys.stderr if error else sys.stdout, flush=True)


def one_line_errors(command: str) -> Callable[[Callable], Callable]:
    """Decorate an entry point's `main`: a ValueError (flags or input that cannot work; our input errors are
    ValueErrors) or an OSError (a missing file, storage that failed after its retries) ends the command with
    `[command] error: ...` on stderr and exit status 2, not a traceback. `OPENVISION_TRACEBACK=1` re-raises."""
    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def guarded(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except (ValueError, OSError) as e:
                if os.environ.get(TRACEBACK_ENV):
                    raise
                say(command, f"error: {e} ({TRACEBACK_ENV}=1 shows the traceback)", error=True)
                raise SystemExit(2) from None
        return guarded
    return decorate


def local_log_dir(out: str) -> Path:
    if storage.is_remote(out):
        return Path(tempfile.gettempdir()) / "openvision-logs" / hashlib.sha256(out.encode()).hexdigest()[:12]
    return Path(out) / LOG_FOLDER


def shown_path(out: str, name: str) -> str:
    """Where a user finds the log `name` of a run writing to `out`."""
    return storage.join(out, LOG_FOLDER, name) if storage.is_remote(out) else str(local_log_dir(out) / name)


class LogFile:
    def __init__(self, out: str, name: str):
        self.out, self.name = out, name
        self.path = local_log_dir(out) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler: logging.Handler | None = None
        self.synced = float("-inf")

    @property
    def shown(self) -> str:
        return shown_path(self.out, self.name)

    def capture_process(self) -> None:
        """Everything this process and its children write to stdout/stderr (fds 1 and 2) goes to the file."""
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        logging.captureWarnings(True)

    def capture_libraries(self) -> None:
        """Logging (libraries' loggers reach the root logger, which writes the file) and Python warnings go to
        the file; this process's own prints stay on the console. Call again after ray.init(), which
        changes the handlers of Ray's logger."""
        import ray  # noqa: F401  (its import installs a console handler, removed here)

        if self.handler is None:
            self.handler = logging.FileHandler(self.path)
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.handlers = [self.handler]
        root.setLevel(logging.INFO)
        for name in LIBRARIES:
            logger = logging.getLogger(name)
            logger.handlers = []
            logger.propagate = True
        logging.captureWarnings(True)
        warnings.simplefilter("default")

    def close(self) -> None:
        """Stop writing library logs to the file (in-process runs start and end many jobs)."""
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
            self.handler.close()
            self.handler = None

    def sync(self, every: float = 0.0) -> None:
        """Copy the local file to OUT/_logs/ when the output is remote (best effort: logs are not data);
        `every`: not again within that many seconds (a worker syncs after each shard, its log only grows)."""
        if not storage.is_remote(self.out) or time.monotonic() - self.synced < every:
            return
        self.synced = time.monotonic()
        try:
            storage.write_bytes(self.shown, self.path.read_bytes())
        except OSError as e:
            say("logs", f"could not copy the log {self.path} to {self.shown}: {e}", error=True)


def quiet_environment() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send everything written to stdout/stderr (fds 1 and 2, so child processes too) to `path` for a while."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])

