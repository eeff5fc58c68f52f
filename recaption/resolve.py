"""Pin what an engine config leaves open: the model's exact version, its dtype and its context length.

Done once by the driver, so that every worker loads the same files in the same dtype and the
fingerprint names what really produced the captions: a Hub model resolves to its commit (a moving
`main` cannot change under a run), a local folder to a hash of its contents.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Bytes hashed from each weight file beside its size and header: three slices (start, middle, end of
# the tensor data), enough to tell retrained weights of identical shapes apart without reading gigabytes.
WEIGHT_SLICE = 64 << 10
COMMIT = re.compile(r"[0-9a-f]{40}")
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
               "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def is_local(model: str) -> bool:
    return Path(model).is_dir()


def _weight_digest(path: Path) -> bytes:
    """Size, safetensors header (names, shapes, dtypes, offsets) and three slices of the tensor data."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        data_start = 0
        if path.suffix == ".safetensors" and size >= 8:
            (header_len,) = struct.unpack("<Q", f.read(8))
            data_start = 8 + min(header_len, size - 8)
            digest.update(f.read(data_start - 8))
        data_len = size - data_start
        for offset in sorted({data_start, data_start + max(0, data_len // 2 - WEIGHT_SLICE // 2),
                              max(data_start, size - WEIGHT_SLICE)}):
            f.seek(offset)
            digest.update(f.read(WEIGHT_SLICE))
    return digest.digest()


def folder_version(folder: str | Path) -> str:
    """'sha256:...' over every file of a model folder: config, tokenizer, chat template, processor in full,
    weights by size + header + sampled data. Hidden entries (caches) are skipped."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(relative.as_posix().encode() + b"\0")
        if path.suffix in WEIGHT_SUFFIXES:
            digest.update(_weight_digest(path))
        else:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return "sha256:" + digest.hexdigest()[:40]


def hub_commit(model: str, revision: str | None) -> str:
    """The commit a Hub revision points at now (the local cache answers when offline)."""
    if revision and COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi, snapshot_download

    try:
        sha = HfApi().model_info(model, revision=revision).sha
        if sha is None:
            raise ValueError("the Hub gave no commit")
        return sha
    except Exception as online:  # offline, or the Hub unreachable: fall back to the cached snapshot
        try:
            return Path(snapshot_download(model, revision=revision, local_files_only=True)).name
        except Exception:
            raise ValueError(f"cannot resolve the revision {revision or 'main'!r} of model {model!r}: "
                             f"{online}") from None


def model_config(model: str, revision: str | None) -> dict:
    """The model's raw config.json (read as JSON: works for architectures transformers does not know)."""
    if is_local(model):
        path = Path(model) / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(model, "config.json", revision=revision))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the config of model {model!r}: {e}") from None


def checkpoint_dtype(config: dict) -> str:
    """The dtype the weights were saved in ('dtype', older 'torch_dtype', top level or text config)."""
    text = config.get("text_config") or {}
    for value in (config.get("dtype"), config.get("torch_dtype"), text.get("dtype"), text.get("torch_dtype")):
        if isinstance(value, str) and value.lower() in DTYPE_NAMES:
            return DTYPE_NAMES[value.lower()]
    return "float32"  # what transformers assumes for a config without one


def resolve_dtype(requested: str, config: dict) -> str:
    """'auto' is the checkpoint's own dtype (transformers' rule; vLLM would downcast float32 to 16 bits,
    which is why the two backends disagreed); anything else is normalised to a torch dtype name."""
    if requested == "auto":
        return checkpoint_dtype(config)
    if requested.lower() not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {requested!r}; use auto, {', '.join(sorted(set(DTYPE_NAMES.values())))}")
    return DTYPE_NAMES[requested.lower()]


def context_length(config: dict) -> int | None:
    """The language model's position limit (LLaVA keeps it in text_config; llava_llama at the top level)."""
    for section in (config.get("text_config") or {}, config):
        value = section.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return None
