"""CLIPS / OpenVision models: one size table, one config, one factory.

A model is named like "B/16": the size picks the towers from `SIZES` (RECIPE.md's table), the
number is the patch size. `build_model(model_config("B/16"))` returns a `CLIPS` module:

- vision tower: patch conv (no bias) + CLS + fixed 2-D sin-cos positions (zero row for CLS),
  pre-norm blocks with exact GELU, no LayerNorm before the blocks, average of the patch tokens
  -> LayerNorm -> linear (no bias);
- text tower (objective "clips"): bidirectional, learnable positions, tanh GELU, pooled at the
  last token (the appended [CLS]) -> LayerNorm -> linear (no bias);
- caption decoder: a prefix (projected image patch tokens, plus the web caption's token states
  for "clips") followed by one learnable query per caption position. Each query also carries
  the embedding of the previous recaption token (teacher forcing), prefix attends within
  itself, queries see the prefix and are causal among themselves.

Objective "openvision2" drops the text tower and keeps a random ~30 % of the patch tokens as
the decoder prefix. All LayerNorms use eps 1e-6.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

LN_EPS = 1e-6


@dataclass(frozen=True)
class Tower:
    width: int
    depth: int
    mlp: int
    heads: int


# size -> (vision tower, text/decoder tower), RECIPE.md "Model sizes".
SIZES: dict[str, tuple[Tower, Tower]] = {
    "Ti": (Tower(192, 12, 768, 3), Tower(192, 12, 768, 3)),
    "S": (Tower(384, 12, 1536, 6), Tower(384, 12, 1536, 6)),
    "B": (Tower(768, 12, 3072, 12), Tower(512, 12, 2048, 8)),
    "L": (Tower(1024, 24, 4096, 16), Tower(768, 12, 3072, 12)),
    "So400m": (Tower(1152, 27, 4304, 16), Tower(1152, 27, 4304, 16)),
    "H": (Tower(1280, 32, 5120, 16), Tower(1024, 24, 4096, 16)),
}
OBJECTIVES = ("clips", "openvision2")
LOSSES = ("softmax", "sigmoid")


@dataclass(frozen=True)
class ModelConfig:
    vision: Tower
    text: Tower  # text encoder and caption decoder
    patch_size: int
    objective: str = "clips"
    loss: str = "softmax"
    vocab_size: int = 32000
    context_length: int = 80  # text encoder input, [CLS] included
    caption_length: int = 128  # decoder queries = recaption target tokens
    keep_ratio: float = 0.3  # openvision2: share of patch tokens given to the decoder
    pad_id: int = 0
    grad_checkpointing: bool = False

    @property
    def embed_dim(self) -> int:
        return self.text.width

    @property
    def has_text_tower(self) -> bool:
        return self.objective == "clips"


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of `dataclasses.asdict` (checkpoints store the config that way)."""
    return ModelConfig(**{**d, "vision": Tower(**d["vision"]), "text": Tower(**d["text"])})


def model_config(name: str, *, depth: int | None = None, **fields) -> ModelConfig:
    """Decode "Ti/16" etc.; `depth` overrides every tower's depth (small test models)."""
    size, _, patch = name.partition("/")
    if size not in SIZES or not patch.isdigit():
        raise ValueError(f"model {name!r}: expected SIZE/PATCH with SIZE in {list(SIZES)}, e.g. 'B/16'")
    vision, text = SIZES[size]
    if depth is not None:
        vision, text = replace(vision, depth=depth), replace(text, depth=depth)
    cfg = ModelConfig(vision=vision, text=text, patch_size=int(patch), **fields)
    if cfg.objective not in OBJECTIVES or cfg.loss not in LOSSES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, loss one of {LOSSES}")
    return cfg


def sincos_2d(grid_h: int, grid_w: int, width: int, temperature: float = 10_000.0) -> Tensor:
    """Fixed 2-D sin-cos position table (grid_h * grid_w, width): [sin x, cos x, sin y, cos y]."""
    if width % 4:
        raise ValueError("sin-cos positions need a width divisible by 4")
    y, x = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32),
                          torch.arange(grid_w, dtype=torch.float32), indexing="ij")
    quarter = width // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / max(quarter - 1, 1))
    x = x.reshape(-1, 1) * omega
    y = y.reshape(-1, 1) * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """`mask`: bool, broadcastable to (B, heads, T, T), True where a query may attend."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, tower: Tower, gelu: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(tower.width, eps=LN_EPS)
        self.attn = Attention(tower.width, tower.heads)
        self.norm2 = nn.LayerNorm(tower.width, eps=LN_EPS)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(tower.width, tower.mlp))
        self.mlp.add_module("act", nn.GELU(approximate=gelu))
        self.mlp.add_module("fc2", nn.Linear(tower.mlp, tower.width))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, tower: Tower, gelu: str, grad_checkpointing: bool):
        super().__init__()
        self.blocks = nn.ModuleList(Block(tower, gelu) for _ in range(tower.depth))
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x


class VisionTower(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.vision.width
        self.patch_size = cfg.patch_size
        self.patch_embed = nn.Conv2d(3, w, cfg.patch_size, cfg.patch_size, bias=False)
        self.cls = nn.Parameter(torch.zeros(w))
        self.transformer = Transformer(cfg.vision, "none", cfg.grad_checkpointing)
        self.norm = nn.LayerNorm(w, eps=LN_EPS)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)

    def positions(self, grid_h: int, grid_w: int) -> Tensor:
        """(1 + grid_h * grid_w, width) table for this resolution, zero row for CLS first."""
        table = sincos_2d(grid_h, grid_w, self.cls.numel())
        return torch.cat([table.new_zeros(1, table.shape[1]), table])

    def tokens(self, images: Tensor) -> Tensor:
        """Last-block states (B, 1 + patches, width), CLS first."""
        x = self.patch_embed(images)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.positions(grid_h, grid_w).to(x.device, x.dtype)
        return self.transformer(x)

    def pool(self, tokens: Tensor) -> Tensor:
        return self.proj(self.norm(tokens[:, 1:].mean(dim=1)))

    def forward(self, images: Tensor) -> Tensor:
        return self.pool(self.tokens(images))


class TextTower(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.text.width
        self.token_embed = nn.Embedding(cfg.vocab_size, w)
        self.positions = nn.Parameter(torch.zeros(cfg.context_length, w))
        self.transformer = Transformer(cfg.text, "tanh", cfg.grad_checkpointing)
        self.norm = nn.LayerNorm(w, eps=LN_EPS)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (features from the last token, normalised token states)."""
        x = self.token_embed(ids) + self.positions[: ids.shape[1]]
        states = self.norm(self.transformer(x))
        return self.proj(states[:, -1]), states


class CaptionDecoder(nn.Module):
    """Prefix-conditioned decoder: outputs at the caption queries -> LayerNorm -> vocabulary."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.text.width
        self.token_embed = nn.Embedding(cfg.vocab_size, w)
        self.queries = nn.Parameter(torch.zeros(cfg.caption_length, w))
        self.transformer = Transformer(cfg.text, "tanh", cfg.grad_checkpointing)
        self.norm = nn.LayerNorm(w, eps=LN_EPS)
        self.head = nn.Linear(w, cfg.vocab_size)

    def forward(self, prefix: Tensor, prefix_valid: Tensor, previous: Tensor) -> Tensor:
        """prefix (B, P, w), prefix_valid (B, P) bool, previous tokens (B, L) -> logits (B, L, vocab)."""
        p, n = prefix.shape[1], previous.shape[1]
        queries = self.queries[:n] + self.token_embed(previous)
        x = torch.cat([prefix, queries], dim=1)
        self_mask = torch.ones(p + n, p + n, dtype=torch.bool, device=x.device).tril()
        self_mask[:, :p] = True  # every row sees the whole prefix ...
        self_mask[:p, p:] = False  # ... and the prefix never sees the queries
        key_valid = torch.cat([prefix_valid, prefix_valid.new_ones(prefix.shape[0], n)], dim=1)
        mask = self_mask[None, None] & key_valid[:, None, None, :]
        return self.head(self.norm(self.transformer(x, mask)[:, p:]))


class CLIPS(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg)
        self.image_prefix = nn.Sequential(nn.LayerNorm(cfg.vision.width, eps=LN_EPS),
                                          nn.Linear(cfg.vision.width, cfg.text.width))
        self.decoder = CaptionDecoder(cfg)
        if cfg.has_text_tower:
            self.text = TextTower(cfg)
            self.text_prefix = nn.Linear(cfg.text.width, cfg.text.width)
            sigmoid = cfg.loss == "sigmoid"
            # SigLIP starts at scale 10 and bias -10; softmax InfoNCE at 1/0.07 with no bias.
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0 if sigmoid else 1 / 0.07)))
            self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if sigmoid else None
        else:
            self.text = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """big_vision-style: xavier linears, lecun patch conv, embeddings and positions at 1/sqrt(width)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=m.embedding_dim ** -0.5)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.decoder.queries, std=self.cfg.text.width ** -0.5)
        if self.text is not None:
            nn.init.normal_(self.text.positions, std=self.cfg.text.width ** -0.5)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.vision(images)

    def encode_text(self, ids: Tensor) -> Tensor:
        return self.text(ids)[0]

    def keep_random_tokens(self, tokens: Tensor) -> Tensor:
        """Keep a random `keep_ratio` share of each image's tokens (order preserved)."""
        b, n, _ = tokens.shape
        keep = max(1, round(n * self.cfg.keep_ratio))
        idx = torch.rand(b, n, device=tokens.device).argsort(dim=1)[:, :keep].sort(dim=1).values
        return tokens.gather(1, idx[..., None].expand(-1, -1, tokens.shape[-1]))

    def forward(self, images: Tensor, texts: Tensor | None, captions: Tensor) -> dict[str, Tensor]:
        """images (B,3,H,W); texts (2B, T): web captions then sub-captions; captions (B, L+1).

        Returns image/text features, caption logits (B, L, vocab) for captions[:, 1:], and the
        logit scale/bias.
        """
        tokens = self.vision.tokens(images)
        patches = self.image_prefix(tokens[:, 1:])
        out: dict[str, Tensor] = {}
        if self.text is None:
            prefix = self.keep_random_tokens(patches)
            valid = all_valid(prefix)
        else:
            b = images.shape[0]
            out["image"] = self.vision.pool(tokens)
            out["text"], states = self.text(texts)
            prefix = torch.cat([patches, self.text_prefix(states[:b])], dim=1)
            valid = torch.cat([all_valid(patches), texts[:b] != self.cfg.pad_id], dim=1)
            out["logit_scale"] = self.logit_scale
            if self.logit_bias is not None:
                out["logit_bias"] = self.logit_bias
        out["caption_logits"] = self.decoder(prefix, valid, captions[:, :-1])
        return out


def all_valid(tokens: Tensor) -> Tensor:
    return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


def build_model(cfg: ModelConfig) -> CLIPS:
    return CLIPS(cfg)


def vision_parameter_count(model: CLIPS, image_size: int) -> int:
    """Vision-tower parameters as open_clip counts them (its position table is a parameter)."""
    grid = image_size // model.cfg.patch_size
    return sum(p.numel() for p in model.vision.parameters()) + (grid * grid + 1) * model.cfg.vision.width
