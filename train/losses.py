"""Contrastive (softmax InfoNCE or SigLIP sigmoid) and captioning losses over the global batch.

Every loss is written so that the mean over ranks (what DDP's gradient averaging computes) is
the loss of one process holding the whole global batch: each rank scores its own rows against
all-gathered columns, and the caption loss divides by the global number of target tokens.
Logits are computed in fp32 even under bf16 autocast, as the reference does ("for logit training
stability", UCSC-VLAA/OpenVision `text_decoder.py` and `two_towers.py`).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from train.distributed import all_gather_with_grad, all_reduce_sum


@contextmanager
def fp32(device: torch.device) -> Iterator[None]:
    """Autocast off: matmuls of fp32 inputs stay fp32."""
    with torch.autocast(device.type, enabled=False):
        yield


def offset_labels(local: int, device: torch.device) -> Tensor:
    """Column index of each local row's positive inside the gathered batch."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return torch.arange(local, device=device) + rank * local


def softmax_contrastive(image: Tensor, views: list[Tensor], logit_scale: Tensor) -> Tensor:
    """InfoNCE averaged over the text views, each view 1/2 (image->text + text->image)."""
    with fp32(image.device):
        image = F.normalize(image.float(), dim=-1)
        all_images = all_gather_with_grad(image)
        labels = offset_labels(image.shape[0], image.device)
        scale = logit_scale.float().exp()
        total = image.new_zeros(())
        for text in views:
            text = F.normalize(text.float(), dim=-1)
            all_texts = all_gather_with_grad(text)
            image_to_text = F.cross_entropy(scale * image @ all_texts.T, labels)
            text_to_image = F.cross_entropy(scale * text @ all_images.T, labels)
            total = total + (image_to_text + text_to_image) / 2
        return total / len(views)


def sigmoid_contrastive(image: Tensor, views: list[Tensor], logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """SigLIP: every image-text pair is a binary decision; summed per image, averaged over views."""
    with fp32(image.device):
        image = F.normalize(image.float(), dim=-1)
        labels = offset_labels(image.shape[0], image.device)
        total = image.new_zeros(())
        for text in views:
            all_texts = all_gather_with_grad(F.normalize(text.float(), dim=-1))
            logits = logit_scale.float().exp() * image @ all_texts.T + logit_bias.float()
            signs = -torch.ones_like(logits)
            signs[torch.arange(len(labels)), labels] = 1
            total = total - F.logsigmoid(signs * logits).sum() / image.shape[0]
        return total / len(views)


class _VocabNLL(torch.autograd.Function):
    """Summed token cross-entropy of `hidden @ weight.T` in fp32, chunk by chunk.

    The gradients are computed in the forward pass while each chunk's logits exist, so at most
    one chunk of (rows x vocabulary) logits is ever held: the technique of Liger Kernel's fused
    linear cross-entropy (arXiv:2410.10989). The backward only scales the stored gradients.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
        h, w = hidden.float(), weight.float()
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        nll, correct = h.new_zeros(()), torch.zeros((), dtype=torch.long, device=h.device)
        for start in range(0, h.shape[0], chunk):
            rows, t = h[start:start + chunk], targets[start:start + chunk]
            logits = rows @ w.T
            lse = logits.logsumexp(dim=-1)
            nll += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            correct += (logits.argmax(dim=-1) == t).sum()
            if grad_h is not None or grad_w is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # d(sum nll)/d(logits) = softmax - onehot
                probs[torch.arange(len(t), device=t.device), t] -= 1
                if grad_h is not None:
                    grad_h[start:start + chunk] = probs @ w
                if grad_w is not None:
                    grad_w.addmm_(probs.T, rows)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(correct)
        return nll, correct

    @staticmethod
    def backward(ctx, grad_nll: Tensor, _grad_correct: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (None if grad_h is None else (grad_h * grad_nll).to(h_dtype),
                None if grad_w is None else (grad_w * grad_nll).to(w_dtype), None, None)


@torch.compiler.disable  # data-dependent row count and a Python chunk loop: run eagerly
def vocab_nll(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """(summed NLL, correct argmax count) of the bias-free vocabulary head over `hidden` (N, w)."""
    with fp32(hidden.device):
        return _VocabNLL.apply(hidden, weight, targets, chunk)


def caption_loss(nll_sum: Tensor, tokens: Tensor) -> Tensor:
    """Mean token cross-entropy over the global batch's target tokens (this rank's share of it)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return nll_sum * world / all_reduce_sum(tokens).clamp(min=1)


def match_accuracy(image: Tensor, text: Tensor) -> Tensor:
    """Share of local images whose most similar gathered text is their own (web caption view)."""
    all_texts = all_gather_with_grad(text.detach())
    best = (F.normalize(image.detach(), dim=-1) @ F.normalize(all_texts, dim=-1).T).argmax(dim=1)
    return (best == offset_labels(image.shape[0], image.device)).float().mean()
