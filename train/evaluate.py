"""Evaluate an encoder: zero-shot classification on an ImageFolder tree and image-text retrieval
(R@1/5/10 both ways) for models with a text tower; k-NN and linear-probe classification on
ImageFolder train/val trees for any encoder (OpenVision 2 has no text tower); the caption
decoder's teacher-forced token accuracy on recaption shards, beside the same with every image
zeroed (the control that says how much of it the image carries)."""
from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from train import checkpoint
from train.data import eval_transform, expand_urls, image_bytes, read_shards, text_field
from train.model import CLIPS, build_model, config_from_dict, random_keep
from train.tokenizer import CaptionTokenizer

Template = Callable[[str], str]
# CLIP's 80 ImageNet prompts (Radford et al. 2021, as open_clip ships them) and the bare class name.
ZEROSHOT_TEMPLATES: tuple[Template, ...] = (*OPENAI_IMAGENET_TEMPLATES, lambda c: c)
CLASSNAME_SETS = {"imagenet": IMAGENET_CLASSNAMES}
PROBE_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # the linear probe's L2 weights, swept


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
        size = image_size or state["train_config"]["image_size"]
        return cls(model.to(device).eval(), CaptionTokenizer.from_files(state["tokenizer"]), size,
                   torch.device(device), **kw)

    def require_text_tower(self, task: str) -> None:
        if self.model.text is None:
            raise ValueError(f"{task} needs a text tower; this {self.model.cfg.objective} encoder has none "
                             "(use the k-NN / linear probe)")

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        self.require_text_tower("text encoding")
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

    def classifier(self, classnames: Sequence[str], templates: Sequence[Template]) -> torch.Tensor:
        """(classes, dim): the normalised mean of each class's prompt embeddings."""
        prompts = [t(c) for c in classnames for t in templates]
        per_prompt = self.encode_texts(prompts).view(len(classnames), len(templates), -1)
        return F.normalize(per_prompt.mean(dim=1), dim=-1)

    def zeroshot(self, folder: str | Path, classnames: Sequence[str] | None = None,
                 templates: Sequence[Template] = ZEROSHOT_TEMPLATES) -> dict[str, float]:
        """Top-1/top-5 accuracy; class names default to the folder names ('_' read as space)."""
        self.require_text_tower("zero-shot classification")
        dataset = ImageFolder(str(folder), transform=eval_transform(self.image_size))
        names = list(classnames) if classnames else [c.replace("_", " ") for c in dataset.classes]
        if len(names) != len(dataset.classes):
            raise ValueError(f"{len(names)} class names for {len(dataset.classes)} folders")
        weights = self.classifier(names, templates)
        feats, labels = self.encode_images(dataset)
        top5 = (feats @ weights.T).topk(min(5, len(names)), dim=1).indices.cpu()
        hits = top5 == labels[:, None]
        return {"top1": hits[:, 0].float().mean().item(), "top5": hits.any(dim=1).float().mean().item(),
                "images": len(dataset), "classes": len(names), "templates": len(templates)}

    def retrieval(self, images: list[bytes | Path], captions: list[str],
                  caption_image: list[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
        """Recall@k image->text (any of the image's captions) and text->image."""
        self.require_text_tower("retrieval")
        img, _ = self.encode_images(LazyImages(images, eval_transform(self.image_size)))
        sim = (img @ self.encode_texts(captions).T).cpu()
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


    @torch.no_grad()
    def captioning(self, shards: str, seed: int = 0) -> dict[str, float]:
        """Teacher-forced token accuracy of the caption decoder on `shards` (the training format: image,
        web caption `.txt`, recaption `.re_caption.txt`), with the images and with every image zeroed
        (the normalised mean image: one input for all, so the decoder can use only its text). The
        decoder's inputs are the training ones at the evaluation resolution: OpenVision 1 sees the web
        caption in its prefix; OpenVision 2 a seeded random `keep_ratio` share of the patches."""
        cfg, transform = self.model.cfg, eval_transform(self.image_size)
        samples = [(data, text_field(s, "txt"), text_field(s, "re_caption.txt"))
                   for s in read_shards(expand_urls(shards)) if (data := image_bytes(s)) is not None]
        generator = torch.Generator().manual_seed(seed)
        totals = {"correct": 0, "zero_images_correct": 0, "tokens": 0}
        for i in range(0, len(samples), self.batch_size):
            chunk = samples[i:i + self.batch_size]
            images = torch.stack([transform(Image.open(io.BytesIO(d))) for d, _, _ in chunk]).to(self.device)
            captions = self.tokenizer.encode([r for _, _, r in chunk], cfg.caption_length, append_cls=False)
            texts = keep = None
            if cfg.has_text_tower:
                texts = self.tokenizer.encode([w for _, w, _ in chunk], cfg.context_length).to(self.device)
            else:
                patches = (self.image_size // cfg.patch_size) ** 2
                keep = random_keep(len(chunk), patches, cfg.kept_tokens(patches), generator=generator).to(self.device)
            for name, pixels in (("correct", images), ("zero_images_correct", torch.zeros_like(images))):
                out = self.model(pixels, captions.to(self.device), texts=texts, keep=keep)
                totals[name] += int(out["caption_correct"])
            totals["tokens"] += int(out["caption_tokens"])
        tokens = max(totals["tokens"], 1)
        return {"token_acc": totals["correct"] / tokens,
                "zero_images_token_acc": totals["zero_images_correct"] / tokens,
                "tokens": totals["tokens"], "images": len(samples)}

    def probe(self, train_folder: str | Path, val_folder: str | Path, k: int = 20, temperature: float = 0.07,
              weight_decays: Sequence[float] = PROBE_WEIGHT_DECAYS) -> dict[str, float]:
        """k-NN (DINO's weighted vote, arXiv:2104.14294) and a linear probe (multinomial logistic
        regression, L-BFGS; its L2 weight chosen from `weight_decays` on a held-out share of the
        training images, never on the validation tree) on the pooled, normalised image features of
        two ImageFolder trees."""
        transform = eval_transform(self.image_size)
        train_set, val_set = ImageFolder(str(train_folder), transform), ImageFolder(str(val_folder), transform)
        if train_set.classes != val_set.classes:
            raise ValueError(f"{train_folder} and {val_folder} have different class folders")
        train_x, train_y = (t.cpu() for t in self.encode_images(train_set))  # small: fit on the CPU
        val_x, val_y = (t.cpu() for t in self.encode_images(val_set))
        classes = len(train_set.classes)
        weight_decay = choose_weight_decay(train_x, train_y, classes, weight_decays)
        return {"knn_top1": knn_accuracy(train_x, train_y, val_x, val_y, classes, k, temperature),
                "linear_top1": linear_probe_accuracy(train_x, train_y, val_x, val_y, classes, weight_decay),
                "linear_weight_decay": weight_decay,
                "train_images": len(train_set), "val_images": len(val_set), "classes": classes}


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 classes: int, k: int, temperature: float, chunk: int = 4096) -> float:
    """Each validation image votes with its k most similar training images, weighted exp(sim / T).

    Similarities are taken `chunk` validation x `chunk` training images at a time, the running top k
    merged after each block, so memory does not grow with the training set (ImageNet's full
    50k x 1.28M matrix would be ~256 GB)."""
    k = min(k, len(train_x))
    correct = 0
    for v in range(0, len(val_x), chunk):
        queries = val_x[v:v + chunk]
        best = queries.new_full((len(queries), 0), float("-inf"))
        best_idx = torch.zeros(len(queries), 0, dtype=torch.long)
        for t in range(0, len(train_x), chunk):
            sim = queries @ train_x[t:t + chunk].T
            merged = torch.cat([best, sim], dim=1)
            merged_idx = torch.cat([best_idx, torch.arange(t, t + sim.shape[1]).expand(len(queries), -1)], dim=1)
            best, pick = merged.topk(min(k, merged.shape[1]), dim=1)
            best_idx = merged_idx.gather(1, pick)
        votes = torch.zeros(len(queries), classes).scatter_add_(1, train_y[best_idx], (best / temperature).exp())
        correct += int((votes.argmax(dim=1) == val_y[v:v + chunk]).sum())
    return correct / len(val_x)


def choose_weight_decay(train_x: torch.Tensor, train_y: torch.Tensor, classes: int, grid: Sequence[float],
                        held_out: float = 0.2, seed: int = 0) -> float:
    """The grid value whose probe, fit on a seeded (1 - held_out) share of the training features, scores
    best on the rest (the smallest such value on ties)."""
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(len(order) * (1 - held_out)))
    fit, rest = order[:cut], order[cut:]
    scores = [linear_probe_accuracy(train_x[fit], train_y[fit], train_x[rest], train_y[rest], classes, wd)
              for wd in sorted(grid)]
    return sorted(grid)[scores.index(max(scores))]


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                          classes: int, weight_decay: float, steps: int = 200) -> float:
    """Fit softmax regression on the training features, report top-1 on the validation features."""
    layer = torch.nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.LBFGS(layer.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(layer(train_x), train_y) + weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (layer(val_x).argmax(dim=1) == val_y).float().mean().item()


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
    for sample in read_shards(expand_urls(spec)):
        text = text_field(sample, caption_field)
        data = image_bytes(sample)
        if data is None or not text:
            continue
        owner.append(len(images))
        captions.append(text)
        images.append(data)
    return images, captions, owner


def read_lines(path: str | Path) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def classnames_from(spec: str | None) -> list[str] | None:
    """'imagenet' (open_clip's CLIP class names), a file with one name per line, or None (folder names)."""
    if spec is None:
        return None
    return list(CLASSNAME_SETS[spec]) if spec in CLASSNAME_SETS else read_lines(spec)


def templates_from(path: str | None) -> tuple[Template, ...]:
    """Prompt templates from a file (one per line, '{}' for the class name), else CLIP's 80 + '{}'."""
    return tuple(line.format for line in read_lines(path)) if path else ZEROSHOT_TEMPLATES


def evaluate(ckpt: str | Path, *, zeroshot: str | None = None, classnames: str | None = None,
             templates: str | None = None, retrieval: str | None = None, retrieval_images: str | None = None,
             split: str = "test", probe_train: str | None = None, probe_val: str | None = None,
             captioning: str | None = None,
             image_size: int | None = None, device: str = "cpu", batch_size: int = Evaluator.batch_size,
             workers: int = Evaluator.workers) -> dict:
    """Run the requested evaluations; returns {"zeroshot": {...}, "retrieval": {...}, "probe": {...},
    "captioning": {...}}."""
    ev = Evaluator.from_checkpoint(ckpt, device, image_size, batch_size=batch_size, workers=workers)
    results: dict = {"checkpoint": str(ckpt), "image_size": ev.image_size}
    if zeroshot:
        results["zeroshot"] = ev.zeroshot(zeroshot, classnames_from(classnames), templates_from(templates))
    if retrieval:
        results["retrieval"] = ev.retrieval(*load_retrieval_set(retrieval, retrieval_images, split))
    if probe_train and probe_val:
        results["probe"] = ev.probe(probe_train, probe_val)
    if captioning:
        results["captioning"] = ev.captioning(captioning)
    return results
