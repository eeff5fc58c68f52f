"""Vision features for the MLLM: the patch tokens of one block of a vision tower, CLS dropped.

LLaVA-1.5 feeds the LM the second-to-last layer of CLIP (`mm_vision_select_layer -2`,
`mm_vision_select_feature patch`; haotian-liu/LLaVA `clip_encoder.py`). `layer` counts like
Hugging Face `hidden_states`: 0 is the patch embeddings, k the output of block k, -1 the last
block, -2 the one before it.

Two kinds of tower:
- ours: a training checkpoint of `pipelines/train.py` (OpenVision 1 or 2). Its fixed sin-cos
  positions are computed for any grid, so the resolution is free (384 -> 768 in the SmolLM
  ablation of OpenVision, arXiv:2505.04601);
- open_clip: any model open_clip builds ("open_clip:NAME", e.g. "open_clip:local-dir:/models/ov-L14"
  for a staged OpenVision release, or "open_clip:ViT-L-14-336" with weights from
  `tower_weights`); its position table is resized by open_clip for another resolution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import functional as TF

from train import checkpoint
from train.model import build_model, config_from_dict

OPEN_CLIP = "open_clip:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # our towers train with ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


def blocks_to_run(layer: int, depth: int) -> int:
    """How many blocks produce hidden state `layer` (Hugging Face hidden_states indexing)."""
    n = depth + 1 + layer if layer < 0 else layer
    if not 0 <= n <= depth:
        raise ValueError(f"layer {layer} is outside a tower of {depth} blocks")
    return n


@dataclass(frozen=True)
class ImagePrep:
    """LLaVA-1.5 "pad" preprocessing: pad to a square with the mean colour, resize, normalise."""
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> Tensor:
        image = expand_to_square(image.convert("RGB"), tuple(round(255 * m) for m in self.mean))
        image = image.resize((self.size, self.size), Image.BICUBIC)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Centre the image on a square canvas of its longer side (haotian-liu/LLaVA expand2square)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


class Tower(nn.Module):
    """`forward(images (B,3,S,S)) -> (B, tokens, width)`, and the preprocessing it expects."""

    def __init__(self, prep: ImagePrep):
        super().__init__()
        self.prep = prep

    @torch.no_grad()
    def shape(self) -> tuple[int, int]:
        """(tokens per image, width), from one blank image."""
        p = next(self.parameters())
        size = self.prep.size
        out = self(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
        return out.shape[1], out.shape[2]


class OurTower(Tower):
    """The vision tower of one of our checkpoints, run up to block `layer`."""

    def __init__(self, path: str, image_size: int | None, layer: int):
        state = checkpoint.load(path)
        model = build_model(config_from_dict(state["model_config"]))
        model.load_state_dict(state["model"])
        size = image_size or state.get("train_config", {}).get("image_size")
        if not size:
            raise ValueError(f"{path}: no training resolution recorded; pass an image size")
        super().__init__(ImagePrep(size, IMAGENET_MEAN, IMAGENET_STD))
        self.vision = model.vision
        self.depth = blocks_to_run(layer, len(self.vision.transformer.blocks))
        if size % self.vision.patch_embed.stride[0]:
            raise ValueError(f"image size {size} is not a multiple of the patch size")

    def forward(self, images: Tensor) -> Tensor:
        return self.vision.hidden(images, blocks=self.depth)[:, 1:]


class OpenClipTower(Tower):
    """The image trunk of an open_clip model, intermediate block output without prefix tokens."""

    def __init__(self, name: str, weights: str | None, image_size: int | None, layer: int):
        import open_clip

        model = open_clip.create_model(name, pretrained=weights, force_image_size=image_size)
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        super().__init__(ImagePrep(size, tuple(cfg["mean"]), tuple(cfg["std"])))
        self.visual = model.visual
        trunk = getattr(self.visual, "transformer", None)
        blocks = trunk.resblocks if trunk is not None else self.visual.trunk.blocks
        n = blocks_to_run(layer, len(blocks))
        if n == 0:
            raise ValueError("open_clip towers expose block outputs only (layer 0 is the embeddings)")
        self.index = n - 1

    def forward(self, images: Tensor) -> Tensor:
        out = self.visual.forward_intermediates(images, indices=[self.index], stop_early=True,
                                                intermediates_only=True, output_fmt="NLC")
        return out["image_intermediates"][0]


def load_tower(spec: str, *, image_size: int | None = None, layer: int = -2, weights: str | None = None) -> Tower:
    """`spec`: one of our checkpoints (.pt) or "open_clip:NAME" (weights: open_clip's `pretrained`)."""
    if spec.startswith(OPEN_CLIP):
        return OpenClipTower(spec[len(OPEN_CLIP):], weights, image_size, layer)
    if weights:
        raise ValueError("tower weights apply to open_clip towers only; our checkpoints carry their own")
    return OurTower(spec, image_size, layer)
