"""Zero-shot classification on an ImageFolder tree and image-text retrieval (R@1/5/10 both ways)."""
from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from train import checkpoint
from train.data import eval_transform, expand_urls, text_field
from train.model import CLIPS, build_model, config_from_dict
from train.templates import ZEROSHOT_TEMPLATES
from train.tokenizer import CaptionTokenizer


@dataclass
class Evaluator:
    model: CLIPS
    tokenizer: CaptionTokenizer
    image_size: int
    device: torch.device
    batch_size: int = 64
    workers: int = 2

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", image_size: int | None = None, **kw) -> Evaluator:
        """Model, tokenizer and (unless given) the training resolution from a training checkpoint."""
        state = checkpoint.load(path)
        model = build_model(config_from_dict(state["model_config"]))
        model.load_state_dict(state["model"])
        if model.text is None:
            raise ValueError(f"{path}: an openvision2 model has no text tower to evaluate with")
        size = image_size or state["train_config"]["image_size"]
        return cls(model.to(device).eval(), CaptionTokenizer.from_files(state["tokenizer"]), size,
                   torch.device(device), **kw)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        feats = []
        for i in range(0, len(texts), 256):
            ids = self.tokenizer.encode(list(texts[i:i + 256]), self.model.cfg.context_length)
            feats.append(F.normalize(self.model.encode_text(ids.to(self.device)), dim=-1))
        return torch.cat(feats)

    @torch.no_grad()
    def encode_images(self, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised features of every image and the dataset's second field (labels or indices)."""
        feats, targets = [], []
        for images, target in DataLoader(dataset, batch_size=self.batch_size, num_workers=self.workers):
            feats.append(F.normalize(self.model.encode_image(images.to(self.device)), dim=-1))
            targets.append(target)
        return torch.cat(feats), torch.cat(targets)

    def classifier(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """(classes, dim): the normalised mean of each class's prompt embeddings."""
        prompts = [t.format(c) for c in classnames for t in templates]
        per_prompt = self.encode_texts(prompts).view(len(classnames), len(templates), -1)
        return F.normalize(per_prompt.mean(dim=1), dim=-1)

    def zeroshot(self, folder: str | Path, classnames: Sequence[str] | None = None,
                 templates: Sequence[str] = ZEROSHOT_TEMPLATES) -> dict[str, float]:
        """Top-1/top-5 accuracy; class names default to the folder names ('_' read as space)."""
        dataset = ImageFolder(str(folder), transform=eval_transform(self.image_size))
        names = list(classnames) if classnames else [c.replace("_", " ") for c in dataset.classes]
        if len(names) != len(dataset.classes):
            raise ValueError(f"{len(names)} class names for {len(dataset.classes)} folders")
        weights = self.classifier(names, templates)
        feats, labels = self.encode_images(dataset)
        top5 = (feats @ weights.T).topk(min(5, len(names)), dim=1).indices
        hits = top5 == labels[:, None]
        return {"top1": hits[:, 0].float().mean().item(), "top5": hits.any(dim=1).float().mean().item(),
                "images": len(dataset), "classes": len(names), "templates": len(templates)}

    def retrieval(self, images: list[bytes | Path], captions: list[str],
                  caption_image: list[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
        """Recall@k image->text (any of the image's captions) and text->image."""
        img, _ = self.encode_images(LazyImages(images, eval_transform(self.image_size)))
        sim = img @ self.encode_texts(captions).T
        owner = torch.tensor(caption_image)
        k_max = min(max(ks), sim.shape[1])
        i2t_owner = owner[sim.topk(k_max, dim=1).indices]
        t2i = sim.T.topk(min(max(ks), sim.shape[0]), dim=1).indices
        image_ids = torch.arange(sim.shape[0])[:, None]
        return {
            "image_to_text": {f"R@{k}": (i2t_owner[:, :k] == image_ids).any(1).float().mean().item() for k in ks},
            "text_to_image": {f"R@{k}": (t2i[:, :k] == owner[:, None]).any(1).float().mean().item() for k in ks},
            "images": sim.shape[0], "captions": sim.shape[1],
        }


class LazyImages(Dataset):
    """Images (encoded bytes or file paths) opened on demand, returned with their index."""

    def __init__(self, sources: list[bytes | Path], transform: Callable):
        self.sources, self.transform = sources, transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        src = self.sources[i]
        image = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src).convert("RGB")
        return self.transform(image), i


def load_retrieval_set(spec: str, images_root: str | None = None, split: str = "test",
                       caption_field: str = "txt") -> tuple[list[bytes | Path], list[str], list[int]]:
    """(images as bytes or paths, captions, image index of each caption) from WebDataset shards (one caption
    per image, from `caption_field`) or a Karpathy-style JSON ({"images": [{"filename",
    "filepath"?, "split", "sentences": [{"raw"}]}]}) whose images lie under `images_root`."""
    images, captions, owner = [], [], []
    if spec.endswith(".json"):
        root = Path(images_root or Path(spec).parent)
        for entry in json.loads(Path(spec).read_text())["images"]:
            if entry.get("split", split) != split:
                continue
            owner += [len(images)] * len(entry["sentences"])
            captions += [s["raw"] for s in entry["sentences"]]
            images.append(root / entry.get("filepath", "") / entry["filename"])
        return images, captions, owner
    for sample in wds.WebDataset(expand_urls(spec), shardshuffle=False, empty_check=False):
        text = text_field(sample, caption_field)
        data = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
        if data is None or not text:
            continue
        owner.append(len(images))
        captions.append(text)
        images.append(data)
    return images, captions, owner


def read_lines(path: str | Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def evaluate(ckpt: str | Path, *, zeroshot: str | None = None, classnames: str | None = None,
             templates: str | None = None, retrieval: str | None = None, retrieval_images: str | None = None,
             split: str = "test", image_size: int | None = None, device: str = "cpu",
             batch_size: int = 64, workers: int = 2) -> dict:
    """Run the requested evaluations; returns {"zeroshot": {...}, "retrieval": {...}}."""
    ev = Evaluator.from_checkpoint(ckpt, device, image_size, batch_size=batch_size, workers=workers)
    results: dict = {"checkpoint": str(ckpt), "image_size": ev.image_size}
    if zeroshot:
        results["zeroshot"] = ev.zeroshot(zeroshot, read_lines(classnames) if classnames else None,
                                          read_lines(templates) if templates else ZEROSHOT_TEMPLATES)
    if retrieval:
        results["retrieval"] = ev.retrieval(*load_retrieval_set(retrieval, retrieval_images, split))
    return results
