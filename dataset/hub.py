"""Publish to a Hugging Face Hub dataset repo in ONE commit, to a private repo unless asked otherwise.

Each finished file is pre-uploaded as soon as it is written (`HfApi.preupload_lfs_files`: large files
go to the Hub's LFS/Xet storage, invisible until a commit names them, and leave local disk at once);
`finish` then makes one `create_commit` that adds every file and deletes the stale ones together, with
`parent_commit` set to the head seen at the start, so readers see the old dataset or the new one, never
a mix, and a concurrent publish makes this one fail instead of interleaving. Small files the Hub stores
in git ("regular": README.md) stay in local staging until the commit.

The token comes from `HF_TOKEN` or `hf auth login` (huggingface_hub finds it; it is never printed),
the endpoint from `HF_ENDPOINT` or the caller.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

HF_SCHEME = "hf://"


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
    """Receives finished files (`put`: pre-uploaded at once), then commits them all in one commit (`finish`)."""

    def __init__(self, dest: str, staging: str, switch_name: str, *, public: bool = False,
                 endpoint: str | None = None, log: Callable[[str], None] = print):
        from huggingface_hub import HfApi

        self.repo_id, self.api, self.log = repo_id(dest), HfApi(endpoint=endpoint), log
        self.api.create_repo(self.repo_id, repo_type="dataset", private=not public, exist_ok=True)
        info = self.api.dataset_info(self.repo_id)
        if not info.private and not public:
            raise ValueError(f"{HF_SCHEME}{self.repo_id} exists and is public; publish to it with --public, "
                             "or make it private on the Hub first")
        if info.private and public:
            log(f"note: {HF_SCHEME}{self.repo_id} exists and is private; it stays private "
                "(change its visibility on the Hub)")
        self.private = info.private
        self.parent = info.sha   # the commit this publish builds on
        self.staging = Path(staging)   # the caller's temporary folder: regular files wait here for the commit
        self.additions: list = []
        self.switch_name = switch_name
        self.commit: str | None = None

    def put(self, local_file: str, rel: str) -> None:
        """Stage one file and pre-upload it if the Hub keeps it in LFS/Xet storage (then it leaves local disk)."""
        from huggingface_hub import CommitOperationAdd

        staged = self.staging / rel
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(local_file, staged)
        addition = CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(staged))
        self.api.preupload_lfs_files(self.repo_id, [addition], repo_type="dataset", free_memory=True)
        if not isinstance(addition.path_or_fileobj, str):  # uploaded: huggingface_hub dropped its local path
            os.remove(staged)
        self.additions.append(addition)

    def finish(self, switch: bytes, keep: set[str], is_managed: Callable[[str], bool]) -> list[str]:
        """One commit: every file put, the switch file (the card, a manifest), and the deletion of managed files
        not in `keep`; returns those."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        self.additions.append(CommitOperationAdd(path_in_repo=self.switch_name, path_or_fileobj=switch))

        remote = self.api.list_repo_files(self.repo_id, repo_type="dataset", revision=self.parent)
        stale = sorted(f for f in remote if is_managed(f) and f not in keep)
        operations = [*self.additions, *(CommitOperationDelete(path_in_repo=f) for f in stale)]
        message = f"Publish {len(self.additions)} files" + (f", remove {len(stale)} stale files" if stale else "")
        info = self.api.create_commit(self.repo_id, operations, commit_message=message, repo_type="dataset",
                                      parent_commit=self.parent)
        self.commit = info.oid
        self.log(f"committed {info.oid} to {'private' if self.private else 'public'} dataset repo {self.repo_id}")
        return [f"{HF_SCHEME}{self.repo_id}/{f}" for f in stale]
