"""Contrastive (softmax InfoNCE or SigLIP sigmoid) and captioning losses over the global batch.

Every loss is written so that the mean over ranks (what DDP's gradient averaging computes) is
the loss of one process holding the whole global batch: each rank scores its own rows against
all-gathered columns, and the caption loss divides by the global number of target tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from train.distributed import all_gather_with_grad, all_reduce_sum


def offset_labels(local: int, device: torch.device) -> Tensor:
    """Column index of each local row's positive inside the gathered batch."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return torch.arange(local, device=device) + rank * local


def softmax_contrastive(image: Tensor, views: list[Tensor], logit_scale: Tensor) -> Tensor:
    """InfoNCE averaged over the text views, each view 1/2 (image->text + text->image)."""
    image = F.normalize(image, dim=-1)
    all_images = all_gather_with_grad(image)
    labels = offset_labels(image.shape[0], image.device)
    scale = logit_scale.exp()
    total = image.new_zeros(())
    for text in views:
        text = F.normalize(text, dim=-1)
        all_texts = all_gather_with_grad(text)
        image_to_text = F.cross_entropy(scale * image @ all_texts.T, labels)
        text_to_image = F.cross_entropy(scale * text @ all_images.T, labels)
        total = total + (image_to_text + text_to_image) / 2
    return total / len(views)


def sigmoid_contrastive(image: Tensor, views: list[Tensor], logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """SigLIP: every image-text pair is a binary decision; summed per image, averaged over views."""
    image = F.normalize(image, dim=-1)
    labels = offset_labels(image.shape[0], image.device)
    total = image.new_zeros(())
    for text in views:
        all_texts = all_gather_with_grad(F.normalize(text, dim=-1))
        logits = logit_scale.exp() * image @ all_texts.T + logit_bias
        signs = -torch.ones_like(logits)
        signs[torch.arange(len(labels)), labels] = 1
        total = total - F.logsigmoid(signs * logits).sum() / image.shape[0]
    return total / len(views)


def caption_loss(logits: Tensor, targets: Tensor, pad_id: int) -> Tensor:
    """Token cross-entropy over non-pad targets, normalised by the global target count."""
    mask = targets != pad_id
    summed = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    summed = (summed * mask.flatten()).sum()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return summed * world / all_reduce_sum(mask.sum()).clamp(min=1)


def match_accuracy(image: Tensor, text: Tensor) -> Tensor:
    """Share of local images whose most similar gathered text is their own (web caption view)."""
    all_texts = all_gather_with_grad(text.detach())
    best = (F.normalize(image.detach(), dim=-1) @ F.normalize(all_texts, dim=-1).T).argmax(dim=1)
    return (best == offset_labels(image.shape[0], image.device)).float().mean()


def token_accuracy(logits: Tensor, targets: Tensor, pad_id: int) -> Tensor:
    mask = targets != pad_id
    return ((logits.detach().argmax(-1) == targets) & mask).sum() / mask.sum().clamp(min=1)
