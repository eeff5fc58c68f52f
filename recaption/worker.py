"""The Ray actor that owns one caption engine and captions whole shards with it."""
from __future__ import annotations

import io
import os
import socket
import threading
from pathlib import Path

import pyarrow.parquet as pq

from dataset import outputs, storage
from recaption.engines import CaptionEngine, make_engine
from recaption.job import CaptionJob
from recaption.prompt import PromptBuilder
from recaption.shard import recaption_shard

# Test hook: a marker path; the first worker to generate creates it and dies (kill -9 style).
FAULT_DIE_ONCE_ENV = "OPENVISION_FAULT_DIE_ONCE"


class DieOnceEngine:
    """Wraps an engine so that the first generate() anywhere ends the process abruptly."""

    def __init__(self, engine: CaptionEngine, marker: str):
        self.engine, self.marker, self.processor = engine, marker, engine.processor

    def generate(self, prompts, images):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return self.engine.generate(prompts, images)
        os.close(fd)
        os._exit(137)


class CaptionWorker:
    """Created as a Ray actor with max_concurrency=2: one call generates while the next prepares."""

    def __init__(self, job: CaptionJob, base: str):
        self.job, self.store = job, outputs.ShardStore(base, outputs.RECAPTION_KINDS)
        engine = make_engine(job.engine, job.sampling)
        marker = os.environ.get(FAULT_DIE_ONCE_ENV)
        self.engine = DieOnceEngine(engine, marker) if marker and not Path(marker).exists() else engine
        self.prompts = PromptBuilder(engine.processor, job.prompt)
        self.engine_lock = threading.Lock()

    def name(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def caption(self, path: str, shard: str, attempt: int, retry_errors: bool, generation: int,
                claim_token: str | None) -> dict:
        previous = None
        if retry_errors:
            ledger = self.store.read_ledger(shard, generation - 1)
            if ledger is None:
                raise FileNotFoundError(f"{shard}: no readable ledger of generation {generation - 1} to retry")
            parquet = self.store.files(ledger)["parquet"]
            previous = pq.read_table(io.BytesIO(storage.read_bytes(parquet))).to_pylist()
        return recaption_shard(path, self.store, self.engine, self.prompts, self.job, attempt=attempt,
                               engine_lock=self.engine_lock, previous_rows=previous, generation=generation,
                               claim_token=claim_token)
