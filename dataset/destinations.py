"""Where published files go, switched for readers in one step: a Hub repo (one commit, dataset/hub.py), or a
local folder or S3 prefix.

A folder or prefix gets each publish's data files under a folder of their own, `data/{publish id}/`, while
readers keep reading the old ones; then ONE write of the switch file (the card README.md, whose `configs`
name the data files, so `datasets.load_dataset(DEST)` reads through it; a WDS export's manifest) switches
readers to the new files, as a compare-and-swap on the switch file read at the start: of two publishes at
once, the second to finish fails and removes its own files, never a mix. Only then are the earlier
publishes' files removed. A destination takes finished local files (`put`), then `finish(switch, keep,
is_managed)` makes the switch and returns the paths it removed.
"""
from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from dataset import hub, storage

CARD = "README.md"
DATA_DIR = "data"


def upload_line(dest: str, files: int) -> str:
    """How `files` files will reach `dest`, for the plan printed before publishing."""
    if hub.is_hub(dest):
        return (f"upload: {files} files to dataset repo {hub.repo_id(dest)}, each pre-uploaded when written, "
                f"then one commit; token {hub.token_status()}")
    if storage.is_remote(dest):
        return f"upload: {files} objects, one PUT each (multipart for large files), then the card switches readers"
    return f"write: {files} files, then the card switches readers"


class ConcurrentPublish(RuntimeError):
    """Another publish switched the destination while this one wrote its files."""


class StorageDestination:
    """A local folder or `s3://bucket/prefix` (see the module docstring)."""

    def __init__(self, dest: str, switch_name: str):
        self.dest, self.switch_name = dest, switch_name
        self.at_start = storage.read_versioned(storage.join(dest, switch_name))   # what the switch replaces
        self.written: list[str] = []

    def put(self, local_file: str, rel: str) -> None:
        self.written.append(rel)
        storage.put_file(local_file, storage.join(self.dest, rel))

    def finish(self, switch: bytes, keep: set[str], is_managed: Callable[[str], bool]) -> list[str]:
        """Switch readers with one conditional write of the switch file, then delete managed files not in `keep`."""
        path = storage.join(self.dest, self.switch_name)
        start = self.at_start
        switched = (storage.create_if_absent(path, switch) if start is None
                    else storage.put_if_match(path, switch, start.etag))
        if switched is None:
            for rel in self.written:
                storage.delete(storage.join(self.dest, rel))
            raise ConcurrentPublish(f"{path} changed while this publish wrote its files (another publish?); its "
                                    "files are removed and the destination is as the other publish left it: rerun")
        stale = []
        root = storage.join(self.dest, "")
        for entry in storage.list_entries(self.dest, recursive=True):
            rel = entry.path[len(root):].lstrip("/")
            if rel not in keep and is_managed(rel):
                storage.delete(entry.path)
                stale.append(entry.path)
        return stale


def data_dir(dest: str) -> str:
    """Where this publish's data files go: `data/` on the Hub (one commit switches them all), a folder of its own
    elsewhere (the card switches to it)."""
    if hub.is_hub(dest):
        return DATA_DIR
    return f"{DATA_DIR}/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


def open_destination(dest: str, switch_name: str, staging: str, *, public: bool, endpoint: str | None,
                     log: Callable[[str], None]) -> hub.HubDestination | StorageDestination:
    """The destination; `switch_name` is the file whose write switches readers (README.md, manifest.json)."""
    if hub.is_hub(dest):
        return hub.HubDestination(dest, staging, switch_name, public=public, endpoint=endpoint, log=log)
    return StorageDestination(dest, switch_name)
