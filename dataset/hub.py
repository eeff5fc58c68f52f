"""Upload a published dataset to a Hugging Face Hub dataset repo, a batch of files at a time.

The token comes from `HF_TOKEN` or `hf auth login` (huggingface_hub finds it; it is never printed),
the endpoint from `HF_ENDPOINT` or the caller. Files are staged in a local folder and sent with
`HfApi.upload_folder`, which in huggingface_hub 2.x splits large uploads into several commits and
resumes an interrupted one (unchanged files are skipped). Staging is emptied after every batch, so
local disk holds at most one batch.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

HF_SCHEME = "hf://"
# upload_folder (huggingface_hub 2.x) starts at about 250 files per commit and adapts from there.
FILES_PER_COMMIT = 250


def is_hub(dest: str) -> bool:
    return dest.startswith(HF_SCHEME)


def repo_id(dest: str) -> str:
    """`hf://ORG/NAME` -> `ORG/NAME`."""
    parts = dest[len(HF_SCHEME):].strip("/").split("/")
    if not is_hub(dest) or len(parts) != 2 or not all(parts):
        raise ValueError(f"{dest}: expected hf://ORG/NAME")
    return "/".join(parts)


def token_status() -> str:
    """Whether a token is configured, without showing it."""
    from huggingface_hub import get_token

    return "found" if get_token() else "not found (set HF_TOKEN or run `hf auth login`)"


class HubDestination:
    """Receives finished files (`put`), uploads them `batch_files` at a time, and prunes stale data files."""

    def __init__(self, dest: str, *, batch_files: int = 20, private: bool = False, endpoint: str | None = None):
        from huggingface_hub import HfApi

        self.repo_id = repo_id(dest)
        self.api = HfApi(endpoint=endpoint)
        self.batch_files = batch_files
        self.staging = Path(tempfile.mkdtemp(prefix="ov-hub-"))
        self.staged = 0
        self.commits: list[str] = []
        self.api.create_repo(self.repo_id, repo_type="dataset", private=private, exist_ok=True)

    def put(self, local_file: str, rel: str) -> None:
        target = self.staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(local_file, target)
        self.staged += 1
        if self.staged >= self.batch_files:
            self._upload("Add data files")

    def finish(self, keep: set[str]) -> list[str]:
        """Upload what is staged and delete the repo's `data/` files that are not in `keep`; returns those."""
        remote = self.api.list_repo_files(self.repo_id, repo_type="dataset")
        stale = sorted(f for f in remote if f.startswith("data/") and f not in keep)
        if self.staged or stale:
            self._upload("Add dataset card" + (f", remove {len(stale)} stale data files" if stale else ""), stale)
        shutil.rmtree(self.staging, ignore_errors=True)
        return [f"{HF_SCHEME}{self.repo_id}/{f}" for f in stale]

    def _upload(self, message: str, delete: list[str] | None = None) -> None:
        info = self.api.upload_folder(repo_id=self.repo_id, repo_type="dataset", folder_path=self.staging,
                                      commit_message=message, delete_patterns=delete or None)
        self.commits.append(info.oid)
        shutil.rmtree(self.staging)
        self.staging.mkdir()
        self.staged = 0
