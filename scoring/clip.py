"""CLIP scores: the cosine between an image's and a caption's embeddings under any open_clip model.

A model is named as `open_clip.create_model_and_transforms` names it: `local-dir:DIR`, `hf-hub:ORG/NAME`,
or a built-in architecture with a `pretrained` tag (`ViT-L-14` + `datacomp_xl_s13b_b90k`). Texts longer
than the model's context are cut by its own tokenizer (open_clip keeps the first `context_length - 1`
tokens and ends with the end-of-text token), as DataComp's CLIP-score filter does.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)
LOCAL_DIR = "local-dir:"
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ClipModelSpec:
    """Which open_clip model scores: what the scores depend on, recorded with them."""
    model: str
    pretrained: str | None = None

    def identity(self) -> dict:
        """The spec, plus a content digest of the folder's files for `local-dir:` (a folder can be rewritten)."""
        identity = {"model": self.model, "pretrained": self.pretrained}
        if self.model.startswith(LOCAL_DIR):
            identity["digest"] = folder_digest(Path(self.model[len(LOCAL_DIR):]))
        return identity

    def describe(self) -> str:
        return self.model + (f" ({self.pretrained})" if self.pretrained else "")

    def check(self) -> None:
        """Refuse, in one line and before any worker starts, a model open_clip cannot make: a local folder without
        open_clip's config, an unknown built-in architecture or pretrained tag (hf-hub: names are checked by the
        Hub when a worker loads them)."""
        import open_clip

        if self.model.startswith(LOCAL_DIR):
            folder = Path(self.model[len(LOCAL_DIR):])
            if not (folder / "open_clip_config.json").is_file():
                raise ValueError(f"--clip-model {self.model}: no open_clip_config.json in {folder}")
        elif not self.model.startswith("hf-hub:"):
            if self.model not in open_clip.list_models():
                near = [name for name in open_clip.list_models() if name.lower() == self.model.lower()]
                raise ValueError(f"--clip-model {self.model}: not an open_clip architecture"
                                 + (f" (did you mean {near[0]}?)" if near else " (see open_clip.list_models())"))
            tags = open_clip.list_pretrained_tags_by_model(self.model)
            if self.pretrained and self.pretrained not in tags:
                raise ValueError(f"--pretrained {self.pretrained}: {self.model} has {', '.join(tags) or 'none'}")


def folder_digest(folder: Path) -> str:
    """SHA-256 over the names and bytes of a folder's files (sorted), streamed."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder for {LOCAL_DIR}{folder}")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:16]


class Scorer(Protocol):
    def scores(self, images: list[Image.Image], captions: dict[str, list[str]]) -> dict[str, np.ndarray]: ...


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ClipScorer:
    """An open_clip model in eval mode with its preprocessing and tokenizer."""

    def __init__(self, spec: ClipModelSpec, device: str | None = None):
        import open_clip

        self.spec, self.device = spec, device or default_device()
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            spec.model, pretrained=spec.pretrained, device=self.device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(spec.model)
        self.context_length = self.model.context_length

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Unit-norm image embeddings, one row per image."""
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        return self.model.encode_image(pixels, normalize=True).float()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings, each text cut to the model's context by its tokenizer."""
        tokens = self.tokenizer(texts, context_length=self.context_length).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float()

    def scores(self, images: list[Image.Image], captions: dict[str, list[str]]) -> dict[str, np.ndarray]:
        """For each named caption list (aligned with `images`), the cosine of every image with its caption."""
        image_embeddings = self.embed_images(images)
        return {name: (image_embeddings * self.embed_texts(texts)).sum(dim=-1).cpu().numpy().astype(np.float64)
                for name, texts in captions.items()}
