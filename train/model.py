"""CLIPS / OpenVision models: one size table, one config, one factory.

A model is named like "B/16": the size picks the towers from `SIZES`, the number is the patch
size. `build_model(model_config("B/16"))` returns a `CLIPS` module. Both objectives follow the
reference code (UCSC-VLAA/OpenVision, `src/models`):

- vision tower (`vit.py`): patch conv (no bias) + CLS + fixed 2-D sin-cos positions (zero row
  for CLS), pre-norm blocks with exact GELU, no LayerNorm before the blocks; pooled by averaging
  the patch tokens -> LayerNorm -> linear (no bias). OpenVision 2 trains no pooled head, so it
  is not built there.
- "clips" (OpenVision 1, arXiv:2505.04601; CLIPS, arXiv:2411.16828), `two_towers.py` +
  `text_decoder.py` with fusion "concat": a bidirectional text tower (learnable positions,
  tanh GELU, pooled at the appended [CLS] -> LayerNorm -> linear without bias) for the
  contrastive loss, and a caption decoder whose input is [image patch tokens; web-caption token
  states; learnable queries]. Patch tokens are the last block's states without CLS, the caption
  states are the text tower's last block before its final LayerNorm without the [CLS] position;
  each goes through a bias-free linear. The prefix attends within itself, the queries see the
  prefix and are causal among themselves, and the queries never see the recaption tokens they
  predict (teacher forcing is an option, off by default, not the reference).
- "openvision2" (arXiv:2509.01644), `openvision2_model.py` + `text_decoder_v2.py`: no text
  tower; a random `keep_ratio` share of the patch tokens (bias-free linear) followed by the
  embedded caption tokens, under one causal mask; no position embedding in the decoder.

Decoders end in LayerNorm -> linear to the vocabulary without bias; that head is applied by
`train.losses.vocab_nll` in fp32 and in chunks. All LayerNorms use eps 1e-6.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from train.losses import vocab_nll

LN_EPS = 1e-6


@dataclass(frozen=True)
class Tower:
    width: int
    depth: int
    mlp: int
    heads: int


# size -> (vision tower, text tower and caption decoder): `decode_variant` of the reference's
# vit.py, text_transformer.py and text_decoder.py (after Table 2 of arXiv:2106.04560).
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
    caption_length: int = 128  # decoder tokens: [BOS] recaption [EOS] [PAD]..; predicts the last 127
    keep_ratio: float = 0.35  # openvision2: share of patch tokens the decoder sees (configs/openvision2.py)
    teacher_forcing: bool = False  # clips: add the previous caption token to each query (not the reference)
    pad_id: int = 0
    grad_checkpointing: bool = False
    head_chunk: int = 4096  # target tokens per chunk of the fp32 vocabulary head

    @property
    def embed_dim(self) -> int:
        return self.text.width

    @property
    def has_text_tower(self) -> bool:
        return self.objective == "clips"

    def kept_tokens(self, patches: int) -> int:
        """Patch tokens the openvision2 decoder sees (the reference's int(N * keep_ratio))."""
        return max(1, int(patches * self.keep_ratio))


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

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """`mask`: bool, broadcastable to (B, heads, T, T), True where a query may attend."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
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

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        x = x + self.attn(self.norm1(x), mask, causal)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, tower: Tower, gelu: str, grad_checkpointing: bool):
        super().__init__()
        self.blocks = nn.ModuleList(Block(tower, gelu) for _ in range(tower.depth))
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False, blocks: int | None = None) -> Tensor:
        """Run the first `blocks` blocks (all by default)."""
        for block in self.blocks[:blocks]:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, mask, causal, use_reentrant=False)
            else:
                x = block(x, mask, causal)
        return x


class VisionTower(nn.Module):
    """ViT. `tokens(images, layer)` is the API for other harnesses (e.g. an MLLM's visual features)."""

    def __init__(self, cfg: ModelConfig, pooled_head: bool = True):
        super().__init__()
        w = cfg.vision.width
        self.patch_size = cfg.patch_size
        self.patch_embed = nn.Conv2d(3, w, cfg.patch_size, cfg.patch_size, bias=False)
        self.cls = nn.Parameter(torch.zeros(w))
        self.transformer = Transformer(cfg.vision, "none", cfg.grad_checkpointing)
        self.norm = nn.LayerNorm(w, eps=LN_EPS) if pooled_head else None
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False) if pooled_head else None

    def positions(self, grid_h: int, grid_w: int) -> Tensor:
        """(1 + grid_h * grid_w, width) table for this resolution, zero row for CLS first."""
        table = sincos_2d(grid_h, grid_w, self.cls.numel())
        return torch.cat([table.new_zeros(1, table.shape[1]), table])

    def tokens(self, images: Tensor, layer: int = -1) -> Tensor:
        """States (B, 1 + patches, width) after block `layer` (-1: the last, -2: the one before), CLS first.

        Normalised images in (B, 3, H, W) with H, W multiples of the patch size; no final norm.
        LLaVA-style harnesses take `tokens(images, layer=-2)[:, 1:]`.
        """
        depth = len(self.transformer.blocks)
        if not -depth <= layer < depth:
            raise ValueError(f"layer {layer} outside a tower of {depth} blocks")
        return self.hidden(images, blocks=layer % depth + 1)

    def hidden(self, images: Tensor, blocks: int) -> Tensor:
        """States (B, 1 + patches, width) after the first `blocks` blocks (0: the embeddings), CLS first:
        Hugging Face's `hidden_states[blocks]`."""
        x = self.patch_embed(images)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = x + self.positions(grid_h, grid_w).to(x.device, x.dtype)
        return self.transformer(x, blocks=blocks) if blocks else x

    def pool(self, tokens: Tensor) -> Tensor:
        """Mean of the patch tokens (-> LayerNorm -> projection where the tower has a pooled head)."""
        pooled = tokens[:, 1:].mean(dim=1)
        return pooled if self.proj is None else self.proj(self.norm(pooled))

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
        """Returns (features from the last token, last-block states before the final LayerNorm)."""
        states = self.transformer(self.token_embed(ids) + self.positions[: ids.shape[1]])
        return self.proj(self.norm(states[:, -1])), states


class DecoderHead(nn.Module):
    """Final LayerNorm and the bias-free vocabulary head, applied to the target positions only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.text.width, eps=LN_EPS)
        self.head = nn.Linear(cfg.text.width, cfg.vocab_size, bias=False)
        self.pad_id, self.chunk = cfg.pad_id, cfg.head_chunk

    def forward(self, hidden: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """hidden (B, L, w) predicting targets (B, L) -> summed NLL, correct and counted tokens."""
        keep = targets != self.pad_id
        nll, correct = vocab_nll(self.norm(hidden[keep]), self.head.weight, targets[keep], self.chunk)
        return {"caption_nll": nll, "caption_correct": correct, "caption_tokens": keep.sum()}


class QueryDecoder(nn.Module):
    """OpenVision 1 caption decoder: [image patches; web-caption states] prefix, then learnable queries."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.text.width
        self.image_proj = nn.Linear(cfg.vision.width, w, bias=False)
        self.text_proj = nn.Linear(cfg.text.width, w, bias=False)
        self.queries = nn.Parameter(torch.zeros(cfg.caption_length, w))
        self.token_embed = nn.Embedding(cfg.vocab_size, w) if cfg.teacher_forcing else None
        self.transformer = Transformer(cfg.text, "tanh", cfg.grad_checkpointing)
        self.out = DecoderHead(cfg)

    def forward(self, patches: Tensor, text_states: Tensor, captions: Tensor) -> dict[str, Tensor]:
        """patches (B, P, vision width), text_states (B, T, text width), captions (B, L) -> loss sums.

        Query i predicts caption token i + 1, so L - 1 queries run.
        """
        prefix = torch.cat([self.image_proj(patches), self.text_proj(text_states)], dim=1)
        n = captions.shape[1] - 1
        queries = self.queries[:n].expand(prefix.shape[0], -1, -1)
        if self.token_embed is not None:
            queries = queries + self.token_embed(captions[:, :-1])
        p = prefix.shape[1]
        mask = torch.ones(p + n, p + n, dtype=torch.bool, device=prefix.device).tril()
        mask[:, :p] = True  # every position sees the whole prefix ...
        mask[:p, p:] = False  # ... and the prefix never sees the queries
        hidden = self.transformer(torch.cat([prefix, queries], dim=1), mask)[:, p:]
        return self.out(hidden, captions[:, 1:])


class CausalDecoder(nn.Module):
    """OpenVision 2 caption decoder: one causal mask over [kept image patches; caption tokens]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w = cfg.text.width
        self.image_proj = nn.Linear(cfg.vision.width, w, bias=False)
        self.token_embed = nn.Embedding(cfg.vocab_size, w)
        self.transformer = Transformer(cfg.text, "tanh", cfg.grad_checkpointing)
        self.out = DecoderHead(cfg)

    def forward(self, patches: Tensor, captions: Tensor) -> dict[str, Tensor]:
        """patches (B, K, vision width), captions (B, L): input tokens 0..L-2 predict tokens 1..L-1."""
        x = torch.cat([self.image_proj(patches), self.token_embed(captions[:, :-1])], dim=1)
        hidden = self.transformer(x, causal=True)[:, patches.shape[1]:]
        return self.out(hidden, captions[:, 1:])


def random_keep(batch: int, patches: int, kept: int, device: torch.device | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """(batch, kept) patch indices drawn without replacement, in random order (as jax.random.choice)."""
    return torch.rand(batch, patches, device=device, generator=generator).argsort(dim=1)[:, :kept]


class CLIPS(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg, pooled_head=cfg.has_text_tower)
        if cfg.has_text_tower:
            self.text = TextTower(cfg)
            self.decoder: nn.Module = QueryDecoder(cfg)
            sigmoid = cfg.loss == "sigmoid"
            # SigLIP starts at scale 10 and bias -10; softmax InfoNCE at 1/0.07 with no bias.
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0 if sigmoid else 1 / 0.07)))
            self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if sigmoid else None
        else:
            self.text = None
            self.decoder = CausalDecoder(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Towers big_vision-style (xavier linears, lecun patch conv, embeddings at 1/sqrt(width));
        decoder inputs and head as the reference's text_decoder*.py (normal, std 1/sqrt(fan-in);
        queries std 1; caption embedding std 0.02)."""
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
        decoder = self.decoder
        for proj in (decoder.image_proj, getattr(decoder, "text_proj", None), decoder.out.head):
            if proj is not None:
                nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
        if isinstance(decoder, QueryDecoder):
            nn.init.normal_(decoder.queries, std=1.0)
        else:
            nn.init.normal_(decoder.token_embed.weight, std=0.02)
        if self.text is not None:
            nn.init.normal_(self.text.positions, std=self.cfg.text.width ** -0.5)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.vision(images)

    def encode_text(self, ids: Tensor) -> Tensor:
        return self.text(ids)[0]

    def forward(self, images: Tensor, captions: Tensor, texts: Tensor | None = None,
                keep: Tensor | None = None) -> dict[str, Tensor]:
        """images (B,3,H,W) normalised; captions (B, L) decoder tokens; clips: texts (2B, T), web
        captions then sub-captions; openvision2: keep (B, K) patch indices (random if not given).

        Returns the caption loss sums (`caption_nll`, `caption_correct`, `caption_tokens`) and for
        clips the image/text features and the logit scale (and bias).
        """
        patches = self.vision.tokens(images)
        if self.text is None:
            patch_tokens = patches[:, 1:]
            if keep is None:
                b, n = patch_tokens.shape[:2]
                keep = random_keep(b, n, self.cfg.kept_tokens(n), images.device)
            kept = patch_tokens.gather(1, keep[..., None].expand(-1, -1, patch_tokens.shape[-1]))
            return self.decoder(kept, captions)
        b = images.shape[0]
        text_features, states = self.text(texts)
        out = self.decoder(patches[:, 1:], states[:b, :-1], captions)
        out.update(image=self.vision.pool(patches), text=text_features, logit_scale=self.logit_scale)
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def build_model(cfg: ModelConfig) -> CLIPS:
    return CLIPS(cfg)
