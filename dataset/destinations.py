"""Where published files go: a local folder or S3 prefix (file by file), or a Hub repo (one commit, dataset/hub.py).

A destination takes finished local files (`put`), then `finish(keep, is_managed)` completes the
publish and removes the files an earlier publish left that this one does not rewrite.
"""
from __future__ import annotations

from collections.abc import Callable

from dataset import hub, storage


def upload_line(dest: str, files: int) -> str:
    """How `files` files will reach `dest`, for the plan printed before publishing."""
    if hub.is_hub(dest):
        return (f"upload: {files} files to dataset repo {hub.repo_id(dest)}, each pre-uploaded when written, "
                f"then one commit; token {hub.token_status()}")
    if storage.is_remote(dest):
        return f"upload: {files} objects, one PUT each (multipart for large files)"
    return f"write: {files} files"


class StorageDestination:
    """A local folder or `s3://bucket/prefix`: files land under their dataset paths; stale ones go at the end."""

    def __init__(self, dest: str):
        self.dest = dest

    def put(self, local_file: str, rel: str) -> None:
        storage.put_file(local_file, storage.join(self.dest, rel))

    def finish(self, keep: set[str], is_managed: Callable[[str], bool]) -> list[str]:
        """Delete managed files, in the folders `keep` writes to, that are not in `keep`; returns their paths."""
        stale = []
        for folder in sorted({rel.rsplit("/", 1)[0] if "/" in rel else "" for rel in keep}):
            for path in storage.list_files(storage.join(self.dest, folder) if folder else self.dest):
                rel = f"{folder}/{storage.basename(path)}" if folder else storage.basename(path)
                if rel not in keep and is_managed(rel):
                    storage.delete(path)
                    stale.append(path)
        return stale


def open_destination(dest: str, staging: str, *, public: bool, endpoint: str | None,
                     log: Callable[[str], None]) -> hub.HubDestination | StorageDestination:
    if hub.is_hub(dest):
        return hub.HubDestination(dest, staging, public=public, endpoint=endpoint, log=log)
    return StorageDestination(dest)


