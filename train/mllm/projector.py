"""Vision-to-language projectors of LLaVA (haotian-liu/LLaVA `multimodal_projector/builder.py`)."""
from __future__ import annotations

import re

from torch import nn

PROJECTORS = ("mlp2x_gelu", "linear")  # LLaVA-1.5's two-layer GELU MLP; LLaVA-1's linear map


def build_projector(kind: str, vision_width: int, lm_width: int) -> nn.Module:
    """"linear" or "mlpNx_gelu": N linear layers with (exact) GELU between them."""
    if kind == "linear":
        return nn.Linear(vision_width, lm_width)
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"projector {kind!r}: expected 'linear' or 'mlpNx_gelu' (LLaVA-1.5: mlp2x_gelu)")
    layers: list[nn.Module] = [nn.Linear(vision_width, lm_width)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(lm_width, lm_width)]
    return nn.Sequential(*layers)
