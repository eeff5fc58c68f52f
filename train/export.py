"""Export a training checkpoint as an open_clip model folder, or its vision tower as a timm folder.

open_clip (objective clips): the folder holds `open_clip_config.json`, `open_clip_pytorch_model.bin`
and the tokenizer (Hugging Face files), and loads with no code of ours:

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR")
    tokenizer = open_clip.get_tokenizer("local-dir:DIR")

How our model maps onto open_clip's CLIP (3.3.0):
- vision: `no_ln_pre`, `pool_type: avg`, `final_ln_after_pool`, LayerNorm eps 1e-6, exact GELU,
  bias-free patch conv and projection. Our sin-cos position table has no resolution of its own;
  open_clip stores a table for one resolution, so the export writes ours for `image_size` (the
  training resolution unless told otherwise) into its `positional_embedding` (type
  'learnable': the values are exact, but open_clip would train them if fine-tuned, and at
  another resolution it interpolates them instead of recomputing sin-cos).
- text: `no_causal_mask`, `pool_type: last`, tanh GELU, no pad mask (ours has none either),
  tokenizer_mode 'clips' (open_clip's [BOS] .. [EOS] [PAD].. [CLS] layout, the same as ours).
- the caption decoder is not part of a CLIP model and is left out.

timm (any objective; the only export for OpenVision 2, which has no text tower): `config.json`
and `model.safetensors` of a timm `VisionTransformer` (class token, `global_pool='avg'`,
`fc_norm`, no pre-norm, GELU, LayerNorm eps 1e-6), loadable with no code of ours:

    model = timm.create_model("local-dir:DIR", pretrained=True)
    model.forward_features(x)      # (B, 1 + patches, width): the last block's states, CLS first
    model(x)                       # pooled features (clips: projected to the joint embedding)

Our block names already are timm's except `attn.out` (timm `attn.proj`); the bias-free patch
conv and projection get zero biases; the sin-cos table is stored for one resolution, as above.
OpenVision 2 trains no pooled head, so its export has none (`num_classes=0`, no final norm):
`model(x)` is the mean of the patch tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from train import checkpoint
from train.data import IMAGENET_MEAN, IMAGENET_STD
from train.model import CLIPS, LN_EPS, ModelConfig, Tower, build_model, config_from_dict
from train.tokenizer import CaptionTokenizer

WEIGHTS_FILE = "open_clip_pytorch_model.bin"
CONFIG_FILE = "open_clip_config.json"
TIMM_WEIGHTS_FILE, TIMM_CONFIG_FILE = "model.safetensors", "config.json"
FORMATS = ("open_clip", "timm")
# Our block parameter names -> open_clip's ResidualAttentionBlock names.
BLOCK_RENAMES = (("blocks.", "resblocks."), ("norm1.", "ln_1."), ("norm2.", "ln_2."),
                 ("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"),
                 ("attn.out.", "attn.out_proj."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))


def mlp_ratio(tower: Tower) -> float:
    """A ratio for which open_clip's int(width * ratio) gives back exactly `tower.mlp`."""
    ratio = tower.mlp / tower.width
    return ratio if int(tower.width * ratio) == tower.mlp else (tower.mlp + 0.25) / tower.width


def open_clip_config(cfg: ModelConfig, image_size: int, tokenizer: CaptionTokenizer, tokenizer_name: str) -> dict:
    norm = {"eps": LN_EPS}
    model_cfg = {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": image_size, "patch_size": cfg.patch_size, "width": cfg.vision.width,
            "layers": cfg.vision.depth, "head_width": cfg.vision.width // cfg.vision.heads,
            "mlp_ratio": mlp_ratio(cfg.vision), "no_ln_pre": True, "pool_type": "avg",
            "final_ln_after_pool": True, "pos_embed_type": "learnable", "norm_kwargs": norm,
        },
        "text_cfg": {
            "context_length": cfg.context_length, "vocab_size": cfg.vocab_size, "width": cfg.text.width,
            "heads": cfg.text.heads, "layers": cfg.text.depth, "mlp_ratio": mlp_ratio(cfg.text),
            "hf_tokenizer_name": tokenizer_name, "tokenizer_mode": "clips", "no_causal_mask": True,
            "pool_type": "last", "pad_id": tokenizer.pad_id, "eos_id": tokenizer.eos_id,
            "act_kwargs": {"approximate": "tanh"}, "norm_kwargs": norm,
        },
    }
    if cfg.loss == "sigmoid":
        model_cfg["init_logit_bias"] = -10.0
    preprocess = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                  "interpolation": "bilinear", "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def rename_blocks(state: dict[str, Tensor], src: str, dst: str) -> dict[str, Tensor]:
    out = {}
    for name, value in state.items():
        if name.startswith(src):
            new = name[len(src):]
            for old, replacement in BLOCK_RENAMES:
                new = new.replace(old, replacement)
            out[dst + new] = value
    return out


def open_clip_state_dict(model: CLIPS, image_size: int) -> dict[str, Tensor]:
    """Our vision and text towers under open_clip CLIP's parameter names."""
    s = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    grid = image_size // model.cfg.patch_size
    out = {
        "visual.conv1.weight": s["vision.patch_embed.weight"],
        "visual.class_embedding": s["vision.cls"],
        "visual.positional_embedding": model.vision.positions(grid, grid).cpu(),
        "visual.ln_post.weight": s["vision.norm.weight"], "visual.ln_post.bias": s["vision.norm.bias"],
        "visual.proj": s["vision.proj.weight"].T.contiguous(),
        "token_embedding.weight": s["text.token_embed.weight"],
        "positional_embedding": s["text.positions"],
        "ln_final.weight": s["text.norm.weight"], "ln_final.bias": s["text.norm.bias"],
        "text_projection": s["text.proj.weight"].T.contiguous(),
        "logit_scale": s["logit_scale"],
    }
    if "logit_bias" in s:
        out["logit_bias"] = s["logit_bias"]
    out.update(rename_blocks(s, "vision.transformer.", "visual.transformer."))
    out.update(rename_blocks(s, "text.transformer.", "transformer."))
    return out


def load_model(ckpt: str | Path) -> tuple[CLIPS, dict]:
    """The checkpoint's model (on the CPU) and the rest of its state."""
    state = checkpoint.load(ckpt)
    model = build_model(config_from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    return model, state


def export(ckpt: str | Path, out_dir: str | Path, image_size: int | None = None,
           tokenizer_name: str | None = None) -> Path:
    """Write the open_clip folder; `tokenizer_name` is the Hub id recorded for hf-hub: loading."""
    model, state = load_model(ckpt)
    cfg = model.cfg
    if not cfg.has_text_tower:
        raise ValueError(f"{ckpt}: an openvision2 model has no text tower for open_clip's CLIP; export it as timm")
    size = image_size or state["train_config"]["image_size"]
    tokenizer = CaptionTokenizer.from_files(state["tokenizer"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(open_clip_state_dict(model, size), out / WEIGHTS_FILE)
    tokenizer.save(out)
    config = open_clip_config(cfg, size, tokenizer, tokenizer_name or out.name)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def timm_config(cfg: ModelConfig, image_size: int) -> dict:
    head = cfg.has_text_tower  # only the contrastive objective trains the pooled LayerNorm + projection
    model_args = {"img_size": image_size, "patch_size": cfg.patch_size, "embed_dim": cfg.vision.width,
                  "depth": cfg.vision.depth, "num_heads": cfg.vision.heads, "mlp_ratio": mlp_ratio(cfg.vision),
                  "class_token": True, "global_pool": "avg", "fc_norm": True, "final_norm": head,
                  "pre_norm": False, "num_classes": cfg.embed_dim if head else 0}
    pretrained = {"input_size": [3, image_size, image_size], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                  "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
                  "num_classes": model_args["num_classes"]}
    return {"architecture": "vit_base_patch16_224", "num_classes": model_args["num_classes"],
            "num_features": cfg.vision.width, "model_args": model_args, "pretrained_cfg": pretrained}


def timm_state_dict(model: CLIPS, image_size: int) -> dict[str, Tensor]:
    """Our vision tower under timm VisionTransformer's parameter names."""
    s = {k.removeprefix("vision."): v.detach().cpu().contiguous() for k, v in model.state_dict().items()
         if k.startswith("vision.")}
    width, grid = model.cfg.vision.width, image_size // model.cfg.patch_size
    out = {"patch_embed.proj.weight": s["patch_embed.weight"], "patch_embed.proj.bias": torch.zeros(width),
           "cls_token": s["cls"].view(1, 1, width), "pos_embed": model.vision.positions(grid, grid)[None].cpu()}
    for name, value in s.items():
        if name.startswith("transformer.blocks."):
            out[name.removeprefix("transformer.").replace(".attn.out.", ".attn.proj.")] = value
    if model.vision.proj is not None:
        out.update({"fc_norm.weight": s["norm.weight"], "fc_norm.bias": s["norm.bias"],
                    "head.weight": s["proj.weight"], "head.bias": torch.zeros(model.cfg.embed_dim)})
    return out


def export_timm(ckpt: str | Path, out_dir: str | Path, image_size: int | None = None) -> Path:
    """Write the vision tower as a timm folder (`timm.create_model('local-dir:DIR', pretrained=True)`)."""
    model, state = load_model(ckpt)
    size = image_size or state["train_config"]["image_size"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(timm_state_dict(model, size), str(out / TIMM_WEIGHTS_FILE))
    (out / TIMM_CONFIG_FILE).write_text(json.dumps(timm_config(model.cfg, size), indent=2) + "\n")
    return out
